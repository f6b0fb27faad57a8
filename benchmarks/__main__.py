"""`python -m benchmarks`: every figure as a ratio measured in this one run, then a summary table.

    python -m benchmarks                       # all sections, on CUDA when there is one
    python -m benchmarks --device cpu --quick  # small sizes, well under a minute (the smoke test)
    python -m benchmarks --json out.json --log out.txt --sections methods,loader

Sections: methods (step cost vs SGD and vs the floor), loader (DeviceLoader vs DataLoader),
autoattack (samat vs the official code), scale (status / collect / --help on N runs), cuda (epoch
throughput per precision and layout, and the method ratios under bf16 + channels_last; CUDA only).
Targets that are missed are reported, not failed: the exit status is 1 only when a section broke.
"""

from __future__ import annotations

import argparse
import platform
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import samat
from benchmarks.figures import Figure, Printer, table, write_json

SECTIONS = ("methods", "loader", "autoattack", "scale", "cluster", "cuda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes (tests, smoke checks)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--skip-autoattack", action="store_true")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--log", type=Path, help="write the printed lines here too")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (cpu: 1; 0: torch's default)"
    )
    methods = parser.add_argument_group("methods")
    methods.add_argument("--model", default=None, help="preact_resnet18 (small_cnn with --quick)")
    methods.add_argument("--width", type=int, default=None)
    methods.add_argument("--batch-size", type=int, default=None)
    methods.add_argument("--steps", type=int, default=None, help="timed steps (cpu 5, cuda 20)")
    methods.add_argument("--warmup", type=int, default=None, help="warm-up steps (cpu 1, cuda 5)")
    methods.add_argument("--pgd-steps", type=int, default=10)
    methods.add_argument("--amp", action="store_true", help="bf16 autocast")
    methods.add_argument("--channels-last", action="store_true")
    other = parser.add_argument_group("loader, autoattack, scale, cuda")
    other.add_argument("--loader-images", type=int, default=None)
    other.add_argument("--aa-images", type=int, default=None)
    other.add_argument("--aa-steps", type=int, default=None)
    other.add_argument("--aa-queries", type=int, default=None)
    other.add_argument("--scale-runs", type=int, default=None)
    other.add_argument("--keep-scale-dir", type=Path, help="write the runs here and keep them")
    other.add_argument("--cuda-images", type=int, default=None)
    other.add_argument("--cuda-steps", type=int, default=None, help="steps per timed stretch")
    other.add_argument("--cuda-repeats", type=int, default=None)
    other.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return _defaults(args)


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the user left unset: quick sizes, or the full ones for the device."""
    cuda = args.device == "cuda"
    full = {
        "model": "preact_resnet18",
        "batch_size": 128,
        "steps": 20 if cuda else 5,
        "warmup": 5 if cuda else 1,
        "loader_images": 10_000,
        "aa_images": 200,
        "aa_steps": 100,
        "aa_queries": 5000,
        "scale_runs": 10_000,
        "cuda_images": 50_000,
        "cuda_steps": 50,
        "cuda_repeats": 3,
    }
    quick = {
        "model": "small_cnn",
        "width": 8,
        "batch_size": 16,
        "steps": 3,
        "warmup": 1,
        "loader_images": 1_000,
        "aa_images": 100,
        "aa_steps": 10,
        "aa_queries": 100,
        "scale_runs": 100,
        "cuda_images": 5_000,
        "cuda_steps": 10,
        "cuda_repeats": 2,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


Section = Callable[[argparse.Namespace, torch.device, Printer], tuple[dict, list[Figure]]]


def methods_section(
    args: argparse.Namespace, device: torch.device, printer: Printer
) -> tuple[dict, list[Figure]]:
    """Sections 1 and 2: step cost vs SGD and vs the floor."""
    from benchmarks import step_cost

    setup = step_cost.Setup(
        device,
        model=args.model,
        width=args.width,
        batch_size=args.batch_size,
        amp=args.amp,
        channels_last=args.channels_last,
        warmup=args.warmup,
        steps=args.steps,
    )
    tag = ""
    if args.amp or args.channels_last:
        tag = f" ({'bf16' if args.amp else 'fp32'}{'+cl' if args.channels_last else ''})"
    result = step_cost.run(setup, printer, pgd_steps=args.pgd_steps, tag=tag)
    return result, step_cost.figures(result, tag)


def loader_section(
    args: argparse.Namespace, device: torch.device, printer: Printer
) -> tuple[dict, list[Figure]]:
    """Section 3: DeviceLoader vs torchvision's DataLoader."""
    from benchmarks import loader

    result = loader.run(device, printer, count=args.loader_images)
    return result, loader.figures(result)


