"""A prepared dataset on disk: WebDataset shards, a Parquet manifest and `dataset.json`.

Layout under the dataset URI (a local path, `file://`, or any pyarrow/fsspec
filesystem such as `s3://`, `gs://`, `memory://`)::

    train-000000.tar  train-000001.tar  …  test-000000.tar  …
    manifest.parquet   one row per sample: key, split, shard, index, label,
                       height, width, channels, source_id
    dataset.json       source, options, counts, sample shape, per-channel
                       mean/std, SHA-256 of every shard; written last, so its
                       presence means the dataset is complete

Each sample in a shard is `<key>.png` (images, uint8, mode L or RGB) or
`<key>.npy` (float32 data as given: (D,) vectors, e.g. toy 2-D data, or (C, H, W)
arrays, from `cdm prepare arrays`; kind "vector" either way) plus `<key>.cls` (the integer
label, absent for unlabeled data). Keys are `<split>-<index:08d>`, `index` being
the sample's position in its split; shards hold consecutive indices.

Shards are written with `webdataset.TarWriter` with a fixed mtime/owner/mode and
samples in a fixed order, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.common.errors import UserError
from pipelines.common.storage import Location, resolve, user_cache

FORMAT = "cdm-webdataset/1"
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
SHARD_MTIME = 0  # fixed, so shards do not depend on when they were written
_TAR_USER = "cdm"
IMAGE_ENCODING = "png"
VECTOR_ENCODING = "npy"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def index_from_key(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


# --------------------------------------------------------------------------- encoding


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} → PNG bytes (deterministic: no timestamps)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a dataset looks like (from dataset.json `sample`)."""

    kind: str  # "image" (8-bit, PNG) | "vector" (float32, npy)
    shape: tuple[int, ...]  # (H, W, C) for images; (D,) for vectors, (C, H, W) for arrays
    labeled: bool
    num_classes: int | None = None

    @property
    def encoding(self) -> str:
        return IMAGE_ENCODING if self.kind == "image" else VECTOR_ENCODING

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "encoding": self.encoding, "labeled": self.labeled}
        if self.kind == "image":
            out.update(height=self.shape[0], width=self.shape[1], channels=self.shape[2])
        else:
            out.update(shape=list(self.shape), dtype="float32")
        return out

    @classmethod
    def from_json(cls, meta: dict[str, Any], num_classes: int | None) -> SampleSpec:
        if meta["kind"] == "image":
            shape: tuple[int, ...] = (int(meta["height"]), int(meta["width"]), int(meta["channels"]))
        else:
            shape = tuple(int(d) for d in meta["shape"])
        return cls(kind=meta["kind"], shape=shape, labeled=bool(meta["labeled"]), num_classes=num_classes)


def decode_png(data: bytes, spec: SampleSpec, where: str) -> np.ndarray:
    """PNG bytes → uint8 (H, W, C), checked against the dataset's declared shape and mode."""
    h, w, c = spec.shape
    want_mode = "L" if c == 1 else "RGB"
    try:
        pil = Image.open(io.BytesIO(data))
        # Size and mode from the header, checked before decoding: a small PNG can decode to gigabytes.
        if pil.mode != want_mode or pil.size != (w, h):
            raise UserError(
                f"{where}: image is {pil.size[0]}x{pil.size[1]} mode {pil.mode}, dataset.json declares {w}x{h} "
                f"mode {want_mode}; the shard does not belong to this dataset, re-run `cdm prepare`"
            )
        pil.load()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{where}: PNG does not decode ({err}); the shard is corrupt, re-run `cdm prepare`") from None
    arr = np.asarray(pil, dtype=np.uint8)
    return arr[:, :, None] if c == 1 else arr


