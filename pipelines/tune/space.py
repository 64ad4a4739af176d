"""The sweep file: what `cdm tune` searches (`[space]`) and how (`[tune]`).

    [space]                                   # any TrainConfig setting, by its dotted name
    "schedule.name" = { grid = ["linear", "cosine", "uniform", "ot"] }
    "loss.w_ce"     = { loguniform = [1e-4, 1e-1] }
    "optim.lr"      = { choice = [1e-4, 2e-4, 5e-4] }
    "train.steps"   = 2000                    # a plain value: the same for every trial

    [tune]                                    # every key optional; CLI flags override
    metric = "val/nll_bpd"                    # or "val/mse", or "weighted" (see `weights`)
    num_samples = 16
    scheduler = "asha"                        # or "fifo", or "pbt" (population based training)

Nested tables work too (`[space.loss] w_ce = { loguniform = [1e-4, 1e-1] }`).
Samplers: `choice` (random pick), `grid` (every value, crossed with the other
grids, the whole grid repeated num_samples times), `uniform` / `loguniform`
([low, high], floats) and `randint` ([low, high), integers, high exclusive as in
Ray and Python's range).

Everything is checked against TrainConfig before Ray starts: unknown settings
(with a suggestion), values of the wrong type or out of bounds (every `choice`
and `grid` value and both ends of every range are applied to the base config),
ranges on non-numeric settings, and settings the sweep itself owns.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ray import tune

from pipelines.common import config as cfg
from pipelines.common.config import ConfigError, FieldError, option
from pipelines.train.config import TrainConfig

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")

# Set by `cdm tune` for every trial (where its run goes, which MLflow run is its parent).
OWNED_BY_SWEEP = ("run.name", "run.storage_path", "run.ray_address", "tracking.")

# What PBT may change while a trial trains: settings under which the donor's checkpoint stays a valid
# starting point (the model, noise schedule, class prior and data must not change mid-training).
PBT_MUTABLE = ("optim.", "loss.w_ce", "loss.w_mse")

# Validation metrics a trial reports (pipelines.train.validation) that a weighted objective may combine.
VALIDATION_METRICS = ("val/nll_bpd", "val/mse", "val/ce")
WEIGHTED_METRIC = "val/weighted"


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) setting."""

    key: str  # dotted TrainConfig name, e.g. "loss.w_ce"
    sampler: Optional[str]  # one of SAMPLERS; None for a fixed value
    values: tuple[Any, ...]  # choice/grid values, [low, high] for ranges, (value,) when fixed

    def describe(self) -> str:
        if self.sampler is None:
            return repr(self.values[0])
        if self.sampler in ("choice", "grid"):
            return f"{self.sampler}({', '.join(repr(v) for v in self.values)})"
        return f"{self.sampler}({self.values[0]!r}, {self.values[1]!r})"

    def ray_domain(self) -> Any:
        if self.sampler is None:
            return self.values[0]
        if self.sampler == "grid":
            return tune.grid_search(list(self.values))
        make = {
            "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
        }
        return make[self.sampler](self.values)


@dataclass
class SweepSettings:
    """How to search: the `[tune]` table of the sweep file (CLI flags override it)."""

    name: Optional[str] = option(
        None, doc="sweep name = folder under the config's run.storage_path; default <config>-sweep-<time>"
    )
    metric: Literal["val/nll_bpd", "val/mse", "weighted"] = option(
        "val/nll_bpd", doc="what the sweep minimises; 'weighted' = sum of weights[k] * k"
    )
    weights: dict[str, float] = option(
        {"val/nll_bpd": 1.0, "val/mse": 1.0}, doc="metric weights when metric = 'weighted'"
    )
    num_samples: int = option(1, ge=1, doc="trials drawn from the space (a grid is repeated this many times)")
    scheduler: Literal["asha", "fifo", "pbt"] = option(
        "asha", doc="asha: stop weak trials early; fifo: run all to the end; pbt: population based training"
    )
    max_concurrent: int = option(
        0, ge=0, doc="trials at once, at most; 0 = as many as the cluster's CPUs/GPUs fit (never more: see README)"
    )
    grace_period: Optional[int] = option(
        None, ge=1, doc="ASHA: steps before a trial can be stopped; default the first checkpoint step"
    )
    reduction_factor: float = option(3.0, gt=1, doc="ASHA: keep the best 1/reduction_factor at every rung")
    perturbation_interval: Optional[int] = option(
        None, ge=1, doc="PBT: steps between exploit/explore (a multiple of checkpoint.every); default checkpoint.every"
    )
    quantile_fraction: float = option(
        0.25, gt=0, le=0.5, doc="PBT: trials in this bottom fraction continue from a trial in the top fraction"
    )
    resample_probability: float = option(
        0.25,
        ge=0,
        le=1,
        doc="PBT: chance that a mutated setting is drawn afresh instead of scaled by 0.8/1.2 (or moved to a neighbouring choice)",
    )
    seed: Optional[int] = option(None, doc="seed of the random search (same trials for the same space)")
    trial_retries: int = option(
        0, ge=0, doc="restart a failed trial this many times (0: a failure is recorded and the sweep goes on)"
    )

    def check(self) -> None:
        if self.metric == "weighted":
            unknown = [k for k in self.weights if k not in VALIDATION_METRICS]
            if unknown:
                raise FieldError(
                    "weights", f"{unknown[0]!r} is not a validation metric; use {', '.join(VALIDATION_METRICS)}"
                )
            if not self.weights or not any(w > 0 for w in self.weights.values()):
                raise FieldError("weights", "needs at least one positive weight")

    @property
    def tune_metric(self) -> str:
        """The key Tune optimises in each trial's reports."""
        return WEIGHTED_METRIC if self.metric == "weighted" else self.metric


