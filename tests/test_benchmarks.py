"""Tests for benchmarks/: the floor arithmetic on fake timings, and the CPU paths end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not an installed package: it runs from the repository root, as the tests do
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import autoattack_compare, step_cost  # noqa: E402
from benchmarks.figures import Figure, table  # noqa: E402
from benchmarks.step_cost import Primitives, cases, floor  # noqa: E402

ALL = {"standard", "sam", "asam", "fgsm_at", "pgd_at", "esam", "looksam"}
# one row of the step-cost table: label, ms/step, x SGD, passes, floor ms, /floor
METHOD_ROW = re.compile(
    r"^  (\S.*?)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)$"
)


def by_label(available: set[str] = ALL) -> dict[str, step_cost.Case]:
    kept, _ = cases(available)
    return {case.label: case for case in kept}


def test_floors_from_fake_timings():
    p = Primitives(forward=0.010, input_backward=0.020, step=0.050)
    c = by_label()
    assert floor(c["SGD"], p, 1) == pytest.approx(0.050)
    assert floor(c["SAM"], p, 2) == pytest.approx(0.100)
    assert floor(c["ASAM"], p, 2) == pytest.approx(0.100)
    # PGD-k: k (t_f + t_bi) + t_step; FGSM-RS: (t_f + t_bi) + t_step
    assert floor(c["PGD-10 AT"], p, 11) == pytest.approx(10 * 0.030 + 0.050)
    assert floor(c["FGSM-AT"], p, 2) == pytest.approx(0.030 + 0.050)
    # ESAM and LookSAM: their own pass count times a plain step
    assert floor(c["LookSAM k=5"], p, 1.2) == pytest.approx(0.060)
    assert floor(c["ESAM"], p, 1.7) == pytest.approx(0.085)
    assert c["LookSAM k=5"].cycle == 5


def test_pgd_steps_set_the_floor_and_missing_methods_are_noted():
    kept, notes = cases({"standard", "pgd_at"}, pgd_steps=3)
    assert [case.label for case in kept] == ["SGD", "PGD-3 AT"]
    p = Primitives(forward=1.0, input_backward=2.0, step=5.0)
    assert floor(kept[1], p, 4) == pytest.approx(3 * 3.0 + 5.0)
    assert len(notes) == 5 and all("skipped" in note for note in notes)
    assert any("'looksam'" in note for note in notes)


def test_figures_compare_measured_with_floor_and_sgd():
    result = {
        "methods": {
            "SGD": {"vs_sgd": 1.0, "vs_floor": 1.02, "passes_per_step": 1.0},
            "SAM": {"vs_sgd": 2.1, "vs_floor": 1.07, "passes_per_step": 2.0},
            "LookSAM k=5": {"vs_sgd": 1.31, "vs_floor": 1.0, "passes_per_step": 1.2},
        }
    }
    figures = {f.name: f for f in step_cost.figures(result)}
    # LookSAM k = 5 has the issue's own target: at most 1.3x SGD's step
    assert (
        figures["LookSAM k=5 step cost vs SGD"].target,
        figures["LookSAM k=5 step cost vs SGD"].ok,
    ) == ("<= 1.3", False)
    aa = {"time_ratio": 1.06, "samat_robust": 0.5, "official_robust": 0.5}
    time_figure = autoattack_compare.figures(aa)[0]
    assert (time_figure.target, time_figure.ok) == ("<= 1.05", False)
    assert autoattack_compare.figures({**aa, "time_ratio": 0.9})[0].ok is True
    assert figures["SGD measured/floor"].ok is True
    assert figures["SAM measured/floor"].ok is False
    assert figures["SAM step cost vs SGD"].text == "x2.10"
    assert figures["SAM step cost vs SGD"].target == "~2 (passes)"
    rendered = table([*figures.values(), Figure("x", None, "skipped")])
    assert rendered.splitlines()[0].split() == ["figure", "value", "target", "ok?"]
    assert "NO" in rendered and "ok" in rendered


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_quick_benchmark_prints_well_formed_positive_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        [
            "-m",
            "benchmarks",
            "--device",
            "cpu",
            "--quick",
            "--sections",
            "methods,loader,scale,cuda",
            "--loader-images",
            "512",
            "--scale-runs",
            "20",
            "--json",
            str(out),
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [m.groups() for line in proc.stdout.splitlines() if (m := METHOD_ROW.match(line))]
    assert {row[0] for row in rows} >= {"SGD", "SAM", "ASAM", "FGSM-AT", "PGD-10 AT"}
    for label, *numbers in rows:
        assert all(float(n) > 0 for n in numbers), label
    assert re.search(r"DataLoader w=0 +[\d,]+ img/s +DeviceLoader is x\d+\.\d", proc.stdout)
    assert "cuda: skipped" in proc.stdout

    data = json.loads(out.read_text())
    names = {f["name"] for f in data["figures"]}
    assert {"SGD measured/floor", "PGD-10 AT step cost vs SGD", "samat --help s"} <= names
    for figure in data["figures"]:
        assert figure["value"] is not None and math.isfinite(figure["value"]), figure
        assert figure["value"] > 0, figure
    sgd = data["methods"]["methods"]["SGD"]
    assert sgd["vs_sgd"] == 1.0
    assert data["methods"]["primitives"]["step"] > 0
    assert data["scale"]["commands"]["collect"]["problem"] is None
    # the table printed last: one row per figure, each value as printed in the JSON
    for figure in data["figures"]:
        assert re.search(
            rf"^{re.escape(figure['name'])}\s+{re.escape(figure['text'])}", proc.stdout, re.M
        )


@pytest.mark.slow
def test_quick_autoattack_comparison_agrees_with_the_official_code(tmp_path):
    out = tmp_path / "aa.json"
    args = ["-m", "benchmarks", "--device", "cpu", "--quick", "--sections", "autoattack"]
    proc = _run([*args, "--json", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())["autoattack"]
    assert result["samat_robust"] == result["official_robust"]
    assert result["clean"] > result["samat_robust"] > 0
    assert result["time_ratio"] > 0
    assert re.search(r"time samat [\d.]+ s, official [\d.]+ s, ratio x\d+\.\d\d", proc.stdout)


@pytest.mark.slow
def test_gpu_check_cpu_path_passes(tmp_path):
    log = tmp_path / "gpu_check.txt"
    proc = _run(
        ["-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--log", str(log)],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = log.read_text()
    assert "RESULT: PASS" in text
    assert "PASS  final model tensors bit for bit" in text
    assert "FAIL" not in text


def test_cluster_figures_compare_slurm_with_local_and_packing():
    from benchmarks import cluster

    measured = {
        "demo": {"local_s": 100.0, "slurm_s": 160.0, "equal_numbers": True},
        "packing": {"k1_runs_per_minute": 4.0, "k4_runs_per_minute": 6.0},
    }
    ratio, equal, packing = cluster.figures(measured)
    assert (ratio.value, ratio.text, ratio.ok) == (1.6, "1.60x", False)  # target <= 1.5
    assert equal.ok is True and equal.text == "equal"
    assert (packing.value, packing.text, packing.ok) == (1.5, "1.50x", None)  # no target
    measured["demo"].update(slurm_s=140.0, equal_numbers=False)
    ratio, equal, _ = cluster.figures(measured)
    assert ratio.ok is True and equal.ok is False and equal.text == "DIFFER"
    assert [f.text for f in cluster.figures({"skipped": "no SLURM cluster"})] == [
        "skipped: no SLURM cluster"
    ]
