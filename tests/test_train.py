import copy

import pytest
import torch

from samat.config import ConfigError, ScheduleConfig, validate_run
from samat.grid import RunSpec, method_label, run_id
from samat.store import CHECKPOINT, RunDir, prepare, read_checkpoint
from samat.train import TrainingError, execute, lr_factor
from tests.conftest import TINY_BASE


def make_run(tmp_path, **overrides) -> RunDir:
    data = copy.deepcopy(TINY_BASE)
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    config = validate_run(data)
    rid = run_id(config)
    return prepare(RunSpec(rid, config, method_label(config), tmp_path / "runs" / rid))


def test_lr_schedule_follows_the_papers():
    paper = ScheduleConfig()
    factors = [lr_factor(paper, e, 100) for e in (0, 74, 75, 89, 90, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = ScheduleConfig(name="cosine")
    assert lr_factor(cosine, 0, 10) == 1 and lr_factor(cosine, 5, 10) == pytest.approx(0.5)
    warm = ScheduleConfig(warmup_epochs=3)
    assert [lr_factor(warm, e, 100) for e in range(3)] == pytest.approx([0.25, 0.5, 0.75])


def test_per_step_schedules():
    poly = ScheduleConfig(name="poly", power=0.9)
    assert lr_factor(poly, 0, 1, step=0, steps=100) == 1
    assert lr_factor(poly, 3, 5, step=50, steps=100) == pytest.approx(0.5**0.9)
    assert lr_factor(poly, 4, 5, step=99, steps=100) == pytest.approx(0.01**0.9)
    linear = ScheduleConfig(name="linear", warmup_ratio=0.1)
    factors = [lr_factor(linear, 0, 3, step=t, steps=100) for t in (0, 5, 10, 55, 100)]
    assert factors == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert lr_factor(ScheduleConfig(name="linear"), 0, 3, step=25, steps=100) == 0.75


def test_training_by_iterations_with_a_poly_schedule(tmp_path):
    """20 steps of 16 per epoch: two epochs, the second cut to 4 steps, the lr set every step."""
    data = copy.deepcopy(TINY_BASE)
    del data["train"]["epochs"]
    data["train"].update(iterations=20, schedule={"name": "poly", "power": 1.0})
    data["eval"]["attacks"] = []
    config = validate_run(data)
    run = prepare(RunSpec(run_id(config), config, "SGD", tmp_path / "runs" / run_id(config)))
    result = execute(run.path)
    assert (result["epochs"], result["steps"], result["forward_backward_passes"]) == (2, 20, 20)
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["lr"] for m in metrics] == pytest.approx([0.05, 0.05 * (1 - 16 / 20)])
    assert [m["last_lr"] for m in metrics] == pytest.approx([0.05 * 5 / 20, 0.05 / 20])
    # the optimizer really ran the last step at the last step's lr
    _, meta = read_checkpoint(run.file(CHECKPOINT))
    assert meta["param_groups"][0]["lr"] == pytest.approx(0.05 / 20)
    assert (meta["epoch"], meta["step"]) == (2, 0)
    with pytest.raises(ConfigError, match="set train.epochs or train.iterations, not both"):
        validate_run({"train": {"epochs": 3, "iterations": 20}})


def test_run_writes_result_metrics_and_state(tmp_path):
    run = make_run(tmp_path)
    result = execute(run.path)
    assert run.state()["state"] == "done" and run.state()["attempts"] == 1
    assert run.result() == result
    assert 0.5 < result["natural"] <= 1
    assert set(result["robust"]) == {"FGSM"} and result["robust"]["FGSM"] <= result["natural"]
    assert result["average_robust"] == result["robust"]["FGSM"]
    assert result["passes_per_step"] == 1
    assert result["forward_backward_passes"] == 2 * 16  # 2 epochs x 16 batches of 32 from 512
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert "resumed" not in run.file("log").read_text()


def _weights(run: RunDir) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run.file(CHECKPOINT))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


@pytest.mark.parametrize(
    "method",
    [
        {"name": "sam", "rho": 0.1},
        {"name": "pgd_at", "eps": 0.1, "steps": 2},
        # LookSAM's stored gradient component and ESAM's random draws go through the checkpoint
        {"name": "looksam", "rho": 0.1, "k": 3},
        {"name": "esam", "rho": 0.1, "beta": 0.5, "gamma": 0.5},
    ],
)
def test_resume_equals_uninterrupted(tmp_path, method):
    straight = make_run(tmp_path / "a", method=method)
    execute(straight.path)

    stopped = make_run(tmp_path / "b", method=method, train={"epochs": 1})
    execute(stopped.path)
    # the same run, now asked for 2 epochs: continue from the 1-epoch checkpoint
    resumed = make_run(tmp_path / "c", method=method)
    resumed.file(CHECKPOINT).write_bytes(stopped.file(CHECKPOINT).read_bytes())
    _retag_checkpoint(resumed)
    execute(resumed.path)

    assert "resumed from epoch 1" in resumed.file("log").read_text()
    a, c = _weights(straight), _weights(resumed)
    assert a.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], c[key]), key
    assert straight.result()["natural"] == resumed.result()["natural"]
    assert straight.result()["robust"] == resumed.result()["robust"]