@dataclass
class SweepFile:
    path: str
    dimensions: list[Dimension]
    settings: SweepSettings
    raw: dict[str, Any] = field(default_factory=dict)  # the file as read (kept with the sweep for --resume)

    @property
    def searched(self) -> list[Dimension]:
        return [d for d in self.dimensions if d.sampler is not None]

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param_space: nested dicts of Tune domains, the shape `apply_overrides` takes."""
        space: dict[str, Any] = {}
        for d in self.dimensions:
            node = space
            *parents, last = d.key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = d.ray_domain()
        return space

    def pbt_mutations(self) -> dict[str, Any]:
        """PBT's hyperparam_mutations, nested like param_space: the searched settings it may change mid-training.

        Ranges mutate by a factor of 0.8 or 1.2 (or are drawn afresh); choice and grid values move to a
        neighbouring value. The other searched settings are drawn once per trial and copied from the donor.
        """
        mutations: dict[str, Any] = {}
        for d in self.searched:
            if not pbt_mutable(d.key):
                continue
            node = mutations
            *parents, last = d.key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = list(d.values) if d.sampler in ("choice", "grid") else d.ray_domain()
        return mutations

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.dimensions if d.sampler == "grid")


def pbt_mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in PBT_MUTABLE)


# --------------------------------------------------------------------------- reading


def _is_sampler(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in SAMPLERS


def _is_table_setting(tp: Any) -> bool:
    """A section or a free-form table: a [space] table under it names settings, not a sampler."""
    return dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) in (dict, Mapping)


def _leaves(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """("loss.w_ce", {"loguniform": [...]}) pairs; nested tables follow TrainConfig's sections."""
    out = []
    for key, value in table.items():
        name = f"{prefix}{key}"
        if (
            isinstance(value, Mapping)
            and not _is_sampler(value)
            and _is_table_setting(_field_type(name, section_ok=True))
        ):
            nested = _leaves(value, f"{name}.")
            if not nested:
                raise ConfigError(f"space: {name}: empty table; give a sampler such as {{ choice = [...] }}")
            out += nested
        else:
            out.append((name, value))
    return out


def _field_type(key: str, *, section_ok: bool = False) -> Any:
    """The type hint of a dotted TrainConfig setting (raises ConfigError naming the key if unknown)."""
    node: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return Any  # inside a free-form table (schedule.params.*)
        hints = typing.get_type_hints(node)
        if part not in hints:
            try:  # the config system's own message: "unknown setting (did you mean …); <section> has …"
                cfg.apply_overrides(TrainConfig, {key: None})
            except ConfigError as err:
                raise ConfigError(f"space: {err}") from None
        node = hints[part]
        inner = [a for a in typing.get_args(node) if a is not type(None)]
        if typing.get_origin(node) in (typing.Union, types.UnionType) and len(inner) == 1:
            node = inner[0]  # Optional[X] -> X
    if dataclasses.is_dataclass(node) and not section_ok:
        raise ConfigError(
            f"space: {key}: is a section; search its settings, e.g. {key}.{dataclasses.fields(node)[0].name}"
        )
    return node


