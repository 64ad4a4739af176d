"""Is the Ray cluster or the MLflow server there? Asked in seconds, before a command starts work or opens a run.

Left to themselves, `ray.init` waits minutes for a cluster that is not there (over 120 s for
RAY_ADDRESS=127.0.0.1:1, without a word) and MLflow's client retries an unreachable server for
about 250 s. cdm asks first, with a short timeout, and answers with one line naming the address and
the fix. CDM_CONNECT_TIMEOUT_S sets the wait (default 10 s; the tests use less).

Standard library only: this runs before torch, Ray or MLflow have any say.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from pipelines.common.errors import UserError

CONNECT_TIMEOUT_S = 10.0


def connect_timeout() -> float:
    value = os.environ.get("CDM_CONNECT_TIMEOUT_S", "")
    try:
        return float(value) if value else CONNECT_TIMEOUT_S
    except ValueError:
        raise UserError(f"CDM_CONNECT_TIMEOUT_S={value!r}: not a number of seconds") from None


def ray_endpoint(address: str | None) -> tuple[str, int] | None:
    """The (host, port) that `ray.init(address)` connects to first; None where there is nothing to ask
    (a local Ray, `auto`, which reads the address `ray start` left on this machine)."""
    if not address or address in ("auto", "local"):
        return None
    if address.startswith("ray://"):
        rest, default_port = address[len("ray://") :], 10001  # Ray Client's server
    elif "://" in address:
        return None
    else:
        rest, default_port = address, 6379  # the GCS
    try:
        parts = urlsplit(f"//{rest}")
        host, port = parts.hostname, parts.port or default_port
    except ValueError:  # a port that is not a number: ray.init's own error says so at once
        return None
    return (host, port) if host else None


def _reason(err: OSError, timeout: float) -> str:
    if isinstance(err, (TimeoutError, socket.timeout)):
        return f"no answer in {timeout:g} s"
    return err.strerror or str(err) or type(err).__name__


def check_cluster(address: str | None, setting: str) -> None:
    """Refuse a Ray address (`address`, else $RAY_ADDRESS) where nothing answers: one line, in seconds.

    `setting` names where `address` came from (e.g. run.ray_address), for the message.
    """
    named = address or os.environ.get("RAY_ADDRESS") or None
    endpoint = ray_endpoint(named)
    if endpoint is None:
        return
    # An option fed by RAY_ADDRESS (typer's envvar=) holds the variable's value: name the variable the user set.
    where = setting if address and address != os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"
    timeout = connect_timeout()
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as err:
        raise UserError(
            f"{where}={named}: no Ray cluster answers there ({_reason(err, timeout)}); check the address and "
            f"that the cluster is up (`ray status --address {named}`), or unset {where} to run on a local Ray"
        ) from None


def check_tracking_server(uri: str) -> None:
    """Refuse an http(s) MLflow tracking URI whose server does not answer its /health page in time."""
    timeout = connect_timeout()
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # a server answers (behind a proxy /health may be another page): MLflow's own calls go on
    except (urllib.error.URLError, OSError, ValueError) as err:
        cause = err.reason if isinstance(err, urllib.error.URLError) else err
        reason = _reason(cause, timeout) if isinstance(cause, OSError) else str(cause)
        raise UserError(
            f"tracking URI {uri}: no MLflow server answers there ({reason}); start it (`mlflow server …`) or "
            "check tracking.tracking_uri / --tracking-uri / MLFLOW_TRACKING_URI (unset, cdm tracks to "
            "mlflow.db in the working folder)"
        ) from None
