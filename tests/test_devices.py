"""What a GPU changes, checked on a CPU: devices of tensors, collectives, RNG states, precision, GPU settings.

Every test here would have caught a defect that all CPU runs hid: NCCL takes only CUDA
tensors (gloo takes CPU ones), a CUDA generator's state does not fit a CPU generator, a
checkpoint loaded onto the GPU puts Adam's step counters there, cuDNN uses TF32 by default.
The `meta` device stands in for a GPU where a test needs a device that is not the CPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from cdm_core.checkpoint import load_checkpoint, save_checkpoint
from cdm_core.ema import EMA
from pipelines.common import config as cfg
from pipelines.common.checkpoints import load_trained_model
from pipelines.common.config import ConfigError
from pipelines.common.errors import UserError
from pipelines.evaluate.config import TrainFeaturesConfig
from pipelines.evaluate.feature_classifier import train_features
from pipelines.evaluate.features import build_extractor, extractor_file, resolve_extractor
from pipelines.evaluate.fid import FeatureWorker
from pipelines.train import collectives, loop
from pipelines.train.config import TrainConfig
from pipelines.train.step import build_network, build_optimizer, build_schedule
from pipelines.train.validation import Validator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train_tiny.toml"


def tiny(*overrides: str) -> TrainConfig:
    return cfg.load(TrainConfig, TINY, ["data.uri=unused", *overrides])


# --------------------------------------------------------------------------- collectives


def test_collectives_hand_the_process_group_tensors_on_the_training_device(monkeypatch):
    """NCCL (GPU workers) takes CUDA tensors only: the loop's sums must travel on the training device."""
    seen = []
    monkeypatch.setattr(collectives, "world_size", lambda: 2)  # two ranks, as under Ray Train
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: seen.append(tensor.device.type))
    window = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # accumulated on the host
    mean = collectives.all_mean(window, torch.device("meta"))
    assert seen == ["meta"] and mean.device.type == "meta" and window.device.type == "cpu"
    collectives.all_sum(torch.ones(2), torch.device("meta"))
    assert seen == ["meta", "meta"]


def test_the_training_code_reaches_the_process_group_only_through_collectives():
    users = []
    for path in sorted((ROOT / "pipelines" / "train").glob("*.py")):
        if path.name == "collectives.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                imported = [f"{node.module}.{a.name}" for a in node.names]
            if any(name.startswith("torch.distributed") for name in imported):
                users.append(f"{path.name}:{node.lineno}")
    assert users == []


# --------------------------------------------------------------------------- resuming on another device


def _training_objects(device: str = "cpu"):
    config = tiny()
    torch.manual_seed(0)
    model = build_network(config, 1, 8).to(device)
    optimizer, scheduler = build_optimizer(model, config.optim)
    return config, model, EMA(model, config.ema.decay), optimizer, scheduler


def _checkpoint_after_one_step(folder: Path, rng: dict) -> Checkpoint:
    config, model, ema, optimizer, scheduler = _training_objects()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(
        folder / "checkpoint.pt",
        model=model,
        step=1,
        config=cfg.to_dict(config),
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        extra={"rng": [rng], "world_size": 1, "epoch": 0},
    )
    return Checkpoint.from_directory(str(folder))


def test_a_checkpoint_from_a_gpu_run_resumes_on_a_cpu_worker_with_fresh_rng_streams(tmp_path):
    cuda_rng = {"generator": torch.zeros(16, dtype=torch.uint8), "torch": torch.get_rng_state(), "device_type": "cuda"}
    checkpoint = _checkpoint_after_one_step(tmp_path, cuda_rng)
    config, model, ema, optimizer, scheduler = _training_objects()
    generator = torch.Generator()
    step, epoch, rng, used, skipped = loop._restore_latest(
        checkpoint, model, ema, optimizer, scheduler, generator, config, 0, 1
    )
    assert (step, epoch) == (1, 0)
    assert rng == "reseeded (the checkpoint's RNG streams are cuda, this worker's cpu)"


