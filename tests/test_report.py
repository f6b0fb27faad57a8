import csv
import io
import json
import math
import statistics
import subprocess
import sys

import pytest

from samat.config import load_grid, validate_run
from samat.grid import RunSpec, expand, method_label, run_id
from samat.report import render_table, render_text, summarize
from samat.store import prepare, write_json
from tests.conftest import finish, set_state


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
    rows = {r["method"]: r for r in json.loads(render_text(results, "json"))}
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
    runs = json.loads(render_text(results, "json", per_run_json=True))
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
    table = list(csv.reader(io.StringIO(render_text(results, "csv"))))
    assert table[0][:3] == ["method", "Natural mean", "Natural std"]
    standard = next(row for row in table if row[0] == "label-standard")
    assert standard[1] == "91.00" and standard[2] == "1.41"
    markdown = render_text(results, "markdown")
    assert "| label-standard | 91.0 ± 1.4 |" in markdown
    assert "| label-pgd_at | - |" in markdown
    assert r"91.0 $\pm$ 1.4" in render_text(results, "latex")


def test_table_shows_pending_and_failed(results):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(results))
    text = console.export_text()
    assert "1 failed" in text and "1 running" in text and "3/5 runs done" in text


def test_plot_writes_png(results, tmp_path):
    from samat.report import plot

    out = plot(results, tmp_path / "p.png", "PGD")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- published numbers, intervals, paired differences ----------------------------------------

TABLE2 = [
    "FGSM linf 1/255",
    "PGD-10 linf 1/255",
    "PGD-10 l2 32/255",
    "AA l2 32/255",
    "StAdv",
    "FAB-10 l2 32/255",
    "Pixle-5",
]


def add_cifar_run(root, method, seed, natural=None, robust=None, state=None, optimizer="sgd"):
    """A fabricated CIFAR-10 PreActResNet-18 run (the data is never read), labelled as a grid
    labels it."""
    config = validate_run(
        {
            "data": {"name": "cifar10", "root": str(root / "no-data")},
            "model": {"name": "preact_resnet18"},
            "train": {"optimizer": {"name": optimizer}},
            "method": method,
            "seed": seed,
        }
    )
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, method_label(config), root / "runs" / rid))
    if natural is not None:
        write_json(
            run.file("result.json"),
            {
                "run_id": rid,
                "natural": natural,
                "robust": robust,
                "average_robust": sum(robust.values()) / len(robust),
            },
        )
    if state:
        set_state(run, state=state)
    return run


@pytest.fixture
def cifar(tmp_path):
    """SGD (3 seeds, every Table 2 column and AA linf 1/255), SAM rho=0.1 (seeds 0 and 1 done,
    seed 2 running; two columns), SAM rho=0.7 and PGD-AT linf 8/255 (one seed each)."""
    root = tmp_path / "results"
    fixed = {"FGSM linf 1/255": 0.63, "PGD-10 l2 32/255": 0.41, "AA l2 32/255": 0.32}
    fixed |= {"StAdv": 0.35, "FAB-10 l2 32/255": 0.45, "Pixle-5": 0.10, "AA linf 1/255": 0.90}
    for seed, (natural, pgd) in enumerate([(0.940, 0.37), (0.942, 0.38), (0.944, 0.39)]):
        robust = {**fixed, "PGD-10 linf 1/255": pgd}
        add_cifar_run(root, {"name": "standard"}, seed, natural, robust)
    for seed, (natural, pgd) in enumerate([(0.950, 0.46), (0.956, 0.48)]):
        robust = {"PGD-10 linf 1/255": pgd, "AA l2 32/255": 0.44}
        add_cifar_run(root, {"name": "sam", "rho": 0.1}, seed, natural, robust)
    add_cifar_run(root, {"name": "sam", "rho": 0.1}, 2, state="running")
    add_cifar_run(root, {"name": "sam", "rho": 0.7}, 0, 0.93, {"PGD-10 linf 1/255": 0.5})
    at = {"name": "pgd_at", "norm": "linf", "eps": 8 / 255}
    add_cifar_run(root, at, 0, 0.85, {"PGD-10 linf 1/255": 0.8})
    return root


