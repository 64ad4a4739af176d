"""The cdm checkpoint format: one ``torch.save`` file holding everything to resume or evaluate.

A checkpoint is a dict::

    {"format": "cdm-checkpoint", "version": 1,
     "model_spec": {...},            # networks.model_spec: rebuilds the architecture
     "model": state_dict, "ema": EMA.state_dict() or None,
     "optimizer": state_dict or None, "scheduler": state_dict or None,
     "step": int, "config": {...},   # the run's config, plain JSON types
     "extra": {...}}                 # e.g. RNG states (tensors) for exact resumption

Everything in it is a tensor or a plain Python value so that it loads with
``torch.load(weights_only=True)``, which executes no pickled code. ``save_checkpoint``
checks this when writing, so a bad value fails at save time rather than at resume time.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .ema import EMA
from .networks import LEGACY_FIELDS, build_model, model_spec, unwrap_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointMismatchError",
    "save_checkpoint",
    "load_checkpoint",
    "restore",
    "model_from_checkpoint",
    "spec_differences",
]

CHECKPOINT_FORMAT = "cdm-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("model_spec", "model", "ema", "optimizer", "scheduler", "step", "config", "extra")
_JSON_SCALARS = (str, int, float, bool, type(None))


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the objects it is being restored into."""


def _check_storable(value: Any, where: str, allow_tensors: bool = True) -> None:
    """Raise TypeError if ``value`` would not load under torch.load(weights_only=True)."""
    if isinstance(value, _JSON_SCALARS) or (allow_tensors and isinstance(value, torch.Tensor)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            # JSON objects have string keys; torch.load also reads int keys (optimizer state).
            if not isinstance(k, _JSON_SCALARS if allow_tensors else str):
                raise TypeError(f"checkpoint field {where} has a key {k!r} of type {type(k).__name__}")
            _check_storable(v, f"{where}[{k!r}]", allow_tensors)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_storable(v, f"{where}[{i}]", allow_tensors)
        return
    kind = "plain JSON types" if not allow_tensors else "tensors and plain Python types"
    raise TypeError(
        f"checkpoint field {where} has type {type(value).__module__}.{type(value).__qualname__}; "
        f"only {kind} are allowed so that the file loads with torch.load(weights_only=True)"
    )


def save_checkpoint(
    path: str | os.PathLike | IO[bytes],
    *,
    model: nn.Module,
    step: int,
    config: dict[str, Any],
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint to ``path`` (atomically) or to a binary file object.

    ``model`` may be wrapped in DistributedDataParallel or torch.compile; the
    state dict is taken from the underlying network so keys have no ``module.`` prefix.
    """
    net = unwrap_model(model)
    _check_storable(config, "config", allow_tensors=False)
    _check_storable(extra or {}, "extra")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_spec": model_spec(net),
        "model": net.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "config": config,
        "extra": dict(extra or {}),
    }
    for key in ("optimizer", "scheduler"):
        _check_storable(checkpoint[key], key)

    if not isinstance(path, (str, os.PathLike)):
        torch.save(checkpoint, path)
        return
    # Temp file in the same folder + os.replace: a crash mid-write never leaves
    # a truncated file under the real name (os.replace is atomic on one filesystem).
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open() (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_path, "xb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike | IO[bytes], map_location: Any = "cpu", *, name: str | None = None
) -> dict[str, Any]:
    """Read and validate a checkpoint written by ``save_checkpoint`` (never runs pickled code).

    `name` is what messages call a file given as a stream (default: the stream's own name).
    """
    if isinstance(path, (str, os.PathLike)):
        name = name or str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"no checkpoint file at {name} (expected a cdm checkpoint written by save_checkpoint)"
            )
    else:
        name = name or str(getattr(path, "name", "the checkpoint stream"))
    expected = f"expected a {CHECKPOINT_FORMAT!r} file written by cdm_core.checkpoint.save_checkpoint"
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # arbitrary bytes make the unpickler fail in arbitrary ways (KeyError, EOFError, ...)
        raise ValueError(f"{name} {_not_torch(_head(path)) or _unreadable(err)}; {expected}") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{name} is not a cdm checkpoint (found format {found!r}); {expected}")
    version = checkpoint.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{name} is a cdm checkpoint of version {version!r}; this code reads version {CHECKPOINT_VERSION}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"{name} is an incomplete cdm checkpoint: missing {missing}")
    return checkpoint


def _head(path: str | os.PathLike | IO[bytes], size: int = 64) -> bytes | None:
    """The first bytes of a file or of a seekable stream (left where it was); None if they cannot be read."""
    try:
        if isinstance(path, (str, os.PathLike)):
            with open(path, "rb") as f:
                return f.read(size)
        at = path.tell()
        path.seek(0)
        head = path.read(size)
        path.seek(at)
        return head
    except (OSError, AttributeError, ValueError):
        return None


def _not_torch(head: bytes | None) -> str | None:
    """What a file is, if it is neither of torch.save's formats (a zip archive, or a pickle for the legacy one).

    torch.load reads anything else as a legacy pickle, and so calls a JSON or text file one holding
    "Python objects": true of no such file, and no help to whoever gave the wrong path.
    """
    if head is None or head.startswith((b"PK\x03\x04", b"\x80")) or not head:
        return None
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        what = "JSON text"
    elif head.startswith(b"PAR1"):
        what = "a Parquet file"
    elif head.startswith(b"\x93NUMPY"):
        what = "a numpy .npy file"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what = "text"
    else:
        what = f"bytes {head[:8]!r}…, in neither of torch's formats"
    return f"is not a checkpoint but {what}: give the checkpoint.pt that `cdm train` wrote, or its folder"


def _unreadable(err: Exception) -> str:
    """Why torch.load refused a file, in words for whoever gave us the file."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    if "weights_only" in text.lower() or "WeightsUnpickler" in text:
        # torch's long how-to ends in "re-run with weights_only=False": the wrong advice for a file from elsewhere.
        named = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line), "")
        return (
            "holds Python objects besides tensors and plain values, which a cdm checkpoint never does: refused "
            f"without running them{f' ({named[:160]})' if named else ''}. Load only checkpoints you trust, and never "
            "with weights_only=False"
        )
    if isinstance(err, (EOFError, OSError)) or any(
        key in text for key in ("central directory", "zip archive", "unexpected EOF", "Ran out of input")
    ):
        return "is truncated or damaged (not a complete torch file): copy it again, or use another checkpoint"
    return f"is not a cdm checkpoint: torch.load(weights_only=True) failed ({type(err).__name__}: {lines[0][:200]})"


def _flatten_spec(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"config": {"base_channels": 64}} -> {"base_channels": 64}; nested names stay dotted below the first level."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_spec(value, "" if key == "config" and not prefix else f"{name}."))
        else:
            flat[name] = value
    return flat


def spec_differences(checkpoint_spec: dict[str, Any], model_spec_: dict[str, Any]) -> list[str]:
    """Human-readable differences between two model specs, e.g. 'checkpoint has base_channels=64, model has base_channels=32'.

    A U-Net spec written before a field existed has that field's legacy value (as ``build_model`` rebuilds it).
    """
    a, b = _flatten_spec(_with_legacy_fields(checkpoint_spec)), _flatten_spec(_with_legacy_fields(model_spec_))
    diffs = []
    for key in list(a) + [k for k in b if k not in a]:
        if key not in b:
            diffs.append(f"checkpoint has {key}={a[key]!r}, model has no {key}")
        elif key not in a:
            diffs.append(f"checkpoint has no {key}, model has {key}={b[key]!r}")
        elif _normalise(a[key]) != _normalise(b[key]):
            diffs.append(f"checkpoint has {key}={a[key]!r}, model has {key}={b[key]!r}")
    return diffs


def _with_legacy_fields(spec: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(spec.get("config"), dict):
        return spec
    return {**spec, "config": {**LEGACY_FIELDS, **spec["config"]}}


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _state_dict_differences(
    saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor], limit: int = 5
) -> list[str]:
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(current[k].shape)}"
        for k in current
        if k in saved and saved[k].shape != current[k].shape
    ]
    out = []
    for label, items in (
        ("missing from checkpoint", missing),
        ("unexpected in checkpoint", unexpected),
        ("shape mismatch", shapes),
    ):
        if items:
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            out.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return out


