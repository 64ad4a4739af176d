"""The config of `cdm run`: one table per stage, each the stage's own settings.

    [prepare]   the data: any `cdm prepare` option (source, path, …); no source = use train.data.uri as is
    [features]  `cdm train-features` (the classifier whose features define fd_<dataset>)
    [train]     a complete training config (`cdm train`); `extends = "../cifar10.toml"` starts from a train config file
    [tune]      optional Ray Tune sweep before training: `space` (a sweep file) and any [tune] setting of one
    [sample]    `cdm sample` options (n, sampler, steps, …)
    [protocols.NAME]  optional: several sampling protocols (a paper's table rows), each what differs from
                [sample] (sampler, steps, cfg, …); each gets its own sample and fid stages, its FID logged
                as eval/<metric>_NAME (name it by sampler and steps: ddim50, dpms25, …)
    [nll]       `cdm nll` options (split, …), plus `untrained` (also score the untrained network, for comparison)
    [fid]       `cdm fid` options (features = classifier | inception | raw | classifier:PATH, …)
    [tracking]  MLflow experiment and store
    [ray]       the local Ray session (num_cpus); the cluster address is the training config's run.ray_address

One source of truth per hyperparameter: each table's fields are *derived* from
the stage's own config dataclass (minus what the workflow wires itself: input
and output locations, MLflow plumbing), so a stage option exists here exactly
when the stage has it, with the stage's default. Training hyperparameters live
in the training config file that `[train] extends`, and a workflow only states
what it changes.

`--set` addresses any of it with the stage's name in front:
`--set train.optim.lr=1e-4 --set sample.steps=50 --set prepare.path=~/cifar-10-python.tar.gz`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipelines.common import config as cfg
from pipelines.common.config import ConfigError, FieldError, option
from pipelines.data.config import PrepareConfig
from pipelines.evaluate.config import FidConfig, NllConfig, SampleConfig, TrainFeaturesConfig
from pipelines.train.config import TrainConfig

# What the workflow itself decides for every stage: where inputs and outputs are, and MLflow.
WIRED = ("out", "force", "track", "tracking", "train_run_id", "address")


def stage_section(
    name: str,
    stage_config: type,
    wired: Sequence[str],
    *,
    replace: dict[str, tuple] | None = None,
    extra: Sequence[tuple] = (),
    check: Any = None,
) -> type:
    """A config section with the stage config's own settings (types, defaults, help), minus the `wired` ones.

    The settings of the stage config's sections (its `scoring`, `pool`, …) appear here by their
    flat names, as its command's flags do; a `wired` name drops a setting or a whole section.
    `replace` maps a setting to (type, option(...)) where the workflow's version differs;
    `extra` adds workflow-only settings as (name, type, option(...)); `check` is the stage config's
    own check of the settings the section keeps, so that a bad value stops the workflow before it starts.
    """
    fields = []
    for setting, (section, f, tp) in cfg.flat_fields(stage_config).items():
        if setting in wired or section in wired:
            continue
        if replace and setting in replace:
            fields.append((setting, *replace[setting]))
            continue
        default = cfg.field_default(stage_config, setting)
        # The stage's bounds come along, so that the plan refuses what the stage would refuse (sample.n=0).
        ge, gt, le, lt = f.metadata.get("bounds", (None,) * 4)
        fields.append((setting, tp, option(default, doc=f.metadata.get("doc", ""), ge=ge, gt=gt, le=le, lt=lt)))
    made = dataclasses.make_dataclass(name, [*fields, *extra], namespace={"check": check} if check else None)
    made.__doc__ = f"The settings of {stage_config.__name__} that the workflow does not set itself."
    made.__module__ = __name__
    return made


# `source` becomes optional: a workflow without it trains on an already prepared train.data.uri.
PrepareSection = stage_section(
    "PrepareSection",
    PrepareConfig,
    WIRED,
    replace={
        "source": (Optional[str], option(None, doc="cdm prepare SOURCE; none: train on train.data.uri as it is")),
    },
)

FeaturesSection = stage_section("FeaturesSection", TrainFeaturesConfig, (*WIRED, "dataset", "device"))

SampleSection = stage_section(
    "SampleSection",
    SampleConfig,
    (*WIRED, "checkpoint"),
    extra=[("enabled", bool, option(True, doc="run the sample stage (and so the fid stage)"))],
    check=SampleConfig.check,  # sampler, time_grid and clip_x0 only: settings the section has
)

NllSection = stage_section(
    "NllSection",
    NllConfig,
    # The workflow's nll stage is the CDM's one-pass likelihood (eval/nll_bpd); `cdm nll --method` gives the others.
    (*WIRED, "checkpoint", "dataset", "method", "elbo_stride", "ode_rtol", "ode_atol", "trace"),
    extra=[
        ("enabled", bool, option(True, doc="score the split with the trained model")),
        (
            "untrained",
            bool,
            option(True, doc="also score it with the untrained network (same seed): the baseline to beat"),
        ),
    ],
)

FidSection = stage_section(
    "FidSection",
    FidConfig,
    (*WIRED, "samples", "reference"),
    replace={
        "features": (
            str,
            option("classifier", doc="classifier (trained by the features stage), inception, raw or classifier:PATH"),
        )
    },
    extra=[("enabled", bool, option(True, doc="Fréchet distance of the samples to the reference split"))],
)

_PROTOCOL_NAME = re.compile(r"[A-Za-z0-9_]+")
_WORKFLOW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Workflow-only settings of a section: not settings of the stage itself.
WORKFLOW_ONLY = ("enabled", "untrained")


def stage_settings(section: Any) -> dict[str, Any]:
    """A workflow section's values that are the stage's own settings (by flat name; see `cfg.nest`)."""
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in WORKFLOW_ONLY}


@dataclass
class WorkflowTracking:
    experiment: str = option("cdm", doc="MLflow experiment of the parent run and every stage's run")
    tracking_uri: Optional[str] = option(
        None, doc="MLflow URI; default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db"
    )
    parent_run_id: Optional[str] = option(
        None,
        doc="nest the workflow's parent run under this MLflow run (a study's, a sweep's), in the same experiment",
    )


@dataclass
class RaySection:
    num_cpus: Optional[int] = option(
        None,
        ge=1,
        doc="logical CPUs of the local Ray the workflow starts (default: the "
        "machine's cores); not used when joining a cluster (RAY_ADDRESS, train.run.ray_address)",
    )


@dataclass
class WorkflowConfig:
    train: TrainConfig
    name: Optional[str] = option(
        None, doc="the workflow's name (MLflow parent run, outputs/workflows/NAME); default: the config file's name"
    )
    prepare: PrepareSection = field(default_factory=PrepareSection)  # type: ignore[valid-type]
    features: FeaturesSection = field(default_factory=FeaturesSection)  # type: ignore[valid-type]
    tune: dict[str, Any] = option({}, doc="a Ray Tune sweep to run before training (empty: train the config as it is)")
    sample: SampleSection = field(default_factory=SampleSection)  # type: ignore[valid-type]
    protocols: dict[str, dict[str, Any]] = option(
        {},
        doc="sampling protocols: [protocols.NAME] holds the sample settings that differ from [sample]; each "
        "gets its own sample and fid stages and its FID as eval/<metric>_NAME (empty: the one [sample] protocol)",
    )
    nll: NllSection = field(default_factory=NllSection)  # type: ignore[valid-type]
    fid: FidSection = field(default_factory=FidSection)  # type: ignore[valid-type]
    tracking: WorkflowTracking = field(default_factory=WorkflowTracking)
    ray: RaySection = field(default_factory=RaySection)

    def check(self) -> None:
        if self.name is not None and not _WORKFLOW_NAME.fullmatch(self.name):
            raise FieldError(
                "name",
                f"{self.name!r}: a workflow's name is letters, digits, '.', '_' and '-', starting with a letter or "
                "digit (it names the folder outputs/workflows/NAME, which must stay inside the workdir)",
            )
        if self.fid.enabled and not self.sample.enabled:
            raise FieldError(
                "fid.enabled", "the fid stage compares samples: enable the sample stage or set fid.enabled = false"
            )
        self.sampling_protocols()

    def sampling_protocols(self) -> dict[str, Any]:
        """{protocol name: its SampleSection} ([sample] with the protocol's settings); {"": [sample]} without any."""
        if not self.protocols:
            return {"": self.sample}
        made = {}
        base = cfg.to_dict(self.sample)
        for name, table in self.protocols.items():
            if not _PROTOCOL_NAME.fullmatch(name):
                raise FieldError(
                    f"protocols.{name}",
                    "a protocol's name is letters, digits and '_' (it names stages and metrics: ddim50, dpms25, …)",
                )
            if not isinstance(table, dict):
                raise FieldError(f"protocols.{name}", f"expected a table of sample settings, got {table!r}")
            if "enabled" in table:
                raise FieldError(f"protocols.{name}.enabled", "sample.enabled switches every protocol on or off")
            try:
                made[name] = cfg.from_dict(SampleSection, cfg.merge(base, table), f"protocols.{name}")
            except ConfigError as err:
                where, _, message = str(err).partition(": ")
                raise FieldError(where, message) from None
        return made

    @property
    def uses_feature_classifier(self) -> bool:
        """The fid stage measures in the features of a classifier the workflow trains itself."""
        return self.fid.enabled and self.fid.features == "classifier"


# The training config keys the workflow sets itself (so a train config's values for them are ignored).
TRAIN_WIRED = ("run.name", "run.storage_path", "tracking.")


# --------------------------------------------------------------------------- loading


def _train_base(table: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """The [train] table with its `extends = FILE` (a training config, relative to the workflow file) merged underneath."""
    table = dict(table)
    base = table.pop("extends", None)
    if base is None:
        return table
    if not isinstance(base, str):
        raise ConfigError(f"train.extends: expected a training config file name, got {base!r}")
    path = Path(base).expanduser()
    if not path.is_absolute():
        path = config_file.parent / path
    if not path.is_file():
        raise ConfigError(f"train.extends: {path} does not exist (paths are relative to {config_file})")
    return cfg.merge(cfg.read_file(path), table)


def load(path: str | Path, overrides: Sequence[str] = ()) -> tuple[WorkflowConfig, dict[str, Any]]:
    """The workflow config of `path` with `--set` overrides, validated.

    Returns (config, facts) where facts["train_data_uri_given"] says whether the
    user set train.data.uri in the workflow file or on the command line (as
    opposed to inheriting it from a training config): with a [prepare] source
    that is a contradiction, while an inherited one is simply replaced by the
    prepare stage's output.
    """
    path = Path(path)
    data = cfg.read_file(path)
    overrides = list(overrides)
    parsed = [cfg.parse_override(text) for text in overrides]
    extends_override = [v for k, v in parsed if k == "train.extends"]
    rest = [f"{k}={v}" for k, v in parsed if k != "train.extends"]
    table = data.get("train", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: train: expected a table (the training config)")
    given = "uri" in (table.get("data") or {}) or any(k == "train.data.uri" for k, _ in parsed)
    if extends_override:
        table = {**table, "extends": str(Path(extends_override[-1]).expanduser().resolve())}
    try:
        merged = _train_base(table, path)
        # The workflow fills in data.uri from its prepare stage; a placeholder lets the rest validate first.
        if _has_prepare(data, parsed):
            merged.setdefault("data", {})
            if not given:
                merged["data"]["uri"] = "(output of the prepare stage)"
        data = {**data, "train": merged}
        config = cfg.apply_overrides(WorkflowConfig, rest, base=data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    space = config.tune.get("space")
    if isinstance(space, str):
        # A sweep file named in the workflow file is found next to it (as train.extends is); one given with
        # --set, from the current folder.
        base = Path.cwd() if any(k == "tune.space" for k, _ in parsed) else path.parent
        config.tune["space"] = str((base / Path(space).expanduser()).resolve())
    if config.prepare.source is not None and given:
        raise ConfigError(
            f"{path}: train.data.uri is set, and so is prepare.source: the prepare stage's output is the "
            "training data. Remove one of them (no prepare.source = train on train.data.uri as it is)"
        )
    if config.prepare.source is None and not config.train.data.uri:
        raise ConfigError(
            f"{path}: train.data.uri: no dataset to train on; set prepare.source (and prepare.path) "
            "or train.data.uri (a `cdm prepare` output)"
        )
    return config, {"train_data_uri_given": given}


def _has_prepare(data: dict[str, Any], parsed: list[tuple[str, str]]) -> bool:
    prepare = data.get("prepare") or {}
    source = prepare.get("source") if isinstance(prepare, dict) else None
    for key, value in parsed:
        if key == "prepare.source":
            source = None if value.strip().lower() in ("none", "null", "") else value
    return source is not None


def describe() -> list[tuple[str, str, Any, str]]:
    """Every setting of a workflow config (for `cdm run --list-settings`)."""
    rows = []
    for key, kind, default, doc in cfg.describe(WorkflowConfig):
        inner = key.removeprefix("train.")
        if key.startswith("train.") and any(
            inner == w or (w.endswith(".") and inner.startswith(w)) for w in TRAIN_WIRED
        ):
            doc = "set by the workflow (ignored here)"
        rows.append((key, kind, default, doc))
    return rows
