"""The NLL stage: the likelihood of every sample of a dataset split, by one, two or three methods.

`run(NllConfig(...))` is the stage (`cdm nll` in pipelines.cli).

A Ray Data pipeline reads the split's shards, and a pool of actors (one model
each, EMA weights by default) scores batches. The methods (`--method`):

  one-pass  a CDM's exact log-density in one forward pass, no gradient (1 NFE):
                log p(x) = ℓ_0(x) − ℓ_{T+1}(x) + log N(x; 0, I) + log π(T+1) − log π(0)    (Theorem 3.2)
  elbo      the DDPM variational bound over the model's classes (every `--elbo-stride`-th), with the
            discretized Gaussian decoder, on the 8-bit data (`cdm_core.likelihood.elbo_bits_per_dim`;
            one ε̂ per kept class: T NFE). Its bits/dim are a discrete probability's, −log2 P(x)/d, no
            offset: they compare directly with the one-pass figure in the standard convention
            (convention "discrete"). Never dequantized (the bound is of the 8-bit data itself).
  ode       the probability-flow ODE's exact log-density (`cdm_core.likelihood.ode_log_likelihood`,
            dopri5 with `--ode-rtol/--ode-atol`; NFE adaptive, per batch), the divergence exact or by
            Hutchinson's estimate; same conventions and dequantization as one-pass.
A CDM's ε̂ is Theorem 3.1's (`cdm_eps_fn` at the classes, `cdm_continuous_eps_fn` between them), a DDM's
its network's (`ddm_eps_fn`, `ddm_continuous_eps_fn`); `--conditional` passes each sample's label to all.
The ELBO's x_t noise and the ODE's probes are drawn per sample from (seed, index), as the dequantization
noise is, so a sample's figures do not depend on batching or worker count (the ODE's up to its solver
tolerance: the adaptive steps are shared by a batch).

Per-sample results (key, index, label; one-pass: log_px, bpd; elbo: bpd_elbo, nats_elbo, nfe_elbo;
ode: log_px_ode, bpd_ode, nfe_ode; each method's seconds_* as the sample's share of its batch's time)
go to `scores.parquet`; each method's mean bits/dim with a 95% confidence interval, its NFE per sample
and seconds go to stdout, `summary.json` ("methods") and MLflow (`eval/nll_bpd` and `eval/nll_bpd_ci95`
for one-pass, `eval/nll_bpd_elbo`, `eval/nll_bpd_ode`, `eval/nfe_per_sample_*`, `eval/nll_seconds_*`).
With one-pass and another method, `nll_methods.png` plots them per sample.

Consistency (with one-pass): the `link01` column is ℓ₀ − ℓ₁ per sample, its mean `eval/link01_nats`, set beside
its scale on 8-bit data `eval/link01_expected_nats` (`cdm_core.likelihood.link01_expected_nats`; ≈ 0 against it:
the one-pass figure is the density at class 1, the data blurred by s₁). On 8-bit images the first
`--consistency-samples` samples of the split (index < N) also get the model's own ELBO on a chain of
`--consistency-classes` classes even in log-SNR (`bpd_elbo_subset`, NaN elsewhere), and `eval/consistency_nll_bpd`,
`eval/consistency_nll_bpd_elbo` and `eval/consistency_gap_bpd` (one-pass − ELBO on one footing,
`cdm_core.likelihood.one_pass_minus_elbo_bpd`; above 0 the one-pass figure contradicts a bound of the same model;
a consistent model's lies below 0 by the chain's own looseness) go to MLflow and to summary.json's "consistency",
with a one-line reading that `cdm nll` and `cdm run` print. Before anything is
reported the scored keys are checked against the dataset's manifest: every
sample of the split exactly once.

Bits/dim conventions (always recorded as the `bpd_convention` param; for images the summary and MLflow
also hold the mean in both image conventions, `eval/nll_bpd_standard` and `eval/nll_bpd_official`):
  standard    8-bit images in [-1, 1]: −log p/(d ln 2) + log2(127.5)
  official    the official CDM code's −log p/(d ln 2) + 7
  continuous  −log p/(d ln 2), no bin offset (the default for vector data and arrays); log p is the density of
              the data as given: a model trained on normalized data (`cdm prepare arrays --normalize
              standardize`) sees z = (x − μ)/σ, and log p_x(x) = log p_z(z) − Σ log σ (pipelines.data.normalization)
Uniform dequantization (`--dequantize`) adds u·2/255, u ~ U[0, 1), drawn
per sample from (seed, index), so it does not depend on batching either.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cdm_core.likelihood import (
    cdm_continuous_eps_fn,
    ddm_continuous_eps_fn,
    elbo_bits_per_dim,
    link01_expected_nats,
    log_snr_classes,
    ode_log_likelihood,
    one_pass_minus_elbo_bpd,
)
from cdm_core.objective import LOG2_BIN_OFFSET, OFFICIAL_CODE_OFFSET, log_likelihood_from_logits, nats_to_bits_per_dim
from cdm_core.samplers import cdm_eps_fn, ddm_eps_fn
from pipelines.common import storage
from pipelines.common.checkpoints import LocatedModel, locate_model
from pipelines.common.config import FieldError
from pipelines.common.errors import UserError
from pipelines.common.stage import tracked
from pipelines.data import shards as sh
from pipelines.data.normalization import of_model
from pipelines.data.readers import DATASET
from pipelines.evaluate.config import CONVENTIONS, NLL_METHODS, NllConfig, PoolSection, ScoringSection
from pipelines.evaluate.plots import save_beside, save_method_scatter
from pipelines.evaluate.workers import ModelWorker, map_split, run_tags

SCORES = "scores.parquet"
SUMMARY = "summary.json"
SCATTER = "nll_methods.png"
OFFSETS = {"standard": LOG2_BIN_OFFSET, "official": OFFICIAL_CODE_OFFSET, "continuous": 0.0}


def bpd_offset(convention: str) -> float:
    return OFFSETS[convention]


ELBO_CONVENTION = "discrete"
ELBO_NOTE = (
    "−log2 P(x)/d of the 8-bit data, no offset: compares directly with a density's bits/dim in the standard "
    "convention (+log2 127.5: a density times the (2/255)^d bin volume is the bin's probability to first order); "
    "the official convention's figures are 7 − log2(127.5) = 0.0056 higher"
)
# The column that holds each method's per-sample bits/dim, and the suffix of its other columns and metrics.
BPD_COLUMN = {"one-pass": "bpd", "elbo": "bpd_elbo", "ode": "bpd_ode"}
SUFFIX = {"one-pass": "one_pass", "elbo": "elbo", "ode": "ode"}
# Per-sample noise streams (seed, index, tag): the tags keep the three kinds of noise apart.
DEQUANTIZE_TAG, ELBO_TAG, PROBE_TAG = 7, 11, 13


@dataclass(frozen=True)
class Methods:
    """Which likelihoods a scorer computes, and their settings (`NllConfig`'s method, elbo_stride, ode_*, trace,
    consistency_*; consistency_samples is 0 where the check does not apply)."""

    names: tuple[str, ...] = ("one-pass",)
    elbo_stride: int = 1
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    trace: str = "hutchinson"
    consistency_samples: int = 0
    consistency_classes: int = 20


def resolve_methods(config: NllConfig, kind: str, data_kind: str) -> Methods:
    """The methods `config` asks for, for a model of `kind` on data of `data_kind`; one clear line if one cannot apply."""
    try:
        config.check()
    except FieldError as err:
        raise UserError(f"--{err.field.replace('_', '-')} {err.message}") from None
    asked = [m.strip() for m in (config.method or ("one-pass" if kind == "cdm" else "ode")).split(",")]
    if "all" in asked:
        names = [m for m in NLL_METHODS if (m != "one-pass" or kind == "cdm") and (m != "elbo" or data_kind == "image")]
    else:
        names = [m for m in NLL_METHODS if m in asked]
    if "one-pass" in names and kind != "cdm":
        raise UserError(
            f"{config.checkpoint}: a {kind!r} model; the one-forward-pass likelihood needs a CDM (model.kind = 'cdm'): "
            "for this model use --method ode (the exact likelihood of its probability-flow ODE) or --method elbo"
        )
    if "elbo" in names and data_kind != "image":
        raise UserError(
            "--method elbo: the ELBO's discretized decoder is for 8-bit images and this dataset holds continuous "
            "vectors; use --method ode (or one-pass for a CDM)"
        )
    trace = config.trace or ("hutchinson" if data_kind == "image" else "exact")
    # The consistency ELBO needs the one-pass figure beside it and 8-bit data under its discretized decoder.
    subset = config.consistency_samples if "one-pass" in names and data_kind == "image" else 0
    return Methods(
        tuple(names), config.elbo_stride, config.ode_rtol, config.ode_atol, trace, subset, config.consistency_classes
    )


def _ci95(values: np.ndarray) -> tuple[float, float]:
    std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    # normal approximation of the mean's sampling distribution: fine for the thousands of images scored here
    return (1.96 * std / math.sqrt(len(values)) if len(values) > 1 else float("nan")), std


LINK01_NEAR_ZERO = 0.1  # |mean ℓ₀ − ℓ₁| under this share of its scale reads as "≈ 0"


def consistency_reading(c: dict[str, Any]) -> str:
    """One line on whether the one-pass figure can be read as the model's density, from `SplitScores.consistency`."""
    parts = []
    if "gap_bpd" in c:
        gap, chain = c["gap_bpd"], f"{c['elbo_classes']}-class ELBO, {c['samples']} samples"
        if gap > 0:
            parts.append(
                f"one-pass figure {gap:.2f} bits/dim above the model's own ELBO ({chain}): above a bound, so not "
                "the model's density"
            )
        else:
            parts.append(
                f"one-pass figure {-gap:.2f} bits/dim below the model's own ELBO ({chain}; the short chain is "
                "itself loose)"
            )
    link, scale = c["link01_nats"], c.get("link01_expected_nats")
    if scale is None:
        parts.append(f"ℓ₀−ℓ₁ = {link:.2f} nats")
    elif abs(link) < LINK01_NEAR_ZERO * abs(scale):
        parts.append(
            f"ℓ₀−ℓ₁ = {link:.2f} nats ≈ 0 against a scale of {scale:.1f}: this is the density at class 1 (the data "
            "blurred by s₁), not of the data"
        )
    else:
        parts.append(f"ℓ₀−ℓ₁ = {link:.2f} nats against a scale of {scale:.1f}")
    return "consistency: " + "; ".join(parts)


