import csv
import io
import json

import pytest

from samat.config import validate_run
from samat.grid import RunSpec, run_id
from samat.report import render, summarize
from samat.store import prepare, write_json
from tests.conftest import set_state


def add_run(root, method, seed, natural=None, robust=None, state=None):
    config = validate_run({"method": method, "seed": seed})
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "label-" + method["name"], root / "runs" / rid))
    if natural is not None:
        write_json(
            run.file("result.json"),
            {
                "run_id": rid,
                "natural": natural,
                "robust": robust,
                "average_robust": sum(robust.values()) / len(robust),
                "train_seconds": 1.5,
                "eval_seconds": 0.5,
            },
        )
    if state:
        set_state(run, state=state, error="boom" if state == "failed" else None)
    return run


@pytest.fixture
def results(tmp_path):
    add_run(tmp_path, {"name": "standard"}, 0, 0.90, {"PGD": 0.30, "FGSM": 0.50})
    add_run(tmp_path, {"name": "standard"}, 1, 0.92, {"PGD": 0.34, "FGSM": 0.54})
    add_run(tmp_path, {"name": "sam", "rho": 0.1}, 0, 0.93, {"PGD": 0.40, "FGSM": 0.60})
    add_run(tmp_path, {"name": "sam", "rho": 0.1}, 1, state="running")
    add_run(tmp_path, {"name": "pgd_at"}, 0, state="failed")
    return tmp_path


def test_summarize_mean_and_sample_std():
    mean, std = summarize([0.90, 0.92])
    assert mean == pytest.approx(91.0) and std == pytest.approx(1.41421356, rel=1e-6)
    assert summarize([0.5]) == (50.0, 0.0)
    assert summarize([]) is None


def test_json_rows_group_seeds(results):
    rows = {r["method"]: r for r in json.loads(render(results, "json"))}
    assert set(rows) == {"label-standard", "label-sam", "label-pgd_at"}
    std = rows["label-standard"]
    assert std["Natural"]["mean"] == pytest.approx(91.0)
    assert std["PGD"]["mean"] == pytest.approx(32.0)
    assert std["Average"]["mean"] == pytest.approx((40 + 44) / 2)
    assert std["done"] == 2
    assert rows["label-sam"]["states"] == {"done": 1, "running": 1}
    assert rows["label-pgd_at"]["Natural"] is None and rows["label-pgd_at"]["states"] == {
        "failed": 1
    }


def test_per_run_json_has_the_documented_fields(results):
    runs = json.loads(render(results, "json", per_run_json=True))
    assert len(runs) == 5
    keys = {
        "run_id",
        "state",
        "seed",
        "config",
        "natural",
        "robust",
        "average_robust",
        "train_seconds",
        "eval_seconds",
    }
    assert all(keys <= set(r) for r in runs)
    done = [r for r in runs if r["state"] == "done"]
    assert len(done) == 3 and all(0 <= r["natural"] <= 1 for r in done)
    assert {r["state"] for r in runs} == {"done", "running", "failed"}
    assert all(r["config"]["seed"] == r["seed"] for r in runs)


def test_csv_markdown_latex(results):
    table = list(csv.reader(io.StringIO(render(results, "csv"))))
    assert table[0][:3] == ["method", "Natural mean", "Natural std"]
    standard = next(row for row in table if row[0] == "label-standard")
    assert standard[1] == "91.00" and standard[2] == "1.41"
    markdown = render(results, "markdown")
    assert "| label-standard | 91.0 ± 1.4 |" in markdown
    assert "| label-pgd_at | - |" in markdown
    assert r"91.0 $\pm$ 1.4" in render(results, "latex")


def test_table_shows_pending_and_failed(results):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render(results, "table"))
    text = console.export_text()
    assert "1 failed" in text and "1 running" in text and "3/5 runs done" in text


def test_plot_writes_png(results, tmp_path):
    from samat.report import plot

    out = plot(results, tmp_path / "p.png", "PGD")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
