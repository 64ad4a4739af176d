"""Versions and devices, for `cdm info` and bug reports."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def collect_info() -> dict[str, str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return {
        "cdm": _version("cdm"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "mlflow": _version("mlflow"),
        "webdataset": _version("webdataset"),
        "cuda": str(torch.version.cuda) if torch.version.cuda else "none",
        "devices": ", ".join(devices),
        "cpu threads": str(torch.get_num_threads()),
    }
