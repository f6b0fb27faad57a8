"""`samat status`, `samat collect` and `samat --help` on a results directory of N finished runs,
and the bookkeeping of a submit of N runs.

The directory is generated, not trained: one run is laid out by samat.store itself (`prepare`),
marked done and given a result.json; the other N - 1 are copies with their own seed and run id.
Each command runs as a subprocess, as a user types it, so interpreter start and imports count.

The submit's bookkeeping is what `samat submit` writes into the output directory for N new runs,
timed in this process with the functions submit_grid calls for SLURM: the selection
(`select_runs`), the one pass over the run directories (`prepare_runs`: config.yaml and
eval.json, then one filesystem flush) and the recording of the job ids (`record_submission`:
the journal and each run's state.json, one array of at most MaxArraySize runs at a time, with
made-up job ids). Not in it: expanding the grid, sbatch and submitit's own files (the pickled
tasks).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.figures import Figure, Printer, at_most
from benchmarks.launch import samat_command, samat_env
from samat import store
from samat.config import RunConfig, validate_run
from samat.grid import RunSpec, method_label, run_id

TARGETS = {"status": 3.0, "collect": 3.0, "help": 0.5, "submit": 15.0}
ATTACKS = [
    {"attack": "fgsm", "norm": "linf", "eps": "8/255"},
    {"attack": "pgd", "norm": "linf", "eps": "8/255", "steps": 10},
]
ATTACK_LABELS = ["FGSM linf 8/255", "PGD-10 linf 8/255"]
VARIANTS = [
    {"name": "standard"},
    {"name": "sam", "rho": 0.05},
    {"name": "sam", "rho": 0.1},
    {"name": "pgd_at", "eps": "8/255", "steps": 10},
    {"name": "fgsm_at", "eps": "8/255"},
]


def _config(variant: dict[str, Any]) -> RunConfig:
    return validate_run(
        {
            "data": {"name": "cifar10", "root": "/data/cifar10"},
            "model": {"name": "preact_resnet18"},
            "method": variant,
            "train": {"epochs": 100},
            "eval": {"n_examples": 1000, "attacks": ATTACKS},
        }
    )


def _result(rid: str, config: RunConfig, index: int, extra: dict[str, Any]) -> dict[str, Any]:
    natural = 0.80 + 0.1 * ((index * 7919) % 1000) / 1000
    robust = {label: natural * (0.3 + 0.1 * i) for i, label in enumerate(ATTACK_LABELS)}
    return {
        "run_id": rid,
        "seed": config.seed,
        "method": config.method.name,
        "natural": natural,
        "robust": robust,
        "average_robust": sum(robust.values()) / len(robust),
        "robust_examples": 1000,
        "train_seconds": 3600.0,
        "eval_seconds": 300.0,
        "images_per_second": 1400.0,
        "epochs": config.train.epochs,
        "device": "NVIDIA H100 80GB HBM3",
        **extra,
    }


def _mark_done(run: store.RunDir) -> None:
    # the run state API changes under a refactor; either spelling writes what samat writes
    if hasattr(run, "mark_done"):
        run.mark_done()
    else:
        run.update_state(state="done", attempts=1)


def write_results(root: Path, count: int) -> None:
    """`count` finished runs under root/runs, in the layout samat.store writes."""
    runs = root / "runs"
    for index in range(min(count, len(VARIANTS))):
        config = _config(VARIANTS[index])
        template = store.prepare(
            RunSpec(run_id(config), config, method_label(config), runs / run_id(config))
        )
        _mark_done(template)
        # a result answers an evaluation request where the store keeps one (request_key)
        extra = {"request": template.request_key()} if hasattr(template, "request_key") else {}
        files = {
            p.name: p.read_text() for p in template.path.iterdir() if not p.name.startswith(".")
        }
        config_text = files.pop(store.CONFIG)
        if not config_text.endswith("seed: 0\n"):
            raise RuntimeError("config.yaml no longer ends with the seed; update benchmarks/scale")
        for seed, number in enumerate(range(index, count, len(VARIANTS))):
            seeded = config.model_copy(update={"seed": seed})
            folder = runs / run_id(seeded)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / store.CONFIG).write_text(config_text.removesuffix("0\n") + f"{seed}\n")
            for name, text in files.items():
                if name != store.RESULT:
                    (folder / name).write_text(text)
            result = _result(folder.name, seeded, number, extra)
            (folder / store.RESULT).write_text(json.dumps(result, indent=2) + "\n")


def submit_specs(output: Path, count: int) -> list[RunSpec]:
    """`count` runs of a grid (the variants times seeds) that output/runs does not hold yet."""
    specs = []
    for index in range(min(count, len(VARIANTS))):
        config = _config(VARIANTS[index])
        label = method_label(config)
        for seed in range(len(range(index, count, len(VARIANTS)))):
            seeded = config.model_copy(update={"seed": seed})
            rid = run_id(seeded)
            specs.append(RunSpec(rid, seeded, label, output / "runs" / rid))
    return specs


def time_bookkeeping(output: Path, count: int) -> tuple[float, str | None]:
    """Seconds of a submit's bookkeeping for `count` new runs (see the module's docstring), and
    what is wrong with what it wrote (None when every run is recorded as queued)."""
    from samat.launch.scheduler import DEFAULT_MAX_ARRAY_SIZE
    from samat.launch.submit import array_chunks, prepare_runs, record_submission, select_runs

    specs = submit_specs(output, count)
    began = time.perf_counter()
    actions = select_runs(specs)
    prepare_runs(specs, actions, force=False, defer=True)
    todo = [spec for spec in specs if actions[spec.run_id].runs]
    for number, chunk in enumerate(array_chunks(todo, DEFAULT_MAX_ARRAY_SIZE)):
        array = str(1000 + number)
        jobs = [f"{array}_{index}" for index in range(len(chunk))]
        record_submission(output, "scale", array, chunk, jobs)
    seconds = time.perf_counter() - began
    if len(todo) != count:
        return seconds, f"{len(todo)} of {count} runs selected to run"
    queued = sum(
        state.state == "pending" and bool(state.job_id) and state.label is not None
        for state in (store.RunDir(spec.run_dir).state() for spec in specs)
    )
    if queued != count:
        return seconds, f"{queued} of {count} runs recorded as queued"
    return seconds, None


def time_command(
    args: list[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Seconds of one subprocess, and the finished process (its output captured)."""
    began = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    return time.perf_counter() - began, proc