def decode_npy(data: bytes, spec: SampleSpec, where: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise UserError(f"{where}: .npy does not decode ({err}); the shard is corrupt, re-run `cdm prepare`") from None
    if arr.shape != spec.shape or arr.dtype != np.float32:
        raise UserError(
            f"{where}: array is {arr.dtype}{list(arr.shape)}, dataset.json declares float32{list(spec.shape)}"
        )
    return arr


def decode_sample(members: dict[str, bytes], spec: SampleSpec, where: str) -> tuple[np.ndarray, int]:
    """One sample's tar members → (data, label); label is -1 for unlabeled datasets."""
    enc = spec.encoding
    if enc not in members:
        raise UserError(
            f"{where}: sample has no .{enc} member (has: {sorted(members) or 'nothing'}); the shard is damaged"
        )
    data = decode_png(members[enc], spec, where) if enc == IMAGE_ENCODING else decode_npy(members[enc], spec, where)
    label = -1
    if spec.labeled:
        if "cls" not in members:
            raise UserError(f"{where}: labeled dataset but the sample has no .cls member; the shard is damaged")
        try:
            label = int(members["cls"].decode("ascii"))
        except ValueError:
            raise UserError(f"{where}: .cls is {members['cls'][:20]!r}, not an integer label") from None
        if spec.num_classes is not None and not 0 <= label < spec.num_classes:
            raise UserError(f"{where}: label {label} outside 0..{spec.num_classes - 1}")
    return data, label


# --------------------------------------------------------------------------- writing


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str
    first_index: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_index": self.first_index,
        }


@dataclass
class _Stats:
    """Running per-channel sum / sum of squares / min / max in float64 (values scaled to [0, 1] for images)."""

    n: int = 0
    s: np.ndarray | None = None
    ss: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:  # values: (..., C)
        flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
        if self.s is None:
            self.s = np.zeros(flat.shape[1])
            self.ss = np.zeros(flat.shape[1])
            self.lo = np.full(flat.shape[1], np.inf)
            self.hi = np.full(flat.shape[1], -np.inf)
        self.n += flat.shape[0]
        self.s += flat.sum(0)
        self.ss += (flat * flat).sum(0)
        self.lo = np.minimum(self.lo, flat.min(0))
        self.hi = np.maximum(self.hi, flat.max(0))

    def extremes(self) -> tuple[list[float], list[float]]:
        if not self.n:
            return [], []
        return [float(v) for v in self.lo], [float(v) for v in self.hi]

    def result(self) -> tuple[list[float], list[float]]:
        if not self.n:
            return [], []
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.ss / self.n - mean * mean, 0.0))
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


