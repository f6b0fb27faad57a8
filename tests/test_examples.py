"""The example grids run end to end on a fresh clone, through the CLI, with nothing staged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from samat.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: Path) -> list[dict]:
    grid = yaml.safe_load((ROOT / "configs" / "examples" / name).read_text())
    grid["output"] = str(tmp_path / "out")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid))
    runner = CliRunner()
    submitted = runner.invoke(cli, ["submit", str(path), "--executor", "local"])
    assert submitted.exit_code == 0, submitted.output
    collected = runner.invoke(
        cli, ["collect", str(tmp_path / "out"), "--format", "json", "--per-run"]
    )
    assert collected.exit_code == 0, collected.output
    return json.loads(collected.output)


@pytest.mark.slow
def test_image_tiny_esam_looksam_deit_stadv_corruptions(tmp_path):
    rows = run_example("image_tiny.yaml", tmp_path)
    assert sorted(row["label"] for row in rows) == [
        "ESAM rho=0.05 (Adam)",
        "LookSAM rho=0.05 k=2 (Adam)",
    ]
    for row in rows:
        assert row["state"] == "done" and row["config"]["model"]["name"] == "deit_tiny"
        assert set(row["robust"]) == {"StAdv", "Corruptions", "PGD-3 linf 8/255"}
        assert all(0 <= value <= 1 for value in row["robust"].values())
    # the corruption record keeps the per-corruption, per-severity table
    records = list((tmp_path / "out" / "runs").glob("*/evals/*.json"))
    details = [json.loads(p.read_text()) for p in records]
    corruption = [d for d in details if d.get("label") == "Corruptions"]
    assert len(corruption) == 2
    table = corruption[0]["details"]["per_corruption"]
    assert len(table) == 15 and all(set(v) == {"1", "5"} for v in table.values())


def run_generated_example(name: str, tmp_path: Path) -> tuple[str, list[dict]]:
    """An example whose data samat generates, run through the CLI with its relative data paths
    moved under tmp_path (a test never writes the repo): collect's table (whitespace folded, as
    the title wraps on a narrow terminal) and its per-run JSON."""
    text = (ROOT / "configs" / "examples" / name).read_text()
    grid = yaml.safe_load(text.replace("data/generated/", f"{tmp_path}/generated/"))
    grid["output"] = str(tmp_path / "out")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    runner = CliRunner()
    submitted = runner.invoke(cli, ["submit", str(path), "--executor", "local"])
    assert submitted.exit_code == 0, submitted.output
    table = runner.invoke(cli, ["collect", str(tmp_path / "out")])
    assert table.exit_code == 0, table.output
    per_run = runner.invoke(
        cli, ["collect", str(tmp_path / "out"), "--format", "json", "--per-run"]
    )
    return " ".join(table.output.split()), json.loads(per_run.output)


@pytest.mark.slow
def test_segmentation_tiny_prints_its_miou_table(tmp_path):
    table, rows = run_generated_example("segmentation_tiny.yaml", tmp_path)
    # the data was generated in the real layout, then read back
    labels = tmp_path / "generated/stanford_tiny/iccv09Data/labels"
    assert len(list(labels.glob("*.regions.txt"))) == 60
    assert "3/3 runs done (mIoU %)" in table
    by_label = {row["label"]: row for row in rows}
    assert set(by_label) == {"SGD", "SAM rho=0.05", "PGD-AT linf eps=2/255"}
    for row in rows:
        assert row["state"] == "done"
        assert set(row["robust"]) == {"PGD-10 linf 1/255", "PGD-10 l2 1"}
        # it learns (8 classes: chance is far lower), and PGD does not raise the mIoU
        assert 0.4 < row["natural"] <= 1
        assert all(v <= row["natural"] + 1e-9 for v in row["robust"].values())


@pytest.mark.slow
def test_text_tiny_prints_accuracy_and_success_rates(tmp_path):
    table, rows = run_generated_example("text_tiny.yaml", tmp_path)
    # model, data and resources were generated in their real formats, then read back
    generated = tmp_path / "generated/text-tiny"
    assert (generated / "distilbert-tiny/config.json").is_file()
    assert (generated / "rotten_tomatoes/rt-polaritydata/rt-polarity.neg").is_file()
    assert "success rate %, lower is more robust" in table and "Average" not in table
    assert {row["label"] for row in rows} == {"AdamW", "SAM rho=0.05 (AdamW)"}
    for row in rows:
        assert row["state"] == "done" and set(row["robust"]) == {"PSO", "IGA"}
        assert row["natural"] > 0.8 and row["average_robust"] is None
        assert all(0 < rate < 1 for rate in row["robust"].values())
