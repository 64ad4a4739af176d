"""The classify stage: a class-conditional CDM as an exact Bayes classifier (`cdm classify`).

`run(ClassifyConfig(...))` is the stage. For a sample x and each class y the
CDM's one-pass likelihood (Theorem 3.2, the label as the network's input) gives

    log p(x | y) = ℓ_0(x, y) − ℓ_{T+1}(x, y) + log N(x; 0, I) + log π(T+1) − log π(0)

and Bayes' rule the posterior over the K classes,

    log p(y | x) = log p(x | y) + log p(y) − log Σ_y' p(x | y') p(y'),

whose denominator is the model's marginal log p(x). That is K forward passes
per sample, no gradient: each batch is repeated once per class (labels
0..K−1) and scored in forward passes of `batch_size` (sample, class) rows, on
the NLL stage's pool of Ray actors, every manifest key checked to be scored
exactly once. The class prior p(y) is the label frequencies of the dataset's
train split (`--prior train`, the default: the distribution the model was
trained on) or uniform (`--prior uniform`); which one is recorded.

Reported (stdout, `summary.json`, MLflow):
  accuracy       fraction with argmax_y p(y | x) = the label                 eval/classify_accuracy
  NLL            mean −log p(y_true | x) in nats                             eval/classify_nll
  ECE            expected calibration error, 15 equal-width bins of the      eval/classify_ece
                 confidence c = max_y p(y | x): bin b holds c ∈ ((b−1)/15, b/15],
                 ECE = Σ_b (|B_b| / N) · |accuracy(B_b) − mean confidence(B_b)|
                 (Guo et al. 2017, "On calibration of modern neural networks")
and `confusion.png` (rows: true class, columns: predicted). `scores.parquet` has a
row per sample: key, index, label, predicted, confidence, log_p_true
(log p(y_true | x)), log_p_predicted, log_px (the marginal, nats), and the
per-class lists log_p_y_given_x and log_px_given_y; densities are of the data as given (for
continuous data a model trained on normalized values has its normalization's Jacobian undone,
as `cdm nll` does).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cdm_core.objective import log_likelihood
from pipelines.common import storage
from pipelines.common.checkpoints import LocatedModel, TrainedModel, locate_model
from pipelines.common.config import FieldError
from pipelines.common.errors import UserError
from pipelines.common.stage import tracked
from pipelines.data import shards as sh
from pipelines.data.normalization import of_model
from pipelines.data.readers import DATASET
from pipelines.evaluate.config import ClassifyConfig
from pipelines.evaluate.nll import check_complete, check_model_fits, default_out, manifest_keys, write_scores
from pipelines.evaluate.plots import save_beside, save_confusion
from pipelines.evaluate.workers import ModelWorker, map_split, run_tags

CONFUSION = "confusion.png"
ECE_BINS = 15


# --------------------------------------------------------------------------- the science, per batch


def class_log_likelihoods(
    model: torch.nn.Module, x: torch.Tensor, num_labels: int, time_prior: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """log p(x | y) in nats for every sample and class y = 0..K−1: shape (B, K), float64.

    The batch repeated once per class, in forward passes of at most `rows` (sample, class) pairs;
    row r is sample r mod B with label r div B, so a pass never holds more than `rows` inputs.
    """
    b = x.shape[0]
    if b == 0:
        return torch.zeros((0, num_labels), dtype=torch.float64, device=x.device)
    out = []
    for start in range(0, b * num_labels, rows):
        r = torch.arange(start, min(start + rows, b * num_labels), device=x.device)
        y = r // b
        # float64 from the logits on: the likelihood is a difference of large logits plus log N(x; 0, I).
        out.append(log_likelihood(lambda z, y=y: model(z, y).double(), x[r % b], prior=time_prior))
    return torch.cat(out).view(num_labels, b).T


def log_posterior(log_px_given_y: torch.Tensor, log_prior_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y | x) of shape (B, K), log p(x) of shape (B,)) by Bayes' rule."""
    joint = log_px_given_y + log_prior_y
    log_px = torch.logsumexp(joint, dim=1)
    return joint - log_px[:, None], log_px


