"""The configs of the evaluation stages (sample, nll, ood, fid, train-features), composed of shared sections.

    SampleConfig(checkpoint, out, n, sampler, …, pool=PoolSection(), tracking=TrackingSection())
    NllConfig(checkpoint, dataset, split, …, scoring=ScoringSection(), pool=…, tracking=…)

Light on purpose (no torch, no Ray): the CLI and the workflow read help texts and
defaults from these fields before any stage module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipelines.common.config import FieldError, TrackingSection, option

# cdm_core.samplers.SAMPLERS, TIME_GRIDS and RETIRED_SAMPLERS, repeated here so that the CLI need not import
# torch to check a flag (tests/test_samplers.py keeps them equal).
SAMPLERS = ("ddpm", "ddim", "dpmsolver2m", "dpmsolver++2m", "euler")
TIME_GRIDS = ("even", "official")
RETIRED_SAMPLERS = {
    "dpm2": "'dpm2' is no longer a sampler name (it was ambiguous): use dpmsolver2m for DPM-Solver-2 multistep on "
    "the noise prediction (the official CDM code's, the paper's \"2nd order DPMS\") or dpmsolver++2m for "
    "DPM-Solver++(2M) on the data prediction (what dpm2 ran)",
}
CONVENTIONS = ("standard", "official", "continuous")
NLL_METHODS = ("one-pass", "elbo", "ode")  # the order figures are reported in; "all" = every one that applies
TRACES = ("exact", "hutchinson")  # cdm_core.likelihood.TRACES


def sampler_problem(name: str) -> Optional[str]:
    """What is wrong with sampler `name`, in one line starting with the name; None if it is a sampler."""
    if name in RETIRED_SAMPLERS:
        return RETIRED_SAMPLERS[name]
    if name not in SAMPLERS:
        return f"{name!r} is not one of {', '.join(SAMPLERS)}"
    return None


@dataclass
class PoolSection:
    """The Ray workers of a batch stage (`pool`): each loads the model once, then takes batch after batch."""

    workers: Optional[int] = option(
        None,
        ge=0,
        doc="Ray workers (default: one per GPU, else one per CPU); 0: one worker in this process, without Ray "
        "(a small evaluation, a debugger; the split is read into memory).",
    )
    gpus_per_worker: Optional[float] = option(
        None, doc="GPUs per worker (default: 1 where the cluster has GPUs, else none)."
    )
    address: Optional[str] = option(None, doc="Ray cluster address (default: RAY_ADDRESS or a local Ray).")
    wait_s: Optional[float] = option(
        None, ge=0, doc="Seconds to wait for room for the workers (default: 600 on a cluster, none on a local Ray)."
    )


@dataclass
class ScoringSection:
    """How samples are scored (`scoring`); shared by `cdm nll` and `cdm ood`."""

    bpd_convention: Optional[str] = option(
        None, doc="standard (+log2 127.5), official (+7) or continuous; default standard for images."
    )
    dequantize: bool = option(False, doc="Uniform dequantization x + u·2/255 (8-bit images).")
    conditional: bool = option(False, doc="Score log p(x|y) with each sample's label (conditional models).")
    seed: int = option(
        0, doc="Seed of the per-sample noise: dequantization, and for `cdm nll` the ELBO's x_t and the ODE's probes."
    )
    batch_size: int = option(256, doc="Images per forward pass.")
    use_ema: bool = option(True, doc="Score with the EMA weights (false: the raw weights).")
    allow_tf32: bool = option(
        False, doc="Let GPUs use TF32 for fp32 matmuls and convolutions (faster; moves bits/dim)."
    )


@dataclass
class SampleConfig:
    checkpoint: str = option(doc="A checkpoint.pt or the folder holding one (a `cdm train` output).")
    out: str = option(doc="Output folder or URI for the sample shards and grid.png.")
    n: int = option(64, ge=1, doc="Number of samples.")
    sampler: str = option(
        "ddim",
        doc=f"One of: {', '.join(SAMPLERS)} (dpmsolver2m: DPM-Solver-2 multistep on ε̂, the paper's "
        '"2nd order DPMS"; dpmsolver++2m: DPM-Solver++(2M) on x̂0).',
    )
    steps: int = option(50, ge=1, doc="Sampler steps (ε̂ evaluations; each is a forward and a backward pass for a CDM).")
    time_grid: str = option(
        "even",
        doc="Classes the sampler visits: even (T down to 1 evenly, then 0) or official (the official code's "
        "range(1, T+1, T//steps) from the top, then 0; more steps than asked when steps does not divide T).",
    )
    seed: int = option(0, doc="Base seed; sample i uses a stream derived from (seed, i).")
    batch_size: int = option(64, ge=1, doc="Samples per batch on a worker.")
    cfg: float = option(0.0, ge=0, doc="Classifier-free guidance scale w: ε = (1+w)·ε_cond − w·ε_uncond.")
    label: Optional[int] = option(
        None, doc="Draw every sample for this class (conditional models); default: classes in turn."
    )
    use_ema: bool = option(True, doc="Sample with the EMA weights (false: the raw weights).")
    clip_x0: Optional[float] = option(
        None,
        ge=0,
        doc="Clip the predicted x̂0 to ±this at every step; 0 = no clipping (the official code's samplers); "
        "default 1 for images, no clipping for vectors.",
    )
    samples_per_shard: int = option(1000, doc="Samples per tar shard of the output.")
    force: bool = option(False, doc="Sample again even if --out holds an identical, intact run.")
    train_run_id: Optional[str] = option(
        None, doc="MLflow run that trained the checkpoint, to link to (default: read from the checkpoint)."
    )
    track: bool = option(True, doc="Log an MLflow run.")
    pool: PoolSection = field(default_factory=PoolSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def check(self) -> None:
        problem = sampler_problem(self.sampler)
        if problem:
            raise FieldError("sampler", problem)
        if self.time_grid not in TIME_GRIDS:
            raise FieldError("time_grid", f"{self.time_grid!r} is not one of {', '.join(TIME_GRIDS)}")
        if self.clip_x0 is not None and self.clip_x0 < 0:
            raise FieldError("clip_x0", f"{self.clip_x0!r} must be >= 0 (0 = no clipping)")


@dataclass
class NllConfig:
    checkpoint: str = option("", doc="A checkpoint.pt or the folder holding one (a CDM; `cdm train` output).")
    dataset: str = option("", doc="A prepared dataset (`cdm prepare` or `cdm sample` output).")
    split: str = option("test", doc="Which split to score.")
    out: Optional[str] = option(
        None, doc="Folder for scores.parquet and summary.json (default outputs/nll/<dataset>-<split>)."
    )
    train_run_id: Optional[str] = option(
        None, doc="MLflow run that trained the checkpoint, to link to (default: read from the checkpoint)."
    )
    track: bool = option(True, doc="Log an MLflow run.")
    method: Optional[str] = option(
        None,
        doc="one-pass (Theorem 3.2, 1 NFE; CDM only), elbo (DDPM bound, T NFE), ode (probability-flow ODE, "
        "adaptive), or all that apply; comma-separated lists too. Default: one-pass for a CDM, ode for a DDM.",
    )
    elbo_stride: int = option(1, ge=1, doc="The ELBO keeps every N-th class (1: all T; larger is cheaper, looser).")
    consistency_samples: int = option(
        64,
        ge=0,
        doc="With one-pass on 8-bit images: the model's own ELBO on the first N samples of the split too "
        "(classes even in log-SNR), set beside the one-pass figure (eval/consistency_gap_bpd); 0 = off.",
    )
    consistency_classes: int = option(
        20, ge=1, doc="Classes of that ELBO's chain, evenly spaced in log-SNR (all T when T is smaller)."
    )
    ode_rtol: float = option(1e-5, doc="Relative tolerance of the ODE's adaptive solver (dopri5, torchdiffeq).")
    ode_atol: float = option(1e-5, doc="Absolute tolerance of the ODE's adaptive solver.")
    trace: Optional[str] = option(
        None,
        doc="The ODE's divergence: exact (one backward per dimension: small dimension) or hutchinson "
        "(one Rademacher probe per sample, seeded from --seed and its index); default hutchinson for images, "
        "exact for vectors.",
    )
    scoring: ScoringSection = field(default_factory=ScoringSection)
    pool: PoolSection = field(default_factory=PoolSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def check(self) -> None:
        if self.method is not None:
            for m in self.method.split(","):
                if m.strip() not in (*NLL_METHODS, "all"):
                    raise FieldError("method", f"{m.strip()!r} is not one of {', '.join((*NLL_METHODS, 'all'))}")
        if self.trace is not None and self.trace not in TRACES:
            raise FieldError("trace", f"{self.trace!r} is not one of {', '.join(TRACES)}")
        for name in ("ode_rtol", "ode_atol"):
            value = getattr(self, name)
            if not (value > 0 and value < 1):
                raise FieldError(name, f"{value!r} must be in (0, 1)")
        if self.elbo_stride < 1:
            raise FieldError("elbo_stride", f"{self.elbo_stride!r} must be >= 1")
        if self.consistency_samples < 0:
            raise FieldError("consistency_samples", f"{self.consistency_samples!r} must be >= 0 (0 = off)")
        if self.consistency_classes < 1:
            raise FieldError("consistency_classes", f"{self.consistency_classes!r} must be >= 1")


@dataclass
class OodConfig:
    checkpoint: str = option("", doc="A CDM checkpoint.pt or the folder holding one.")
    in_dataset: str = option("", doc="The in-distribution dataset (what the model was trained on).")
    out_dataset: str = option("", doc="The out-of-distribution dataset (same sample shape).")
    in_split: str = option("test", doc="Split of IN_DATASET to score.")
    out_split: str = option("test", doc="Split of OUT_DATASET to score.")
    out: Optional[str] = option(None, doc="Folder for scores, summary.json and the histogram.")
    train_run_id: Optional[str] = option(
        None, doc="MLflow run that trained the checkpoint, to link to (default: read from the checkpoint)."
    )
    track: bool = option(True, doc="Log an MLflow run.")
    scoring: ScoringSection = field(default_factory=ScoringSection)
    pool: PoolSection = field(default_factory=PoolSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


@dataclass
class FidConfig:
    samples: str = option(doc="Generated samples: a `cdm sample` output (or any prepared dataset).")
    reference: str = option(doc="The reference dataset (`cdm prepare` output).")
    features: str = option("inception", doc="inception (FID), classifier:PATH (from `cdm train-features`) or raw.")
    samples_split: Optional[str] = option(None, doc="Split of SAMPLES (default: its only split).")
    reference_split: str = option("train", doc="Split of REFERENCE.")
    inception_weights: Optional[str] = option(
        None, doc="Path to pt_inception-2015-12-05-6726825d.pth (default: $CDM_WEIGHTS_DIR or ~/.cache/cdm/weights)."
    )
    inception_sha256: Optional[str] = option(
        None, doc="Full SHA-256 the Inception file must have (default: the published prefix 6726825d)."
    )
    cache_dir: Optional[str] = option(
        None, doc="Where reference statistics are cached (default $CDM_CACHE_DIR/fid-stats or ~/.cache/cdm/fid-stats)."
    )
    use_cache: bool = option(True, doc="Read and write the cached reference statistics.")
    batch_size: int = option(100, doc="Images per feature batch.")
    allow_tf32: bool = option(False, doc="Let GPUs use TF32 for the features (faster; moves the distance).")
    track: bool = option(True, doc="Log an MLflow run.")
    pool: PoolSection = field(default_factory=PoolSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


@dataclass
class TrainFeaturesConfig:
    dataset: str = option(doc="A labelled, prepared image dataset (e.g. `cdm prepare mnist5k` output).")
    out: Optional[str] = option(None, doc="Where to write classifier.pt (default outputs/features/<dataset>/).")
    epochs: int = option(8, doc="Training epochs.")
    batch_size: int = option(128, doc="Batch size.")
    lr: float = option(3e-3, doc="Peak learning rate (one-cycle schedule).")
    seed: int = option(0, doc="Seed for initialisation and shuffling.")
    train_split: str = option("train", doc="Split to train on.")
    test_split: str = option("test", doc="Split to measure the test accuracy on.")
    width_mult: int = option(16, doc="Channels of the first conv stage (the second has twice as many).")
    device: Optional[str] = option(None, doc="cpu or cuda (default: cuda when available).")
    # CPU: the network is too small to gain from more threads, and loses under load.
    threads: int = option(1, doc="torch threads on CPU.")
    track: bool = option(True, doc="Log an MLflow run.")
    tracking: TrackingSection = field(default_factory=TrackingSection)


PRIORS = ("train", "uniform")


@dataclass
class ClassifyConfig:
    checkpoint: str = option("", doc="A class-conditional CDM checkpoint.pt or the folder holding one.")
    dataset: str = option("", doc="A labeled, prepared dataset with the model's classes (`cdm prepare` output).")
    split: str = option("test", doc="Which split to classify.")
    prior: str = option(
        "train", doc="The class prior p(y): train (the label frequencies of the dataset's train split) or uniform."
    )
    out: Optional[str] = option(
        None,
        doc="Folder for scores.parquet, summary.json and confusion.png (default outputs/classify/<dataset>-<split>).",
    )
    batch_size: int = option(
        512, doc="(sample, class) pairs per forward pass: each sample is scored once per class, all in one batch."
    )
    use_ema: bool = option(True, doc="Classify with the EMA weights (false: the raw weights).")
    allow_tf32: bool = option(False, doc="Let GPUs use TF32 for fp32 matmuls and convolutions (faster; moves scores).")
    train_run_id: Optional[str] = option(
        None, doc="MLflow run that trained the checkpoint, to link to (default: read from the checkpoint)."
    )
    track: bool = option(True, doc="Log an MLflow run.")
    pool: PoolSection = field(default_factory=PoolSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def check(self) -> None:
        if self.prior not in PRIORS:
            raise FieldError("prior", f"{self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"{self.batch_size} must be >= 1")
