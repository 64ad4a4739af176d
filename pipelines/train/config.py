"""The training stage's config: every knob the paper varies, one section per concern.

Defaults are the paper's CIFAR-10 settings (linear schedule, T=1000, w_ce=1e-3,
w_mse=1, Adam 2e-4 with 5k warm-up and ×0.1 every 200k, 500k steps, EMA
0.9999); files in configs/ change what differs. `to_dict(config)` is what
MLflow logs as params and what every checkpoint carries (the contract of
`pipelines.common.checkpoints`: model.kind, schedule.name/T/params, loss.prior,
data.num_labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipelines.common.config import FieldError, ScalingSection, TrackingSection, option


@dataclass
class DataSection:
    uri: str = option(doc="prepared dataset (`cdm prepare … --out URI`): a folder or s3://, gs://, … URI")
    train_split: str = option("train", doc="split to train on")
    val_split: str = option("test", doc="split for validation (CE, MSE, NLL)")
    flip: bool = option(False, doc="random horizontal flips of training images")
    dequantize: bool = option(
        False,
        doc="uniform dequantization of 8-bit training images, x + u·2/255 with u ~ U[0, 1) (the standard for "
        "likelihood models: class 0 then has a density, and ℓ₀ − ℓ₁ a finite target); the paper trains without; "
        "evaluate such a model with `cdm nll --dequantize` (validation.dequantize)",
    )
    shuffle: Literal["none", "files", "rows"] = option(
        "files", doc="Ray Data shuffle: shard order, or a full row shuffle each epoch"
    )
    shuffle_buffer: int = option(256, ge=0, doc="per-worker local shuffle buffer (rows); 0 = off")
    num_labels: Optional[int] = option(None, ge=1, doc="classes; filled in from dataset.json when model.conditional")
    normalization: Optional[dict[str, Any]] = option(
        None,
        doc="filled in from dataset.json (leave unset): how continuous data is normalized for the model "
        "(pipelines.data.normalization), carried by every checkpoint; none for 8-bit images",
    )


@dataclass
class ModelSection:
    kind: Literal["cdm", "ddm"] = option(
        "cdm", doc="cdm: noise-level classifier; ddm: the ε-prediction baseline on the same U-Net"
    )
    preset: Literal["tiny", "mnist", "cifar10", "celeba64", "mlp"] = option(
        "cifar10",
        doc="U-Net size (cdm_core.networks.unet_preset) for images and (C, H, W) arrays; mlp: the MLP networks "
        "(cdm_core.networks.MLPClassifier / MLPDenoiser) for (D,) vectors, the only preset for them",
    )
    mlp_hidden: Optional[int] = option(None, ge=1, doc="mlp preset: hidden width (default 256)")
    mlp_depth: Optional[int] = option(None, ge=1, doc="mlp preset: hidden layers (default 4)")
    base_channels: Optional[int] = option(None, ge=1, doc="override the preset's base channel count")
    channel_mult: Optional[list[int]] = option(None, doc="override the preset's per-level channel multipliers")
    num_res_blocks: Optional[int] = option(None, ge=1, doc="override the preset's res blocks per level")
    attn_resolutions: Optional[list[int]] = option(None, doc="override the preset's attention resolutions")
    dropout: Optional[float] = option(None, ge=0, lt=1, doc="override the preset's dropout")
    num_heads: Optional[int] = option(None, ge=1, doc="override the preset's attention heads")
    head_channels: Optional[int] = option(
        None,
        ge=1,
        doc="override the preset's CDM head conv width (cifar10 512, celeba64 1024 as in the paper; the official "
        "code has 256; tiny/mnist: the backbone's width); CDM only",
    )
    conditional: bool = option(False, doc="class-conditional (labels from the dataset; classifier-free guidance)")
    label_dropout: float = option(0.1, ge=0, lt=1, doc="probability of the null label in training (conditional only)")

    def unet_overrides(self) -> dict[str, Any]:
        names = (
            "base_channels",
            "channel_mult",
            "num_res_blocks",
            "attn_resolutions",
            "dropout",
            "num_heads",
            "head_channels",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def check(self) -> None:
        if self.preset == "mlp" and self.unet_overrides():
            name = next(iter(self.unet_overrides()))
            raise FieldError(
                name,
                f"is a U-Net setting; the mlp preset takes mlp_hidden and mlp_depth, so leave {name} unset "
                f"(--set model.{name}=none)",
            )
        if self.preset != "mlp":
            for name in ("mlp_hidden", "mlp_depth"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"applies to the mlp preset only (model.preset is {self.preset!r})")
        if self.kind == "ddm" and self.head_channels is not None:
            raise FieldError(
                "head_channels",
                f"{self.head_channels} is the width of the CDM classifier's head; the DDM's head outputs the image "
                "channels, so leave it unset (none) with kind = ddm",
            )


@dataclass
class ScheduleSection:
    name: Literal["linear", "cosine", "uniform", "ot"] = option("linear", doc="noise schedule over the T+2 classes")
    T: int = option(1000, ge=1, doc="intermediate noise levels (the CDM has T+2 classes)")
    params: dict[str, Any] = option(
        {}, doc="schedule parameters, e.g. beta_start/beta_end (linear), offset/max_beta (cosine)"
    )


@dataclass
class LossSection:
    w_ce: float = option(1e-3, ge=0, doc="weight of the cross-entropy over noise levels")
    w_mse: float = option(1.0, ge=0, doc="weight of the denoising MSE (needs the double backward)")
    prior: Optional[list[float]] = option(None, doc="class prior π over t = 0..T+1 (T+2 numbers); none = uniform")

    def check(self) -> None:
        if self.w_ce == 0 and self.w_mse == 0:
            raise FieldError("w_mse", "w_ce and w_mse are both 0; at least one loss term must be on")


@dataclass
class OptimSection:
    lr: float = option(2e-4, gt=0, doc="Adam learning rate after warm-up")
    betas: list[float] = option([0.9, 0.999], doc="Adam betas")
    eps: float = option(1e-8, gt=0, doc="Adam epsilon")
    weight_decay: float = option(0.0, ge=0, doc="decoupled weight decay (AdamW) when > 0")
    warmup_steps: int = option(5000, ge=0, doc="linear warm-up from 0 to lr")
    decay_every: int = option(200_000, ge=0, doc="multiply lr by decay_factor every this many steps; 0 = never")
    decay_factor: float = option(0.1, gt=0, le=1, doc="step decay factor")
    grad_clip: float = option(0.0, ge=0, doc="clip the global gradient norm; 0 = off (the paper does not clip)")

    def check(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", f"{self.betas!r} must be two numbers in [0, 1)")


@dataclass
class EMASection:
    decay: float = option(
        0.9999, ge=0, le=1, doc="EMA decay of the weights used for validation, samples and the final model"
    )
    start_step: int = option(0, ge=0, doc="copy the live weights (no averaging) for this many steps")


@dataclass
class TrainSection:
    steps: int = option(500_000, ge=1, doc="optimizer steps")
    batch_size: int = option(128, ge=1, doc="GLOBAL batch, split evenly over the workers")
    grad_accum: int = option(
        1,
        ge=1,
        doc="micro-batches per optimizer step on each worker (gradient accumulation): a worker holds "
        "batch_size / workers / grad_accum images at once, and the step's update is the whole batch's",
    )
    seed: int = option(0, doc="seed of initialisation, noise levels, noise and label dropout")
    precision: Literal["fp32", "bf16"] = option("fp32", doc="bf16 = autocast to bfloat16 (GPUs with bf16 support)")
    compile: bool = option(
        False,
        doc="compile the training step with torch.compile (a CDM's input gradient through torch.func); "
        "the first step pays the compilation (minutes); needs a C++ compiler on CPU, Triton on GPU",
    )
    log_every: int = option(
        100, ge=1, doc="log train/* metrics every this many steps (averaged over the window and the workers)"
    )


@dataclass
class ValidationSection:
    every: int = option(
        5000,
        ge=1,
        doc="validate with the EMA model every this many steps, and at every checkpoint (checkpoint.keep_best "
        "ranks them, and a sweep's schedulers read them, by their validation score) and at the end",
    )
    batch_size: int = option(256, ge=1, doc="per-worker validation batch")
    max_samples: Optional[int] = option(None, ge=1, doc="validate on the first N samples of the split; none = all")
    t_points: int = option(
        10, ge=1, doc="noise levels in the fixed grid for val/ce and val/mse (evenly spaced in 1..T)"
    )
    dequantize: bool = option(False, doc="uniform dequantization before the NLL (the paper's figures use none)")
    consistency_samples: int = option(
        64,
        ge=0,
        doc="CDM on 8-bit images: the final validation also takes the model's own ELBO on the first N validation "
        "images (val/nll_bpd_elbo, val/consistency_gap_bpd), N cut further so that it adds at most 10% to the "
        "run's validation work; 0 = off",
    )
    consistency_classes: int = option(
        20, ge=1, doc="classes of that ELBO's chain, evenly spaced in log-SNR (all T when T is smaller)"
    )
    seed: int = option(1234, doc="seed of the fixed validation noise (per sample, so independent of the worker count)")
    allow_tf32: bool = option(False, doc="let GPUs use TF32 in validation (training's convolutions use it either way)")


@dataclass
class SamplingSection:
    every: int = option(10_000, ge=0, doc="log a DDIM sample grid every this many steps (and at the end); 0 = never")
    num_images: int = option(64, ge=1, doc="images in the grid")
    steps: int = option(20, ge=1, doc="DDIM steps")
    seed: int = option(0, doc="seed of the grid's start noise (same images across runs)")


@dataclass
class CheckpointSection:
    every: int = option(5000, ge=1, doc="checkpoint every this many steps (and at the end)")
    keep_best: Optional[int] = option(
        3, ge=1, doc="keep the best K checkpoints by `score` (the latest is always kept); none = all"
    )
    score: Literal["auto", "val/nll_bpd", "val/mse", "val/ce"] = option(
        "auto", doc="auto: val/nll_bpd for a CDM, val/mse for a DDM"
    )


@dataclass
class RunSection:
    name: Optional[str] = option(None, doc="run name = folder under storage_path; default <config name>-<time>")
    storage_path: str = option(
        "outputs/runs",
        doc="checkpoints and Ray state: a folder or any pyarrow URI (s3://…); shared storage on a cluster",
    )
    max_failures: int = option(
        0, ge=-1, doc="worker failures survived by restarting from the latest checkpoint; -1 = any number"
    )
    log_model: bool = option(True, doc="log the final EMA model with mlflow.pytorch.log_model")
    register_model: Optional[str] = option(
        None, doc="also register the logged model under this name in the MLflow model registry (`--register NAME`)"
    )
    ray_address: Optional[str] = option(None, doc="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    init_from: Optional[str] = option(
        None,
        doc="start a new run from this checkpoint folder: its weights, EMA, optimiser state and step (cdm tune's PBT continues trials this way); the architecture must match",
    )


@dataclass
class TrainConfig:
    data: DataSection
    model: ModelSection = field(default_factory=ModelSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def check(self) -> None:
        s = self.scaling
        if s.num_workers == 0 and self.run.max_failures != 0:
            raise FieldError(
                "run.max_failures",
                f"{self.run.max_failures} with scaling.num_workers=0: local mode trains in the cdm process itself, "
                "which nothing can restart; set run.max_failures=0, or train with 1 or more workers",
            )
        workers = max(s.num_workers, 1)  # local mode (0) is one process
        if s.use_gpu and workers > 1 and s.gpus_per_worker < 1:
            raise FieldError(
                "scaling.gpus_per_worker",
                f"{s.gpus_per_worker:g} with {workers} workers would let Ray put two training ranks on one GPU, and NCCL "
                "refuses two ranks on one device; give each worker a whole GPU (1), or train with one worker",
            )
        if self.train.batch_size % workers:
            raise FieldError(
                "train.batch_size",
                f"{self.train.batch_size} is not divisible by scaling.num_workers={workers}; the global batch is "
                f"split evenly, so choose a multiple of {workers} (e.g. {self.train.batch_size // workers * workers or workers})",
            )
        per_worker = self.train.batch_size // workers
        if per_worker % self.train.grad_accum:
            raise FieldError(
                "train.grad_accum",
                f"{self.train.grad_accum} does not divide the {per_worker} images each of the {workers} worker(s) "
                f"takes per step (train.batch_size={self.train.batch_size}); choose a divisor of {per_worker}",
            )
        if self.loss.prior is not None and len(self.loss.prior) != self.schedule.T + 2:
            raise FieldError(
                "loss.prior",
                f"has {len(self.loss.prior)} entries; schedule.T={self.schedule.T} needs T+2 = {self.schedule.T + 2}",
            )
        if self.model.kind == "ddm" and self.checkpoint.score in ("val/nll_bpd", "val/ce"):
            raise FieldError(
                "checkpoint.score", f"{self.checkpoint.score!r} does not exist for a DDM; use val/mse or auto"
            )
        if self.sampling.steps > self.schedule.T:
            raise FieldError("sampling.steps", f"{self.sampling.steps} exceeds schedule.T={self.schedule.T}")
        if self.validation.t_points > self.schedule.T:
            raise FieldError("validation.t_points", f"{self.validation.t_points} exceeds schedule.T={self.schedule.T}")

    @property
    def micro_batch(self) -> int:
        """Images a worker holds at once: its share of the global batch over train.grad_accum."""
        return self.train.batch_size // max(self.scaling.num_workers, 1) // self.train.grad_accum

    @property
    def score_metric(self) -> str:
        if self.checkpoint.score != "auto":
            return self.checkpoint.score
        return "val/nll_bpd" if self.model.kind == "cdm" else "val/mse"


# Settings a resumed run may change: they do not alter what is being trained,
# only how long, how fast, how it is watched. Everything else is fixed at the start.
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.grad_accum",
    "optim.",
    "validation.",
    "sampling.",
    "checkpoint.every",
    "scaling.",
    "run.max_failures",
    "run.log_model",
    "run.register_model",
    "run.ray_address",
)


def resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)