class BayesClassifier(ModelWorker):
    """A Ray Data actor: loads the model once, then scores batches {x, label, index, pad} for every class."""

    def __init__(self, *args: Any, log_prior_y: list[float], rows: int, **kwargs: Any):  # + ModelWorker's
        super().__init__(*args, **kwargs)
        self.log_prior_y = torch.tensor(log_prior_y, dtype=torch.float64, device=self.device)
        self.rows = rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.next_call()
        keep = ~batch["pad"]
        x = torch.from_numpy(np.ascontiguousarray(batch["x"][keep])).to(self.device)
        with torch.no_grad():
            per_class = class_log_likelihoods(
                self.trained.model, x, len(self.log_prior_y), self.trained.prior, self.rows
            )
            post, log_px = log_posterior(per_class, self.log_prior_y)
        return {
            "index": batch["index"][keep],
            "label": batch["label"][keep],
            "log_px_given_y": per_class.cpu().numpy(),
            "log_p_y_given_x": post.cpu().numpy(),
            "log_px": log_px.cpu().numpy(),
        }


# --------------------------------------------------------------------------- the figures


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (|B_b|/N)·|acc(B_b) − conf(B_b)| over `bins` equal-width bins ((b−1)/bins, b/bins] of the confidence."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # edges[b] < c ≤ edges[b+1]
    # per bin, |Σ correct − Σ confidence| / N = (|B_b|/N)·|acc(B_b) − conf(B_b)|
    gap = np.bincount(which, correct.astype(np.float64), bins) - np.bincount(which, confidence, bins)
    return float(np.abs(gap).sum() / len(confidence))