def invoke(*args):
    from click.testing import CliRunner

    from samat.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def table_lines(text):
    """The body lines of a printed rich table, each as its stripped cells."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in text.splitlines()
        if "│" in line
    ]


def header(text):
    """The column names of a printed rich table (printed at its natural width: one line)."""
    line = next(line for line in text.splitlines() if "┃ Method" in line)
    return [cell.strip() for cell in line.split("┃")[1:-1]]


def test_reference_prints_ours_published_and_difference(cifar):
    result = invoke("collect", cifar, "--reference", "table2")
    assert result.exit_code == 0, result.output
    lines = table_lines(result.stdout)
    labels = [line[0] for line in lines]
    # the reference's rows in its order, then the rows it does not have
    assert [label for label in labels if not label.startswith(("published", "Δ"))] == [
        "SGD",
        "SAM rho=0.1",
        "PGD-AT linf eps=8/255",
        "SAM rho=0.7",
    ]
    sgd = labels.index("SGD")
    assert header(result.stdout) == ["Method", "Natural", *TABLE2, "Average", "Runs"]
    assert lines[sgd] == [
        "SGD",
        "94.2 ± 0.2",
        "63.0 ± 0.0",
        "38.0 ± 1.0",
        "41.0 ± 0.0",
        "32.0 ± 0.0",
        "35.0 ± 0.0",
        "45.0 ± 0.0",
        "10.0 ± 0.0",
        "37.7 ± 0.1",
        "3 done",
    ]
    published = ["94.5", "63.4", "37.9", "41.5", "31.7", "35.2", "44.8", "10.0", "37.8"]
    assert lines[sgd + 1] == ["published", *published, ""]
    diff = ["-0.3", "-0.4", "+0.1", "-0.5", "+0.3", "-0.2", "+0.2", "+0.0", "-0.1"]
    assert lines[sgd + 2] == ["Δ published", *diff, ""]
    sam = labels.index("SAM rho=0.1")
    assert lines[sam][1:4] == ["95.3 ± 0.4", "-", "47.0 ± 1.4"]
    assert lines[sam][-1] == "2 done, 1 running"
    assert lines[sam + 1][1:4] == ["95.4", "63.3", "46.2"]
    assert lines[sam + 2][1:6] == ["-0.1", "-", "+0.8", "-", "+0.4"]
    at = labels.index("PGD-AT linf eps=8/255")
    assert lines[at + 1][1] == "84.5" and lines[at + 2][1] == "+0.5"
    # an unmatched row: no published lines
    assert labels[labels.index("SAM rho=0.7") + 1 :] == []
    assert "3 of 4 rows matched" in result.stdout
    assert "not shown: AA linf 1/255" in result.stdout


def test_reference_average_is_the_mean_of_the_papers_columns(cifar):
    ours = {r["method"]: r for r in json.loads(render_text(cifar, "json"))}
    # without a reference: result.json's average over every attack (AA linf 1/255 included)
    assert ours["SGD"]["Average"]["mean"] == pytest.approx((2.64 + 0.90) / 8 * 100)
    referenced = {
        r["method"]: r for r in json.loads(render_text(cifar, "json", reference="table2"))
    }
    sgd = referenced["SGD"]
    assert sgd["Average"]["mean"] == pytest.approx(2.64 / 7 * 100)
    assert sgd["published"]["values"]["Average"] == 37.8
    assert sgd["published"]["diff"]["Average"] == pytest.approx(2.64 / 7 * 100 - 37.8)
    # a run without all seven columns has no comparable Average
    assert referenced["SAM rho=0.1"]["Average"] is None


def test_reference_in_every_format(cifar):
    rows = {r["method"]: r for r in json.loads(render_text(cifar, "json", reference="table2"))}
    sgd = rows["SGD"]
    assert sgd["published"]["table"] == "table2" and sgd["published"]["row"] == "SGD"
    assert sgd["published"]["values"]["PGD-10 linf 1/255"] == 37.9
    assert sgd["published"]["diff"]["PGD-10 linf 1/255"] == pytest.approx(0.1)
    assert sgd["published"]["diff"]["Natural"] == pytest.approx(-0.3)
    assert rows["SAM rho=0.1"]["published"]["diff"]["FGSM linf 1/255"] is None
    assert rows["SAM rho=0.7"]["published"] is None

    table = list(csv.reader(io.StringIO(render_text(cifar, "csv", reference="table2"))))
    header = table[0]
    sgd = dict(zip(header, next(row for row in table if row[0] == "SGD"), strict=True))
    assert sgd["Natural mean"] == "94.20" and sgd["Natural published"] == "94.50"
    assert sgd["Natural diff"] == "-0.30" and sgd["PGD-10 linf 1/255 diff"] == "0.10"
    assert sgd["published row"] == "SGD" and sgd["seeds"] == "3"
    unmatched = dict(
        zip(header, next(row for row in table if row[0] == "SAM rho=0.7"), strict=True)
    )
    assert unmatched["Natural published"] == "" and unmatched["published row"] == ""

    markdown = render_text(cifar, "markdown", reference="table2")
    assert "| SGD | 94.2 ± 0.2 | 63.0 ± 0.0 | 38.0 ± 1.0 |" in markdown
    assert "| ↳ published | 94.5 | 63.4 | 37.9 | 41.5 |" in markdown
    assert "| ↳ Δ published | -0.3 | -0.4 | +0.1 | -0.5 |" in markdown
    assert "| 10.0 ± 0.0 | 37.7 ± 0.1 | 3 |" in markdown  # Pixle, Average, n

    latex = render_text(cifar, "latex", reference="table2")
    assert r"\quad published & 94.5 & 63.4 & 37.9" in latex
    assert r"\quad $\Delta$ published & -0.3 & -0.4 & +0.1" in latex
    assert r"PGD-AT linf eps=8/255 & 85.0 & - & 80.0" in latex


def test_unknown_reference_is_a_one_line_error(cifar):
    result = invoke("collect", cifar, "--reference", "table9")
    assert result.exit_code == 2
    assert result.output == (
        "error: unknown reference table 'table9'; choose one of segmentation_stanford, "
        "segmentation_voc, table1, table2, table3, table4, table5, table6, table7, "
        "text_rotten_tomatoes\n"
    )


def test_ci_is_a_t_interval(cifar):
    rows = {r["method"]: r for r in json.loads(render_text(cifar, "json", ci=True))}
    natural = rows["SGD"]["Natural"]
    # t(0.975, 2 dof) = 4.302653: 94.2 ± 4.302653 * 0.2 / sqrt(3)
    assert natural["n"] == 3
    assert natural["ci95"] == pytest.approx([94.2 - 0.496827, 94.2 + 0.496827], abs=1e-5)
    # t(0.975, 1 dof) = 12.706205 for two seeds
    half = 12.706205 * statistics.stdev([95.0, 95.6]) / math.sqrt(2)
    assert rows["SAM rho=0.1"]["Natural"]["ci95"] == pytest.approx([95.3 - half, 95.3 + half])
    assert "ci95" not in rows["SAM rho=0.7"]["Natural"]  # one seed: no interval

    result = invoke("collect", cifar, "--ci")
    lines = {line[0]: line for line in table_lines(result.stdout)}
    assert lines["SGD"][1] == "94.2 [93.7, 94.7]"
    assert lines["SAM rho=0.1"][1] == "95.3 [91.5, 99.1]"
    assert lines["SAM rho=0.7"][1] == "93.0"
    assert "95% CI, Student's t with n-1 dof" in result.stdout


def test_compare_pairs_runs_by_seed(cifar):
    result = invoke("collect", cifar, "--compare", "SGD")
    assert result.exit_code == 0, result.output
    lines = table_lines(result.stdout)
    labels = [line[0] for line in lines]
    names = header(result.stdout)
    sam = dict(zip(names, lines[labels.index("SAM rho=0.1") + 1], strict=True))
    # seeds 0 and 1: 95.0 - 94.0 and 95.6 - 94.2 (unpaired means would give +1.1)
    assert sam["Method"] == "Δ vs SGD" and sam["Natural"] == "+1.2 ± 0.3"
    assert sam["PGD-10 linf 1/255"] == "+9.5 ± 0.7" and sam["AA l2 32/255"] == "+12.0 ± 0.0"
    assert sam["FGSM linf 1/255"] == "-" and sam["Runs"] == "2 pairs"
    one = dict(zip(names, lines[labels.index("SAM rho=0.7") + 1], strict=True))
    assert one["Natural"] == "-1.0" and one["PGD-10 linf 1/255"] == "+13.0"
    assert one["Runs"] == "1 pair"
    assert "Δ vs SGD" not in lines[labels.index("SGD") + 1][0]

    rows = {r["method"]: r for r in json.loads(render_text(cifar, "json", compare="SGD", ci=True))}
    compare = rows["SAM rho=0.1"]["compare"]
    assert compare["baseline"] == "SGD" and compare["pairs"] == 2
    natural = compare["diff"]["Natural"]
    assert natural["mean"] == pytest.approx(1.2) and natural["n"] == 2
    assert natural["std"] == pytest.approx(statistics.stdev([1.0, 1.4]))
    half = 12.706205 * statistics.stdev([1.0, 1.4]) / math.sqrt(2)
    assert natural["ci95"] == pytest.approx([1.2 - half, 1.2 + half])
    assert rows["SGD"]["compare"] is None

    table = list(csv.reader(io.StringIO(render_text(cifar, "csv", compare="SGD"))))
    sam_row = dict(zip(table[0], next(r for r in table if r[0] == "SAM rho=0.1"), strict=True))
    assert sam_row["Natural vs SGD mean"] == "1.20" and sam_row["pairs with SGD"] == "2"


def test_compare_unknown_label_lists_the_rows(cifar):
    result = invoke("collect", cifar, "--compare", "ST")
    assert result.exit_code == 2
    assert result.output == (
        "error: --compare 'ST' is not a row of the table; choose one of 'SGD', "
        "'SAM rho=0.1', 'SAM rho=0.7', 'PGD-AT linf eps=8/255'\n"
    )


def test_collect_imports_scipy_only_for_ci(cifar):
    # collect stays light: no torch, and scipy only for --ci
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from samat.cli import cli\n"
        "for args in (['collect', '--help'], ['collect', sys.argv[1], '--reference', 'table2', "
        "'--compare', 'SGD', '--format', 'markdown']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "print('scipy' in sys.modules, 'torch' in sys.modules)\n"
        "assert CliRunner().invoke(cli, ['collect', sys.argv[1], '--ci']).exit_code == 0\n"
        "print('scipy' in sys.modules, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(cifar)], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "False", "True", "False"]


def test_collect_grid_file_keeps_its_own_runs(tmp_path, write_yaml):
    # two grids that share an output directory (and their SGD runs)
    base = {"data": {"name": "digits"}, "model": {"name": "small_cnn"}}
    grids = {}
    for name, rho in (("a", 0.1), ("b", 0.2)):
        grids[name] = write_yaml(
            {
                "name": name,
                "output": str(tmp_path / "shared"),
                "base": base,
                "variants": [
                    {"method.name": "standard"},
                    {"method.name": "sam", "method.rho": rho},
                ],
                "seeds": [0, 1],
            },
            f"{name}.yaml",
        )
    for path in grids.values():
        for spec in expand(load_grid(path)):
            finish(prepare(spec), accuracy=0.4)
    rows = json.loads(invoke("collect", grids["a"], "--format", "json").stdout)
    assert [(r["method"], r["done"]) for r in rows] == [("SGD", 2), ("SAM rho=0.1", 2)]
    everything = json.loads(invoke("collect", tmp_path / "shared", "--format", "json").stdout)
    assert [r["method"] for r in everything] == ["SGD", "SAM rho=0.1", "SAM rho=0.2"]
