"""What a cdm command says on the console, and where everything else it prints goes.

Stages are libraries (Ray actors and notebooks import them), so they print
through `echo` and `warn` rather than through a CLI library: progress goes to
stdout or stderr as asked, warnings to stderr, in yellow on a terminal only.

`capture_library_output(path)` (the `cdm` entry point calls it for the commands
that start Ray or write to MLflow) keeps the console for cdm's own lines: file
descriptors 1 and 2 of the process (what C++ code such as Ray's core worker,
child processes, Python's `sys.stderr`, logging handlers, warnings and tqdm
write to) go to a log file, and `sys.stdout` plus `echo`/`warn` keep the
terminal. Ray's copies of its workers' output are written to the log as well
(pipelines.common.ray_session, once Ray is up), without colour codes.
`place_log(folder)` moves the log into a run's folder once the run knows it.
Nothing is captured in a process whose streams someone else already replaced
(pytest's capture, a notebook), or with `--verbose`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

_YELLOW, _RESET = "\x1b[33m", "\x1b[0m"
LOG_NAME = "cdm.log"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Capture:
    """The terminal's streams and the log file while library output is captured."""

    def __init__(self, log: Path, out: IO[str], err: IO[str]):
        self.log, self.out, self.err = log, out, err
        self.placed = False


_capture: _Capture | None = None


def _stream(err: bool) -> IO[str]:
    if _capture is not None:
        return _capture.err if err else _capture.out
    return sys.stderr if err else sys.stdout


def echo(message: str = "", *, err: bool = False) -> None:
    print(message, file=_stream(err), flush=True)


def warn(message: str) -> None:
    """A warning on stderr (yellow when stderr is a terminal)."""
    stream = _stream(True)
    text = f"{_YELLOW}{message}{_RESET}" if stream.isatty() else message
    print(text, file=stream, flush=True)


def terminal_err() -> IO[str]:
    """The stream cdm's own error lines go to: the terminal's stderr, also while output is captured."""
    return _stream(True)


def log_path() -> Path | None:
    """The log file library output goes to, or None when nothing is captured."""
    return _capture.log if _capture is not None else None


def capture_library_output(log: str | os.PathLike) -> bool:
    """Send file descriptors 1 and 2 (and so everything but cdm's own lines) to `log`; False if not done.

    Not done (and nothing changed) when `sys.stdout`/`sys.stderr` are not the process's own
    streams (pytest's capture, a notebook) or capture is already on.
    """
    global _capture
    if _capture is not None or sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return False
    log = Path(log).absolute()
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")
    err = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    _point_fds_at(log)
    # Ray colours its copies of worker lines and C++ log prefixes whatever the stream is; not in a file.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    _capture = _Capture(log, out, err)
    atexit.register(_drop_empty_log)
    sys.stdout = out  # print() and typer.echo in the CLI are cdm's own lines; sys.stderr (fd 2) is the log
    return True


def _drop_empty_log() -> None:
    if _capture is not None and not _capture.placed and _capture.log.exists() and _capture.log.stat().st_size == 0:
        _capture.log.unlink()


def _open_log(path: Path) -> int:
    """The log file for appending; readable by its owner only (a log may hold paths, hosts and settings), and
    never opened through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _point_fds_at(path: Path) -> None:
    fd = _open_log(path)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def log_folder() -> Path:
    """This user's private folder for the logs of commands that have no run folder (yet): `<tmp>/cdm-logs-<uid>`.

    A fixed name in a shared /tmp could be made first by another user, as a link to where they can read or
    write; so the folder must be a real one (not a link) of this user's, and is made mode 0700. If it is
    not, a new private folder (tempfile.mkdtemp) takes the logs, with a warning.
    """
    path = Path(tempfile.gettempdir()) / f"cdm-logs-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        problem = f"not a folder of yours ({err.strerror})"
    else:
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                problem = f"owned by user {st.st_uid}, not by you"
            else:
                if st.st_mode & 0o077:
                    os.fchmod(fd, 0o700)  # ours, made by an older cdm or by hand: private from now on
                return path
        finally:
            os.close(fd)
    fresh = Path(tempfile.mkdtemp(prefix=f"cdm-logs-{os.getuid()}-"))
    warn(f"warning: {path}: {problem}, so not used for logs; this command logs to {fresh}")
    return fresh


def place_log(folder: str | os.PathLike) -> Path | None:
    """Move the log into `folder` (a local run folder, created if missing) and keep writing it there.

    Only the first call moves it (a workflow places its log in its folder before its training stage
    would place it in the run's); a URI (`s3://…`) leaves it in the temporary folder. Returns the
    log's path, or None when nothing is captured.
    """
    if _capture is None or _capture.placed:
        return log_path()
    text = str(folder)
    if "://" in text and not text.startswith("file://"):
        return _capture.log
    target = Path(text.removeprefix("file://")).resolve() / LOG_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    sys.__stderr__.flush()
    sys.__stdout__.flush()
    os.close(_open_log(target))  # made private before anything is written into it
    with open(_capture.log, "rb") as old, open(target, "ab") as new:
        shutil.copyfileobj(old, new)
    _point_fds_at(target)
    _capture.log.unlink(missing_ok=True)
    _capture.log, _capture.placed = target, True
    return target


class Progress:
    """Progress of long work on the console: a bar on a terminal (rich), else a plain line every `every_s` seconds
    and one at the end, so a log shows it too. `with Progress("nll", 500, "samples") as p: … p.advance(n)`;
    `total` 0 when the count is not known ahead."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = 15.0):
        self.label, self.total, self.unit, self.every_s = label, max(int(total), 0), unit, every_s
        self.done = 0
        self._bar = None
        self._printed = -1  # `done` when the last plain line was printed

    def __enter__(self) -> Progress:
        self._start = self._last = time.monotonic()
        stream = _stream(False)
        if stream.isatty():
            columns = (TextColumn(f"  {self.label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self._bar = Bar(*columns, console=Console(file=stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total or None)
        return self

    def advance(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self._printed = self.done
            echo(self._line())

    def _line(self) -> str:
        elapsed = f"{time.monotonic() - self._start:.0f} s"
        if not self.total:  # a count not known ahead (a source read as it goes)
            return f"  {self.label}: {self.done} {self.unit}, {elapsed}"
        return f"  {self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), {elapsed}"

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc[0] is None and self._printed != self.done:  # not the line just printed again
            echo(self._line())
