"""The compiled training step (`train.compile`) against the eager one, in one process (no Ray).

Inductor writes and builds C++ for every kernel, 2–3 s each here, and a CDM's training graph (the
forward, the input gradient and the backward of both) has ~150 of them on the tiny preset. So
only the unconditional CDM and the dropout check compile through Inductor, both on the tiny U-Net
cut to one level (conftest.ONE_LEVEL: ~60 kernels); the conditional CDM and the DDM, on the preset,
go through "aot_eager" (see CASES). The `linear` and `ot` schedules differ only in the values of
a and s, which are the graph's inputs, so each network compiles once; the unconditional CDM's
graph is also the one the two-process test below and the two-worker test in test_train.py run,
which Inductor's on-disk cache then serves. The presets' own graphs compile in
benchmarks/core.py (mnist) and benchmarks/gpu.sh (the paper's, on a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ONE_LEVEL, tiny_train_config

from pipelines.train.config import TrainConfig
from pipelines.train.step import TrainStep, fresh_train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
tiny = tiny_train_config


def make_step(config: TrainConfig, seed: int = 0, backend: str = "inductor") -> TrainStep:
    return fresh_train_step(config, 1, 8, seed=seed, compile_backend=backend)


def gradients(step: TrainStep) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in step.model.named_parameters()}


def assert_same_gradients(eager: dict[str, torch.Tensor], compiled: dict[str, torch.Tensor]) -> float:
    """Each parameter's gradient within 1e-4 of the largest gradient entry (float32 sums in another order);
    returns the largest difference relative to that scale."""
    scale = max(float(g.abs().max()) for g in eager.values())
    assert scale > 0
    worst = max(float((eager[n] - compiled[n]).abs().max()) for n in eager) / scale
    assert worst < 1e-4, f"compiled gradients differ from eager by {worst:.2e} of the largest gradient"
    return worst


# (overrides, backend): the unconditional CDM through Inductor, the kernels users run; the conditional CDM
# and the DDM through "aot_eager": the same Dynamo capture of torch.func.grad and AOTAutograd's forward and
# backward graphs, run by eager kernels, which saves Inductor's ~2 minutes of C++ per graph here.
CASES = {
    "cdm": (ONE_LEVEL, "inductor"),
    "cdm-conditional": (("model.conditional=true", "data.num_labels=10", "model.label_dropout=0.5"), "aot_eager"),
    "ddm": (("model.kind=ddm",), "aot_eager"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_compiled_step_gives_the_eager_losses_and_gradients(case):
    """Same weights, same generator: the same draws, losses and parameter gradients, then the same
    on the `linear` and the `ot` schedule; label dropout (0.5 here) is drawn as in eager. (Weights after
    Adam are not compared: Adam moves a weight by ~lr for any gradient, so a near-zero gradient's last
    digits decide its direction; the second step's losses and gradients show the updates agree.)"""
    g = torch.Generator().manual_seed(7)
    x, labels = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (4,), generator=g)
    labels = labels if "conditional" in case else None
    case_overrides, backend = CASES[case]
    for schedule in ("linear", "ot"):
        overrides = (*case_overrides, f"schedule.name={schedule}")
        eager = make_step(tiny(*overrides))
        compiled = make_step(tiny(*overrides, "train.compile=true"), backend=backend)
        assert compiled.compiled is not None and eager.compiled is None
        for _ in range(2):  # the second step runs from the updated weights, with fresh draws
            loss_e, ce_e, mse_e = eager.backward(x, labels)
            loss_c, ce_c, mse_c = compiled.backward(x, labels)
            assert math.isfinite(float(loss_e))
            for e, c in ((loss_e, loss_c), (ce_e, ce_c), (mse_e, mse_c)):
                assert float(c) == pytest.approx(float(e), rel=1e-5, abs=1e-7)
            assert_same_gradients(gradients(eager), gradients(compiled))
            for step in (eager, compiled):
                step.optimizer.step()
                step.scheduler.step()


def test_a_compiled_step_trains_and_skips_a_nonfinite_update():
    step = make_step(tiny("train.compile=true", *ONE_LEVEL))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert step(x).finite
    before = [p.detach().clone() for p in step.model.parameters()]
    step.poison_loss = True
    assert not step(x).finite
    assert all(torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    assert step(x).finite and step.ema.num_updates == 2


def test_dropout_in_a_compiled_step_is_random_per_step_and_follows_torch_seed():
    """Inside the compiled graph dropout draws from torch's default generator, as eager dropout does:
    each call a new mask, the same mask again after the same torch.manual_seed."""
    config = tiny("train.compile=true", "model.dropout=0.5", *ONE_LEVEL)
    step = make_step(config)
    with torch.no_grad():  # residual branches start at zero, which would hide what dropout does before them
        for p in step.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.full((4,), 5)
    noise = torch.randn(x.shape)

    def loss(seed: int | None = None) -> float:
        if seed is not None:
            torch.manual_seed(seed)
        return float(step.compiled(step.model, x, None, t, noise)[0])  # the training graph, without its backward

    seeded = [loss(3), loss(3)]
    free = [loss(), loss(), loss()]
    assert seeded[0] == seeded[1]
    assert len(set(free)) == 3, f"dropout masks repeat across compiled calls: {free}"
    eager = float(step.objective(step.model.eval(), x, None, t, noise)[0])
    assert all(value != eager for value in free)  # no-dropout (eval) loss differs: dropout is on


def _two_process_worker(rank: int, world: int, port: int, x: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Different initial weights on each process: the step must start from rank 0's, as DDP would.
        step = fresh_train_step(tiny("train.compile=true", *ONE_LEVEL), 1, 8, seed=rank)
        step.backward(x[rank * 4 : (rank + 1) * 4])
        torch.save({n: p.grad for n, p in step.model.named_parameters()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_compiled_step_on_two_processes_averages_gradients_as_ddp(tmp_path):
    """train.compile has no DDP wrapper: the step broadcasts rank 0's weights and all-reduces the gradients
    itself (gloo here, as Ray Train sets it up on CPU workers). Both processes must end with the gradient of
    one eager process on the global batch with each process's draws. The graph is the `cdm` case's above,
    which Inductor's on-disk cache then serves."""
    import socket

    import torch.multiprocessing as mp

    from cdm_core.objective import cdm_loss

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mp.start_processes(_two_process_worker, args=(2, port, x, str(tmp_path / "grads")), nprocs=2, start_method="spawn")

    eager = make_step(tiny(*ONE_LEVEL))  # seed 0: rank 0's weights
    draws = [
        fresh_train_step(tiny(*ONE_LEVEL), 1, 8, seed=rank).draw(x[rank * 4 : (rank + 1) * 4], None) for rank in (0, 1)
    ]
    t, noise = torch.cat([d[1] for d in draws]), torch.cat([d[2] for d in draws])
    cfg_loss = eager.config.loss
    cdm_loss(
        eager.model, x, eager.schedule, t=t, noise=noise, w_ce=cfg_loss.w_ce, w_mse=cfg_loss.w_mse
    ).total.backward()
    reference = gradients(eager)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        assert_same_gradients(
            reference, {n: g if g is not None else torch.zeros_like(reference[n]) for n, g in got.items()}
        )
