"""Talking to a Ray cluster's Jobs API: where it is, how we authenticate, what went wrong.

`cdm submit` and `cdm jobs` share this. Everything a user can fix (a cluster
that is not running, a missing or wrong token, a job id that does not exist)
becomes a `UserError` naming the fix, never a traceback.

Token authentication (Ray ≥ 2.52): a head started with `RAY_AUTH_MODE=token`,
or by `ray start --head` when a token already exists (Ray 2.60), rejects Jobs
API requests without `Authorization: Bearer <token>`. Ray's own client only
sends the token when `RAY_AUTH_MODE=token` is set in the client's environment;
we look the token up the way Ray does (RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH,
then ~/.ray/auth_token) and send it whenever one exists unless
`RAY_AUTH_MODE=disabled`, as `ray start` and `ray.init()` do for local
clusters. The token never appears in output, logs or reprs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from pipelines.common.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Exit codes of the commands that follow a job: it failed or was stopped; the user stopped following.
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130
_TOKEN_DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"
_REQUEST_TIMEOUT_S = 30
# How long following a job's logs rides out a lost Jobs API (a restarted dashboard), and the pauses between tries.
RECONNECT_S = 120.0
_FIRST_PAUSE_S, _LAST_PAUSE_S = 0.5, 10.0


class ApiUnreachable(UserError):
    """The Jobs API did not answer (refused, reset, timed out): it may be back in a moment."""


class NoSuchJob(UserError):
    """The Jobs API does not know the job (a restarting dashboard may say so for a moment too)."""


@dataclass(frozen=True)
class ClusterToken:
    """The cluster's auth token and where it came from (the value is never shown)."""

    value: str = field(repr=False)
    source: str


def resolve_address(address: str | None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local default; as an http(s) URL.

    A bare `host:port` would make Ray's client treat it as a GCS address and
    wait half a minute to fail, so it becomes `http://host:port`.
    """
    chosen = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    chosen = chosen.strip().rstrip("/")
    if chosen in ("auto", "local"):
        return DEFAULT_ADDRESS
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    scheme = urlparse(chosen).scheme
    if scheme not in ("http", "https"):
        raise UserError(
            f"address {chosen!r} is not a Jobs API address: give the head's dashboard URL, "
            f"e.g. --address http://HEAD:8265 (not ray:// or the GCS port 6379)"
        )
    return chosen


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> ClusterToken | None:
    """The token Ray would use, in Ray's precedence order; None when there is none or auth is disabled."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return ClusterToken(env["RAY_AUTH_TOKEN"].strip(), "the RAY_AUTH_TOKEN variable")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        # Like Ray: a path that was set but cannot be read is a misconfiguration, not "no token".
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise UserError(
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err.strerror}); fix the path or unset it"
            ) from None
        if not value:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path} is empty; put the cluster's token there or unset it")
        return ClusterToken(value, f"the file {path} (RAY_AUTH_TOKEN_PATH)")
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return ClusterToken(value, f"the file {default}") if value else None


def _missing_token_message(address: str) -> str:
    return (
        f"the Ray cluster at {address} uses token authentication and no token was found. "
        "Get it on the head node with `ray get-auth-token` and either save it to ~/.ray/auth_token "
        f"or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH=<file>). See {_TOKEN_DOCS}"
    )


def _wrong_token_message(address: str, token: ClusterToken | None) -> str:
    where = token.source if token else "your environment"
    return (
        f"the Ray cluster at {address} rejected the token from {where}. "
        "Use the token of that cluster: `ray get-auth-token` on its head node prints it; "
        "save it to ~/.ray/auth_token or set RAY_AUTH_TOKEN."
    )


def _unreachable_message(address: str, detail: str = "") -> str:
    extra = f" ({detail})" if detail else ""
    return (
        f"cannot reach the Ray Jobs API at {address}{extra}. Is the cluster running? "
        "Start a local one with `cluster/local_cluster.sh start` (or `ray start --head --dashboard-host 127.0.0.1`), "
        "or point at yours with --address http://HEAD:8265 or RAY_ADDRESS (the dashboard port, 8265 by default)."
    )


