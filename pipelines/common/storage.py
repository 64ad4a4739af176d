"""Paths and URIs, the one place: where a stage's files are, whether they exist, JSON in and out, SHA-256.

Every stage reads and writes through a `Location`: a root on some filesystem
(pyarrow.fs, so Ray Data reads the same URIs; fsspec for schemes pyarrow lacks).
A local path and `s3://`, `gs://`, `hdfs://`, `file://`, `memory://` URIs work
alike. Local paths are made absolute (`~` expanded, symlinks resolved) before
they are recorded anywhere, because Ray Tune runs trials in other working
directories and a cluster's nodes do not share ours.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs

from pipelines.common.errors import UserError

# A disk that is full, a quota reached, a file larger than the limit (RLIMIT_FSIZE): a user's fix, not a bug.
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NoSpace(UserError):
    """A write failed for want of space (FULL); `where` is the file, `reason` the system's word for it."""

    def __init__(self, where: str, code: int):
        self.where, self.reason = where, os.strerror(code)
        super().__init__(
            f"{where}: {self.reason}; free space there (or raise the quota or file-size limit), or write elsewhere"
        )


def is_uri(text: str) -> bool:
    """Whether `text` is a URI (`s3://…`, `file://…`) rather than a local path."""
    return "://" in text


def absolute(uri: str | os.PathLike) -> str:
    """A URI as given; a local path made absolute (expanded, symlinks resolved)."""
    text = _checked(uri)
    if is_uri(text):
        return text
    try:
        return str(Path(text).expanduser().resolve())
    except (RuntimeError, OSError) as err:  # Python 3.11 says RuntimeError for a loop, later ones OSError(ELOOP)
        raise UserError(
            f"{text}: cannot follow this path ({err}); a symbolic link on it that leads round in a loop must "
            "point at a real folder instead, or give another path"
        ) from None


def _checked(uri: str | os.PathLike) -> str:
    """The path or URI as text, refused if it holds bytes that are not UTF-8.

    Python keeps such bytes of a command line as lone surrogates, which pyarrow, MLflow and JSON cannot encode,
    so they would fail later with an encoding error that does not name the path.
    """
    text = os.fspath(uri)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise UserError(
            f"{shown}: the path holds bytes that are not UTF-8; cdm records paths as UTF-8 text, so rename it "
            "(or choose another path) in UTF-8"
        ) from None
    return text