@dataclass
class SplitScores:
    """Per-sample scores of one split, sorted by index, already checked against the manifest."""

    dataset: str
    split: str
    table: Any  # pyarrow.Table: key, index, label, then each method's columns (BPD_COLUMN, module docstring)
    convention: str
    offset: float
    dequantized: bool
    seconds: float
    allow_tf32: bool = False
    methods: Methods = Methods()
    link01_expected: Optional[float] = None  # ℓ₀ − ℓ₁'s scale for 8-bit data; None for continuous data
    elbo_classes: int = 0  # classes of the consistency ELBO's chain

    @property
    def count(self) -> int:
        return self.table.num_rows

    @property
    def method(self) -> str:
        """The headline figure's (`nll_bpd`, `bpd`): the exact likelihood where there is one, one-pass before ODE."""
        return next(m for m in ("one-pass", "ode", "elbo") if m in self.methods.names)

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    @property
    def bpd(self) -> np.ndarray:
        return self.column(BPD_COLUMN[self.method])

    @property
    def log_px(self) -> np.ndarray:
        return self.column({"one-pass": "log_px", "ode": "log_px_ode", "elbo": "nats_elbo"}[self.method]) * (
            -1.0 if self.method == "elbo" else 1.0
        )

    def method_summary(self, method: str) -> dict[str, Any]:
        bpd = self.column(BPD_COLUMN[method])
        ci95, std = _ci95(bpd)
        suffix = SUFFIX[method]
        seconds = float(self.column(f"seconds_{suffix}").sum())
        out: dict[str, Any] = {
            "nll_bpd": float(bpd.mean()),
            "nll_bpd_ci95": ci95,
            "nll_bpd_std": std,
            "nfe_per_sample": 1.0 if method == "one-pass" else float(self.column(f"nfe_{suffix}").mean()),
            # The workers' compute for this method (each sample's share of its batch's time), summed over workers.
            "seconds": seconds,
            "images_per_s": self.count / seconds if seconds > 0 else float("nan"),
        }
        if method == "elbo":
            nats = self.column("nats_elbo")
            return out | {
                "mean_nats": float(nats.mean()),
                "convention": ELBO_CONVENTION,
                "bpd_offset": 0.0,
                "convention_note": ELBO_NOTE,
                "dequantize": False,
                "stride": self.methods.elbo_stride,
            }
        log_px = self.column("log_px" if method == "one-pass" else "log_px_ode")
        out |= {
            "mean_log_px_nats": float(log_px.mean()),
            "convention": self.convention,
            "bpd_offset": self.offset,
            "nll_bpd_by_convention": (
                {c: float(bpd.mean()) - self.offset + OFFSETS[c] for c in ("standard", "official")}
                if self.convention != "continuous"
                else {}
            ),
            "dequantize": self.dequantized,
        }
        if method == "ode":
            out |= {
                "solver": "dopri5 (torchdiffeq)",
                "rtol": self.methods.ode_rtol,
                "atol": self.methods.ode_atol,
                "trace": self.methods.trace,
            }
        return out

    def consistency(self) -> dict[str, Any]:
        """The one-pass figure against the model's other likelihoods, on one footing (the ELBO's discrete bits/dim
        against the one-pass figure moved to the standard convention), and the 0 → 1 link (module docstring)."""
        if "one-pass" not in self.methods.names:
            return {}
        one = self.column("bpd")
        out: dict[str, Any] = {"link01_nats": float(self.column("link01").mean())}
        if self.link01_expected is not None:
            out["link01_expected_nats"] = self.link01_expected
        if "bpd_elbo_subset" in self.table.column_names:
            elbo = self.column("bpd_elbo_subset")
            subset = ~np.isnan(elbo)
            if subset.any():
                one_pass, bound = float(one[subset].mean()), float(elbo[subset].mean())
                out |= {
                    "nll_bpd": one_pass,
                    "nll_bpd_elbo": bound,
                    "gap_bpd": float(one_pass_minus_elbo_bpd(one_pass, bound, self.offset)),
                    "samples": int(subset.sum()),
                    "elbo_classes": self.elbo_classes,
                    "seconds": float(self.column("seconds_consistency").sum()),
                }
        if "elbo" in self.methods.names:
            gap = -one_pass_minus_elbo_bpd(one, self.column("bpd_elbo"), self.offset)
            out["elbo_minus_one_pass_bpd"] = {
                "mean": float(gap.mean()),
                "min": float(gap.min()),
                "max": float(gap.max()),
                "fraction_one_pass_le_elbo": float((gap >= 0).mean()),
            }
        if "ode" in self.methods.names:
            gap = self.column("bpd_ode") - one
            out["ode_minus_one_pass_bpd"] = {
                "mean": float(gap.mean()),
                "mean_abs": float(np.abs(gap).mean()),
                "min": float(gap.min()),
                "max": float(gap.max()),
            }
        out["reading"] = consistency_reading(out)
        return out

    def summary(self) -> dict[str, Any]:
        methods = {m: self.method_summary(m) for m in self.methods.names}
        first = methods[self.method]
        summary = {
            "dataset": self.dataset,
            "split": self.split,
            "count": self.count,
            "method": self.method,
            "nll_bpd": first["nll_bpd"],
            "nll_bpd_ci95": first["nll_bpd_ci95"],
            "nll_bpd_std": first["nll_bpd_std"],
            "mean_log_px_nats": float(self.log_px.mean()),
            "bpd_convention": first["convention"],
            "bpd_offset": first["bpd_offset"],
            # The same mean in the other conventions for 8-bit images (they differ by their offsets only), so a
            # figure can be set beside the paper's (its code's +7) and beside the literature's (+log2 127.5).
            "nll_bpd_by_convention": first.get("nll_bpd_by_convention", {}),
            "dequantize": self.dequantized,
            "allow_tf32": self.allow_tf32,
            "seconds": self.seconds,
            "images_per_s": self.count / self.seconds if self.seconds > 0 else float("nan"),
            "methods": methods,
        }
        if consistency := self.consistency():
            summary["consistency"] = consistency
        return summary


