"""Quieter Ray Data logs on the console of a Ray that cdm starts itself.

Ray Data prints several INFO lines per epoch ("Starting execution of Dataset …") from its
SplitCoordinator actor, where the driver's `logging` settings do not reach; each Ray Data
process reads its logging config from the YAML file named by RAY_DATA_LOGGING_CONFIG. A
local Ray's workers inherit the driver's environment, so setting the variable before
`ray.init` covers them. A user's own RAY_DATA_LOGGING_CONFIG wins; on a cluster the
job's runtime_env decides.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG = Path(__file__).with_name("ray_data_logging.yaml")


def quiet_ray_data_console() -> None:
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(CONFIG))
