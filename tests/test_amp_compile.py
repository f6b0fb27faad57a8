"""train.amp (off | bf16 | fp16 with a GradScaler) and train.compile (torch.compile for the
training steps), on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samat.config import validate_run
from samat.methods import create
from samat.methods.base import amp_mode, autocast_forward
from samat.store import read_checkpoint
from samat.train import CHECKPOINT, _restore_method, execute
from tests.test_train import _retag_checkpoint, _weights, make_run

METHODS = {
    "standard": {"name": "standard"},
    "sam": {"name": "sam", "rho": 0.1},
    "asam": {"name": "asam", "rho": 0.5},
    "esam": {"name": "esam", "rho": 0.1, "beta": 0.5, "gamma": 0.5},
    "looksam": {"name": "looksam", "rho": 0.1, "k": 2},
    "pgd_at": {"name": "pgd_at", "eps": 0.1, "steps": 2},
    "fgsm_at": {"name": "fgsm_at", "eps": 0.1},
}


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(4 * 8 * 8, 10)).train()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(16, 1, 8, 8, generator=generator)
    return images, torch.randint(0, 10, (16,), generator=generator)


def method_for(name: str, model: nn.Module, amp: str):
    cfg = validate_run({"method": METHODS[name]}).method
    return create(cfg, torch.optim.SGD(model.parameters(), lr=0.1), amp=amp)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_amp_modes_and_the_old_boolean_spelling() -> None:
    assert [amp_mode(x) for x in (True, False, "off", "bf16", "fp16")] == [
        "bf16",
        "off",
        "off",
        "bf16",
        "fp16",
    ]
    with pytest.raises(ValueError, match="unknown amp mode 'fp8'"):
        amp_mode("fp8")
    assert validate_run({"train": {"amp": True}}).train.amp == "bf16"
    assert validate_run({"train": {"amp": "fp16"}}).train.amp == "fp16"
    model = nn.Linear(4, 2)
    x = torch.rand(3, 4)
    dtypes = [autocast_forward(model, x, amp=mode).dtype for mode in ("off", "bf16", "fp16")]
    assert dtypes == [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("name", list(METHODS))
def test_fp16_steps_go_through_the_grad_scaler(name: str) -> None:
    model = bn_model()
    method = method_for(name, model, "fp16")
    assert (
        method.scaler.is_enabled()
        and method_for(name, bn_model(), "bf16").scaler.is_enabled() is False
    )
    before = params(model)
    scales = []
    original = method.scaler.scale
    method.scaler.scale = lambda loss: scales.append(loss.detach()) or original(loss)
    for i in range(3):
        out = method.step(model, *batch(i))
        assert out.logits.dtype == torch.float16 and torch.isfinite(out.loss)
    assert scales, "no loss went through GradScaler.scale"
    after = params(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", list(METHODS))
def test_an_overflowing_fp16_step_leaves_the_weights_and_lowers_the_scale(name: str) -> None:
    """A loss scale that overflows the gradients: the scaler skips the update (for SAM the
    perturbed point is non-finite, and w is restored before the skipped step) and halves it."""
    model = bn_model()
    method = method_for(name, model, "fp16")
    method.scaler.load_state_dict({**method.scaler.state_dict(), "scale": 2.0**127})
    before = params(model)
    method.step(model, *batch())
    after = params(model)
    assert all(torch.equal(before[k], after[k]) for k in before), name
    assert method.scaler.get_scale() == 2.0**126
    # the next step, at a sane scale, trains
    method.scaler.load_state_dict({**method.scaler.state_dict(), "scale": 2.0**10})
    method.step(model, *batch(1))
    assert any(not torch.equal(before[k], v) for k, v in params(model).items())


@pytest.mark.parametrize("name", ["standard", "looksam"])
def test_the_loss_scale_is_method_state_and_restores(name: str) -> None:
    method = method_for(name, bn_model(), "fp16")
    method.scaler.load_state_dict(
        {**method.scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7}
    )
    state = method.state_dict()
    assert float(state["amp.scale"]) == 1024.0 and int(state["amp.growth_tracker"]) == 7
    fresh = method_for(name, bn_model(), "fp16")
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == 1024.0
    assert fresh.scaler.state_dict()["_growth_tracker"] == 7
    # without fp16 there is no scale to keep
    assert "amp.scale" not in method_for(name, bn_model(), "bf16").state_dict()


def test_an_fp16_run_checkpoints_its_scale_and_resumes_bit_identical(tmp_path) -> None:
    # fp16 on the CPU is emulated and slow (68 s for TINY_BASE's 512 images): 128 give the
    # same 2-epoch resume (4 steps an epoch) in a quarter of the time
    train = {"amp": "fp16"}
    method = METHODS["sam"]
    data = {"train_size": 128}
    straight = make_run(tmp_path / "a", method=method, train=train, data=data)
    execute(straight.path)
    tensors, _ = read_checkpoint(straight.file(CHECKPOINT))
    assert float(tensors["method.amp.scale"]) == 2.0**16  # GradScaler's start, not overflowed
    restored = method_for("sam", bn_model(), "fp16")
    _restore_method(restored, tensors)
    assert restored.scaler.get_scale() == 2.0**16

    stopped = make_run(tmp_path / "b", method=method, train={**train, "epochs": 1}, data=data)
    execute(stopped.path)
    resumed = make_run(tmp_path / "c", method=method, train=train, data=data)
    resumed.file(CHECKPOINT).write_bytes(stopped.file(CHECKPOINT).read_bytes())
    _retag_checkpoint(resumed)
    execute(resumed.path)
    assert "resumed from epoch 1" in resumed.file("log").read_text()
    a, c = _weights(straight), _weights(resumed)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """torch.compile as the run calls it, with the aot_eager backend: dynamo traces every pass
    (and AOT autograd its backward) as inductor would get them, without minutes of C++ builds."""
    real = torch.compile
    calls: list[nn.Module] = []

    def compile_(model, *args, **kwargs):
        calls.append(model)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["standard", "sam", "pgd_at"])
def test_compiled_training_runs_and_checkpoints_the_plain_module(
    tmp_path, compiled: list[nn.Module], name: str
) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    overrides = {"method": METHODS[name], "data": {"train_size": 128}}
    run = make_run(tmp_path / "compiled", train={"compile": True}, **overrides)
    result = execute(run.path)
    assert len(compiled) == 1 and run.state()["state"] == "done"
    # 2 epochs of 4 steps: a handful of graphs (clean, frozen-BN, input-gradient passes), not one
    # per step
    assert 1 <= counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    tensors, _ = read_checkpoint(run.file(CHECKPOINT))
    plain = make_run(tmp_path / "plain", **copy.deepcopy(overrides))
    execute(plain.path)
    eager, _ = read_checkpoint(plain.file(CHECKPOINT))
    assert tensors.keys() == eager.keys()  # no '_orig_mod.' prefix
    for key in tensors:
        if key.startswith("model."):
            assert torch.allclose(tensors[key], eager[key], atol=1e-4), key
    assert result["natural"] == pytest.approx(plain.result()["natural"], abs=0.05)


@pytest.mark.slow
def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> float:
    keys = [k for k in b if k.startswith(prefix) and b[k].is_floating_point()]
    return float(sum(((a[k] - b[k]).double() ** 2).sum() for k in keys) ** 0.5)


def _initial_weights(run) -> dict[str, torch.Tensor]:
    from samat.train import _set_determinism, build

    config = run.config()
    _set_determinism(config)
    _, model = build(config, torch.device("cpu"))
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def test_compiled_training_with_the_default_backend(tmp_path) -> None:
    """Once with inductor itself (what a GPU run gets; C++ on the CPU, about a minute here).

    Inductor fuses and reorders float32 sums, so its weights differ from eager's by rounding, and
    by how much depends on the CPU (2.5e-4 on a momentum buffer of about 3e-2 was seen on an AMD
    EPYC; an absolute 1e-4 on every tensor failed there). What must not differ is the training
    itself, so each figure is compared with the size of what training changed:
    - the weights: their distance from eager's is at most 3e-4 of the distance training moved
      them (measured: 3e-5 here). A learning rate 1% off moves them 6e-4 of it, a dropped or a
      stale step far more, so any of those fails; a control run with the 1%-off rate checks that
      this bound does fail it.
    - the momentum buffers, one step's gradients of mostly BatchNorm-cancelled biases, carry the
      rounding at its largest (1e-3 of their norm here, 2.5e-4 absolute on the EPYC): within 5%
      of their norm, a check that they exist and are the same step's, not a precision test.
    - the epoch's loss to 1e-4 relative.
    """
    torch._dynamo.reset()
    overrides = {"data": {"train_size": 64}}
    run = make_run(tmp_path / "compiled", train={"compile": True, "epochs": 1}, **overrides)
    execute(run.path)
    plain = make_run(tmp_path / "plain", train={"epochs": 1}, **copy.deepcopy(overrides))
    execute(plain.path)
    off = make_run(
        tmp_path / "off",
        train={"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05 * 1.01}},
        **copy.deepcopy(overrides),
    )
    execute(off.path)
    ours, theirs, control = _weights(run), _weights(plain), _weights(off)
    assert ours.keys() == theirs.keys()
    moved = _distance(theirs, {**theirs, **_initial_weights(plain)}, "model.")
    assert moved > 0.1
    assert _distance(ours, theirs, "model.") <= 3e-4 * moved
    assert _distance(control, theirs, "model.") > 3e-4 * moved  # the bound catches a 1% lr
    momentum = _distance(theirs, {k: torch.zeros_like(v) for k, v in theirs.items()}, "optim.")
    assert momentum > 0 and _distance(ours, theirs, "optim.") <= 0.05 * momentum
    loss, eager_loss = (run.metrics()[-1]["loss"], plain.metrics()[-1]["loss"])
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    torch._dynamo.reset()
