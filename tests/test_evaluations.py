"""Train once, evaluate many: evaluations are records beside a trained run, added without
retraining, resumable after a kill, and tied to the images and checkpoint they ran on."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from samat.cli import cli
from samat.config import load_grid, validate_run
from samat.data import Split
from samat.evaluate import clean_accuracy, evaluate_run, subset_indices
from samat.grid import expand, run_id
from samat.store import CHECKPOINT, RunDir, find_runs, prepare, record_keys
from samat.train import execute
from tests.conftest import TINY_BASE

FGSM = {"attack": "fgsm", "norm": "linf", "eps": 0.1, "label": "FGSM"}
PGD = {"attack": "pgd", "norm": "linf", "eps": 0.1, "steps": 3, "label": "PGD"}


def samat(*args: Any) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def write_grid(tmp_path: Path, attacks: list[dict], **base_changes: Any) -> Path:
    base = copy.deepcopy(TINY_BASE)
    base["eval"]["attacks"] = attacks
    base.update(base_changes)
    grid = {
        "name": "e",
        "output": str(tmp_path / "out"),
        "base": base,
        "variants": [{"method.name": "standard"}, {"method.name": "sam", "method.rho": 0.1}],
    }
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_the_eval_section_is_not_part_of_the_run_id():
    config = validate_run(copy.deepcopy(TINY_BASE))
    other = config.model_copy(update={"eval": config.eval.model_copy(update={"n_examples": 3})})
    assert run_id(config) == run_id(other)
    trained_differently = config.model_copy(update={"seed": 1})
    assert run_id(trained_differently) != run_id(config)


def test_a_new_attack_column_evaluates_and_trains_nothing(tmp_path):
    grid_file = write_grid(tmp_path, [FGSM])
    first = samat("submit", grid_file, "--executor", "local")
    assert first.exit_code == 0, first.output
    runs = find_runs(tmp_path / "out")
    assert len(runs) == 2
    before = {
        r.run_id: (
            r.file(CHECKPOINT).read_bytes(),
            r.file(CHECKPOINT).stat().st_mtime_ns,
            r.result()["train_seconds"],
            r.metrics(),
        )
        for r in runs
    }
    fgsm_records = {r.run_id: r.eval_record(record_keys(r.config())["FGSM"]) for r in runs}

    grid_file = write_grid(tmp_path, [FGSM, PGD])
    plan = samat("plan", grid_file)
    assert plan.output.count("eval only: PGD") == 2, plan.output
    second = samat("submit", grid_file, "--executor", "local")
    assert second.exit_code == 0, second.output
    assert "2 runs to run (0 to train, 2 eval only)" in second.output
    for run in find_runs(tmp_path / "out"):
        data, mtime, seconds, metrics = before[run.run_id]
        assert run.file(CHECKPOINT).read_bytes() == data
        assert run.file(CHECKPOINT).stat().st_mtime_ns == mtime
        assert run.result()["train_seconds"] == seconds and run.metrics() == metrics
        assert "resumed" not in run.file("log").read_text()
        # the stored FGSM record was reused, not recomputed
        assert run.eval_record(record_keys(run.config())["FGSM"]) == fgsm_records[run.run_id]
        assert set(run.result()["robust"]) == {"FGSM", "PGD"}

    table = samat("collect", tmp_path / "out", "--format", "json", "--per-run")
    rows = json.loads(table.output)
    assert len(rows) == 2 and all(set(row["robust"]) == {"FGSM", "PGD"} for row in rows)
    for row in rows:  # the documented fields stay
        assert {
            "run_id",
            "state",
            "seed",
            "config",
            "natural",
            "robust",
            "average_robust",
            "train_seconds",
            "eval_seconds",
        } <= set(row)
        assert row["state"] == "done" and row["average_robust"] == pytest.approx(
            sum(row["robust"].values()) / 2
        )

    third = samat("submit", grid_file, "--executor", "local")
    assert "nothing to submit" in third.output and "2 done" in third.output


def test_samat_eval_adds_an_attack_without_editing_the_grid(tmp_path):
    grid_file = write_grid(tmp_path, [FGSM])
    assert samat("submit", grid_file, "--executor", "local").exit_code == 0
    run = find_runs(tmp_path / "out")[0]
    checkpoint = run.file(CHECKPOINT).read_bytes()
    out = samat("eval", run.path, "--attack", "{attack: pgd, eps: 0.1, steps: 2, label: P2}")
    assert out.exit_code == 0, out.output
    assert "1 run to evaluate" in out.output
    assert run.file(CHECKPOINT).read_bytes() == checkpoint
    assert set(run.result()["robust"]) == {"FGSM", "P2"}
    bad = samat("eval", run.path, "--attack", "{attack: pgdx}")
    assert bad.exit_code == 2 and "unknown attack 'pgdx'" in bad.output
    # an attack of another task is refused before any request is written
    request = run.file("eval.json").read_bytes()
    other = samat("eval", run.path, "--attack", "{attack: pso}")
    assert other.exit_code == 2, other.output
    assert "attack 'pso' does not apply to an image run" in other.output
    assert run.file("eval.json").read_bytes() == request


def test_force_retrains_from_epoch_0(tmp_path):
    grid_file = write_grid(tmp_path, [FGSM])
    assert samat("submit", grid_file, "--executor", "local").exit_code == 0
    run = find_runs(tmp_path / "out")[0]
    old = run.result()
    forced = samat("submit", grid_file, "--executor", "local", "--force")
    assert forced.exit_code == 0, forced.output
    assert [m["epoch"] for m in run.metrics()] == [1, 2]  # one line per epoch of the new run
    assert run.result()["train_seconds"] != old["train_seconds"]
    assert "resumed" not in run.file("log").read_text()
    replaced = [p for p in run.path.iterdir() if p.name.startswith("replaced-")]
    assert len(replaced) == 1 and (replaced[0] / "result.json").exists()
    assert json.loads((replaced[0] / "result.json").read_text()) == old


def _eval_run(tmp_path: Path, attacks: list[dict], **eval_changes: Any) -> RunDir:
    data = copy.deepcopy(TINY_BASE)
    data["eval"] = {**data["eval"], "attacks": attacks, **eval_changes}
    config = validate_run(data)
    from samat.grid import RunSpec

    rid = run_id(config)
    return prepare(RunSpec(rid, config, "SGD", tmp_path / "runs" / rid))


def test_a_kill_during_evaluation_resumes_at_the_missing_attack(tmp_path):
    slow = {"attack": "pgd", "norm": "linf", "eps": 0.1, "steps": 400, "label": "slow"}
    run = _eval_run(tmp_path, [FGSM, slow], n_examples=64, batch_size=8)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-m", "samat", "run", str(run.path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    keys = record_keys(run.config())
    deadline = time.monotonic() + 300
    try:
        # wait for the first attack's record and at least one batch of the second
        while not (run.eval_record(keys["FGSM"]) and run.eval_progress(keys["slow"])):
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    first = run.eval_dir() / f"{keys['FGSM']}.json"
    stored = (first.read_bytes(), first.stat().st_mtime_ns)
    done_batches = len(run.eval_progress(keys["slow"])["batches"])
    assert 1 <= done_batches < 8

    result = execute(run.path)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == stored
    log = run.file("log").read_text()
    assert log.count("robust accuracy FGSM") == 1  # attacked once, before the kill
    assert f"attack slow: resuming at {done_batches} of 8 batches" in log
    # the resumed attack gives what an uninterrupted one gives
    fresh = _eval_run(tmp_path / "fresh", [FGSM, slow], n_examples=64, batch_size=8)
    assert execute(fresh.path)["robust"] == result["robust"]


class ModeSensitive(nn.Module):
    """Right in eval mode (a lookup of each image's label by its first pixel), wrong in train
    mode: an evaluation that forgets model.eval() scores 0."""

    def __init__(self, table: dict[int, int], classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.table, self.classes = table, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = (x.flatten(1)[:, 0] * 255).round().long().tolist()
        labels = torch.tensor([self.table[k] for k in keys])
        if self.training:
            labels = (labels + 1) % self.classes
        # differentiable in x (attacks take input gradients), constant in value
        return (
            nn.functional.one_hot(labels, self.classes).float() * 10 + x.sum() * 0 + self.weight * 0
        )


def _lookup_split(n: int = 40, classes: int = 5) -> tuple[Split, dict[int, int]]:
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8) * 3
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
    table = {int(k): int(v) for k, v in zip(images[:, 0, 0, 0], labels, strict=True)}
    return Split(images, labels), table


def test_evaluation_runs_in_eval_mode_on_images_that_match_their_labels(tmp_path):
    split, table = _lookup_split()
    model = ModeSensitive(table, 5)
    model.train()
    from samat.data import DeviceLoader

    assert clean_accuracy(model, DeviceLoader(split, 7, device="cpu", shuffle=False)) == (40, 40)
    assert model.training  # mode given back
    # eps 0 leaves the images as they are: the robust column equals the clean one only when the
    # attacked images are the right ones for their labels (here a random subset of 17)
    zero = {"attack": "pgd", "norm": "linf", "eps": 0.0, "steps": 1, "label": "P0"}
    run = _eval_run(tmp_path, [zero], n_examples=17, subset_seed=3, batch_size=5)
    records = evaluate_run(run, run.config(), model, split, num_classes=5, checkpoint="last")
    assert records["P0"]["accuracy"] == 1.0 and records["P0"]["total"] == 17
    assert records["natural"]["accuracy"] == records["natural_subset"]["accuracy"] == 1.0
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_subset_indices_first_n_or_a_seeded_draw():
    assert subset_indices(10, 4, None).tolist() == [0, 1, 2, 3]
    assert subset_indices(10, 40, None).tolist() == list(range(10))
    drawn = subset_indices(100, 10, 7)
    assert drawn.tolist() == subset_indices(100, 10, 7).tolist() == sorted(drawn.tolist())
    assert drawn.tolist() != list(range(10)) and len(set(drawn.tolist())) == 10
    assert drawn.tolist() != subset_indices(100, 10, 8).tolist()


def test_record_keys_follow_the_images_and_the_checkpoint_not_the_label():
    config = validate_run({**copy.deepcopy(TINY_BASE)})
    keys = record_keys(config)
    relabelled = copy.deepcopy(TINY_BASE)
    relabelled["eval"]["attacks"] = [{**FGSM, "label": "other name"}]
    assert record_keys(validate_run(relabelled))["other name"] == keys["FGSM"]
    more = copy.deepcopy(TINY_BASE)
    more["eval"]["n_examples"] = 33
    assert record_keys(validate_run(more))["FGSM"] != keys["FGSM"]
    assert record_keys(validate_run(more))["natural"] == keys["natural"]  # whole test set
    best = copy.deepcopy(TINY_BASE)
    best["eval"]["checkpoint"] = "best"
    assert record_keys(validate_run(best))["natural"] != keys["natural"]


def test_keep_best_evaluates_the_validation_best_epoch(tmp_path):
    # lr x 40 from 60% of the epochs on: the last epochs are worse than the best one
    data = copy.deepcopy(TINY_BASE)
    data["train"].update(
        epochs=5,
        keep="best",
        validation={"size": 128, "every": 1},
        schedule={"name": "multistep", "milestones": [0.6], "gamma": 40},
    )
    data["eval"]["attacks"] = []
    config = validate_run(data)
    from samat.grid import RunSpec

    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "SGD", tmp_path / rid))
    result = execute(run.path)
    scores = [m["val_accuracy"] for m in run.metrics()]
    best_epoch = scores.index(max(scores)) + 1
    assert best_epoch < 5, scores  # the test's premise
    assert result["checkpoint"] == "best" and result["checkpoint_epoch"] == best_epoch
    # the evaluated weights are the best epoch's: natural accuracy differs from the last's
    last = copy.deepcopy(data)
    last["train"]["keep"] = "last"
    config_last = validate_run(last)
    run_last = prepare(RunSpec(run_id(config_last), config_last, "SGD", tmp_path / "last"))
    assert execute(run_last.path)["natural"] != result["natural"]


def test_old_output_directories_are_a_one_line_error(tmp_path):
    grid_file = write_grid(tmp_path, [FGSM])
    old = tmp_path / "out" / "runs" / "0123456789ab"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("eval: {n_examples: 5}\nseed: 0\n")
    result = samat("submit", grid_file, "--executor", "local")
    assert result.exit_code == 2
    assert "samat 0.1" in result.output and "new output directory" in result.output
    assert load_grid(grid_file) and len(expand(load_grid(grid_file))) == 2