def _check_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    # load_state_dict's own error lists every key of a large model; this names the first few.
    diffs = _state_dict_differences(state, module.state_dict())
    if diffs:
        raise CheckpointMismatchError(f"{what} weights do not fit the model: " + "; ".join(diffs))


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    _check_weights(module, state, what)
    module.load_state_dict(state)


def restore(
    checkpoint: dict[str, Any],
    model: nn.Module,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> int:
    """Load a checkpoint's states into existing objects; returns the checkpoint's step.

    Refuses (CheckpointMismatchError) if the model's architecture differs from
    the checkpoint's, naming every difference, or if a requested state is absent.
    """
    net = unwrap_model(model)
    diffs = spec_differences(checkpoint["model_spec"], model_spec(net))
    if diffs:
        raise CheckpointMismatchError("checkpoint does not match the model: " + "; ".join(diffs))
    _load_weights(net, checkpoint["model"], "model")
    for obj, key in ((ema, "ema"), (optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if checkpoint[key] is None:
            raise CheckpointMismatchError(f"checkpoint has no {key} state, but a {key} was given to restore into")
        if key == "ema":
            _check_weights(ema.model, checkpoint["ema"]["model"], "EMA")
        obj.load_state_dict(checkpoint[key])
    return int(checkpoint["step"])


def model_from_checkpoint(checkpoint: dict[str, Any] | str | os.PathLike, use_ema: bool = True) -> nn.Module:
    """Rebuild the network from the checkpoint's spec and load its EMA (or raw) weights; eval mode."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    model = build_model(checkpoint["model_spec"])
    if use_ema:
        if checkpoint["ema"] is None:
            raise ValueError("checkpoint has no EMA weights; pass use_ema=False to use the raw model weights")
        _load_weights(model, checkpoint["ema"]["model"], "EMA")
    else:
        _load_weights(model, checkpoint["model"], "model")
    return model.eval()