def classification_summary(log_post: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, NLL of the labels (nats), ECE and the confusion matrix of posteriors (N, K) against labels (N,)."""
    n, k = log_post.shape
    predicted = log_post.argmax(1)
    confidence = np.exp(log_post.max(1))
    correct = predicted == labels
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return {
        "count": int(n),
        "num_classes": int(k),
        "accuracy": float(correct.mean()),
        "nll": float(-log_post[np.arange(n), labels].mean()),
        "ece": expected_calibration_error(confidence, correct),
        "ece_bins": ECE_BINS,
        "mean_confidence": float(confidence.mean()),
        "confusion": confusion.tolist(),
    }


# --------------------------------------------------------------------------- classifying a split


@dataclass
class ClassifiedSplit:
    """Per-sample posteriors of one split (sorted by index, checked against the manifest) and their figures."""

    table: Any  # pyarrow.Table, see the module docstring
    figures: dict[str, Any]  # what summary.json holds

    def summary(self) -> dict[str, Any]:
        return self.figures


@dataclass
class ClassifyResult:
    summary: dict[str, Any]
    scores_uri: str
    confusion: str
    run_id: Optional[str] = None

    @property
    def accuracy(self) -> float:
        return self.summary["accuracy"]


def _check_model(trained: TrainedModel, ds: sh.Dataset) -> int:
    """The number of classes K, once the model and the dataset are known to fit a Bayes classifier."""
    if trained.kind != "cdm":
        raise UserError(
            f"{trained.path}: a {trained.kind!r} model; Bayes classification needs a class-conditional CDM "
            "(model.kind = 'cdm', model.conditional = true), whose one-pass likelihood gives log p(x|y)"
        )
    if not trained.num_labels:
        raise UserError(
            f"{trained.path}: an unconditional CDM; `cdm classify` needs a class-conditional CDM "
            "(train one with --set model.conditional=true)"
        )
    if not ds.spec.labeled:
        raise UserError(
            f"{ds.loc.uri}: the dataset has no labels (prepared without them); classify a labeled dataset "
            "prepared from the model's classes"
        )
    have = ds.spec.num_classes
    if have is not None and have != trained.num_labels:
        raise UserError(
            f"{trained.path}: the model has {trained.num_labels} classes, {ds.loc.uri} has {have}; "
            "classify a dataset of the classes the model was trained on"
        )
    check_model_fits(trained, ds, conditional=True)  # the sample shape
    return int(trained.num_labels)


def class_prior(ds: sh.Dataset, num_classes: int, which: str) -> np.ndarray:
    """p(y): uniform, or the label frequencies of the dataset's train split (from its manifest)."""
    if which == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    if "train" not in ds.splits:
        raise UserError(
            f"{ds.loc.uri}: no train split to take the class frequencies from (it has {ds.splits}); "
            "pass --prior uniform"
        )
    if not ds.loc.exists(sh.MANIFEST):
        raise UserError(f"{ds.loc.where(sh.MANIFEST)}: missing; re-run `cdm prepare`")
    table = pq.read_table(io.BytesIO(ds.loc.read_bytes(sh.MANIFEST)), columns=["label", "split"])
    labels = np.asarray(table.column("label").to_numpy())[np.asarray(table.column("split").to_pylist()) == "train"]
    if len(labels) != ds.count("train") or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise UserError(
            f"{ds.loc.where(sh.MANIFEST)}: the train split's labels do not match dataset.json "
            f"({len(labels)} rows, {ds.count('train')} counted, {num_classes} classes); re-run `cdm prepare … --force`"
        )
    counts = np.bincount(labels, minlength=num_classes)
    absent = np.flatnonzero(counts == 0).tolist()
    if absent:
        raise UserError(
            f"{ds.loc.uri}: class(es) {absent[:10]} never occur in the train split, so their frequency prior is 0; "
            "pass --prior uniform"
        )
    return counts / counts.sum()


@dataclass
class ClassifyInputs:
    """A model and a split checked for classification, before any MLflow run is opened."""

    model: LocatedModel
    dataset: sh.Dataset
    num_classes: int
    prior: np.ndarray
    expected: list[str]  # the split's keys in the manifest


def check_classify(config: ClassifyConfig) -> ClassifyInputs:
    _validate(config)
    ds = sh.open_dataset(config.dataset)
    model = locate_model(config.checkpoint, use_ema=config.use_ema, train_run_id=config.train_run_id)
    k = _check_model(model.trained, ds)
    return ClassifyInputs(model, ds, k, class_prior(ds, k, config.prior), manifest_keys(ds, config.split))


def classify_split(config: ClassifyConfig, inputs: ClassifyInputs) -> ClassifiedSplit:
    """Posteriors of every sample of the split on Ray workers; sorted by index and checked against the manifest."""
    ds, trained, k, prior = inputs.dataset, inputs.model.trained, inputs.num_classes, inputs.prior
    ckpt, expected = inputs.model.file, inputs.expected
    norm = of_model(trained.config)  # continuous data: the model's own normalization, whatever the dataset's
    rows = map_split(
        ds,
        config.split,
        BayesClassifier,
        {
            "checkpoint": str(ckpt),
            "use_ema": config.use_ema,
            "log_prior_y": np.log(prior).tolist(),
            "rows": config.batch_size,
            "allow_tf32": config.allow_tf32,
        },
        batch_size=max(1, config.batch_size // k),  # one forward pass per batch where K ≤ batch_size
        pool=config.pool,
        normalization=DATASET if norm is None else norm,
        label="classify",
    )
    check_complete(rows.keys, expected, f"{ds.loc.uri} split {config.split}")
    c = rows.columns
    # Densities of the data as given: undo the normalization's Jacobian (the posterior does not change).
    log_det = norm.log_det(tuple(trained.model.data_shape)) if norm is not None else 0.0
    c["log_px"], c["log_px_given_y"] = c["log_px"] - log_det, c["log_px_given_y"] - log_det
    log_post, labels = c["log_p_y_given_x"].astype(np.float64), c["label"].astype(np.int64)
    predicted = log_post.argmax(1)
    n = len(rows.index)

    def per_class(values: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float64).ravel(), pa.float64()), k)

    table = pa.table(
        {
            "key": pa.array(rows.keys, pa.string()),
            "index": pa.array(rows.index, pa.int64()),
            "label": pa.array(labels, pa.int64()),
            "predicted": pa.array(predicted.astype(np.int64), pa.int64()),
            "confidence": pa.array(np.exp(log_post[np.arange(n), predicted]), pa.float64()),
            "log_p_true": pa.array(log_post[np.arange(n), labels], pa.float64()),
            "log_p_predicted": pa.array(log_post[np.arange(n), predicted], pa.float64()),
            "log_px": pa.array(c["log_px"].astype(np.float64), pa.float64()),
            "log_p_y_given_x": per_class(log_post),
            "log_px_given_y": per_class(c["log_px_given_y"]),
        }
    )
    figures = classification_summary(log_post, labels)
    summary = {
        "dataset": ds.loc.uri,
        "split": config.split,
        "checkpoint": str(ckpt),
        "prior": config.prior,
        "prior_probs": prior.tolist(),
        **figures,
        "mean_log_px_nats": float(c["log_px"].mean()),
        "use_ema": config.use_ema,
        "allow_tf32": config.allow_tf32,
        "seconds": rows.seconds,
        "samples_per_s": n / rows.seconds if rows.seconds > 0 else float("nan"),
        "forward_rows": n * k,  # one (sample, class) row of a forward pass each
    }
    return ClassifiedSplit(table, summary)


