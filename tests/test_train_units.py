"""The pieces of a training step and of validation, in one process (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_config

from cdm_core.ema import EMA
from cdm_core.likelihood import elbo_bits_per_dim
from cdm_core.objective import bits_per_dim, noise_data
from cdm_core.samplers import cdm_eps_fn
from pipelines.common import config as cfg
from pipelines.train.config import TrainConfig
from pipelines.train.step import TrainStep, build_network, build_schedule, fresh_train_step, lr_factor
from pipelines.train.validation import (
    Validator,
    _sample_noise,
    consistency_subset,
    t_grid,
    validations_per_run,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")
tiny = tiny_train_config


def make_step(config: TrainConfig, seed: int = 0) -> TrainStep:
    return fresh_train_step(config, 1, 8, seed=seed)


def test_learning_rate_warms_up_then_decays():
    optim = tiny("optim.warmup_steps=10", "optim.decay_every=100", "optim.decay_factor=0.5").optim
    # The official code's lr_lambda at its 0-based step k = s - 1: min((k+1)/10, 1) * 0.5 ** (k // 100).
    official = [min((s - 1 + 1) / 10, 1) * 0.5 ** ((s - 1) // 100) for s in (1, 5, 10, 99, 100, 101, 250)]
    assert [lr_factor(optim, s) for s in (1, 5, 10, 99, 100, 101, 250)] == official == [0.1, 0.5, 1, 1, 1, 0.5, 0.25]
    step = make_step(tiny("optim.warmup_steps=4", "optim.lr=1e-2"))
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    used = []
    for _ in range(5):
        used.append(step.optimizer.param_groups[0]["lr"])
        step(x)
    assert used == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])  # the lr each step actually ran with


def test_a_nonfinite_loss_skips_the_update():
    step = make_step(tiny())
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    assert step(x).finite
    before = [p.detach().clone() for p in step.model.parameters()]
    ema_updates = step.ema.num_updates
    step.poison_loss = True
    result = step(x)
    assert not result.finite and torch.isnan(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    assert step.ema.num_updates == ema_updates and step.scheduler.last_epoch == 1
    assert step(x).finite  # poisoning lasts one step


@pytest.mark.parametrize("overrides", [("model.kind=ddm",), ("model.conditional=true", "data.num_labels=10")])
def test_ddm_and_conditional_steps_train(overrides):
    config = tiny(*overrides)
    step = make_step(config)
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))
    first = step(x, y if config.model.conditional else None)
    assert first.finite and first.loss > 0 and step.ema.num_updates == 1


def test_dequantized_training_adds_one_bin_of_noise_from_the_step_s_generator():
    """data.dequantize: a training step's loss is the objective at x + u·2/255, u drawn from the step's generator
    after its t and ε, replayed here by hand (to the bit in one batch; to rounding in 2 micro-batches, whose
    mean loss is the batch's); without the option the same seed gives another loss."""
    x = torch.randint(0, 256, (8, 1, 8, 8)).float() / 127.5 - 1
    for k in (1, 2):
        step, plain = make_step(tiny("data.dequantize=true", f"train.grad_accum={k}")), make_step(tiny())
        replay = make_step(tiny())
        loss = step.backward(x)[0]  # the path a training step takes
        y, t, noise = replay.draw(x, None)
        u = torch.rand(x.shape, generator=replay.generator)
        by_hand = replay.objective(replay.model, x + u * (2 / 255), y, t, noise)[0].detach()
        assert torch.equal(loss, by_hand) if k == 1 else torch.allclose(loss, by_hand, rtol=1e-6, atol=0)
        assert not torch.allclose(loss, plain.backward(x)[0], rtol=1e-6, atol=0)
        assert step.generator.get_state().equal(replay.generator.get_state())  # the same draws, nothing more


def _batches(x, labels, batch, pad_every=None):
    out = []
    for start in range(0, len(x), batch):
        idx = torch.arange(start, min(start + batch, len(x)))
        pad = torch.zeros(len(idx), dtype=torch.bool)
        out.append({"x": x[idx], "label": labels[idx], "index": idx, "pad": pad})
    if pad_every:  # reader padding: repeated samples flagged pad=True must not count
        out.append(
            {
                "x": x[:pad_every],
                "label": labels[:pad_every],
                "index": torch.arange(pad_every),
                "pad": torch.ones(pad_every, dtype=torch.bool),
            }
        )
    return out


class _PowerClassifier(torch.nn.Module):
    """Logits over t = 0..T+1 from the mean square of x_t alone, against its expectation a_t²/3 + s_t²."""

    def __init__(self, schedule):
        super().__init__()
        self.expected = schedule.a.float() ** 2 / 3 + schedule.s.float() ** 2

    def forward(self, z):
        power = z.pow(2).flatten(1).mean(1, keepdim=True)
        return -1e3 * (power - self.expected) ** 2


def test_validation_does_not_depend_on_batching_and_matches_the_core_formulas():
    config = tiny("validation.t_points=4")
    model = make_step(config).model.eval()
    x = torch.randint(0, 256, (30, 1, 8, 8)).float() / 127.5 - 1  # 8-bit levels, as the readers give them
    labels = torch.zeros(30, dtype=torch.long)
    results = []
    for batch, pad in ((7, None), (30, 3)):
        v = Validator(config, build_schedule(config), None, torch.device("cpu"))
        v.load(_batches(x, labels, batch, pad))
        results.append(v(model, final=True))
    seconds = [r.pop("val/consistency_seconds") for r in results]
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    m = results[0]
    assert m["val/samples"] == 30
    assert m["val/nll_bpd"] == pytest.approx(bits_per_dim(model, x).mean().item(), rel=1e-5)
    with torch.no_grad():
        logits = model(x)
    assert m["val/link01_nats"] == pytest.approx((logits[:, 0] - logits[:, 1]).mean().item(), rel=1e-5)
    schedule = build_schedule(config)
    assert m["val/link01_expected_nats"] == pytest.approx(
        64 * math.log(math.sqrt(2 * math.pi) * float(schedule.s[1]) * 127.5)
    )
    # the final validation's ELBO: the first N images, N = 64 cut to 10% of the run's validation work
    # (4 validations × 30 images × 4 grid points / 20 classes = 24 → 2)
    n = consistency_subset(config, 30, 20)
    assert n == 2 == m["val/consistency_samples"] and m["val/consistency_elbo_classes"] == 20
    gens = [
        torch.Generator().manual_seed(int(np.random.default_rng([config.validation.seed, i, 11]).integers(2**62)))
        for i in range(n)
    ]
    elbo = elbo_bits_per_dim(
        cdm_eps_fn(model, schedule.to(dtype=torch.float32)), x[:n], schedule, classes=range(1, 21), generator=gens
    )
    assert m["val/nll_bpd_elbo"] == pytest.approx(elbo.bpd.mean().item(), rel=1e-5)
    assert m["val/consistency_nll_bpd"] == pytest.approx(bits_per_dim(model, x[:n]).mean().item(), rel=1e-5)
    assert m["val/consistency_gap_bpd"] == pytest.approx(m["val/consistency_nll_bpd"] - m["val/nll_bpd_elbo"])
    assert all(s > 0 for s in seconds)
    assert "val/nll_bpd_elbo" not in v(model)  # only at the final validation
    # configs/demo.toml's settings (3 validations of 250 images, 5 grid points, 20 classes): 18 images
    demo = tiny("train.steps=750", "validation.every=250", "checkpoint.every=250", "validation.t_points=5")
    assert validations_per_run(demo) == 3 and consistency_subset(demo, 250, 20) == 18
    assert len(v.curve) == len(t_grid(config.schedule.T, 4)) == 4 and m["val/mse"] == pytest.approx(sum(v.curve) / 4)
    # val/accuracy: how often argmax_t of the logits at x_t is t, over the grid, with validation's own noise.
    # A classifier by the mean square of x_t (E = a²/3 + s² for uniform data) is right often, not always.
    schedule, grid = build_schedule(config), t_grid(config.schedule.T, 4)
    v = Validator(config, schedule, None, torch.device("cpu"))
    v.load(_batches(x, labels, 7))
    by_power = _PowerClassifier(schedule)
    accuracy = v(by_power)["val/accuracy"]
    noise = _sample_noise(torch.arange(30), 4, (1, 8, 8), config.validation.seed)
    with torch.no_grad():
        hits = [
            (by_power(noise_data(x, torch.full((30,), t), schedule, noise[:, j])).argmax(1) == t).float().mean().item()
            for j, t in enumerate(grid.tolist())
        ]
    assert 0 < accuracy < 1 and accuracy == pytest.approx(sum(hits) / 4, abs=1e-6)

    v = Validator(tiny("validation.max_samples=10"), build_schedule(config), None, torch.device("cpu"))
    v.load(_batches(x, labels, 7))
    assert v(model)["val/samples"] == 10


def test_ddm_validation_reports_only_the_mse():
    config = tiny("model.kind=ddm")
    v = Validator(config, build_schedule(config), None, torch.device("cpu"))
    v.load(_batches(torch.rand(12, 1, 8, 8) * 2 - 1, torch.zeros(12, dtype=torch.long), 5))
    metrics = v(make_step(config).model.eval())
    assert set(metrics) == {"val/mse", "val/samples"} and metrics["val/mse"] > 0


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # created once: schema set-up takes seconds


@pytest.mark.parametrize("overrides", [("model.conditional=true", "data.num_labels=10"), ("model.kind=ddm",)])
def test_final_model_is_logged_to_mlflow_for_every_kind(overrides, digits_dataset, mlflow_store, tmp_path):
    """The MLflow model (torch.export, dynamic batch) computes what the checkpoint's EMA network computes.

    The unconditional CDM is covered end to end by tests/test_train.py."""
    mlflow = pytest.importorskip("mlflow")
    from cdm_core.checkpoint import save_checkpoint
    from pipelines.train.trainer import log_final_model

    config = tiny(f"data.uri={digits_dataset}", *overrides)
    model = build_network(config, 1, 8)
    save_checkpoint(
        tmp_path / "ckpt" / "checkpoint.pt", model=model, step=1, config=cfg.to_dict(config), ema=EMA(model)
    )
    mlflow.set_tracking_uri(mlflow_store)
    with mlflow.start_run() as active:
        log_final_model(str(tmp_path / "ckpt"), str(digits_dataset), "test")
    (logged,) = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{active.info.run_id}'", output_format="list"
    )
    loaded = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    x = torch.rand(7, 1, 8, 8) * 2 - 1
    args = [x]
    if config.model.kind == "ddm":
        args.append(torch.full((7,), 3))
    if config.model.conditional:
        args.append(torch.arange(7))
    torch.testing.assert_close(loaded(*args), model.eval()(*args), rtol=1e-5, atol=1e-5)
