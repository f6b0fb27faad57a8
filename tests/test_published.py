"""The published tables (samat/published.yaml) and the paper grids (configs/paper/*.yaml)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from samat import attacks
from samat.cli import cli
from samat.config import ConfigError, load_grid, validate_run
from samat.grid import expand
from samat.published import table, tables

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
MAIN = [
    "FGSM linf 1/255",
    "PGD-10 linf 1/255",
    "PGD-10 l2 32/255",
    "AA l2 32/255",
    "StAdv",
    "FAB-10 l2 32/255",
    "Pixle-5",
]
# rows per table and runs per grid (3 seeds each)
ROWS = {
    "table1": 12,
    "table2": 8,
    "table3": 8,
    "table4": 12,
    "table5": 17,
    "table6": 9,
    "table7": 5,
    "segmentation_stanford": 3,
    "segmentation_voc": 3,
    "text_rotten_tomatoes": 2,
}


def config(method, data="cifar10", model="preact_resnet18", optimizer="sgd"):
    return validate_run(
        {
            "data": {"name": data, "root": "/nowhere"},
            "model": {"name": model},
            "train": {"optimizer": {"name": optimizer}},
            "method": method,
        }
    ).model_dump(mode="json")


def test_every_table_with_its_rows_and_columns():
    assert {name: len(t.rows) for name, t in tables().items()} == ROWS
    assert table("table2").columns == ["Natural", *MAIN, "Average"]
    assert table("table3").columns == ["Natural", *MAIN, "Average"]
    assert table("table2").average_of == MAIN == table("table3").average_of
    pgd = ["PGD-10 linf 1/255", "PGD-10 linf 2/255", "PGD-10 l2 16/255", "PGD-10 l2 32/255"]
    assert table("table1").columns == ["Natural", *pgd]
    assert table("table4").columns == ["Natural", "AA l2 32/255", "Pixle-5"]
    for name in ("table5", "table7"):
        assert table(name).columns == ["Natural", "AA l2 32/255", "StAdv"]
    assert table("table6").columns == ["Natural", "AA linf 1/255", "StAdv"]
    for t in tables().values():
        assert all(list(row.values) == t.columns for row in t.rows)


def test_spot_values():
    # one cell per table, far from the others, as PAPER.md prints them
    def cell(name, label, column):
        return next(r for r in table(name).rows if r.label == label).values[column]

    assert cell("table1", "AT l2 128/255", "PGD-10 l2 32/255") == 60.4
    assert cell("table1", "ST", "PGD-10 linf 2/255") == 1.7
    assert cell("table2", "AT l2 128/255", "Pixle-5") == 32.0
    assert cell("table2", "Adam", "FAB-10 l2 32/255") == 24.7
    assert cell("table3", "SAM rho=0.3", "StAdv") == 26.4
    assert cell("table4", "AT l2 64/255", "Pixle-5") == 8.2
    assert cell("table5", "ASAM rho=0.5", "AA l2 32/255") == 44.2
    assert cell("table5", "ESAM rho=0.3", "StAdv") == 48.2
    assert cell("table6", "DeiT AT", "StAdv") == 54.2
    assert cell("table6", "WRN-28-10 SGD", "AA linf 1/255") == 39.6
    assert cell("table7", "AT l2 128/255", "AA l2 32/255") == 32.8


def test_published_average_is_the_mean_of_its_seven_columns():
    for name in ("table2", "table3"):
        for row in table(name).rows:
            mean = statistics.fmean(row.values[c] for c in MAIN)
            # seven numbers rounded to 0.05 and the average rounded again
            assert abs(mean - row.values["Average"]) <= 0.06, (name, row.label)


def test_cells_the_tables_repeat_agree():
    def values(name):
        return {row.label: row.values for row in table(name).rows}

    t2, t3, t4, t5, t6 = (values(f"table{n}") for n in (2, 3, 4, 5, 6))
    mismatches = []
    for label in ("SGD", "Adam", "SAM rho=0.1", "SAM rho=0.2", "SAM rho=0.3", "SAM rho=0.4"):
        for column in ("Natural", "AA l2 32/255", "StAdv"):
            if t5[label][column] != t2[label][column]:
                mismatches.append(("table5", label, column, t5[label][column]))
    for label in ("SGD", "Adam", "SAM rho=0.4", "AT linf 8/255", "AT l2 128/255"):
        for column in ("Natural", "AA l2 32/255", "Pixle-5"):
            if t4[label][column] != t3[label][column]:
                mismatches.append(("table4", label, column, t4[label][column]))
    for ours, theirs in (("SGD", "SGD"), ("SAM", "SAM rho=0.1"), ("AT", "AT linf 8/255")):
        for column in ("Natural", "StAdv"):
            if t6[f"PRN-18 {ours}"][column] != t2[theirs][column]:
                mismatches.append(("table6", ours, column, t6[f"PRN-18 {ours}"][column]))
    # the one the paper itself prints differently (published.yaml notes it)
    assert mismatches == [("table5", "SAM rho=0.3", "AA l2 32/255", 57.8)]
    assert any("57.8" in note for note in table("table5").notes)


def test_rows_match_by_data_model_method_and_hyperparameters():
    t2 = table("table2")

    def found(name, cfg):
        row = table(name).find(cfg)
        return None if row is None else row.label

    assert found("table2", config({"name": "standard"})) == "SGD"
    assert found("table2", config({"name": "standard"}, optimizer="adam")) == "Adam"
    assert found("table2", config({"name": "sam", "rho": 0.1})) == "SAM rho=0.1"
    assert found("table2", config({"name": "sam", "rho": 0.1}, optimizer="adam")) is None
    assert found("table2", config({"name": "sam", "rho": 0.5})) is None
    assert found("table2", config({"name": "asam", "rho": 0.1})) is None
    l2 = {"name": "pgd_at", "norm": "l2", "eps": "128/255"}
    assert found("table2", config(l2)) == "AT l2 128/255"
    assert found("table2", config({**l2, "norm": "linf"})) is None
    assert found("table2", config({**l2, "name": "fgsm_at"})) is None
    assert found("table2", config({"name": "standard"}, data="cifar100")) is None
    assert found("table2", config({"name": "standard"}, model="wide_resnet28_10")) is None
    assert found("table3", config({"name": "standard"}, data="cifar100")) == "SGD"
    assert found("table4", config({**l2, "eps": "16/255"}, data="cifar100")) == "AT l2 16/255"
    assert found("table5", config({"name": "esam", "rho": 0.3})) == "ESAM rho=0.3"
    assert found("table5", config({"name": "asam", "rho": 0.5})) == "ASAM rho=0.5"
    at = {"name": "pgd_at", "norm": "linf", "eps": 8 / 255}
    assert found("table6", config(at, model="wide_resnet28_10")) == "WRN-28-10 AT"
    assert found("table6", config({"name": "sam", "rho": 0.1}, model="deit_tiny")) == "DeiT SAM"
    assert found("table6", config(at)) == "PRN-18 AT"
    assert found("table7", config(at, data="tinyimagenet")) == "AT linf 8/255"
    assert t2.find(config({"name": "standard"}, data="digits", model="small_cnn")) is None


def test_unknown_table_names_the_known_ones():
    with pytest.raises(ConfigError) as error:
        table("table8")
    assert str(error.value) == (
        "unknown reference table 'table8'; choose one of segmentation_stanford, "
        "segmentation_voc, table1, table2, table3, table4, table5, table6, table7, "
        "text_rotten_tomatoes"
    )


# --- the paper grids ---------------------------------------------------------------------------


def specs(name):
    return expand(load_grid(PAPER / f"{name}.yaml"))


def test_plan_every_paper_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the grids' relative output directories: nothing there
    files = sorted(PAPER.glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(ROWS)
    for path in files:
        result = CliRunner().invoke(cli, ["plan", str(path)])
        assert result.exit_code == 0, (path.name, result.output)
        runs = 3 * ROWS[path.stem]
        assert re.search(rf"^{runs} runs -> results/", result.stdout, re.M), path.name
        # no data here: plan warns about data.root, submit would refuse
        assert "warning:" in result.stderr and re.search(r"data\.root /\S+ does not", result.stderr)
    assert list(tmp_path.iterdir()) == []  # plan writes nothing


def test_each_grid_runs_its_table_and_evaluates_its_columns():
    from samat import models, tasks

    assert set(tasks.model_names("image")) == set(models.names())
    for name, published in tables().items():
        rows = {}
        for spec in specs(name):
            cfg = spec.config
            assert cfg.model.name in tasks.model_names(cfg.task)
            labels = {attacks.label(s) for s in attacks.resolve(cfg.eval.attacks)}
            assert set(published.columns) - {"Natural", "Average"} <= labels, (name, spec.label)
            row = published.find(cfg.model_dump(mode="json"))
            assert row is not None, (name, spec.label)  # no run beyond the table
            rows.setdefault(row.label, set()).add(cfg.seed)
        # every row of the table, three seeds each
        assert rows == {row.label: {0, 1, 2} for row in published.rows}, name


def test_tables_2_5_6_and_1_3_4_share_their_runs():
    def ids(name, keep):
        return {s.run_id: s for s in specs(name) if keep(s.config)}

    def prn18(method, **fields):
        def keep(cfg):
            m = cfg.method
            return (
                cfg.model.name == "preact_resnet18"
                and m.name == method
                and cfg.train.optimizer.name == "sgd"
                and all(abs(getattr(m, k) - v) < 1e-12 for k, v in fields.items())
            )

        return keep

    sgd, sam = prn18("standard"), prn18("sam", rho=0.1)
    at = prn18("pgd_at", eps=8 / 255)
    for keep in (sgd, sam, at):
        t2, t6 = ids("table2", keep), ids("table6", keep)
        assert len(t2) == 3 and t2.keys() == t6.keys()
    for keep in (sgd, sam, prn18("sam", rho=0.4)):
        assert ids("table5", keep).keys() == ids("table2", keep).keys()
    for keep in (sgd, prn18("sam", rho=0.4), at):
        t3 = ids("table3", keep)
        assert (
            len(t3) == 3 and t3.keys() == ids("table1", keep).keys() == ids("table4", keep).keys()
        )
    # one output directory per data set, and the same evaluation request for a shared run
    for group in (("table2", "table5", "table6"), ("table1", "table3", "table4")):
        outputs = {load_grid(PAPER / f"{n}.yaml").output for n in group}
        assert len(outputs) == 1
        requests: dict[str, set[str]] = {}
        for n in group:
            for spec in specs(n):
                requests.setdefault(spec.run_id, set()).add(spec.config.eval.model_dump_json())
        assert all(len(r) == 1 for r in requests.values())
    # the shared runs have Table 2's labels whichever grid prepared them last
    labels = {s.run_id: s.label for s in specs("table2")}
    for name in ("table5", "table6"):
        for spec in specs(name):
            assert labels.get(spec.run_id, spec.label) == spec.label