# --------------------------------------------------------------------------- the stage


def _validate(config: ClassifyConfig) -> None:
    if not config.checkpoint or not config.dataset:
        raise UserError("classify needs a checkpoint and a dataset")
    try:
        config.check()  # prior, batch_size: the checks a config file gets on load
    except FieldError as err:
        raise UserError(f"--{err.field.replace('_', '-')} {err.message}") from None


def run(config: ClassifyConfig) -> ClassifyResult:
    inputs = check_classify(config)
    out = config.out or default_out(config.dataset, config.split, stage="classify")
    storage.check_writable(out)  # before the split is scored, not after
    params = {
        "checkpoint": str(inputs.model.file),
        "dataset": inputs.dataset.loc.uri,
        "split": config.split,
        "prior": config.prior,
        "batch_size": config.batch_size,
        "use_ema": config.use_ema,
        "allow_tf32": config.allow_tf32,
        "workers": config.pool.workers,
    }
    tags = run_tags("classify", inputs.model) | {"cdm.dataset": inputs.dataset.loc.uri}
    with tracked(config, f"classify-{config.split}", params, tags) as record:
        scores = classify_split(config, inputs)
        uri = write_scores(scores, out)  # scores.parquet and summary.json, as `cdm nll` writes them
        summary = scores.summary()
        title = f"{Path(summary['dataset']).name} [{summary['split']}], prior {summary['prior']}"
        confusion = save_beside(
            out,
            CONFUSION,
            lambda path: save_confusion(np.asarray(summary["confusion"]), summary["accuracy"], title, path),
            record,
        )
        record.metrics(
            {
                "eval/classify_accuracy": summary["accuracy"],
                "eval/classify_nll": summary["nll"],
                "eval/classify_ece": summary["ece"],
                "eval/classify_count": summary["count"],
                "eval/classify_mean_log_px_nats": summary["mean_log_px_nats"],
                "eval/classify_seconds": summary["seconds"],
                "eval/classify_samples_per_s": summary["samples_per_s"],
            }
        )
        record.json("summary.json", summary)
    return ClassifyResult(summary, uri, confusion, record.run_id)