@dataclass
class SplitWriter:
    """Writes one split as `{split}-{i:06d}.tar` shards of `samples_per_shard` samples each."""

    loc: Location
    split: str
    spec: SampleSpec
    samples_per_shard: int
    shards: list[ShardInfo] = field(default_factory=list)
    # The manifest as one Arrow table per shard: compact columns, not a Python dict per sample.
    manifest: list[pa.Table] = field(default_factory=list)
    _rows: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in _PER_SAMPLE})
    count: int = 0
    _stats: _Stats = field(default_factory=_Stats)
    _buf: io.BytesIO | None = None
    _writer: Any = None
    _in_shard: int = 0

    def add(self, data: np.ndarray, label: int | None, source_id: str) -> None:
        if self._writer is None:
            # Deferred: webdataset takes about a second to import, and only writers need it (readers and
            # Ray Data's read tasks parse the tar files themselves).
            import webdataset as wds  # noqa: PLC0415

            self._buf = io.BytesIO()
            self._writer = wds.TarWriter(
                self._buf, encoder=False, mtime=SHARD_MTIME, user=_TAR_USER, group=_TAR_USER, mode=0o444
            )
            self._in_shard = 0
        if tuple(data.shape) != self.spec.shape:
            raise ValueError(f"{source_id}: shape {data.shape} != {self.spec.shape}")
        key = sample_key(self.split, self.count)
        sample: dict[str, Any] = {"__key__": key}
        if self.spec.kind == "image":
            sample[IMAGE_ENCODING] = encode_png(data)
            self._stats.add(data.astype(np.float64) / 255.0)
        else:
            sample[VECTOR_ENCODING] = encode_npy(data)
            # per channel: each dimension of a (D,) vector, axis 0 of a (C, H, W) array
            self._stats.add(data[None, :] if data.ndim == 1 else data.reshape(data.shape[0], -1).T)
        if self.spec.labeled:
            if label is None or label < 0:
                raise ValueError(f"{source_id}: labeled dataset but no label")
            sample["cls"] = str(int(label)).encode("ascii")
        self._writer.write(sample)
        for name, value in zip(_PER_SAMPLE, (key, self.count, int(label) if self.spec.labeled else -1, source_id)):
            self._rows[name].append(value)
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        data = self._buf.getvalue()
        name = shard_name(self.split, len(self.shards))
        self.loc.write_bytes(name, data)
        self._add_manifest(name)
        self.shards.append(
            ShardInfo(name, self._in_shard, len(data), hashlib.sha256(data).hexdigest(), self.count - self._in_shard)
        )
        self._writer = None
        self._buf = None

    def _add_manifest(self, shard: str) -> None:
        n = len(self._rows["key"])
        if self.spec.kind == "image":
            h, w, c = self.spec.shape
        elif len(self.spec.shape) == 3:
            c, h, w = self.spec.shape
        else:
            h, w, c = None, None, None
        columns = {
            **self._rows,
            "split": [self.split] * n,
            "shard": [shard] * n,
            "height": [h] * n,
            "width": [w] * n,
            "channels": [c] * n,
        }
        self.manifest.append(pa.table({name: columns[name] for name in MANIFEST_SCHEMA.names}, schema=MANIFEST_SCHEMA))
        self._rows = {name: [] for name in _PER_SAMPLE}

    def abort(self) -> None:
        """Drop the shard being built (after an error), closing its tar stream cleanly."""
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._buf = None

    def close(self) -> dict[str, Any]:
        self._finish_shard()
        mean, std = self._stats.result()
        out: dict[str, Any] = {"count": self.count, "mean": mean, "std": std}
        if self.spec.kind == "vector":
            out["min"], out["max"] = self._stats.extremes()
        return {**out, "shards": [s.to_json() for s in self.shards]}


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int64()),
        ("label", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("source_id", pa.string()),
    ]
)
_PER_SAMPLE = ("key", "index", "label", "source_id")  # the other columns are one value per shard


def write_manifest(loc: Location, tables: list[pa.Table]) -> dict[str, Any]:
    """manifest.parquet from the writers' per-shard tables (`SplitWriter.manifest`), in their order."""
    # One chunk, so that the file's bytes do not depend on how many samples a shard holds.
    table = (pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()).combine_chunks()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    loc.write_bytes(MANIFEST, data)
    return {"name": MANIFEST, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()}