@dataclass
class NllResult:
    summary: dict[str, Any]
    scores_uri: str
    run_id: Optional[str] = None
    plot: Optional[str] = None

    @property
    def nll_bpd(self) -> float:
        return self.summary["nll_bpd"]

    @property
    def ci95(self) -> float:
        return self.summary["nll_bpd_ci95"]

    @property
    def count(self) -> int:
        return self.summary["count"]


# --------------------------------------------------------------------------- the worker


def dequantization_noise(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """u ~ U[0, 1) per sample, from its own stream (seed, index): independent of batching and worker count."""
    return (
        np.stack(
            [np.random.default_rng([seed, int(i), DEQUANTIZE_TAG]).random(shape, dtype=np.float32) for i in indices]
        )
        if len(indices)
        else np.zeros((0, *shape), np.float32)
    )


def sample_generators(indices: np.ndarray, seed: int, tag: int, device: str) -> list[torch.Generator]:
    """One torch generator per sample, seeded from its own stream (seed, index, tag), as the dequantization noise."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.default_rng([seed, int(i), tag]).integers(2**62)))
        gens.append(g)
    return gens


class LikelihoodScorer(ModelWorker):
    """A Ray Data actor: loads the model once, then scores batches {x, label, index, pad} → {index, label, <methods' columns>}."""

    def __init__(
        self,
        checkpoint: str,
        use_ema: bool,
        device: str,
        threads: int,
        *,
        dequantize: bool,
        seed: int,
        offset: float,
        conditional: bool,
        allow_tf32: bool = False,
        methods: Methods = Methods(),
        faults: dict[str, Any] | None = None,
    ):
        super().__init__(checkpoint, use_ema, device, threads, allow_tf32=allow_tf32, faults=faults)
        self.dequantize = dequantize
        self.seed = seed
        self.offset = offset
        self.conditional = conditional
        self.methods = methods
        self.schedule = self.trained.schedule.to(device=device, dtype=torch.float32)
        self.consistency_classes = log_snr_classes(self.trained.schedule, methods.consistency_classes)

    def _eps_fns(self, y: torch.Tensor | None) -> tuple[Any, Any]:
        """The ε̂ of the ELBO (integer classes) and of the ODE (real τ) for this model, conditioned on y if given."""
        model = self.trained.model
        if self.trained.kind == "cdm":
            return cdm_eps_fn(model, self.schedule, y), cdm_continuous_eps_fn(model, self.trained.schedule, y)
        return ddm_eps_fn(model, y), ddm_continuous_eps_fn(model, self.trained.schedule, y)

    def _consistency_elbo(
        self, x8: torch.Tensor, y: torch.Tensor | None, index: np.ndarray, elbo_eps: Any
    ) -> np.ndarray:
        """The ELBO on the log-SNR chain for the samples with index < consistency_samples, NaN for the others;
        its x_t noise from the same per-sample streams as `--method elbo`'s."""
        out = np.full(len(index), np.nan)
        keep = index < self.methods.consistency_samples
        if keep.any():
            rows = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
            eps_fn = elbo_eps if y is None else self._eps_fns(y[rows])[0]
            gens = sample_generators(index[keep], self.seed, ELBO_TAG, self.device)
            elbo = elbo_bits_per_dim(eps_fn, x8[rows], self.schedule, classes=self.consistency_classes, generator=gens)
            out[keep] = elbo.bpd.cpu().numpy()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.next_call()
        keep = ~batch["pad"]
        x_np, index, label = batch["x"][keep], batch["index"][keep], batch["label"][keep]
        n, dims = len(index), int(np.prod(x_np.shape[1:]))
        x8 = torch.from_numpy(np.ascontiguousarray(x_np)).to(self.device)  # the data as stored (8-bit levels)
        if self.dequantize:
            x_np = x_np + dequantization_noise(index, x_np.shape[1:], self.seed) * np.float32(2.0 / 255.0)
        x = torch.from_numpy(np.ascontiguousarray(x_np)).to(self.device)
        y = torch.from_numpy(label).to(self.device) if self.conditional else None
        out: dict[str, np.ndarray] = {"index": index, "label": label}
        elbo_eps, ode_eps = self._eps_fns(y)
        for method in self.methods.names:
            start = time.perf_counter()
            if method == "one-pass":
                with torch.no_grad():
                    logits = self.trained.model(x) if y is None else self.trained.model(x, y)
                    # float64 from here on: the likelihood is a difference of large logits plus log N(x; 0, I).
                    log_px = log_likelihood_from_logits(logits.double(), x.double(), self.trained.prior)
                    bpd = nats_to_bits_per_dim(log_px, dims, self.offset)
                    link01 = logits[:, 0].double() - logits[:, 1].double()
                out |= {"log_px": log_px.cpu().numpy(), "bpd": bpd.cpu().numpy(), "link01": link01.cpu().numpy()}
            elif method == "elbo":
                gens = sample_generators(index, self.seed, ELBO_TAG, self.device)
                elbo = elbo_bits_per_dim(elbo_eps, x8, self.schedule, stride=self.methods.elbo_stride, generator=gens)
                out |= {
                    "bpd_elbo": elbo.bpd.cpu().numpy(),
                    "nats_elbo": elbo.nats.cpu().numpy(),
                    "nfe_elbo": np.full(n, elbo.nfe, np.int64),
                }
            else:
                probes = (
                    sample_generators(index, self.seed, PROBE_TAG, self.device)
                    if self.methods.trace == "hutchinson"
                    else None
                )
                log_px, nfe = ode_log_likelihood(
                    ode_eps,
                    x,
                    self.trained.schedule,
                    rtol=self.methods.ode_rtol,
                    atol=self.methods.ode_atol,
                    trace=self.methods.trace,
                    generator=probes,
                )
                log_px = log_px.double()
                out |= {
                    "log_px_ode": log_px.cpu().numpy(),
                    "bpd_ode": nats_to_bits_per_dim(log_px, dims, self.offset).cpu().numpy(),
                    "nfe_ode": np.full(n, nfe, np.int64),
                }
            out[f"seconds_{SUFFIX[method]}"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        if self.methods.consistency_samples > 0:  # timed apart, so one-pass's seconds stay its own
            start = time.perf_counter()
            out["bpd_elbo_subset"] = self._consistency_elbo(x8, y, index, elbo_eps)
            out["seconds_consistency"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out


# --------------------------------------------------------------------------- scoring a split


def check_model_fits(trained: Any, ds: sh.Dataset, conditional: bool) -> None:
    where = ds.loc.uri
    spec = ds.spec
    want = tuple(trained.model.data_shape)
    have = (spec.shape[2], spec.shape[0], spec.shape[1]) if spec.kind == "image" else tuple(spec.shape)
    if want != have:
        raise UserError(
            f"{where}: samples are {have} (C, H, W), the model takes {want}; score a dataset of the model's shape"
        )
    if conditional:
        if trained.num_labels is None:
            raise UserError("--conditional: the model is unconditional (trained without labels)")
        if not spec.labeled:
            raise UserError(f"{where}: --conditional needs labels, and this dataset has none")


def resolve_convention(convention: Optional[str], kind: str, dequantize: bool) -> str:
    if convention is None:
        convention = "standard" if kind == "image" else "continuous"
    if convention not in CONVENTIONS:
        raise UserError(f"--bpd-convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
    if kind == "vector" and convention != "continuous":
        raise UserError(f"--bpd-convention {convention}: vector data is continuous; only 'continuous' applies")
    if kind == "vector" and dequantize:
        raise UserError("--dequantize applies to 8-bit images; this dataset holds continuous vectors")
    return convention


def manifest_keys(ds: sh.Dataset, split: str) -> list[str]:
    if not ds.loc.exists(sh.MANIFEST):
        raise UserError(f"{ds.loc.where(sh.MANIFEST)}: missing; re-run `cdm prepare`")
    table = pq.read_table(io.BytesIO(ds.loc.read_bytes(sh.MANIFEST)), columns=["key", "split"])
    keys = [k for k, s in zip(table.column("key").to_pylist(), table.column("split").to_pylist()) if s == split]
    if len(keys) != ds.count(split):
        raise UserError(
            f"{ds.loc.where(sh.MANIFEST)}: {len(keys)} rows for split {split}, dataset.json counts {ds.count(split)}"
        )
    return keys


def check_complete(keys: list[str], expected: list[str], where: str) -> None:
    """Every expected key exactly once, nothing else; the message names what is wrong."""
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    repeated = sorted(k for k, c in seen.items() if c > 1)
    if missing or extra or repeated:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(extra)} not in the manifest (e.g. {extra[:3]})" if extra else "",
            f"{len(repeated)} scored more than once (e.g. {repeated[:3]})" if repeated else "",
        ]
        raise RuntimeError(
            f"{where}: scored {len(keys)} samples, the manifest lists {len(expected)}: "
            + "; ".join(p for p in parts if p)
        )


@dataclass
class ScoringInputs:
    """A model and a split checked for scoring: all `score` needs, found before any MLflow run is opened."""

    model: LocatedModel
    dataset: sh.Dataset
    split: str
    expected: list[str]  # the split's keys in the manifest: every one must be scored exactly once
    methods: Methods
    convention: str
    options: ScoringSection
    pool: PoolSection


def check_scoring(
    checkpoint: str | LocatedModel,
    dataset: str | sh.Dataset,
    split: str,
    options: ScoringSection,
    pool: PoolSection,
    methods: Optional[Methods | NllConfig] = None,
) -> ScoringInputs:
    """Everything about scoring `split` with this model that can be wrong, checked once; one line if it is.

    `methods`: a Methods, or an NllConfig whose method settings are resolved for this model and data
    (default: the one-pass likelihood, which needs a CDM: a DDM is refused, as `cdm ood` wants).
    """
    ds = sh.open_dataset(dataset)
    model = checkpoint if isinstance(checkpoint, LocatedModel) else locate_model(checkpoint, use_ema=options.use_ema)
    trained = model.trained
    if not isinstance(methods, Methods):
        # `cdm ood`: one-pass only, without the consistency ELBO
        asked = methods or NllConfig(checkpoint=str(model.file), method="one-pass", consistency_samples=0)
        methods = resolve_methods(asked, trained.kind, ds.spec.kind)
    elif "one-pass" in methods.names and trained.kind != "cdm":
        resolve_methods(NllConfig(checkpoint=str(model.file), method="one-pass"), trained.kind, ds.spec.kind)
    check_model_fits(trained, ds, options.conditional)
    convention = resolve_convention(options.bpd_convention, ds.spec.kind, options.dequantize)
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be ≥ 1")
    expected = manifest_keys(ds, split)
    return ScoringInputs(model, ds, split, expected, methods, convention, options, pool)


def score(inputs: ScoringInputs) -> SplitScores:
    """Score every sample of the split on the workers; sorted by index and checked against the manifest."""
    trained, ds, options, methods = inputs.model.trained, inputs.dataset, inputs.options, inputs.methods
    norm = of_model(trained.config)  # continuous data: the model's own normalization, whatever the dataset's
    kwargs = {
        "checkpoint": str(inputs.model.file),
        "use_ema": options.use_ema,
        "dequantize": options.dequantize,
        "seed": options.seed,
        "offset": bpd_offset(inputs.convention),
        "conditional": options.conditional,
        "allow_tf32": options.allow_tf32,
        "methods": methods,
    }
    rows = map_split(
        ds,
        inputs.split,
        LikelihoodScorer,
        kwargs,
        batch_size=options.batch_size,
        pool=inputs.pool,
        normalization=DATASET if norm is None else norm,
        label=f"nll ({', '.join(methods.names)})",
    )
    keys, index, arrays, seconds = rows.keys, rows.index, rows.columns, rows.seconds
    dims = int(np.prod(trained.model.data_shape))
    check_complete(keys, inputs.expected, f"{ds.loc.uri} split {inputs.split}")
    # The density of the data as given: undo the normalization's Jacobian (log p_x = log p_z − Σ log σ).
    log_det = norm.log_det(tuple(trained.model.data_shape)) if norm is not None else 0.0
    for name in ("log_px", "log_px_ode"):
        if name in arrays and log_det:
            arrays[name] = arrays[name] - log_det
            bpd_name = "bpd" if name == "log_px" else "bpd_ode"
            arrays[bpd_name] = arrays[bpd_name] + log_det / (int(np.prod(trained.model.data_shape)) * math.log(2))
    table = {
        "key": pa.array(keys, pa.string()),
        "index": pa.array(index, pa.int64()),
        "label": pa.array(arrays.pop("label").astype(np.int64), pa.int64()),
    }
    for name in sorted(arrays, key=_column_order):
        values = arrays[name]
        integer = name.startswith("nfe_")
        table[name] = pa.array(
            values.astype(np.int64 if integer else np.float64), pa.int64() if integer else pa.float64()
        )
    return SplitScores(
        ds.loc.uri,
        inputs.split,
        pa.table(table),
        inputs.convention,
        bpd_offset(inputs.convention),
        options.dequantize,
        seconds,
        options.allow_tf32,
        methods,
        link01_expected_nats(trained.schedule, dims, trained.prior) if ds.spec.kind == "image" else None,
        len(log_snr_classes(trained.schedule, methods.consistency_classes)),
    )


def _column_order(name: str) -> tuple[int, str]:
    """log_px, bpd (one-pass) first, then the ELBO's and the ODE's columns, the seconds last."""
    first = (
        "log_px",
        "bpd",
        "link01",
        "bpd_elbo_subset",
        "bpd_elbo",
        "nats_elbo",
        "nfe_elbo",
        "log_px_ode",
        "bpd_ode",
        "nfe_ode",
    )
    return (first.index(name), name) if name in first else (len(first), name)


def write_scores(scores: SplitScores, out: str) -> str:
    """scores.parquet + summary.json in `out` (a folder or URI); returns the Parquet file's URI."""
    loc = storage.resolve(out)
    if loc.root_kind() == "file":
        raise UserError(f"{loc.uri}: is a file; --out must be a folder")
    loc.makedirs()
    buf = io.BytesIO()
    pq.write_table(scores.table, buf)
    loc.write_bytes(SCORES, buf.getvalue())
    loc.write_bytes(SUMMARY, (json.dumps(scores.summary(), indent=2) + "\n").encode())
    return loc.where(SCORES)


def read_scores(uri: str) -> Any:
    """The per-sample scores a run wrote (`uri`: the out folder or the .parquet file)."""
    loc = storage.resolve(uri)
    if loc.root_kind() == "dir":
        return pq.read_table(io.BytesIO(loc.read_bytes(SCORES)))
    return pq.read_table(io.BytesIO(loc.fs.open_input_stream(loc.root).read()))


def default_out(dataset: str, split: str, stage: str = "nll") -> str:
    name = storage.resolve(dataset).root.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return str(Path("outputs") / stage / f"{name}-{split}")


# --------------------------------------------------------------------------- the stage


def method_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of each method's figure: eval/nll_bpd (one-pass, as always), eval/nll_bpd_elbo, …_ode."""
    metrics: dict[str, float] = {}
    for method, m in summary["methods"].items():
        suffix = SUFFIX[method]
        if method == "one-pass":
            metrics |= {
                "eval/nll_bpd": m["nll_bpd"],
                "eval/nll_bpd_ci95": m["nll_bpd_ci95"],
                "eval/nll_mean_log_px_nats": m["mean_log_px_nats"],
                **{f"eval/nll_bpd_{c}": v for c, v in m["nll_bpd_by_convention"].items()},
            }
        else:
            metrics |= {f"eval/nll_bpd_{suffix}": m["nll_bpd"], f"eval/nll_bpd_{suffix}_ci95": m["nll_bpd_ci95"]}
        metrics |= {
            f"eval/nfe_per_sample_{suffix}": m["nfe_per_sample"],
            f"eval/nll_seconds_{suffix}": m["seconds"],
            f"eval/nll_images_per_s_{suffix}": m["images_per_s"],
        }
    return metrics


def consistency_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of summary.json's "consistency": eval/link01_nats, eval/consistency_gap_bpd, …"""
    c = summary.get("consistency", {})
    names = {
        "link01_nats": "eval/link01_nats",
        "link01_expected_nats": "eval/link01_expected_nats",
        "nll_bpd": "eval/consistency_nll_bpd",
        "nll_bpd_elbo": "eval/consistency_nll_bpd_elbo",
        "gap_bpd": "eval/consistency_gap_bpd",
        "samples": "eval/consistency_samples",
        "seconds": "eval/consistency_seconds",
    }
    return {metric: float(c[key]) for key, metric in names.items() if key in c}


def run(config: NllConfig) -> NllResult:
    if not config.checkpoint or not config.dataset:
        raise UserError("nll needs a checkpoint and a dataset")
    out = config.out or default_out(config.dataset, config.split)
    storage.check_writable(out)  # before the split is scored, not after
    model = locate_model(config.checkpoint, use_ema=config.scoring.use_ema, train_run_id=config.train_run_id)
    inputs = check_scoring(model, config.dataset, config.split, config.scoring, config.pool, config)

    scoring = config.scoring
    params = {
        "dataset": inputs.dataset.loc.uri,
        "split": config.split,
        "conditional": scoring.conditional,
        "dequantize": scoring.dequantize,
        "seed": scoring.seed,
        "batch_size": scoring.batch_size,
        "use_ema": scoring.use_ema,
        "allow_tf32": scoring.allow_tf32,
        "workers": config.pool.workers,
    }
    tags = run_tags("nll", model) | {"cdm.dataset": inputs.dataset.loc.uri}
    with tracked(config, f"nll-{config.split}", params, tags) as record:
        scores = score(inputs)
        uri = write_scores(scores, out)
        plot = None
        if "one-pass" in scores.methods.names and len(scores.methods.names) > 1:
            plot = save_beside(out, SCATTER, lambda path: save_method_scatter(scores, path), record)
        summary = scores.summary()
        record.params(method_params(summary))
        record.metrics(
            {
                "eval/nll_count": summary["count"],
                "eval/nll_seconds": summary["seconds"],
                "eval/nll_images_per_s": summary["images_per_s"],
                **method_metrics(summary),
                **consistency_metrics(summary),
            }
        )
        if storage.resolve(out).is_local():
            record.artifact(Path(storage.resolve(out).root) / SUMMARY)
    return NllResult(summary, uri, record.run_id, plot)


def method_params(summary: dict[str, Any]) -> dict[str, Any]:
    """Which method and convention a figure uses is part of the figure: logged as params next to it."""
    methods = summary["methods"]
    params: dict[str, Any] = {"method": ",".join(methods)}
    density = next((m for m in ("one-pass", "ode") if m in methods), None)
    if density:
        params |= {"bpd_convention": methods[density]["convention"], "bpd_offset": methods[density]["bpd_offset"]}
    if "elbo" in methods:
        params |= {"elbo_stride": methods["elbo"]["stride"], "elbo_convention": ELBO_CONVENTION}
    if "samples" in summary.get("consistency", {}):
        params |= {
            "consistency_samples": summary["consistency"]["samples"],
            "consistency_classes": summary["consistency"]["elbo_classes"],
        }
    if "ode" in methods:
        ode = methods["ode"]
        params |= {"ode_rtol": ode["rtol"], "ode_atol": ode["atol"], "ode_trace": ode["trace"]}
    return params