def autoattack_section(
    args: argparse.Namespace, device: torch.device, printer: Printer
) -> tuple[dict, list[Figure]]:
    """Section 4: samat's AutoAttack vs the official implementation."""
    from benchmarks import autoattack_compare

    result = autoattack_compare.run(
        device,
        printer,
        count=args.aa_images,
        steps=args.aa_steps,
        queries=args.aa_queries,
        epochs=2 if args.quick else 5,
    )
    return result, autoattack_compare.figures(result)


def scale_section(
    args: argparse.Namespace, device: torch.device, printer: Printer
) -> tuple[dict, list[Figure]]:
    """Section 5: samat status / collect / --help on a generated results directory."""
    from benchmarks import scale

    result = scale.run(
        printer,
        count=args.scale_runs,
        keep=args.keep_scale_dir,
        help_repeats=1 if args.quick else 3,
    )
    return result, scale.figures(result)


def cluster_section(
    args: argparse.Namespace, device: torch.device, printer: Printer
) -> tuple[dict, list[Figure]]:
    """Section 6: the demo grid on SLURM vs local, and packed tasks (runs_per_task 4 vs 1)."""
    from benchmarks import cluster

    result = cluster.run(printer, quick=args.quick)
    return result, cluster.figures(result)


def cuda_section(
    args: argparse.Namespace, device: torch.device, printer: Printer
) -> tuple[dict, list[Figure]]:
    """Section 7: epoch throughput per variant, then the method ratios under bf16 + cl."""
    from benchmarks import epoch, step_cost

    setup = epoch.EpochSetup(
        device,
        images=args.cuda_images,
        steps=args.cuda_steps,
        repeats=args.cuda_repeats,
        warmup=3 if args.quick else 10,
        compile=not args.no_compile,
    )
    epochs = epoch.run(setup, printer)
    tag = " (bf16+cl)"
    methods = step_cost.run(
        step_cost.Setup(
            device,
            amp=True,
            channels_last=True,
            warmup=3 if args.quick else 5,
            steps=5 if args.quick else 20,
        ),
        printer,
        pgd_steps=args.pgd_steps,
        tag=tag,
    )
    result = {"epoch": epochs, "methods": methods}
    return result, epoch.figures(epochs) + step_cost.figures(methods, tag)


# Each section imports its module when it runs: samat is being refactored, and an import that
# breaks in one section must leave the other figures standing.
SECTION_WORK: dict[str, Section] = {
    "methods": methods_section,
    "loader": loader_section,
    "autoattack": autoattack_section,
    "scale": scale_section,
    "cluster": cluster_section,
    "cuda": cuda_section,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads > 0:
        # one thread: two spin-waiting OpenMP threads on a shared 2-core machine time the noise
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    sections = [
        s for s in args.sections.split(",") if s != "autoattack" or not args.skip_autoattack
    ]
    printer = Printer(args.log)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    printer.line(
        f"samat {samat.__version__} benchmarks on {name}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {torch.get_num_threads()} CPU threads"
        + (", quick sizes" if args.quick else "")
    )
    data: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    figures: list[Figure] = []
    broken = []
    for section in sections:
        printer.line()
        if section == "cuda" and device.type != "cuda":
            printer.line("cuda: skipped (no CUDA device; the epoch figures are CUDA only)")
            data["cuda"] = {"skipped": "no CUDA device"}
            continue
        try:
            data[section], found = SECTION_WORK[section](args, device, printer)
        except Exception as error:  # one broken section must not lose the others' figures
            printer.line(f"{section}: FAILED: {type(error).__name__}: {error}")
            printer.line(traceback.format_exc().rstrip())
            data[section] = {"error": f"{type(error).__name__}: {error}"}
            found = [Figure(f"{section} section", None, "FAILED", "runs", False)]
            broken.append(section)
        figures.extend(found)
    printer.line()
    printer.line(table(figures))
    if args.json:
        write_json(args.json, data, figures)
        printer.line(f"wrote {args.json}")
    printer.close()
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