def dataset_meta(
    *,
    source: str,
    options: dict[str, Any],
    inputs: dict[str, Any],
    fingerprint: str,
    spec: SampleSpec,
    class_names: list[str] | None,
    samples_per_shard: int,
    splits: dict[str, Any],
    manifest: dict[str, Any],
    skipped: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of `dataset.json`, the same for a prepared dataset and a sample stage's output."""
    return {
        "format": FORMAT,
        "source": source,
        "options": options,
        "inputs": inputs,
        "fingerprint": fingerprint,
        "sample": spec.to_json(),
        "num_classes": spec.num_classes,
        "class_names": class_names,
        "samples_per_shard": samples_per_shard,
        "counts": {s: m["count"] for s, m in splits.items()},
        "stats_units": "pixel values / 255 (images); values as given (vectors and arrays, per channel)",
        "splits": splits,
        "manifest": manifest,
        "skipped": skipped,
        **(extra or {}),
    }


def write_dataset_json(loc: Location, meta: dict[str, Any]) -> None:
    """Written last: its presence means the dataset is complete."""
    loc.write_bytes(DATASET_JSON, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode())


# --------------------------------------------------------------------------- reading


@dataclass
class Dataset:
    """A prepared dataset: its location and parsed, validated `dataset.json`."""

    loc: Location
    meta: dict[str, Any]
    json_sha256: str = ""  # of dataset.json's bytes: what a verification record is valid for

    @property
    def spec(self) -> SampleSpec:
        return SampleSpec.from_json(self.meta["sample"], self.meta.get("num_classes"))

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def split(self, split: str) -> dict[str, Any]:
        if split not in self.meta["splits"]:
            raise UserError(f"{self.loc.where(DATASET_JSON)}: no split {split!r}; it has {self.splits}")
        return self.meta["splits"][split]

    def count(self, split: str) -> int:
        return int(self.split(split)["count"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.split(split)["shards"])


_REQUIRED = ("format", "source", "sample", "splits")


def open_dataset(uri: str | os.PathLike | Dataset) -> Dataset:
    """Parse `dataset.json`; a clear UserError if the URI is not a prepared dataset.

    A Dataset already opened is returned as it is: a stage opens its datasets once and passes them down.
    """
    if isinstance(uri, Dataset):
        return uri
    loc = resolve(uri)
    kind = loc.root_kind()
    if kind == "missing":
        raise UserError(f"{loc.uri}: no such directory; run `cdm prepare SOURCE --out {loc.uri}` first")
    if kind == "file":
        raise UserError(f"{loc.uri}: is a file; pass the dataset directory (the one holding {DATASET_JSON})")
    if not loc.exists(DATASET_JSON):
        raise UserError(
            f"{loc.uri}: not a prepared dataset (no {DATASET_JSON}; an interrupted `cdm prepare` leaves none); "
            f"run `cdm prepare SOURCE --out {loc.uri}`"
        )
    where = loc.where(DATASET_JSON)
    raw = loc.read_bytes(DATASET_JSON)
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: not valid JSON ({err}); re-run `cdm prepare … --force` to rewrite it") from None
    missing = [k for k in _REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}; re-run `cdm prepare … --force` to rewrite it")
    if meta["format"] != FORMAT:
        raise UserError(f"{where}: format {meta['format']!r}, this cdm reads {FORMAT!r}; re-run `cdm prepare`")
    _check_shard_names(meta, where)
    return Dataset(loc=loc, meta=meta, json_sha256=hashlib.sha256(raw).hexdigest())


def _check_shard_names(meta: dict[str, Any], where: str) -> None:
    """Every shard listed must be a plain file name inside the dataset's folder.

    The one containment check: every reader builds a shard's path from its name here (`loc.path(name)`,
    locally and in object stores alike), so a name such as `../x.tar` or `/etc/passwd` in a dataset.json
    someone else wrote would make verify, nll or train read a file outside the dataset.
    """
    splits = meta["splits"]
    if not isinstance(splits, dict):
        raise UserError(f"{where}: 'splits' is not a table; re-run `cdm prepare … --force` to rewrite it")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise UserError(f"{where}: split {split!r} has no list of shards; re-run `cdm prepare … --force`")
        for shard in shards:
            name = shard.get("name")
            if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
                raise UserError(
                    f"{where}: shard name {name!r} of split {split!r} is not a file name inside the dataset's "
                    "folder (a shard is NAME.tar beside dataset.json, without '/' or '..'); the file was altered, "
                    "re-run `cdm prepare … --force`"
                )


# A file name in the dataset's folder: no separator, no leading dot (so neither `.` nor `..`), no control bytes.
_SHARD_NAME = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]*\.tar")


def check_shard_files(
    ds: Dataset, splits: list[str] | None = None, checksums: bool = True, *, deep: bool = False
) -> list[str]:
    """Problems with the shard files themselves (missing, wrong size, SHA-256 mismatch).

    A shard's SHA-256 is computed once per version of the file: a shard whose size, mtime (and, on local disk,
    inode and ctime, which no copy or edit keeps) are those recorded in `VERIFIED` after its last full check is
    trusted. `deep=True` (`cdm verify`) hashes every shard whatever the record says.
    """
    problems = []
    record = {} if deep or not checksums else _verified(ds)
    fresh: dict[str, list[int]] = {}
    for split in splits or ds.splits:
        for shard in ds.shards(split):
            name, where = shard["name"], ds.loc.where(shard["name"])
            info = ds.loc.info(name)
            if info.type.name != "File":
                problems.append(f"{where}: missing (dataset.json lists it); re-run `cdm prepare`")
                continue
            if info.size is not None and info.size != shard["bytes"]:
                problems.append(
                    f"{where}: {info.size} bytes, dataset.json says {shard['bytes']} (truncated or replaced); re-run `cdm prepare`"
                )
                continue
            if checksums:
                stamp = _stamp(ds.loc, name, info)
                if stamp is not None and record.get(name) == stamp:
                    continue
                digest = ds.loc.sha256(name)
                if digest != shard["sha256"]:
                    problems.append(
                        f"{where}: SHA-256 {digest[:12]}… does not match dataset.json ({shard['sha256'][:12]}…); "
                        "the file changed since `cdm prepare` wrote it; re-run `cdm prepare --force`"
                    )
                elif stamp is not None and _stamp(ds.loc, name) == stamp:  # unchanged while it was hashed
                    fresh[name] = stamp
    if fresh:
        _record_verified(ds, {**_verified(ds), **fresh})
    return problems


def _stamp(loc: Location, name: str, info: Any = None) -> list[int] | None:
    """How a shard file looks without reading it; None where nothing reliable can be had."""
    if loc.is_local():
        try:
            st = os.stat(loc.path(name))
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    info = info if info is not None else loc.info(name)
    if info.size is None or info.mtime_ns is None:  # an object store that reports neither: always hash
        return None
    return [info.size, info.mtime_ns]  # an object's last-modified changes with every upload of it


def verification_record(ds: Dataset) -> Path:
    """Where this machine records which shards of `ds` were last checked whole, and how each file looked then.

    In the user's cache, not in the dataset: reading a dataset never writes into it (read-only or shared
    folders and buckets stay as `cdm prepare` left them).
    """
    return user_cache("verified") / f"{hashlib.sha256(ds.loc.uri.encode()).hexdigest()[:32]}.json"


def _verified(ds: Dataset) -> dict[str, list[int]]:
    """The record of fully checked shards, if it belongs to this very dataset.json; else nothing."""
    try:
        record = json.loads(verification_record(ds).read_text())
    except (OSError, ValueError):  # no record, or one that cannot be read: hash
        return {}
    if not isinstance(record, dict) or record.get("dataset_json_sha256") != ds.json_sha256 or not ds.json_sha256:
        return {}
    shards = record.get("shards")
    return shards if isinstance(shards, dict) else {}


def _record_verified(ds: Dataset, shards: dict[str, list[int]]) -> None:
    path = verification_record(ds)
    record = {"uri": ds.loc.uri, "dataset_json_sha256": ds.json_sha256, "shards": shards}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # concurrent readers (a sweep's trials) never see half a record
    except OSError:  # no writable cache: the next reader hashes again
        pass


def require_valid_shards(ds: Dataset, splits: list[str] | None = None, checksums: bool = True) -> None:
    problems = check_shard_files(ds, splits, checksums)
    if problems:
        raise UserError(summarise(problems))


def summarise(problems: list[str], limit: int = 10) -> str:
    head = "\n  ".join(problems[:limit])
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problem(s):\n  {head}{more}"


def iter_tar_samples(loc: Location, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of one shard, with errors that name the file.

    Members must be contiguous per key (the WebDataset rule). A truncated or
    corrupt tar raises UserError instead of silently ending early.
    """
    where = loc.where(name)
    try:
        stream = loc.open(name)
    except FileNotFoundError:
        raise UserError(f"{where}: missing; re-run `cdm prepare`") from None
    size = loc.info(name).size
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    raise UserError(f"{where}: member {info.name!r} has no extension; not a WebDataset shard")
                k, suffix = base.split(".", 1)
                data = tar.extractfile(info).read()
                if k != key:
                    if key is not None:
                        yield key, members
                    if k in seen:
                        raise UserError(
                            f"{where}: members of sample {k!r} are not contiguous; not a valid WebDataset shard"
                        )
                    seen.add(k)
                    key, members = k, {}
                if suffix in members:
                    raise UserError(f"{where}: sample {k!r} has two .{suffix} members")
                members[suffix] = data
            # Python's tarfile silently stops at a cut-off header; a complete tar
            # ends with two zero blocks after the last member.
            if size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"ends at byte {size} without the end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(
            f"{where}: corrupt or truncated tar ({err}); re-run `cdm prepare --force` or restore the file"
        ) from None
    if key is not None:
        yield key, members


def iter_shard(
    ds: Dataset, split: str, shard: dict[str, Any], *, decode: bool = True
) -> Iterator[tuple[str, int, Any, int]]:
    """(key, index, data, label) for each sample of one shard, checked against dataset.json.

    The key sequence and the sample count must match what dataset.json
    records, so a short or reordered shard is an error, never a silent drop.
    """
    spec = ds.spec
    expected = int(shard["first_index"])
    got = 0
    for key, members in iter_tar_samples(ds.loc, shard["name"]):
        where = f"{ds.loc.where(shard['name'])}: sample {key}"
        want_key = sample_key(split, expected)
        if key != want_key:
            raise UserError(f"{where}: expected key {want_key} next (dataset.json order); the shard was altered")
        if decode:
            data, label = decode_sample(members, spec, where)
            yield key, expected, data, label
        else:
            yield key, expected, members, -1
        expected += 1
        got += 1
    if got != shard["count"]:
        raise UserError(
            f"{ds.loc.where(shard['name'])}: has {got} samples, dataset.json says {shard['count']} (truncated?); "
            "re-run `cdm prepare --force`"
        )


def iter_split(ds: Dataset, split: str, *, decode: bool = True) -> Iterator[tuple[str, int, Any, int]]:
    """(key, index, data, label) for every sample of a split, in index order; data is uint8 (H, W, C) or float32 (D,)."""
    for shard in ds.shards(split):
        yield from iter_shard(ds, split, shard, decode=decode)


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    uri: str
    counts: dict[str, int]
    shards: int
    bytes: int
    decoded: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(uri: str | os.PathLike, *, decode: bool = True) -> VerifyReport:
    """Check a prepared dataset end to end; collects every problem instead of stopping at the first.

    dataset.json parses and is consistent; every shard exists with the recorded
    size and SHA-256; the manifest matches; and (decode=True) every sample has its
    image/array and label, decodes, and has the declared shape, mode and key.
    """
    ds = open_dataset(uri)
    problems: list[str] = []
    counts = {s: ds.count(s) for s in ds.splits}
    shards = [sh for s in ds.splits for sh in ds.shards(s)]
    for split in ds.splits:
        first = 0
        for sh in ds.shards(split):
            if int(sh["first_index"]) != first:
                problems.append(
                    f"{ds.loc.where(DATASET_JSON)}: shard {sh['name']} starts at index {sh['first_index']}, expected {first}"
                )
            first += int(sh["count"])
        if first != counts[split]:
            problems.append(
                f"{ds.loc.where(DATASET_JSON)}: split {split} count {counts[split]} != sum of its shards {first}"
            )
    problems += check_shard_files(ds, deep=True)

    manifest = ds.meta.get("manifest") or {}
    if not ds.loc.exists(MANIFEST):
        problems.append(f"{ds.loc.where(MANIFEST)}: missing; re-run `cdm prepare`")
    else:
        if manifest.get("sha256") and ds.loc.sha256(MANIFEST) != manifest["sha256"]:
            problems.append(
                f"{ds.loc.where(MANIFEST)}: SHA-256 does not match dataset.json; re-run `cdm prepare --force`"
            )
        try:
            table = pq.read_table(io.BytesIO(ds.loc.read_bytes(MANIFEST)))
            if table.num_rows != sum(counts.values()):
                problems.append(
                    f"{ds.loc.where(MANIFEST)}: {table.num_rows} rows, dataset.json counts {sum(counts.values())}"
                )
        except Exception as err:
            problems.append(f"{ds.loc.where(MANIFEST)}: unreadable Parquet ({err})")

    decoded = 0
    bad_files = {p.split(": ", 1)[0] for p in problems}
    if decode:
        for split in ds.splits:
            for shard in ds.shards(split):
                if ds.loc.where(shard["name"]) in bad_files:
                    continue  # already reported; decoding would only repeat it
                try:
                    for _ in iter_shard(ds, split, shard):
                        decoded += 1
                except UserError as err:
                    problems.append(str(err))
    return VerifyReport(
        uri=ds.loc.uri,
        counts=counts,
        shards=len(shards),
        bytes=sum(int(sh["bytes"]) for sh in shards),
        decoded=decoded,
        problems=problems,
    )