def _check_value(base: TrainConfig, key: str, value: Any, what: str) -> None:
    try:
        cfg.apply_overrides(base, {key: value})
    except ConfigError as err:
        raise ConfigError(f"space: {key}: {what} {value!r} does not fit the config: {err}") from None


def _dimension(base: TrainConfig, key: str, spec: Any) -> Dimension:
    if any(key == o or (o.endswith(".") and key.startswith(o)) for o in OWNED_BY_SWEEP):
        raise ConfigError(f"space: {key}: is set by cdm tune for every trial and cannot be searched")
    tp = _field_type(key)
    if not _is_sampler(spec):
        if isinstance(spec, Mapping) and not _is_table_setting(tp):
            raise ConfigError(
                f"space: {key}: {{ {', '.join(spec)} = … }} is not a sampler; use one of {', '.join(SAMPLERS)}"
            )
        _check_value(base, key, spec, "value")
        return Dimension(key, None, (spec,))
    sampler, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space: {key}: {sampler} needs a non-empty list, got {values!r}")
    if sampler in ("choice", "grid"):
        for v in values:
            _check_value(base, key, v, f"{sampler} value")
        return Dimension(key, sampler, tuple(values))

    # Ranges: numbers only, on numeric settings, both ends valid for the setting.
    numeric = tp in (int, float) or tp is Any
    if not numeric:
        raise ConfigError(
            f"space: {key}: {sampler} needs a numeric setting, but {key} is {cfg.type_name(tp)}; use choice or grid"
        )
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"space: {key}: {sampler} needs [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"space: {key}: {sampler} needs low < high, got [{low}, {high}]")
    if sampler == "randint":
        if tp is float:
            raise ConfigError(f"space: {key}: randint draws integers but {key} is a number; use uniform or loguniform")
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"space: {key}: randint needs integer bounds, got [{low}, {high}]")
        low, high = int(low), int(high)
        ends = (low, high - 1)  # high is exclusive
    else:
        if tp is int:
            raise ConfigError(
                f"space: {key}: {sampler} draws real numbers but {key} is an integer; use randint or choice"
            )
        if sampler == "loguniform" and low <= 0:
            raise ConfigError(f"space: {key}: loguniform needs 0 < low, got [{low}, {high}]")
        low, high = float(low), float(high)
        ends = (low, high)
    for end in ends:
        _check_value(base, key, end, f"{sampler} bound")
    return Dimension(key, sampler, (low, high))


def parse(data: Mapping[str, Any], base: TrainConfig, *, where: str = "sweep file") -> SweepFile:
    """Check a sweep file's contents against `base` (the trial config before the search is applied)."""
    unknown = [k for k in data if k not in ("space", "tune")]
    if unknown:
        raise ConfigError(f"{where}: unknown table {unknown[0]!r}; a sweep file has [space] and [tune]")
    space = data.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            f"{where}: needs a [space] table naming at least one setting to search, e.g. "
            '"loss.w_ce" = { loguniform = [1e-4, 1e-1] }'
        )
    try:
        dimensions = [_dimension(base, key, spec) for key, spec in _leaves(space)]
        if not any(d.sampler for d in dimensions):
            raise ConfigError(
                "space: every setting is fixed; search at least one with choice, grid, uniform, loguniform or randint"
            )
        settings = cfg.from_dict(SweepSettings, data.get("tune", {}), "tune")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if settings.scheduler == "pbt" and not any(pbt_mutable(d.key) for d in dimensions if d.sampler):
        raise ConfigError(
            f"{where}: tune.scheduler: pbt changes settings while trials train, and may change only "
            f"{', '.join(m + '*' if m.endswith('.') else m for m in PBT_MUTABLE)}; the [space] searches none "
            '(add e.g. "optim.lr" = { loguniform = [1e-4, 1e-2] }), or use asha or fifo'
        )
    if settings.metric in ("val/nll_bpd", "val/ce") and base.model.kind == "ddm":
        raise ConfigError(f"{where}: tune.metric: {settings.metric!r} does not exist for a DDM; use val/mse")
    return SweepFile(where, dimensions, settings, dict(data))


def load(path: str | Path, base: TrainConfig, overrides: Mapping[str, Any] | None = None) -> SweepFile:
    """Read and check a sweep file; `overrides` replace `[tune]` keys (the CLI flags)."""
    data = cfg.read_file(path)
    if overrides:
        data = dict(data)
        data["tune"] = {**data.get("tune", {}), **{k: v for k, v in overrides.items() if v is not None}}
    return parse(data, base, where=str(path))
