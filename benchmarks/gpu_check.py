"""The GPU check: samat end to end on one GPU in under 5 minutes, nothing downloaded.

    python -m benchmarks.gpu_check [--log gpu_check.txt]       # on the GPU machine
    python -m benchmarks.gpu_check --device cpu --quick        # the same path, tiny, on a CPU

1. grid: configs/gpu_check.yaml (copied with its output in a temp folder) through
   `python -m samat submit GRID --executor local`; every run done (`samat collect --per-run`),
   natural accuracy > 0.1, every attack reported, and result.json's device the GPU.
2. resume: a deterministic 4-epoch run trained straight through, and again killed (SIGKILL) as
   soon as metrics.jsonl has 2 lines and rerun to the end: the two final checkpoints' model
   tensors must be equal bit for bit.
3. figures: the benchmarks' CUDA section (epoch throughput per precision and layout, the
   method ratios under bf16 + channels_last).

samat runs as `python -m samat` with this interpreter and this environment (PYTHONPATH gains the
folder samat was imported from). Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.figures import Figure, Printer, table, write_json
from benchmarks.launch import samat_command, samat_env

GRID = Path(__file__).resolve().parents[1] / "configs" / "gpu_check.yaml"
MIN_NATURAL = 0.1
KILL_AFTER_EPOCHS = 2
RESUME_EPOCHS = 4
# The --quick overrides: the grid's path on a tiny model and data set (a CPU does it in minutes).
QUICK_BASE = {
    "data": {"name": "synthetic", "image_size": 8, "channels": 1, "num_classes": 10},
    "model": {"name": "small_cnn", "width": 16},
    "train": {
        "epochs": 1,
        "batch_size": 64,
        "amp": False,
        "channels_last": False,
        "optimizer": {"name": "sgd", "lr": 0.05},
    },
    "eval": {
        "n_examples": 32,
        "batch_size": 64,
        "attacks": [
            {"attack": "fgsm", "norm": "linf", "eps": "8/255"},
            {"attack": "pgd", "norm": "linf", "eps": "8/255", "steps": 10},
            {
                "attack": "autoattack",
                "norm": "linf",
                "eps": "8/255",
                "steps": 5,
                "options": {"n_queries": 50},
            },
        ],
    },
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class GpuCheck:
    """The three checks in order, each adding Check rows; output through one Printer."""

    def __init__(self, args: argparse.Namespace, workdir: Path, printer: Printer) -> None:
        self.args = args
        self.workdir = workdir
        self.printer = printer
        self.device = torch.device(args.device)
        self.env = samat_env()
        if self.device.type == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # samat picks CUDA whenever it sees one
            # one thread per run, as `samat submit` sets for local CPU runs: two spin-waiting
            # OpenMP threads make a `samat run` on a busy 2-core machine several times slower
            self.env.setdefault("SAMAT_NUM_THREADS", "1")
        self.checks: list[Check] = []
        self.figures: list[Figure] = []
        self.data: dict[str, Any] = {}

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        self.printer.line(
            f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else "")
        )
        return ok

    def expected_device(self) -> str:
        """What result.json's `device` must contain."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def base(self) -> dict[str, Any]:
        grid = yaml.safe_load(GRID.read_text())
        if self.args.quick:
            grid["base"] = QUICK_BASE
        return grid

    # -- subprocesses ---------------------------------------------------------------------------

    def samat(self, *args: str, log: Path, stream: bool = False) -> int:
        """Run `python -m samat ARGS`, output into `log` (and printed with --verbose or stream)."""
        with log.open("w") as handle:
            proc = subprocess.Popen(
                samat_command(*args),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                handle.write(line)
                if stream or self.args.verbose:
                    self.printer.line(f"    | {line.rstrip()}")
            return proc.wait()

    def tail(self, log: Path, lines: int = 15) -> None:
        """The last lines of a log file, indented (or why there are none)."""
        try:
            text = log.read_text()
        except OSError as error:
            text = f"({log}: {error.strerror})"
        for line in text.splitlines()[-lines:]:
            self.printer.line(f"    | {line}")

    # -- 1. the grid ----------------------------------------------------------------------------

    def grid(self) -> None:
        self.printer.line("1. grid: configs/gpu_check.yaml through samat submit --executor local")
        grid = self.base()
        out = self.workdir / "grid"
        grid["output"] = str(out)
        path = self.workdir / "gpu_check.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        began = time.perf_counter()
        code = self.samat(
            "submit", str(path), "--executor", "local", log=self.workdir / "submit.log", stream=True
        )
        seconds = time.perf_counter() - began
        self.data["grid_seconds"] = seconds
        self.check("submit exits 0", code == 0, f"exit {code} after {seconds:.0f} s")
        proc = subprocess.run(
            samat_command("collect", str(out), "--format", "json", "--per-run"),
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        if not self.check("collect --per-run", proc.returncode == 0, proc.stderr.strip()[-300:]):
            return
        runs = json.loads(proc.stdout)
        self.data["grid_runs"] = runs
        expected = len(grid["variants"]) * len(grid.get("seeds", [0]))
        done = [run for run in runs if run["state"] == "done"]
        self.check("every run done", len(done) == expected, f"{len(done)} of {expected} done")
        for run in runs:
            if run["state"] != "done":
                self.printer.line(f"    log of {run['label']} ({run['state']}):")
                self.tail(out / "runs" / run["run_id"] / "log")
        attacks = len(grid["base"]["eval"]["attacks"])
        device = self.expected_device()
        for run in runs:
            natural = run["natural"]
            robust = run["robust"] or {}
            result = _read_json(out / "runs" / run["run_id"] / "result.json") or {}
            self.check(
                f"{run['label']}: natural > {MIN_NATURAL}",
                natural is not None and natural > MIN_NATURAL,
                f"natural {natural}, robust "
                + ", ".join(f"{k} {v:.3f}" for k, v in robust.items()),
            )
            self.check(
                f"{run['label']}: {attacks} attacks reported in [0, 1]",
                len(robust) == attacks and all(0 <= v <= 1 for v in robust.values()),
                f"{len(robust)} reported",
            )
            self.check(
                f"{run['label']}: result.json device is {device!r}",
                device in str(result.get("device")),
                f"device {result.get('device')!r}",
            )

    # -- 2. kill and resume ---------------------------------------------------------------------

    def resume(self) -> None:
        self.printer.line(
            f"2. resume: deterministic {RESUME_EPOCHS}-epoch run, straight vs killed after "
            f"{KILL_AFTER_EPOCHS} epochs and rerun"
        )
        config = self.base()["base"]
        config["method"] = {"name": "sam", "rho": 0.1}
        config["train"] = {**config["train"], "epochs": RESUME_EPOCHS, "deterministic": True}
        config["eval"] = {**config["eval"], "attacks": []}
        path = self.workdir / "resume.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        straight, killed = self.workdir / "straight", self.workdir / "killed"
        code = self.samat(
            "run", str(path), "--output", str(straight), log=self.workdir / "straight.log"
        )
        if not self.check("uninterrupted run exits 0", code == 0, f"exit {code}"):
            self.tail(self.workdir / "straight.log")
            return
        lines, finished = self.kill_after(path, killed)
        self.check(
            f"killed after {KILL_AFTER_EPOCHS} epochs, before the end",
            not finished and KILL_AFTER_EPOCHS <= lines < RESUME_EPOCHS,
            f"metrics.jsonl had {lines} lines at SIGKILL"
            + (" (the run had already finished)" if finished else ""),
        )
        log = self.workdir / "resumed.log"
        code = self.samat("run", str(path), "--output", str(killed), log=log)
        if not self.check("rerun exits 0", code == 0, f"exit {code}"):
            self.tail(log)
            return
        equal, detail = compare_models(_checkpoint(straight), _checkpoint(killed))
        self.data["resume_equal"] = equal
        self.check("final model tensors bit for bit", equal, detail)

    def kill_after(self, config: Path, output: Path) -> tuple[int, bool]:
        """Start the run, SIGKILL it once metrics.jsonl has enough lines; (lines then, finished)."""
        log = (self.workdir / "killed.log").open("w")
        proc = subprocess.Popen(
            samat_command("run", str(config), "--output", str(output)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        lines = 0
        try:
            while proc.poll() is None:
                metrics = list(output.glob("runs/*/metrics.jsonl"))
                if metrics:
                    lines = _count_lines(metrics[0])
                    if lines >= KILL_AFTER_EPOCHS:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        return lines, False
                time.sleep(0.005)
        finally:
            log.close()
        metrics = list(output.glob("runs/*/metrics.jsonl"))
        return (_count_lines(metrics[0]) if metrics else 0), True

    # -- 3. figures -----------------------------------------------------------------------------

    def benchmark(self) -> None:
        self.printer.line("3. figures: epoch throughput per variant, method ratios (bf16 + cl)")
        # imported here: checks 1 and 2 use only the CLI, and must run whatever these import
        from benchmarks import epoch, step_cost

        if self.device.type == "cuda":
            setup = epoch.EpochSetup(self.device, compile=not self.args.no_compile)
            methods = step_cost.Setup(self.device, amp=True, channels_last=True, warmup=5, steps=20)
        else:
            setup = epoch.EpochSetup(
                self.device,
                model="small_cnn",
                width=8,
                images=1024,
                batch_size=64,
                warmup=1,
                steps=3,
                repeats=2,
                compile=self.args.compile,
            )
            methods = step_cost.Setup(
                self.device,
                model="small_cnn",
                width=8,
                batch_size=16,
                amp=True,
                channels_last=True,
                warmup=1,
                steps=2,
            )
        try:
            epochs = epoch.run(setup, self.printer)
            ratios = step_cost.run(methods, self.printer, tag=" (bf16+cl)")
        except Exception as error:
            self.check("benchmark figures", False, f"{type(error).__name__}: {error}")
            return
        self.data["epoch"], self.data["methods"] = epochs, ratios
        self.figures = epoch.figures(epochs) + step_cost.figures(ratios, " (bf16+cl)")
        failed = [name for name, row in epochs["variants"].items() if "error" in row]
        self.check(
            "benchmark figures", not failed, f"failed: {', '.join(failed)}" if failed else ""
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _checkpoint(output: Path) -> Path | None:
    found = sorted(output.glob("runs/*/checkpoint.safetensors"))
    return found[0] if found else None


def compare_models(first: Path | None, second: Path | None) -> tuple[bool, str]:
    """Whether the `model.` tensors of two checkpoints are equal bit for bit, and a detail."""
    from safetensors.torch import load_file

    if first is None or second is None:
        return False, "a checkpoint is missing"
    a = {k: v for k, v in load_file(first).items() if k.startswith("model.")}
    b = {k: v for k, v in load_file(second).items() if k.startswith("model.")}
    if a.keys() != b.keys():
        return False, f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    differ = [
        key
        for key in a
        if a[key].dtype != b[key].dtype
        or a[key].shape != b[key].shape
        or not torch.equal(_bits(a[key]), _bits(b[key]))
    ]
    if differ:
        return False, f"not equal: {len(differ)} of {len(a)} tensors differ ({differ[0]}, ...)"
    return True, f"equal: {len(a)} tensors"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (0-dim tensors too): -0.0 and 0.0, or two NaNs, compare as bits."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model and data (CPU smoke)")
    parser.add_argument("--log", type=Path, help="write all output to this file too")
    parser.add_argument("--json", type=Path, help="write the checks and every number here")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: temp, removed)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--compile", action="store_true", help="compile on CPU too (slow)")
    parser.add_argument("--skip", default="", help="comma-separated: grid,resume,figures")
    parser.add_argument("--verbose", action="store_true", help="print every samat output line")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # as the runs get (SAMAT_NUM_THREADS): steadier on busy CPUs
    printer = Printer(args.log)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="samat-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    began = time.perf_counter()
    printer.line(
        f"samat GPU check on {name}, torch {torch.__version__}, python {sys.version.split()[0]}"
        f"{', quick sizes' if args.quick else ''}; work in {workdir}"
    )
    check = GpuCheck(args, workdir, printer)
    skip = set(args.skip.split(",")) - {""}
    steps = {"grid": check.grid, "resume": check.resume, "figures": check.benchmark}
    try:
        for key, step in steps.items():
            if key in skip:
                printer.line(f"{key}: skipped (--skip)")
                continue
            started = time.perf_counter()
            try:
                step()
            except Exception as error:  # report and go on: the other checks still tell something
                check.check(f"{key} ran", False, f"{type(error).__name__}: {error}")
            printer.line(f"   ({key}: {time.perf_counter() - started:.0f} s)")
            printer.line()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [c for c in check.checks if not c.ok]
    printer.line("=" * 78)
    printer.line(f"GPU CHECK SUMMARY: device {name}; {time.perf_counter() - began:.0f} s")
    for item in check.checks:
        printer.line(f"  {'PASS' if item.ok else 'FAIL'}  {item.name}")
    if check.figures:
        printer.line()
        printer.line(table(check.figures))
    printer.line(
        f"RESULT: {'FAIL' if failed else 'PASS'} ({len(check.checks) - len(failed)} of "
        f"{len(check.checks)} checks passed)"
    )
    if args.json:
        checks = [asdict(item) for item in check.checks]
        write_json(args.json, {"device": name, "checks": checks, **check.data}, check.figures)
    printer.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