def _retag_checkpoint(run: RunDir) -> None:
    """A 1-epoch run's checkpoint re-labelled as belonging to the 2-epoch run (same seed, data)."""
    from samat.store import write_checkpoint

    tensors, meta = read_checkpoint(run.file(CHECKPOINT))
    meta["run_id"] = run_id(run.config())
    write_checkpoint(run.file(CHECKPOINT), tensors, meta)


def test_rerun_after_interruption_mid_training(tmp_path, monkeypatch):
    """Killed after epoch 1 (as a preempted SLURM task is), the next attempt resumes there."""
    straight = make_run(tmp_path / "a", train={"epochs": 3})
    execute(straight.path)

    run = make_run(tmp_path / "b", train={"epochs": 3})
    import samat.train as train_module

    real = train_module.write_checkpoint
    calls = {"n": 0}

    def preempt_after_first(path, tensors, meta):
        real(path, tensors, meta)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # stands in for the job being killed

    monkeypatch.setattr(train_module, "write_checkpoint", preempt_after_first)
    with pytest.raises(KeyboardInterrupt):
        execute(run.path)
    assert run.state()["state"] == "running"  # killed, not failed
    monkeypatch.setattr(train_module, "write_checkpoint", real)
    execute(run.path)
    assert run.state()["attempts"] == 2
    assert "resumed from epoch 1" in run.file("log").read_text()
    assert _weights(run).keys() == _weights(straight).keys()
    assert all(torch.equal(_weights(run)[k], _weights(straight)[k]) for k in _weights(run))


def test_nan_loss_fails_the_run_with_a_fix(tmp_path):
    run = make_run(tmp_path, train={"optimizer": {"name": "sgd", "lr": 1e30}})
    with pytest.raises(TrainingError, match="lower train.optimizer.lr"):
        execute(run.path)
    state = run.state()
    assert state["state"] == "failed" and "loss became" in state["error"]
    assert run.result() is None


def test_corrupt_checkpoint_stops_before_training(tmp_path):
    run = make_run(tmp_path)
    run.file(CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        execute(run.path)
    assert run.state()["state"] == "failed"
    assert run.metrics() == []


def test_checkpoint_of_another_config_is_refused(tmp_path):
    other = make_run(tmp_path / "o", seed=5)
    execute(other.path)
    run = make_run(tmp_path / "r")
    run.file(CHECKPOINT).write_bytes(other.file(CHECKPOINT).read_bytes())
    with pytest.raises(ConfigError, match="belongs to another config"):
        execute(run.path)


@pytest.mark.parametrize("method", [{"name": "standard"}, {"name": "sam", "rho": 0.1}])
def test_the_step_path_reads_nothing_back_from_the_device(tmp_path, monkeypatch, method):
    """No host-device sync per step: loss and accuracy are summed on the device and read once per
    epoch; the NaN flag is read every NAN_CHECK_EVERY steps (on a GPU each read is a sync)."""
    import samat.train as train_module

    run = make_run(tmp_path, method=method, train={"epochs": 1, "batch_size": 8})  # 64 steps
    reads = {"n": 0}
    for name in ("item", "__int__", "__float__", "__bool__", "tolist", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_epoch = train_module._epoch
    during = {}

    def epoch(*args, **kwargs):
        reads["n"] = 0
        record = real_epoch(*args, **kwargs)
        during["reads"] = reads["n"]
        return record

    monkeypatch.setattr(train_module, "_epoch", epoch)
    execute(run.path)
    steps = 512 // 8
    # one NaN-flag read every NAN_CHECK_EVERY steps, plus the epoch's sums
    assert during["reads"] <= steps // train_module.NAN_CHECK_EVERY + 3, during


def test_segmentation_train_accuracy_leaves_ignored_pixels_out(tmp_path):
    """The epoch's accuracy counts pixels, not examples, and not the ignored (255) ones."""
    from samat.methods.base import StepResult
    from samat.train import Position, _epoch

    masks = torch.tensor([[[0, 1], [255, 255]], [[0, 0], [1, 255]]])  # 5 counted pixels, 3 are 0
    logits = torch.zeros(2, 3, 2, 2)
    logits[:, 0] = 1.0  # predicts class 0 everywhere

    class Loader:
        def __len__(self):
            return 1

        def epoch(self, epoch, start=0):
            yield torch.zeros(2, 3, 2, 2), masks

    class Method:
        def step(self, model, images, labels):
            return StepResult(torch.tensor(0.5), logits)

    run = make_run(tmp_path)
    config = run.config()
    model = torch.nn.Conv2d(3, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = _epoch(
        run, config, model, optimizer, Method(), Loader(), Position(), None, (None, None)
    )
    assert record["train_accuracy"] == pytest.approx(3 / 5)
    assert record["loss"] == pytest.approx(0.5)
