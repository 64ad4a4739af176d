"""`train.grad_accum`: k micro-batches per optimizer step give the one batch's gradient and update.

In one process (no Ray, no fit): the step itself, on the tiny U-Net, eager for the CDM (unconditional
and conditional with label dropout) and the DDM, compiled through "aot_eager" for the CDM (the graph
Dynamo captures; Inductor's kernels would add minutes of C++ and change nothing here), and DDP on two
gloo processes, where only the last micro-batch's backward all-reduces.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ONE_LEVEL, ROOT, tiny_train_config

from pipelines.train.step import TrainStep, fresh_train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BATCH = 8


def _batch(conditional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(BATCH, 1, 8, 8, generator=generator) * 2 - 1
    return x, torch.randint(0, 10, (BATCH,), generator=generator) if conditional else None


def _step(*overrides: str, k: int, backend: str = "inductor") -> TrainStep:
    # dropout off: the masks, drawn inside the network, would differ between one batch and k micro-batches.
    config = tiny_train_config("model.dropout=0.0", f"train.grad_accum={k}", *overrides)
    return fresh_train_step(config, 1, 8, seed=0, compile_backend=backend)


def _gradients(step: TrainStep) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in a.values())
    assert scale > 0
    return max(float((a[n] - b[n]).abs().max()) for n in a) / scale


CASES = {
    "cdm": (),
    "cdm-conditional": ("model.conditional=true", "data.num_labels=10", "model.label_dropout=0.5"),
    "ddm": ("model.kind=ddm",),
}


@pytest.mark.parametrize("case", list(CASES))
def test_k_micro_batches_give_the_one_batchs_gradient_and_update(case):
    conditional = "model.conditional=true" in CASES[case]
    x, labels = _batch(conditional)
    one, four = _step(*CASES[case], k=1), _step(*CASES[case], k=4)
    whole, parts = one(x, labels), four(x, labels)
    assert torch.allclose(whole.loss, parts.loss, rtol=1e-5) and torch.allclose(whole.mse, parts.mse, rtol=1e-5)
    assert abs(whole.grad_norm - parts.grad_norm) <= 1e-5 * whole.grad_norm
    # The optimizer, its schedule and the EMA stepped once each, to the same weights.
    assert one.scheduler.last_epoch == four.scheduler.last_epoch == 1
    # Adam's first step is lr·g/(|g|+eps): where |g| is near eps it magnifies float32 rounding, so the weights
    # agree to 1% of one step's size rather than to rounding (the gradients below do).
    atol = 0.01 * one.optimizer.param_groups[0]["lr"]
    for (name, p), q in zip(one.model.named_parameters(), four.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=atol), name
    for p, q in zip(one.ema.model.parameters(), four.ema.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=atol)
    # The gradients themselves, on the next batch from these weights.
    one.backward(x, labels), four.backward(x, labels)
    assert _relative_difference(_gradients(one), _gradients(four)) < 1e-5


def test_a_compiled_step_accumulates_as_the_eager_one():
    x, _ = _batch(False)
    eager = _step(*ONE_LEVEL, k=1)
    compiled = _step(*ONE_LEVEL, "train.compile=true", k=2, backend="aot_eager")
    eager.backward(x), compiled.backward(x)
    assert _relative_difference(_gradients(eager), _gradients(compiled)) < 1e-4  # float32 sums in another order


def _ddp_worker(rank: int, world: int, port: int, x: torch.Tensor, k: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        step = _step(*ONE_LEVEL, k=k)
        step.model = torch.nn.parallel.DistributedDataParallel(step.model)
        step.generator.manual_seed(rank)
        step.backward(x[rank * 4 : (rank + 1) * 4])
        torch.save({n.removeprefix("module."): p.grad for n, p in step.model.named_parameters()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("k", [1, 2])
def test_two_ddp_workers_accumulating_give_one_process_gradient(tmp_path, k):
    """Each of two DDP processes takes 4 of the 8 images in k micro-batches: both end with the gradient one
    process computes on all 8 with each process's draws. k=1: DDP's reducer with the loss's own
    autograd.grad(create_graph=True) inside the backward; k=2: `no_sync` kept the first micro-batch's gradient."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    x, _ = _batch(False)
    mp.start_processes(_ddp_worker, args=(2, port, x, k, str(tmp_path / "grads")), nprocs=2, start_method="spawn")
    reference = _step(*ONE_LEVEL, k=1)
    reference.optimizer.zero_grad(set_to_none=True)
    for rank in (0, 1):  # the mean over 8 = the mean of the two ranks' means over 4
        reference.generator.manual_seed(rank)
        loss, _, _ = reference.loss(x[rank * 4 : (rank + 1) * 4], None)
        (loss / 2).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        assert _relative_difference(_gradients(reference), {n: g for n, g in got.items() if g is not None}) < 1e-5


def test_print_config_tells_the_micro_batch_and_refuses_one_that_does_not_divide(tmp_path):
    cdm = str(Path(sys.executable).with_name("cdm"))
    config = str(ROOT / "configs" / "cifar10.toml")
    sets = ["--set", "train.grad_accum=4", "--set", "scaling.num_workers=1"]
    shown = subprocess.run([cdm, "train", config, "--print-config", *sets], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "512 images per optimizer step = 1 worker(s) × 4 micro-batch(es) of 128" in shown.stderr
    bad = subprocess.run(
        [cdm, "train", config, "--print-config", "--set", "train.grad_accum=3"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and "train.grad_accum" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_resuming_mid_run_from_a_checkpoint_is_exact(tmp_path):
    """Four accumulated steps in one go, and two, a checkpoint as the training loop writes it (weights, Adam,
    schedule, EMA, RNG streams), a fresh step restored from it and two more: the same weights, bit for bit."""
    from cdm_core.checkpoint import load_checkpoint, save_checkpoint
    from pipelines.common.config import to_dict
    from pipelines.train.loop import _restore_state, _rng_state, _set_rng_state

    generator = torch.Generator().manual_seed(5)
    batches = [torch.rand(BATCH, 1, 8, 8, generator=generator) * 2 - 1 for _ in range(4)]
    straight = _step(k=2)
    for x in batches:
        straight(x)
    first = _step(k=2)
    for x in batches[:2]:
        first(x)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(
        path, model=first.model, step=2, config=to_dict(first.config), ema=first.ema, optimizer=first.optimizer,
        scheduler=first.scheduler, extra={"rng": _rng_state(first.generator)},
    )  # fmt: skip
    resumed = fresh_train_step(first.config, 1, 8, seed=99)  # other weights and streams, all replaced below
    state = load_checkpoint(path)
    assert _restore_state(state, resumed.model, resumed.ema, resumed.optimizer, resumed.scheduler, first.config) == 2
    assert _set_rng_state(resumed.generator, state["extra"]["rng"]) is None
    for x in batches[2:]:
        resumed(x)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(straight.ema.model.parameters(), resumed.ema.model.parameters()):
        assert torch.equal(p, q)


def test_in_bf16_micro_batches_stay_within_bf16s_own_rounding():
    """Under bf16 autocast the micro-batches' activations round differently from the batch's (bf16 keeps 8
    bits): the gradients agree to well within what bf16 itself moves them from fp32."""
    x, _ = _batch(False)
    fp32, one, four = _step(k=1), _step("train.precision=bf16", k=1), _step("train.precision=bf16", k=4)
    for step in (fp32, one, four):
        step.backward(x)
    bf16_error = _relative_difference(_gradients(fp32), _gradients(one))
    assert _relative_difference(_gradients(one), _gradients(four)) < min(1e-2, bf16_error)
