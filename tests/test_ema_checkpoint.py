"""EMA and the checkpoint format: averaging, warm-up, exact resumption, clear refusals."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cdm_core.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    model_from_checkpoint,
    restore,
    save_checkpoint,
)
from cdm_core.ema import EMA
from cdm_core.networks import LEGACY_FIELDS, MLPClassifier, UNetClassifier, UNetConfig, unet_preset

T = 10


def small_mlp(seed: int = 0) -> MLPClassifier:
    torch.manual_seed(seed)
    return MLPClassifier(2, T, hidden=16, depth=2)


def fill_(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


# ----------------------------------------------------------------------------
# EMA


def test_ema_is_a_frozen_eval_copy():
    model = small_mlp().train()
    ema = EMA(model)
    assert ema.model is not model and not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for a, b in zip(ema.model.parameters(), model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_ema_update_rule_and_convergence():
    model = small_mlp()
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    fill_(model, 2.0)
    ema.update(model)
    for old, new in zip(before, ema.model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * 2.0)
    for _ in range(300):  # 0.9**300 ≈ 2e-14
        ema.update(model)
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.0))


def test_ema_warm_up_copies_weights():
    model = small_mlp()
    ema = EMA(model, decay=0.5, start_step=2)
    for value in (1.0, 3.0):
        fill_(model, value)
        ema.update(model)
        assert all(torch.equal(p, torch.full_like(p, value)) for p in ema.model.parameters())
    fill_(model, 5.0)
    ema.update(model)  # third update: averaging starts
    assert all(torch.allclose(p, torch.full_like(p, 4.0)) for p in ema.model.parameters())
    assert ema.num_updates == 3


def test_ema_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.99)
    model.train()(torch.randn(8, 2) * 5 + 3)  # changes running stats and the int counter
    ema.update(model)
    for a, b in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(a, b)


def test_ema_unwraps_distributed_data_parallel(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = small_mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMA(ddp, decay=0.5)
        assert type(ema.model) is MLPClassifier
        fill_(model, 1.0)
        ema.update(ddp)
        fill_(model, 3.0)
        ema.update(ddp)
        assert ema.num_updates == 2
        # Checkpoints from a DDP-wrapped model have unprefixed keys and rebuild the bare network.
        buffer = io.BytesIO()
        save_checkpoint(buffer, model=ddp, step=1, config={}, ema=ema)
        buffer.seek(0)
        checkpoint = load_checkpoint(buffer)
        assert not any(k.startswith("module.") for k in checkpoint["model"])
        assert type(model_from_checkpoint(checkpoint)) is MLPClassifier
    finally:
        dist.destroy_process_group()


def test_ema_state_dict_round_trip():
    model = small_mlp()
    ema = EMA(model, decay=0.9)
    fill_(model, 1.0)
    ema.update(model)
    other = EMA(small_mlp(seed=1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    for a, b in zip(other.model.parameters(), ema.model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# Checkpoints


def make_training_state(seed: int = 0):
    model = small_mlp(seed)
    ema = EMA(model, decay=0.9, start_step=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    return model, ema, optimizer, scheduler


def train_step(model, ema, optimizer, scheduler, x):
    optimizer.zero_grad()
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    ema.update(model)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    batches = torch.randn(5, 8, 2)
    model, ema, optimizer, scheduler = make_training_state()
    for x in batches[:3]:
        train_step(model, ema, optimizer, scheduler, x)
    rng_state = torch.get_rng_state()
    config = {"lr": 1e-2, "schedule": "linear", "dims": [2, 16], "nested": {"ok": True, "none": None}}
    path = tmp_path / "ckpt" / "step3.pt"
    save_checkpoint(
        path,
        model=model,
        step=3,
        config=config,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        extra={"torch_rng_state": rng_state, "epoch": 1},
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["step3.pt"]  # no temp files left behind

    raw = torch.load(path, weights_only=True)  # the whole file is weights_only-safe
    assert raw["format"] == "cdm-checkpoint" and raw["version"] == 1

    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 3 and checkpoint["config"] == config
    assert torch.equal(checkpoint["extra"]["torch_rng_state"], rng_state)

    model2, ema2, optimizer2, scheduler2 = make_training_state(seed=1)  # different weights
    assert restore(checkpoint, model2, ema=ema2, optimizer=optimizer2, scheduler=scheduler2) == 3
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert ema2.num_updates == ema.num_updates

    # One more step on each copy: identical parameters, optimiser moments, EMA and lr.
    torch.set_rng_state(checkpoint["extra"]["torch_rng_state"])
    train_step(model, ema, optimizer, scheduler, batches[3])
    train_step(model2, ema2, optimizer2, scheduler2, batches[3])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.model.parameters(), ema2.model.parameters()):
        assert torch.equal(a, b)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_model_from_checkpoint_uses_ema_weights(tmp_path):
    model, ema, optimizer, scheduler = make_training_state()
    for x in torch.randn(3, 8, 2):
        train_step(model, ema, optimizer, scheduler, x)
    save_checkpoint(tmp_path / "c.pt", model=model, step=3, config={}, ema=ema)
    from_ema = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    from_raw = model_from_checkpoint(tmp_path / "c.pt", use_ema=False)
    assert not from_ema.training and not from_raw.training
    for a, b in zip(from_ema.parameters(), ema.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(from_raw.parameters(), model.parameters()):
        assert torch.equal(a, b)
    save_checkpoint(tmp_path / "no_ema.pt", model=model, step=3, config={})
    with pytest.raises(ValueError, match="use_ema=False"):
        model_from_checkpoint(tmp_path / "no_ema.pt")


def test_save_to_file_object_and_overwrite(tmp_path):
    model = small_mlp()
    buffer = io.BytesIO()
    save_checkpoint(buffer, model=model, step=7, config={"a": 1})
    buffer.seek(0)
    assert load_checkpoint(buffer)["step"] == 7
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=model, step=1, config={})
    save_checkpoint(str(path), model=model, step=2, config={})
    assert load_checkpoint(str(path))["step"] == 2


def test_save_refuses_values_weights_only_cannot_load(tmp_path):
    import numpy as np

    model = small_mlp()
    with pytest.raises(TypeError, match=r"extra\['mean'\].*numpy"):
        save_checkpoint(tmp_path / "c.pt", model=model, step=0, config={}, extra={"mean": np.zeros(3)})
    with pytest.raises(TypeError, match=r"config\['w'\]"):
        save_checkpoint(tmp_path / "c.pt", model=model, step=0, config={"w": torch.ones(2)})
    assert not list(tmp_path.iterdir())


def tiny_unet(base_channels: int = 32, num_timesteps: int = T) -> UNetClassifier:
    config = dataclasses.replace(unet_preset("tiny", 1, 8), base_channels=base_channels)
    return UNetClassifier(config, num_timesteps)


def test_restore_refuses_a_different_architecture(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=tiny_unet(base_channels=16, num_timesteps=20), step=0, config={})
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        restore(checkpoint, tiny_unet(base_channels=32, num_timesteps=T))
    message = str(err.value)
    assert "checkpoint has base_channels=16, model has base_channels=32" in message
    assert "checkpoint has num_timesteps=20, model has num_timesteps=10" in message
    assert "in_channels" not in message  # only what differs
    with pytest.raises(CheckpointMismatchError, match="class='MLPClassifier'"):
        restore(load_checkpoint_of(small_mlp(), tmp_path), tiny_unet())
    assert isinstance(err.value, ValueError)


def load_checkpoint_of(model: nn.Module, folder) -> dict:
    save_checkpoint(folder / "other.pt", model=model, step=0, config={})
    return load_checkpoint(folder / "other.pt")


def test_checkpoints_from_before_the_official_unet_load_as_they_were(tmp_path):
    """Checkpoints whose spec lacks head_channels/downsample/norm_eps/min_group_channels hold the network of
    that time: symmetric downsampling, GroupNorm eps 1e-5 and one channel per group at width 32, head conv as
    wide as the backbone."""
    torch.manual_seed(0)
    legacy_config = UNetConfig(1, 8, 32, (1, 2), 1, (4,), 0.0, **LEGACY_FIELDS)
    legacy = UNetClassifier(legacy_config, T)
    with torch.no_grad():
        for p in legacy.parameters():  # no zero-initialised branches: every layer shows in the output
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "old.pt", model=legacy, step=5, config={}, ema=EMA(legacy))
    old = torch.load(tmp_path / "old.pt", weights_only=True)
    for key in LEGACY_FIELDS:  # as every checkpoint written before the fields existed
        del old["model_spec"]["config"][key]
    torch.save(old, tmp_path / "old.pt")

    checkpoint = load_checkpoint(tmp_path / "old.pt")
    rebuilt = model_from_checkpoint(checkpoint)
    assert rebuilt.config == legacy_config
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), legacy.eval()(x))
    # restore() reads the missing fields the same way: into the legacy network it goes ...
    assert restore(checkpoint, UNetClassifier(legacy_config, T)) == 5
    # ... into today's network (same weight shapes) it refuses, saying what changed.
    with pytest.raises(CheckpointMismatchError) as err:
        restore(checkpoint, UNetClassifier(unet_preset("tiny", 1, 8), T))
    message = str(err.value)
    assert "checkpoint has downsample='symmetric', model has downsample='official'" in message
    assert "checkpoint has norm_eps=1e-05, model has norm_eps=1e-06" in message
    assert "checkpoint has min_group_channels=1, model has min_group_channels=2" in message
    assert "head_channels" not in message


def test_restore_lists_state_dict_mismatches(tmp_path):
    model = tiny_unet()
    checkpoint = load_checkpoint_of(model, tmp_path)
    del checkpoint["model"]["head_conv.weight"]
    checkpoint["model"]["logit_increments.bias"] = torch.zeros(3)
    checkpoint["model"]["stray.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        restore(checkpoint, tiny_unet())
    message = str(err.value)
    assert "missing from checkpoint: head_conv.weight" in message
    assert "unexpected in checkpoint: stray.weight" in message
    assert "logit_increments.bias: checkpoint (3,), model (12,)" in message


def test_restore_refuses_missing_optimizer_state(tmp_path):
    model, ema, optimizer, _ = make_training_state()
    checkpoint = load_checkpoint_of(model, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="no optimizer state"):
        restore(checkpoint, model, optimizer=optimizer)


def test_clear_errors_for_files_that_are_not_checkpoints(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    plain = tmp_path / "weights.pt"
    torch.save(small_mlp().state_dict(), plain)
    with pytest.raises(ValueError, match=r"weights\.pt is not a cdm checkpoint.*cdm-checkpoint"):
        load_checkpoint(plain)
    garbage = tmp_path / "notes.txt"
    garbage.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is not a checkpoint but text: .*save_checkpoint"):
        load_checkpoint(garbage)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "cdm-checkpoint", "version": 99}, newer)
    with pytest.raises(ValueError, match="version 99"):
        load_checkpoint(newer)
