"""Command-line options whose default and help text are a stage config's: one source for both."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from pipelines.common import config as cfg


def _default(cls: type, name: str) -> Any:
    default = cfg.field_default(cls, name)
    return ... if default is dataclasses.MISSING else default


def setting(cls: type, name: str, *flags: str, **kwargs: Any) -> Any:
    """`typer.Option` for setting `name` of stage config `cls` (its flat or dotted name)."""
    kwargs.setdefault("help", cfg.field_doc(cls, name))
    return typer.Option(_default(cls, name), *flags, **kwargs)


def argument(cls: type, name: str, **kwargs: Any) -> Any:
    """`typer.Argument` for setting `name` of stage config `cls`; required unless given a default."""
    kwargs.setdefault("help", cfg.field_doc(cls, name))
    return typer.Argument(kwargs.pop("default", ...), **kwargs)