def _store_error(uri: str, err: OSError) -> UserError:
    """One clear line for an object store that refused us (no bucket, bad credentials, unreachable endpoint).

    The secret never appears: pyarrow's messages do not hold it, and it is masked should one ever do.
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        text = text.replace(secret, "***")
    low = text.lower()
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    where = f" at {endpoint}" if endpoint else ""
    if "bucket" in low and ("not found" in low or "does not exist" in low or "nosuchbucket" in low):
        fix = f"create bucket {bucket!r}{where} first, or fix the name"
    elif any(
        k in low
        for k in (
            "access denied",
            "access_denied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "forbidden",
            "credentials",
        )
    ):
        fix = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
    elif any(k in low for k in ("connect", "timed out", "timeout", "network", "resolve")):
        fix = f"check that the object store{where} is running and reachable (AWS_ENDPOINT_URL names a local one)"
    else:
        fix = "check the URI, AWS_ENDPOINT_URL and the credentials"
    return UserError(f"{uri}: the object store refused access ({text}); {fix}")


def join(uri: str, *names: str) -> str:
    """`uri/name/…` for paths and URIs alike."""
    return "/".join([uri.rstrip("/"), *names])


@dataclass
class Location:
    """A folder on some filesystem (pyarrow.fs API) and the files in it, by name."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    root: str

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if self.root else name

    def where(self, name: str) -> str:
        """The URI of `name`, for messages and records."""
        return f"{self.uri.rstrip('/')}/{name}"

    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def info(self, name: str | None = None) -> Any:
        try:
            return self.fs.get_file_info(self.path(name) if name else self.root)
        except OSError as err:
            if self.is_local():
                raise
            raise _store_error(self.uri, err) from None

    def kind(self, name: str | None = None) -> str:
        """ "dir", "file" or "missing": of the root, or of `name` inside it."""
        kind = self.info(name).type
        return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(kind, "missing")

    def root_kind(self) -> str:
        return self.kind()

    def exists(self, name: str) -> bool:
        """Whether `name` is a file in this folder."""
        return self.kind(name) == "file"

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def open(self, name: str) -> Any:
        """A sequential stream (tar files, hashing)."""
        return self.fs.open_input_stream(self.path(name))

    def open_seekable(self, name: str) -> Any:
        """A random-access file (torch.load of a zip checkpoint needs one)."""
        return self.fs.open_input_file(self.path(name))

    def download(self, name: str, local: str | os.PathLike) -> None:
        """Copy `name` to the local file `local` in 64 MiB reads (as Ray Train does): few requests, whatever the size.

        Reading a large object through `open_seekable` instead costs one ranged request per read, which on some
        S3-compatible servers (moto) is slow for every one of them.
        """
        pafs.copy_files(
            self.path(name),
            os.fspath(local),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
            chunk_size=64 * 1024 * 1024,
        )

    def list_names(self) -> list[str]:
        if self.kind() != "dir":
            return []
        selector = pafs.FileSelector(self.root, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def list_folders(self) -> list[str]:
        if self.kind() != "dir":
            return []
        selector = pafs.FileSelector(self.root, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def makedirs(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `name` so that readers never see a half-written file (temp name, then rename)."""
        tmp = f".{name}.tmp-{os.getpid()}"
        try:
            with self.fs.open_output_stream(self.path(tmp)) as f:
                f.write(data)
            self.fs.move(self.path(tmp), self.path(name))
        except BaseException as err:
            with contextlib.suppress(OSError):
                self.fs.delete_file(self.path(tmp))
            if isinstance(err, OSError) and err.errno in FULL:
                raise NoSpace(self.where(name), err.errno) from None
            raise

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.open(name) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def read_json(self, name: str) -> Any | None:
        """The parsed JSON file `name`, or None if there is no such file."""
        if not self.exists(name):
            return None
        return json.loads(self.read_bytes(name).decode())

    def write_json(self, name: str, data: Any) -> None:
        """`name` as indented JSON (values JSON cannot hold become strings), atomically; the folder is created."""
        self.makedirs()
        self.write_bytes(name, (json.dumps(data, indent=2, default=str) + "\n").encode())


def resolve(uri: str | os.PathLike) -> Location:
    """The folder at a path or URI (pyarrow's filesystems, else fsspec's)."""
    text = _checked(uri)
    if not is_uri(text):
        local = absolute(text)
        return Location(uri=local, fs=pafs.LocalFileSystem(), root=local)
    try:
        fs, root = pafs.FileSystem.from_uri(text)
    except Exception:
        try:
            ffs, root = fsspec.core.url_to_fs(text)
        except Exception as err:
            raise UserError(
                f"{text}: unsupported URI ({err}); use a local path or s3://, gs://, hdfs://, file://"
            ) from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
    return Location(uri=text, fs=fs, root=root.rstrip("/") or "/")


def parent_and_name(uri: str) -> tuple[Location, str]:
    """(the folder holding `uri`, the file's name)."""
    parent, _, name = absolute(uri).rstrip("/").rpartition("/")
    return resolve(parent or "/"), name


def exists(uri: str) -> bool:
    """Whether anything (a file or a folder) is at `uri`."""
    return resolve(uri).kind() != "missing"


def read_json(uri: str) -> Any | None:
    """The JSON file at `uri`, or None if there is none."""
    folder, name = parent_and_name(uri)
    return folder.read_json(name)


def write_json(uri: str, data: Any) -> None:
    """The JSON file at `uri`, written atomically (its folder is created)."""
    folder, name = parent_and_name(uri)
    folder.write_json(name, data)


def check_writable(uri: str, what: str = "--out") -> None:
    """A UserError, before any work, if nothing can be written at `uri` (read-only, immutable, a file in the way).

    Local paths are probed in their nearest existing folder, so that nothing is created by the check.
    """
    loc = resolve(uri)
    try:
        if loc.is_local():
            folder = Path(loc.root)
            while not folder.exists():
                folder = folder.parent
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is a file")
            probe = folder / f".cdm-write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            loc.makedirs()
            probe = f".cdm-write-probe-{os.getpid()}"
            loc.write_bytes(probe, b"")
            loc.delete(probe)
    except UserError:
        raise
    except OSError as err:
        if not loc.is_local():
            raise _store_error(uri, err) from None
        reason = err.strerror or str(err)
        raise UserError(f"{uri}: cannot write there ({reason}); choose another {what}, or make it writable") from None


def user_cache(name: str) -> Path:
    """Folder `name` of this user's cdm cache: $CDM_CACHE_DIR, else ~/.cache/cdm (not created here)."""
    base = os.environ.get("CDM_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "cdm") / name


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file (a local path or a URI), read in 1 MiB chunks."""
    if is_uri(os.fspath(path)):
        folder, name = parent_and_name(os.fspath(path))
        return folder.sha256(name)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