def _problem(name: str, proc: subprocess.CompletedProcess[str], count: int) -> str | None:
    """Why a command's run does not count (None when it does)."""
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"exit {proc.returncode}: {last[0]}"
    if name == "collect":
        listed = sum(row["runs"] for row in json.loads(proc.stdout))
        if listed != count:
            return f"collect listed {listed} runs, not {count}"
    return None


def run(
    printer: Printer, *, count: int = 10_000, keep: Path | None = None, help_repeats: int = 3
) -> dict[str, Any]:
    """Generate the directory, time the three commands; print seconds against the targets."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="samat-scale-"))
    env = samat_env()
    try:
        began = time.perf_counter()
        write_results(root, count)
        written = time.perf_counter() - began
        printer.line(f"scale: {count} finished runs written to {root} in {written:.1f} s")
        out: dict[str, Any] = {"runs": count, "write_seconds": written, "commands": {}}
        checks = {
            "status": samat_command("status", str(root)),
            "collect": samat_command("collect", str(root), "--format", "json"),
        }
        for name, args in checks.items():
            seconds, proc = time_command(args, env)
            problem = _problem(name, proc, count)
            out["commands"][name] = {
                "seconds": seconds,
                "exit": proc.returncode,
                "problem": problem,
            }
            printer.line(
                f"  samat {name:8s} {seconds:7.2f} s (target <= {TARGETS[name]:g} s)"
                + (f"  FAILED: {problem}" if problem else "")
            )
        seconds, problem = time_bookkeeping(root / "submit", count)
        out["commands"]["submit"] = {"seconds": seconds, "exit": 0, "problem": problem}
        printer.line(
            f"  submit's bookkeeping {seconds:7.2f} s (select, prepare, record {count} runs; "
            f"target <= {TARGETS['submit']:g} s)" + (f"  FAILED: {problem}" if problem else "")
        )
        times = []
        for _ in range(help_repeats):
            seconds, proc = time_command(samat_command("--help"), env)
            times.append(seconds)
        help_s = sorted(times)[len(times) // 2]
        out["commands"]["help"] = {
            "seconds": help_s,
            "exit": proc.returncode,
            "problem": _problem("help", proc, count),
            "samples": times,
        }
        printer.line(
            f"  samat --help   {help_s:7.2f} s (median of {help_repeats}; target <= "
            f"{TARGETS['help']:g} s)"
        )
        return out
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def figures(result: dict[str, Any]) -> list[Figure]:
    """Seconds of each command against its target; a command that failed is not ok."""
    out = []
    for name, row in result["commands"].items():
        label = {
            "help": "samat --help",
            "submit": f"samat submit bookkeeping ({result['runs']} runs)",
        }.get(name, f"samat {name} ({result['runs']} runs)")
        figure = at_most(label + " s", row["seconds"], TARGETS[name], f"{row['seconds']:.2f}")
        if row["exit"] != 0 or row.get("problem"):
            figure = Figure(
                figure.name, figure.value, figure.text + " (failed)", figure.target, False
            )
        out.append(figure)
    return out
