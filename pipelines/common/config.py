"""Typed stage configs: nested dataclasses loaded from TOML/YAML, overridden by `--set a.b=value` or Ray Tune.

One source of truth per stage. A stage declares its config as nested dataclasses
whose type hints say what each value may be::

    @dataclass
    class ScheduleSection:
        name: Literal["linear", "cosine", "uniform", "ot"] = "linear"
        T: int = option(1000, ge=1, doc="intermediate noise levels (T+2 classes)")

and gets, from this module,

* `load(TrainConfig, "configs/cifar10.toml", ["optim.lr=1e-4"])`: read a file
  (TOML; YAML if the name ends in .yaml/.yml; `extends = "other.toml"` merges a
  base file first), apply dotted overrides, build and validate;
* `apply_overrides(config, {"optim.lr": 3e-4})`: the same from Ray Tune's
  `param_space` (flat dotted keys or nested dicts; typed values or strings);
* `to_dict(config)`: nested plain dicts, for MLflow params and checkpoints;
* errors that name the field, the bad value and what is allowed, e.g.
  `schedule.name: 'quadratic' is not one of linear, cosine, uniform, ot`.

Supported field types: bool, int, float, str, `Literal[...]`, `Optional[X]`,
`list[X]`, `dict[str, Any]` (free-form, e.g. schedule parameters) and nested
dataclasses. A dataclass may define `check(self)` for rules that involve several
fields; it raises `FieldError(field, message)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from pipelines.common.errors import UserError

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


class ConfigError(UserError):
    """A config value the user must fix; the message names the field and what is allowed."""


class FieldError(Exception):
    """Raised by a section's `check()`: `field` is relative to the section (or a dotted path from the top)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str = "",
    ge=None,
    gt=None,
    le=None,
    lt=None,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field with a help text and numeric bounds checked on load."""
    metadata = {"doc": doc, "bounds": (ge, gt, le, lt)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- type handling


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + (" or none" if len(inner) < len(args) else "")
    if origin in (list, tuple, Sequence):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], type_name(args[0])) if args else 'values'}"
    if origin in (dict, Mapping) or tp is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _parse_text(text: str) -> Any:
    """A command-line value in TOML syntax (1e-4, true, [1, 2], "s"), else the text itself."""
    stripped = text.strip()
    if stripped.lower() in _NONE:
        return None
    try:
        return tomllib.loads(f"v = {stripped}")["v"]
    except Exception:
        pass
    if stripped.lower() in _TRUE | _FALSE:
        return stripped.lower() in _TRUE
    return text


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type hint `tp` (parsing strings from the command line); return the typed value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{where}: {value!r} is not {type_name(tp)}")

    if tp is Any:
        return _parse_text(value) if isinstance(value, str) else value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args):
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else bad
    if value is None:
        raise ConfigError(f"{where}: must be set ({type_name(tp)}), got none")
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and not isinstance(choice, str) and _parse_text(value) == choice:
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(str(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: expected a table of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}"
            )
        return from_dict(tp, value, where)
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): (_coerce(v, args[1], f"{where}.{k}") if len(args) == 2 else v) for k, v in value.items()}
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            parsed = _parse_text(value)
            # "1,2,2" as well as "[1, 2, 2]"
            value = parsed if isinstance(parsed, list) else [_parse_text(p) for p in value.split(",") if p.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, str):
            value = _parse_text(value)
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)  # e.g. 5e3 from a config or a Tune sampler
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):
            value = _parse_text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {value!r} is not a finite number")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"{where}: unsupported config type {tp!r}")


def _check_bounds(value: Any, bounds: tuple, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le, lt = bounds
    for limit, ok, text in (
        (ge, lambda v, b: v >= b, ">="),
        (gt, lambda v, b: v > b, ">"),
        (le, lambda v, b: v <= b, "<="),
        (lt, lambda v, b: v < b, "<"),
    ):
        if limit is not None and not ok(value, limit):
            raise ConfigError(f"{where}: {value!r} must be {text} {limit}")


# --------------------------------------------------------------------------- dicts <-> dataclasses


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from nested plain data, checking every value; unknown keys are errors."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # YAML's `? :`, `1: x`, …
        raise ConfigError(
            f"{prefix}{odd[0]!r}: a setting's name must be text; {where or 'the top level'} has {', '.join(fields)}"
        )
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = unknown[0]
        raise ConfigError(
            f"{prefix}{name}: unknown setting{_suggest(name, list(fields))}; "
            f"{where or 'the top level'} has {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):  # name the missing setting inside the section
                    values[name] = from_dict(hints[name], {}, f"{prefix}{name}")
                    continue
                raise ConfigError(f"{prefix}{name}: required ({type_name(hints[name])}), not set")
            continue
        value = _coerce(data[name], hints[name], f"{prefix}{name}")
        _check_bounds(value, f.metadata.get("bounds", (None,) * 4), f"{prefix}{name}")
        values[name] = value
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except FieldError as err:
            raise ConfigError(f"{prefix}{err.field}: {err.message}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Nested plain dicts/lists/scalars (JSON- and MLflow-friendly) of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, str]:
    """'optim.lr=1e-4' -> ('optim.lr', '1e-4')."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-4")
    return key, value


