"""Fuzzing the readers of what users hand us: every generated input gives a result or a UserError, nothing else.

Hypothesis generates the inputs: `--set` overrides, TOML and YAML files, CIFAR-10 pickles,
image files and shards with damaged bytes. A bounded number of examples each in CI;
CDM_FUZZ_EXAMPLES=5000 runs longer by hand. Each test counts its examples and the kinds of
outcome it saw, and prints them (pytest -s shows them; tests/test_fuzz.py's module
docstring in the README gives the last counts).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from conftest import prepare_quick, write_cifar10
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.common import config as cfg
from pipelines.common.errors import UserError
from pipelines.data import shards as sh
from pipelines.data.config import SourceOptions
from pipelines.data.sources import build_source
from pipelines.train.config import TrainConfig

EXAMPLES = int(os.environ.get("CDM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SEEN: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

KEYS = [key for key, *_ in cfg.describe(TrainConfig)] + ["optim", "optim.lr.x", "", "a.b.c", "schedule.params.beta"]
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


def _outcome(name: str, call) -> None:
    """Run `call`; a UserError or a result is fine and counted; anything else fails the test."""
    try:
        call()
        SEEN[name]["result"] += 1
    except UserError as err:
        SEEN[name][type(err).__name__] += 1


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, counts in sorted(SEEN.items()):
        print(f"\nfuzz {name}: {sum(counts.values())} inputs, {dict(counts)}")


# --------------------------------------------------------------------------- configs


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.booleans(), TEXT), max_size=4))
def test_set_overrides(pairs):
    texts = [f"{key}={value}" if has_equals else f"{key}{value}" for key, has_equals, value in pairs]
    _outcome("--set overrides", lambda: cfg.apply_overrides(TrainConfig, ["data.uri=x", *texts]))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True),
    TEXT,
    st.lists(st.integers(-3, 3), max_size=3),
)
TABLES = st.recursive(
    SCALARS,
    lambda inner: st.dictionaries(st.sampled_from(KEYS[:40] + ["data", "optim", "x"]), inner, max_size=4),
    max_leaves=12,
)


def _toml(value, prefix="") -> str:
    import json

    lines, tables = [], []
    for key, item in value.items() if isinstance(value, dict) else []:
        if isinstance(item, dict):
            tables.append((key, item))
        elif item is not None:
            text = json.dumps(item) if not isinstance(item, bool) else str(item).lower()
            lines.append(f'"{key}" = {text}')
    for key, item in tables:
        lines.append(f'["{prefix}{key}"]')
        lines.append(_toml(item, f"{prefix}{key}."))
    return "\n".join(lines)


@FUZZ
@given(TABLES)
def test_config_files_built_from_generated_tables(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(_toml(table if isinstance(table, dict) else {"data": {"uri": table}}))
    _outcome("TOML configs", lambda: cfg.load(TrainConfig, path, ["data.uri=x"]))


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".toml", ".yaml"]))
def test_config_files_of_arbitrary_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"c{suffix}"
    path.write_bytes(data)
    _outcome(f"{suffix} files of bytes", lambda: cfg.load(TrainConfig, path, ["data.uri=x"]))


# --------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    folder, _ = write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=3, test=2)
    return folder


def _damage(data: bytes, where: int, byte: int, cut: int) -> bytes:
    damaged = bytearray(data)
    if damaged:
        damaged[where % len(damaged)] = byte
    return bytes(damaged[: max(0, len(damaged) - cut)])


def _read_all(source) -> None:
    for generate in source.splits.values():
        for _ in generate(_Strict()):
            pass


class _Strict:
    """BadInputs without --skip-bad: a bad sample is a UserError."""

    skip, count, items = False, 0, []

    def report(self, where, problem, fix=""):
        raise UserError(f"{where}: {problem}")


@FUZZ
@given(
    st.sampled_from(["data_batch_1", "test_batch", "batches.meta"]),
    st.integers(0, 10**6),
    st.integers(0, 255),
    st.integers(0, 50),
    st.booleans(),
)
def test_cifar10_pickles_with_damaged_bytes(tmp_path_factory, cifar, member, where, byte, cut, as_other_object):
    folder = tmp_path_factory.mktemp("c") / "cifar-10-batches-py"
    shutil.copytree(cifar, folder)
    target = folder / member
    if as_other_object:  # a valid pickle of the wrong thing
        target.write_bytes(pickle.dumps([where, byte] if cut % 2 else {b"data": where, b"labels": "x"}, protocol=2))
    else:
        target.write_bytes(_damage(target.read_bytes(), where, byte, cut))
    _outcome("CIFAR-10 pickles", lambda: _read_all(build_source("cifar10", SourceOptions(path=str(folder)))))


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".png", ".jpg", ".gif", ".bmp"]), st.booleans())
def test_image_folders_with_arbitrary_files(tmp_path_factory, data, suffix, real_prefix):
    root = tmp_path_factory.mktemp("imgs")
    (root / "a").mkdir()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    (root / "a" / "good.png").write_bytes(buf.getvalue())
    (root / "a" / f"odd{suffix}").write_bytes((buf.getvalue()[:40] if real_prefix else b"") + data)
    _outcome("image folders", lambda: _read_all(build_source("imagefolder", SourceOptions(path=str(root), size=4))))


@pytest.fixture(scope="module")
def shard_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "ds"
    prepare_quick("digits", out, samples_per_shard=100, test_fraction=0.05)
    return out


@FUZZ
@given(st.integers(0, 10**7), st.integers(0, 255), st.integers(0, 3000))
def test_shards_with_damaged_bytes_that_pass_their_checksum(tmp_path_factory, shard_dataset, where, byte, cut):
    """The hard case: bytes changed *and* dataset.json's SHA-256 updated, so only decoding can tell."""
    import hashlib
    import json

    ds = tmp_path_factory.mktemp("d") / "ds"
    shutil.copytree(shard_dataset, ds)
    name = "train-000000.tar"
    data = _damage((ds / name).read_bytes(), where, byte, cut)
    (ds / name).write_bytes(data)
    meta = json.loads((ds / "dataset.json").read_text())
    for shard in meta["splits"]["train"]["shards"]:
        if shard["name"] == name:
            shard["sha256"], shard["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (ds / "dataset.json").write_text(json.dumps(meta))

    def read() -> None:
        opened = sh.open_dataset(ds)
        for _ in sh.iter_shard(opened, "train", opened.shards("train")[0]):
            pass

    _outcome("shards", read)


def test_a_tar_that_is_not_a_shard_is_a_user_error(tmp_path, shard_dataset):
    """One fixed case of the above, kept as a plain test: a valid tar of unrelated files."""
    ds = tmp_path / "ds"
    shutil.copytree(shard_dataset, ds)
    with tarfile.open(ds / "other.tar", "w") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    shutil.copyfile(ds / "other.tar", ds / "train-000000.tar")
    with pytest.raises(UserError):
        opened = sh.open_dataset(ds)
        sh.require_valid_shards(opened, ["train"])
