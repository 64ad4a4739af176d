"""The environment variables cdm reads: one list, for `cdm --help`, the README's table and its test.

A variable that feeds an option is declared on that option too (`envvar=`), so the option's `--help` names
it; the option given on the command line wins over the variable.
"""

from __future__ import annotations

import os

# (name, what it does). tests/test_cli_surface.py checks this list against the README's table and against
# the variables the code reads.
VARIABLES: tuple[tuple[str, str], ...] = (
    ("CDM_DEBUG", "1: full tracebacks for errors, as --debug (0 or unset: off)"),
    ("CDM_VERBOSE", "1: Ray's, MLflow's and the libraries' output live, as --verbose"),
    ("MLFLOW_TRACKING_URI", "the MLflow store, as --tracking-uri (default: sqlite:///./mlflow.db)"),
    ("RAY_ADDRESS", "the Ray cluster to join (default: a local Ray); for cdm submit/jobs, its Jobs API"),
    ("RAY_API_SERVER_ADDRESS", "the Jobs API for cdm submit/jobs, before RAY_ADDRESS, as --address"),
    ("RAY_AUTH_TOKEN", "the cluster's token for cdm submit/jobs (then RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"),
    ("RAY_AUTH_TOKEN_PATH", "a file holding the cluster's token"),
    ("RAY_AUTH_MODE", "disabled: cdm submit/jobs send no token"),
    ("CDM_WEIGHTS_DIR", "the folder of the Inception weights file (default: ~/.cache/cdm/weights)"),
    ("CDM_INCEPTION_SHA256", "the SHA-256 the Inception weights file must have, as --inception-sha256"),
    ("CDM_CACHE_DIR", "cdm's cache folder: FID reference statistics, verify records (default: ~/.cache/cdm)"),
    ("CDM_SYSTEM_METRICS", "0: training runs log no system metrics (CPU, memory, GPU)"),
    ("CDM_TUNE_VERBOSE", "Ray Tune's own progress output in cdm tune's log, 0–3 (default: 1)"),
    ("CDM_CONNECT_TIMEOUT_S", "seconds to wait for a Ray cluster or an MLflow server to answer (default: 10)"),
    (
        "AWS_ENDPOINT_URL",
        "an S3-compatible store's endpoint for s3:// URIs (or AWS_ENDPOINT_URL_S3); credentials: "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    ),
)

# Read only by the test suite's fault injection (tests/test_train_recovery.py, test_batch_faults.py).
TEST_ONLY: tuple[str, ...] = (
    "CDM_FAIL_AT_STEP",
    "CDM_NAN_AT_STEP",
    "CDM_FAIL_RANK",
    "CDM_FAIL_MARKER",
    "CDM_KILL_WORKER_AFTER",
)


def is_on(name: str) -> bool:
    """A yes/no variable: set to anything but "", 0, false, no or off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def help_epilog() -> str:
    width = max(len(name) for name, _ in VARIABLES)
    lines = [f"{name.ljust(width)}  {what}" for name, what in VARIABLES]
    return "Environment variables:\n\n" + "\n".join(lines)