def _auth_headers(token: ClusterToken | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def check_reachable(address: str, token: ClusterToken | None) -> str:
    """One request to /api/version with a timeout; returns the cluster's Ray version or raises UserError."""
    try:
        response = requests.get(f"{address}/api/version", headers=_auth_headers(token), timeout=_REQUEST_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise UserError(_unreachable_message(address, f"no answer within {_REQUEST_TIMEOUT_S} s")) from None
    except requests.exceptions.RequestException as err:
        raise UserError(_unreachable_message(address, type(err).__name__)) from None
    if response.status_code == 401:
        raise UserError(_missing_token_message(address))
    if response.status_code == 403:
        raise UserError(_wrong_token_message(address, token))
    try:
        version = response.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{address} answered (HTTP {response.status_code}) but is not a Ray dashboard; "
            "give the head's dashboard address (port 8265 by default)"
        ) from None
    return str(version)


@contextlib.contextmanager
def translated_errors(address: str, token: ClusterToken | None, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs SDK's exceptions into UserErrors for the cases a user can act on."""
    try:
        yield
    except AuthenticationError as err:
        text = str(err)
        if text.startswith("Authentication required"):
            raise UserError(_missing_token_message(address)) from None
        raise UserError(_wrong_token_message(address, token)) from None
    except (
        ConnectionError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        aiohttp.ClientConnectorError,
    ) as err:
        raise ApiUnreachable(_unreachable_message(address, type(err).__name__)) from None
    except aiohttp.WSServerHandshakeError as err:
        if err.status == 404 and job_id:
            raise NoSuchJob(_no_such_job(address, job_id)) from None
        if err.status in (401, 403):
            raise UserError(
                _missing_token_message(address) if err.status == 401 else _wrong_token_message(address, token)
            ) from None
        raise
    except RuntimeError as err:
        if "status code 404" in str(err) and job_id:
            raise NoSuchJob(_no_such_job(address, job_id)) from None
        raise


def _no_such_job(address: str, job_id: str) -> str:
    return f"no job {job_id!r} on the cluster at {address}; `cdm jobs list` shows the jobs there"


@dataclass
class Cluster:
    """A connected Jobs API client plus what we need to explain its errors."""

    address: str
    token: ClusterToken | None
    client: Any  # ray.job_submission.JobSubmissionClient
    ray_version: str

    def errors(self, job_id: str | None = None) -> contextlib.AbstractContextManager[None]:
        return translated_errors(self.address, self.token, job_id)


def connect(address: str | None = None) -> Cluster:
    """Resolve the address, find the token, check the cluster answers, build the client."""
    url = resolve_address(address)
    token = find_token()
    ray_version = check_reachable(url, token)
    # "WebSocket closed for job …" at INFO on every finished log stream is noise for our users.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    with translated_errors(url, token):
        client = JobSubmissionClient(url, headers=_auth_headers(token))
    return Cluster(address=url, token=token, client=client, ray_version=ray_version)


def stream_logs(
    cluster: Cluster,
    job_id: str,
    write: Callable[[str], None],
    reconnect_s: float = RECONNECT_S,
) -> None:
    """Write the job's logs as they come until it ends.

    The log websocket drops when the dashboard restarts (or a proxy closes an idle one). Then this tries
    again, pausing 0.5 s, 1 s, 2 s … up to 10 s between tries, for up to `reconnect_s` seconds from the drop;
    the server replays the log from its start on each connection, so what was written is skipped. Past
    that it raises a UserError saying the job keeps running. Errors a retry cannot fix (a token, a job
    unknown from the start) are raised at once.
    """
    written = 0
    lost_since: float | None = None
    pause = _FIRST_PAUSE_S

    def write_new(text: str, start: int) -> None:
        """`text` is the log from offset `start`; write the part not written yet."""
        nonlocal written
        skip = max(0, written - start)
        if skip < len(text):
            write(text[skip:])
            written = start + len(text)

    while True:
        try:
            if lost_since is not None:  # after a drop: is the API back, and does the job still run?
                status = job_status(cluster, job_id)
                lost_since = None  # the pause keeps growing until the stream gives a line again
                if status.is_terminal():  # it ended while we were away: the rest of its log, at once
                    with cluster.errors(job_id):
                        write_new(cluster.client.get_job_logs(job_id), 0)
                    return
            seen = 0

            async def follow() -> None:
                nonlocal seen, pause
                async for chunk in cluster.client.tail_job_logs(job_id):
                    write_new(chunk, seen)
                    seen += len(chunk)
                    pause = _FIRST_PAUSE_S

            with cluster.errors(job_id):
                asyncio.run(follow())
            if job_status(cluster, job_id).is_terminal():
                return
            cause = "the log stream closed while the job runs"
        except NoSuchJob:
            if lost_since is None:
                raise
            cause = "the restarted Jobs API does not know the job yet"
        except (
            ApiUnreachable,
            RuntimeError,
            aiohttp.ClientError,
            requests.exceptions.RequestException,
            OSError,
        ) as err:
            cause = str(err).split(". Is the cluster running?")[0] if isinstance(err, UserError) else repr(err)
        now = time.monotonic()
        if lost_since is None:
            lost_since = now
        elif now - lost_since >= reconnect_s:
            raise UserError(
                f"lost the Ray Jobs API at {cluster.address} for {reconnect_s:g} s ({cause}); job {job_id} "
                f"keeps running: follow it again with `cdm jobs logs --follow {job_id}` (--reconnect-s sets "
                "how long to wait)"
            )
        time.sleep(min(pause, max(0.0, lost_since + reconnect_s - now)))
        pause = min(2 * pause, _LAST_PAUSE_S)


def job_status(cluster: Cluster, job_id: str) -> JobStatus:
    with cluster.errors(job_id):
        return JobStatus(cluster.client.get_job_status(job_id))


def wait_until_done(cluster: Cluster, job_id: str, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status (SUCCEEDED, FAILED, STOPPED); return its name."""
    while True:
        status = job_status(cluster, job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def job_info(cluster: Cluster, job_id: str) -> Any:
    with cluster.errors(job_id):
        return cluster.client.get_job_info(job_id)


def outcome_line(info: Any) -> str:
    """'job X SUCCEEDED' or 'job X FAILED: <first line of Ray's message>'."""
    status = str(info.status.value)
    text = f"job {info.submission_id} {status}"
    if status != "SUCCEEDED" and info.message:
        # Ray appends the log tail, which the user has just seen streamed.
        text += ": " + info.message.strip().splitlines()[0].split(", last available logs")[0]
    return text