def test_a_checkpoint_from_the_same_device_type_restores_its_rng_streams(tmp_path):
    saved = torch.Generator().manual_seed(7)
    state = loop._rng_state(saved)
    expected = torch.rand(3, generator=saved)
    del state["device_type"]  # checkpoints written before it was recorded are CPU ones
    checkpoint = _checkpoint_after_one_step(tmp_path, state)
    config, model, ema, optimizer, scheduler = _training_objects()
    generator = torch.Generator().manual_seed(123)
    _, _, rng, _, _ = loop._restore_latest(checkpoint, model, ema, optimizer, scheduler, generator, config, 0, 1)
    assert rng == "restored" and torch.equal(torch.rand(3, generator=generator), expected)
    _, _, rng, _, _ = loop._restore_latest(checkpoint, model, ema, optimizer, scheduler, generator, config, 0, 2)
    assert rng == "reseeded (the checkpoint's world size is 1, this run's 2)"


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta weights hold no values
def test_optimizer_state_is_loaded_on_the_cpu_and_moves_as_torch_moves_it(tmp_path):
    """Adam's moments go to the parameters' device; its step counters stay on the CPU (no sync per step)."""
    checkpoint = _checkpoint_after_one_step(tmp_path, loop._rng_state(torch.Generator()))
    config, model, ema, optimizer, scheduler = _training_objects(device="meta")  # "meta" stands in for a GPU
    loop._restore_latest(checkpoint, model, ema, optimizer, scheduler, torch.Generator(), config, 0, 1)
    state = optimizer.state[next(iter(model.parameters()))]
    assert state["step"].device.type == "cpu" and state["exp_avg"].device.type == "meta"
    # The same for run.init_from (PBT's and the user's "start from this checkpoint").
    config, model, ema, optimizer, scheduler = _training_objects(device="meta")
    assert loop._start_from(str(tmp_path), model, ema, optimizer, scheduler, config) == 1
    state = optimizer.state[next(iter(model.parameters()))]
    assert state["step"].device.type == "cpu" and state["exp_avg"].device.type == "meta"


# --------------------------------------------------------------------------- GPU settings


def test_fractional_gpus_with_several_workers_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker: 0.5 with 2 workers would let Ray put two"):
        tiny("scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.5", "train.batch_size=8")
    assert tiny("scaling.use_gpu=true", "scaling.gpus_per_worker=0.5").scaling.gpus_per_worker == 0.5  # one worker


# --------------------------------------------------------------------------- precision of the figures


class _RecordsTF32(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.seen: set[bool] = set()

    def forward(self, *args):
        self.seen.add(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        return self.net(*args)


@pytest.mark.parametrize("allowed", [False, True])
def test_validation_runs_in_full_fp32_unless_allowed_and_leaves_training_as_it_was(allowed):
    config = tiny("validation.t_points=2", f"validation.allow_tf32={str(allowed).lower()}")
    model = _RecordsTF32(build_network(config, 1, 8))
    validator = Validator(config, build_schedule(config), None, torch.device("cpu"))
    validator.batches = [
        {"x": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2, dtype=torch.long), "index": torch.arange(2)}
    ]
    torch.backends.cudnn.allow_tf32 = True  # torch's default, which training keeps
    metrics = validator(model)
    assert model.seen == {allowed} and metrics["val/samples"] == 2
    assert torch.backends.cudnn.allow_tf32 is True


def test_an_evaluation_worker_turns_tf32_off_for_its_process():
    torch.backends.cudnn.allow_tf32 = True
    try:
        FeatureWorker(resolve_extractor("raw"), "cpu", 1, 10)
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        FeatureWorker(resolve_extractor("raw"), "cpu", 1, 10, allow_tf32=True)
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults


# --------------------------------------------------------------------------- files a worker on another node lacks


def test_feature_workers_get_the_weights_file_from_the_driver(tmp_path, digits_dataset):
    classifier = train_features(
        TrainFeaturesConfig(dataset=str(digits_dataset), out=str(tmp_path / "clf"), epochs=1, track=False)
    )
    spec = resolve_extractor(f"classifier:{classifier.path}")
    data = extractor_file(spec)
    images = torch.randint(0, 256, (5, 8, 8, 1), dtype=torch.uint8).numpy()
    here = build_extractor(spec)(images)
    Path(classifier.path).rename(tmp_path / "moved.pt")  # a worker on another node: the driver's path is not there
    with pytest.raises(UserError):
        build_extractor(spec)
    assert (build_extractor(spec, file_data=data)(images) == here).all()
    with pytest.raises(UserError, match="the weights that reached this worker have SHA-256"):
        build_extractor(spec, file_data=data[:-1] + b"!")


def test_a_loaded_model_keeps_no_parameter_gradients(tmp_path):
    config = tiny()
    model = build_network(config, 1, 8)
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, step=0, config=cfg.to_dict(config))
    trained = load_trained_model(tmp_path)
    assert not any(p.requires_grad for p in trained.model.parameters())
    x = torch.randn(2, 1, 8, 8)
    eps = trained.eps_fn()(x, torch.full((2,), 5))  # a CDM's ε̂ still differentiates the input
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 0