def _set_path(data: dict[str, Any], cls: type, key: str, value: Any) -> None:
    """Set a dotted key in nested dict `data`, walking the dataclass `cls` to report unknown keys early."""
    parts = key.split(".")
    node, node_type = data, cls
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if node_type is not None and dataclasses.is_dataclass(node_type):
            names = [f.name for f in dataclasses.fields(node_type)]
            if part not in names:
                parent = ".".join(parts[:i]) or "the top level"
                raise ConfigError(f"{here}: unknown setting{_suggest(part, names)}; {parent} has {', '.join(names)}")
            node_type = _hints(node_type)[part]
            inner = [a for a in typing.get_args(node_type) if a is not type(None)]
            if typing.get_origin(node_type) in (Union, types.UnionType) and len(inner) == 1:
                node_type = inner[0]
        else:
            node_type = None  # inside a free-form table: any key goes
        if last:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` merged into `base`, table by table (a copy; neither input changes)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(
    config: T | type[T], overrides: Mapping[str, Any] | Sequence[str], *, base: Mapping[str, Any] | None = None
) -> T:
    """A new, validated config with dotted overrides applied.

    `config` is an instance (its values are the base) or a class (`base` dict, or its defaults).
    `overrides` is a list of 'key=value' strings (the CLI) or a mapping of dotted keys
    (or nested dicts) to values (Ray Tune's `param_space`); strings are parsed by the
    field's type, so "1e-4", 1e-4 and 0.0001 are the same float.
    """
    cls = config if isinstance(config, type) else type(config)
    data = dict(base or {}) if isinstance(config, type) else to_dict(config)
    data = merge({}, data)  # deep copy of the dict levels we will modify
    if isinstance(overrides, Mapping):
        items = list(flatten(overrides).items())
    else:
        items = [parse_override(text) for text in overrides]
    for key, value in items:
        _set_path(data, cls, key, value)
    return from_dict(cls, data)


# --------------------------------------------------------------------------- files


def read_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML or YAML file as a dict; `extends = "base.toml"` (relative to the file) is merged underneath."""
    path = Path(path)
    if path.is_dir():
        examples = sorted(p.name for p in path.glob("*.toml"))[:3]
        raise ConfigError(
            f"{path}: is a folder; give a config file" + (f" in it ({', '.join(examples)}, …)" if examples else "")
        )
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    if path.resolve() in _chain:
        loop = " → ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(
            f"{path}: `extends` goes round in a loop ({loop}); one of these files must not extend another"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a text file in UTF-8 (byte {err.start}); save it as UTF-8 TOML or YAML"
        ) from None
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: expected a file name, got {parent!r}")
        data = merge(read_file(path.parent / parent, (*_chain, path.resolve())), data)
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()) -> T:
    """Config `cls` from a file (or its defaults) plus overrides, validated."""
    data = read_file(path) if path is not None else {}
    try:
        return apply_overrides(cls, overrides, base=data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every setting: for `--help`-style listings and docs."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        )
        rows.append((f"{prefix}{f.name}", type_name(tp), default, f.metadata.get("doc", "")))
    return rows


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def sections(cls: type) -> dict[str, type]:
    """The nested sections of a config dataclass: field name -> section class."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def flat_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
    """A stage config's settings by their own names: name -> (its section or None, the field, its type).

    A stage config is its own settings plus shared sections (`tracking`, …); each
    setting's name is unique across them, so a command's flags, a workflow's table
    and a TOML file of a stage can all name settings without their section.
    """
    out: dict[str, tuple[str | None, dataclasses.Field, Any]] = {}
    nested = sections(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        inner = (
            [(f.name, g, _hints(nested[f.name])[g.name]) for g in dataclasses.fields(nested[f.name])]
            if f.name in nested
            else [(None, f, hints[f.name])]
        )
        for section, g, tp in inner:
            if g.name in out or g.name in nested:
                raise TypeError(f"{cls.__name__}: setting {g.name!r} is named twice; flat names must be unique")
            out[g.name] = (section, g, tp)
    return out


def field_doc(cls: type, name: str) -> str:
    """The help text of a setting, by its dotted key (`optim.lr`) or a stage's flat name (`tracking_uri`)."""
    return _field(cls, name).metadata.get("doc", "")


def field_default(cls: type, name: str) -> Any:
    """The default of a setting, named as for `field_doc`."""
    return _field_default(_field(cls, name))


def _field(cls: type, name: str) -> dataclasses.Field:
    if "." in name:
        head, rest = name.split(".", 1)
        return _field(_hints(cls)[head], rest)
    flat = flat_fields(cls)
    if name not in flat:
        raise KeyError(f"{cls.__name__} has no setting {name!r}")
    return flat[name][1]


def nest(cls: type[T], /, **values: Any) -> T:
    """Build stage config `cls` from its settings named flat (see `flat_fields`), or whole sections by name.

    `nest(NllConfig, checkpoint=…, dequantize=True, workers=2, tracking=TrackingSection(…))`.
    Values are taken as they are (the caller typed them: a CLI parser, a workflow's
    validated table, Python code); settings not named keep their defaults.
    """
    flat = flat_fields(cls)
    nested = sections(cls)
    unknown = sorted(k for k in values if k not in flat and k not in nested)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown setting{_suggest(unknown[0], list(flat))}; {cls.__name__} has {', '.join(flat)}"
        )
    top: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {name: {} for name in nested}
    for key, value in values.items():
        if key in nested:
            continue
        section = flat[key][0]
        if section is None:
            top[key] = value
        else:
            grouped[section][key] = value
    for name, section_cls in nested.items():
        if name in values:
            if grouped[name]:
                raise TypeError(f"{cls.__name__}: {name} given whole and as {', '.join(grouped[name])}")
            top[name] = values[name]
        else:
            top[name] = section_cls(**grouped[name])
    return cls(**top)


def flat_values(config: Any) -> dict[str, Any]:
    """The settings of a stage config by their flat names (the inverse of `nest`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update({g.name: getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            out[f.name] = value
    return out


# --------------------------------------------------------------------------- sections shared by stages


@dataclasses.dataclass
class ScalingSection:
    """How many Ray workers and what each gets (train, tune trials, batch stages)."""

    num_workers: int = option(
        1,
        ge=0,
        doc="Ray Train workers (data-parallel replicas); 0 = Ray Train's local mode: the loop runs in the cdm "
        "process itself (no worker actors; `pdb` works), with no restarts (run.max_failures=0) and no sweeps",
    )
    use_gpu: bool = option(False, doc="one GPU per worker (NCCL); CPU workers use gloo")
    cpus_per_worker: int = option(1, ge=1, doc="CPUs reserved per worker; also torch's thread count in the worker")
    gpus_per_worker: float = option(1.0, gt=0, doc="GPUs per worker when use_gpu (fractions share a GPU)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", doc="Ray placement of the workers over nodes"
    )


EXPERIMENT = "cdm"


@dataclasses.dataclass
class TrackingSection:
    """Where a stage's MLflow run goes: every stage config has one (`tracking`)."""

    experiment: str = option(EXPERIMENT, doc="MLflow experiment name")
    tracking_uri: Optional[str] = option(
        None, doc="MLflow URI; default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db"
    )
    workdir: str = option(".", doc="folder of the default MLflow store")
    parent_run_id: Optional[str] = option(None, doc="nest the run under this MLflow run (workflows, tune)")
