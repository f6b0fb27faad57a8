"""The demo grid through SLURM against `--executor local`, and packed tasks against one run each.

1. Wall time of `samat submit configs/demo.yaml --wait` on the cluster (one task per run, one CPU
   each) over the same grid with `--executor local`; the per-run numbers must be equal (the same
   config and seed give the same weights; both use one thread per run). Target <= 1.5.
2. Aggregate throughput of `slurm.runs_per_task: 4` (4 runs per task on min(4, node's CPUs)
   CPUs) against 1 (one CPU per task), for 8 small runs: runs per minute, k = 4 over k = 1.

Needs a SLURM cluster that answers (`bash slurm/start-cluster.sh` starts the test one); without
one the section says so and reports nothing. Each grid runs as a user types it, in a subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.figures import Figure, Printer, at_most
from benchmarks.launch import samat_command, samat_env

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TARGET_RATIO = 1.5


def cluster_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=60).returncode == 0


def _timed(args: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(samat_command(*args), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"samat {' '.join(args)} failed: {(done.stdout + done.stderr)[-2000:]}")
    return seconds


def _per_run(output: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        samat_command("collect", str(output), "--format", "json", "--per-run"),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        row["run_id"]: {"natural": row["natural"], "robust": row["robust"]}
        for row in json.loads(done.stdout)
    }


def _grid(base: dict[str, Any], root: Path, name: str, **changes: Any) -> Path:
    grid = copy.deepcopy(base)
    grid["name"] = name
    grid["output"] = str(root / name)
    grid.update(changes)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run(printer: Printer, *, quick: bool = False) -> dict[str, Any]:
    if not cluster_answers():
        printer.line("cluster: skipped (no SLURM cluster answers; bash slurm/start-cluster.sh)")
        return {"skipped": "no SLURM cluster"}
    demo = yaml.safe_load(DEMO.read_text())
    if quick:
        demo["base"]["train"]["epochs"] = 1
        demo["base"]["eval"]["attacks"] = demo["base"]["eval"]["attacks"][:1]
    root = Path(tempfile.mkdtemp(prefix="samat-cluster-"))
    env = samat_env()
    out: dict[str, Any] = {}
    try:
        local = _grid(demo, root, "demo-local")
        slurm = _grid(demo, root, "demo-slurm")
        local_s = _timed(["submit", str(local), "--executor", "local"], env)
        slurm_s = _timed(["submit", str(slurm), "--executor", "slurm", "--wait"], env)
        same = _per_run(root / "demo-local", env) == _per_run(root / "demo-slurm", env)
        out["demo"] = {"local_s": local_s, "slurm_s": slurm_s, "equal_numbers": same}
        printer.line(
            f"cluster: demo grid ({len(_per_run(root / 'demo-local', env))} runs) local "
            f"{local_s:.1f} s, SLURM {slurm_s:.1f} s: {slurm_s / local_s:.2f}x; per-run numbers "
            f"{'equal' if same else 'DIFFER'}"
        )

        cpus = len(os.sched_getaffinity(0))
        small = copy.deepcopy(demo)
        small["base"]["train"]["epochs"] = 2 if not quick else 1
        small["base"]["eval"]["attacks"] = []
        small["seeds"] = list(range(4))
        small["variants"] = [{"method.name": "standard"}, {"method.name": "sam", "method.rho": 0.1}]
        packing: dict[str, float] = {}
        for k in (1, 4):
            slurm_section = {**small["slurm"], "cpus_per_task": min(k, cpus), "runs_per_task": k}
            grid = _grid(small, root, f"pack-{k}", slurm=slurm_section)
            seconds = _timed(["submit", str(grid), "--executor", "slurm", "--wait"], env)
            packing[f"k{k}_runs_per_minute"] = 8 * 60 / seconds
            printer.line(f"cluster: 8 small runs, {k} per task: {seconds:.1f} s")
        out["packing"] = packing
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def figures(result: dict[str, Any]) -> list[Figure]:
    if "demo" not in result:
        return [Figure("cluster", None, "skipped: no SLURM cluster")]
    demo = result["demo"]
    ratio = demo["slurm_s"] / demo["local_s"]
    found = [
        at_most("demo on SLURM / local (wall)", ratio, TARGET_RATIO, f"{ratio:.2f}x"),
        Figure(
            "demo per-run numbers SLURM == local",
            float(demo["equal_numbers"]),
            "equal" if demo["equal_numbers"] else "DIFFER",
            "equal",
            bool(demo["equal_numbers"]),
        ),
    ]
    packing = result.get("packing")
    if packing:
        gain = packing["k4_runs_per_minute"] / packing["k1_runs_per_minute"]
        # no target: packing is for runs that leave a GPU idle; on CPUs the runs only share cores
        found.append(Figure("packing k=4 / k=1 (runs per minute)", gain, f"{gain:.2f}x"))
    return found
