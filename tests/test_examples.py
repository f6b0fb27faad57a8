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
