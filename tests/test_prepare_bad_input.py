"""Bad input: every case is a clear error naming the file and the problem (or, with --skip-bad, a counted warning).

Covers bad *sources* (missing paths, wrong formats, unreadable or mismatched images)
and bad *prepared datasets* (truncated/corrupt tars, samples without an image,
wrong shape or mode, SHA-256 mismatches), through `verify`, the plain reader and
the real `cdm` command (forked: tests/cdm_forks.py); and inputs that attack the reader
(decompression bombs, a FIFO named like an image) and where the output goes (a full
disk, a 250-byte --out name, the log folder).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bytes, prepare_quick, write_cifar10, write_image_folder

from pipelines.common.errors import UserError
from pipelines.data import shards as sh
from pipelines.data.readers import LocalReader


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small labeled image dataset (3×6×5 RGB, 10 train in shards of 4/4/2, 3 test)."""
    root = tmp_path_factory.mktemp("clean")
    write_image_folder(root / "src" / "train", {"a": 5, "b": 5}, size=(5, 6))
    write_image_folder(root / "src" / "test", {"a": 2, "b": 1}, size=(5, 6), seed=1)
    prepare_quick("imagefolder", root / "ds", path=str(root / "src"), samples_per_shard=4)
    return root / "ds"


@pytest.fixture
def ds(clean, tmp_path):
    """A fresh copy of the clean dataset to damage."""
    shutil.copytree(clean, tmp_path / "ds")
    return tmp_path / "ds"


def _rewrite_shard(ds: Path, name: str, edit) -> None:
    """Rewrite shard `name` with edit(list of (key, members)) and record its new SHA-256 in dataset.json.

    This is the "valid checksum, bad content" case: a shard produced by another
    tool (or a buggy one) that only sample-level checks can catch.
    """
    import webdataset as wds

    samples = []
    with tarfile.open(ds / name) as tar:
        for info in tar:
            key, suffix = info.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(info).read()
    samples = edit(samples)
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as w:
        for key, members in samples:
            w.write({"__key__": key, **members})
    data = buf.getvalue()
    (ds / name).write_bytes(data)
    meta = json.loads((ds / "dataset.json").read_text())
    for split in meta["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (ds / "dataset.json").write_text(json.dumps(meta))


def _problems(ds) -> str:
    report = sh.verify(ds)
    assert not report.ok
    return "\n".join(report.problems)


def _reader_error(ds, split="train") -> str:
    with pytest.raises(UserError) as err:
        LocalReader(ds, split)
    return str(err.value)


# --------------------------------------------------------------------------- damaged datasets


def test_clean_dataset_verifies(clean):
    report = sh.verify(clean)
    assert report.ok and report.decoded == 13 and report.shards == 4
    assert report.counts == {"test": 3, "train": 10} or report.counts == {"train": 10, "test": 3}


def test_truncated_tar(ds):
    data = (ds / "train-000001.tar").read_bytes()
    (ds / "train-000001.tar").write_bytes(data[:1100])  # cut inside the second member
    assert "train-000001.tar" in _problems(ds) and "truncated" in _problems(ds)
    assert "train-000001.tar" in _reader_error(ds)
    # Without the size/checksum check, the tar parser itself catches it.
    with pytest.raises(UserError, match=r"train-000001\.tar: corrupt or truncated tar"):
        LocalReader(ds, "train", verify=False)


def test_truncated_cleanly_between_members(ds):
    """Cut exactly after a member: Python's tarfile sees a clean end; the missing end-of-archive marker does not."""
    with tarfile.open(ds / "train-000000.tar") as tar:
        cut = next(m for m in tar if m.name.startswith("train-00000002")).offset
    (ds / "train-000000.tar").write_bytes((ds / "train-000000.tar").read_bytes()[:cut])
    assert "train-000000.tar" in _problems(ds)
    with pytest.raises(UserError, match=r"train-000000\.tar: corrupt or truncated tar \(ends at byte \d+ without"):
        LocalReader(ds, "train", verify=False)


def test_short_shard_with_valid_tar(ds):
    """A tar cut cleanly between samples parses fine; the per-shard sample count catches it."""
    _rewrite_shard(ds, "train-000000.tar", lambda s: s[:3])
    with pytest.raises(UserError, match=r"train-000000\.tar: has 3 samples, dataset.json says 4"):
        LocalReader(ds, "train")
    assert "has 3 samples" in _problems(ds)


def test_corrupt_tar(ds):
    (ds / "train-000002.tar").write_bytes(os.urandom((ds / "train-000002.tar").stat().st_size))
    assert "train-000002.tar: SHA-256" in _problems(ds)
    with pytest.raises(UserError, match=r"train-000002\.tar: corrupt or truncated tar"):
        LocalReader(ds, "train", verify=False)


def test_sample_without_image(ds):
    def drop_png(samples):
        samples[1][1].pop("png")
        return samples

    _rewrite_shard(ds, "train-000000.tar", drop_png)
    msg = _problems(ds)
    assert "train-000000.tar: sample train-00000001: sample has no .png member" in msg
    assert "no .png member" in _reader_error(ds)
    assert sh.verify(ds, decode=False).ok  # --quick checks files and checksums only


@pytest.mark.parametrize(
    "image, problem",
    [
        (np.zeros((6, 5), np.uint8), "mode L"),  # grayscale in an RGB dataset
        (np.zeros((7, 5, 3), np.uint8), "5x7"),  # wrong size
    ],
)
def test_wrong_shape_or_mode(ds, image, problem):
    def replace(samples):
        samples[2][1]["png"] = png_bytes(image)
        return samples

    _rewrite_shard(ds, "train-000001.tar", replace)
    msg = _problems(ds)
    assert "train-000001.tar: sample train-00000006" in msg and problem in msg and "declares 5x6 mode RGB" in msg
    assert problem in _reader_error(ds)


def test_undecodable_png_and_bad_label(ds):
    def damage(samples):
        samples[0][1]["png"] = b"\x89PNG not really"
        samples[1][1]["cls"] = b"7"  # only classes 0..1 exist
        return samples

    _rewrite_shard(ds, "test-000000.tar", damage)
    report = sh.verify(ds)
    assert any("test-00000000: PNG does not decode" in p for p in report.problems)
    assert "PNG does not decode" in _reader_error(ds, "test")


def test_sha256_mismatch(ds):
    """Same size, valid tar, different pixels: only the checksum can tell."""
    path = ds / "train-000000.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
    offset = member.offset_data + member.size - 5  # inside the PNG's IEND chunk CRC: still a valid tar
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    msg = _problems(ds)
    assert "train-000000.tar: SHA-256" in msg and "does not match dataset.json" in msg
    assert "train-000000.tar: SHA-256" in _reader_error(ds)


def _flip_a_png_byte(path: Path) -> bytes:
    """The bytes of `path` with one byte inside a PNG changed: same size, still a valid tar."""
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
    data[member.offset_data + member.size - 5] ^= 0xFF
    return bytes(data)


def test_a_shard_is_hashed_once_per_version_of_its_file(ds):
    """Readers trust the record of a shard's last full check while the file is as it was then; any edit or swap
    (even with the old mtime put back) changes its ctime or inode, so it is hashed again and caught."""
    LocalReader(ds, "train")  # the first reader hashes every train shard and records how each looked
    record = json.loads(sh.verification_record(sh.open_dataset(ds)).read_text())
    assert record["dataset_json_sha256"] == hashlib.sha256((ds / "dataset.json").read_bytes()).hexdigest()
    assert sorted(record["shards"]) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]

    edited = ds / "train-000000.tar"
    before = edited.stat()
    edited.write_bytes(_flip_a_png_byte(edited))  # edited in place
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    swapped = ds / "train-000001.tar"
    before = swapped.stat()
    (ds / "other.tmp").write_bytes(_flip_a_png_byte(swapped))  # replaced by another file
    os.utime(ds / "other.tmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(ds / "other.tmp", swapped)
    message = _reader_error(ds)
    assert "train-000000.tar: SHA-256" in message and "train-000001.tar: SHA-256" in message

    # The record is what decides: one forged to the edited files' looks hides them from a reader (no hashing),
    # but not from `cdm verify`, which hashes every shard.
    for path in (edited, swapped):
        st = path.stat()
        record["shards"][path.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    sh.verification_record(sh.open_dataset(ds)).write_text(json.dumps(record))
    LocalReader(ds, "train")
    problems = _problems(ds)
    assert "train-000000.tar: SHA-256" in problems and "train-000001.tar: SHA-256" in problems
    # A record of another dataset.json is not this dataset's.
    (ds / "dataset.json").write_text((ds / "dataset.json").read_text() + " ")
    assert "train-000000.tar: SHA-256" in _reader_error(ds)


def test_missing_shard_and_manifest(ds):
    (ds / "train-000002.tar").unlink()
    (ds / "manifest.parquet").unlink()
    msg = _problems(ds)
    assert "train-000002.tar: missing" in msg and "manifest.parquet: missing" in msg


def test_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match=r"nope: no such directory; run `cdm prepare"):
        sh.verify(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: not a prepared dataset \(no dataset.json"):
        LocalReader(tmp_path / "empty", "train")
    (tmp_path / "empty" / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match=r"dataset.json: not valid JSON"):
        sh.verify(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text('{"format": "cdm-webdataset/1"}')
    with pytest.raises(UserError, match=r"dataset.json: missing field\(s\) \['source', 'sample', 'splits'\]"):
        sh.verify(tmp_path / "empty")


def test_unknown_split(clean):
    with pytest.raises(UserError, match=r"no split 'valid'"):
        LocalReader(clean, "valid")


# --------------------------------------------------------------------------- bad sources


def test_source_path_missing_or_wrong_format(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.*does not exist"):
        prepare_quick("cifar10", tmp_path / "o", path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere.*does not exist"):
        prepare_quick("imagefolder", tmp_path / "o", path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="needs --path"):
        prepare_quick("cifar10", tmp_path / "o")
    # A folder of images is not CIFAR-10.
    write_image_folder(tmp_path / "imgs", {"a": 2})
    with pytest.raises(UserError, match=r"imgs: missing data_batch_1.*official python-format CIFAR-10"):
        prepare_quick("cifar10", tmp_path / "o", path=str(tmp_path / "imgs"))
    # A text file is not the tarball.
    (tmp_path / "cifar.tar.gz").write_text("hello")
    with pytest.raises(UserError, match=r"cifar.tar.gz: not a readable tar.gz"):
        prepare_quick("cifar10", tmp_path / "o", path=str(tmp_path / "cifar.tar.gz"))
    # A folder with no images.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"docs: no images found"):
        prepare_quick("imagefolder", tmp_path / "o", path=str(tmp_path / "docs"))
    # A file where a folder is expected.
    with pytest.raises(UserError, match=r"a.txt: is a file, not a folder"):
        prepare_quick("imagefolder", tmp_path / "o", path=str(tmp_path / "docs" / "a.txt"))
    assert not (tmp_path / "o").exists()


def test_cifar_bad_batch_contents(tmp_path):
    folder, _ = write_cifar10(tmp_path / "src", per_batch=4, test=2)
    d = pickle.loads((folder / "data_batch_3").read_bytes())
    d[b"data"] = d[b"data"][:, :100]
    (folder / "data_batch_3").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_3: 'data' is uint8 \(4, 100\), expected uint8 \(N, 3072\)"):
        prepare_quick("cifar10", tmp_path / "o", path=str(folder))


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder, _ = write_cifar10(tmp_path / "src", per_batch=4, test=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}, protocol=2))
    with pytest.raises(UserError, match=r"batches.meta: not a CIFAR-10 python pickle \(refusing to load"):
        prepare_quick("cifar10", tmp_path / "o", path=str(folder))


def test_cifar_bad_label_skip(tmp_path):
    folder, _ = write_cifar10(tmp_path / "src", per_batch=4, test=2)
    d = pickle.loads((folder / "test_batch").read_bytes())
    d[b"labels"][1] = 12
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(UserError, match=r"test_batch row 1: label 12 is not in 0..9.*--skip-bad"):
        prepare_quick("cifar10", tmp_path / "o", path=str(folder))
    with pytest.warns(UserWarning, match="test_batch row 1"):
        result = prepare_quick("cifar10", tmp_path / "o2", path=str(folder), skip_bad=True)
    assert result.counts == {"train": 20, "test": 1}
    assert result.meta["skipped"]["count"] == 1


def _bad_folder(root: Path) -> Path:
    from PIL import Image

    write_image_folder(root, {"a": 3, "b": 3}, size=(6, 6))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.zeros((9, 6, 3), np.uint8)).save(root / "b" / "tall.png")
    Image.fromarray(np.zeros((6, 6), np.uint16)).save(root / "b" / "deep.png")
    return root


def test_imagefolder_bad_images(tmp_path):
    src = _bad_folder(tmp_path / "src")
    with pytest.raises(UserError, match=r"a/broken.png: not a readable image.*--skip-bad"):
        prepare_quick("imagefolder", tmp_path / "o", path=str(src))
    (src / "a" / "broken.png").unlink()
    with pytest.raises(UserError) as err:
        prepare_quick("imagefolder", tmp_path / "o", path=str(src))
    assert "deep.png: image mode I;16" in str(err.value) or "tall.png: image is 6x9" in str(err.value)
    (src / "b" / "deep.png").unlink()
    with pytest.raises(UserError, match=r"tall.png: image is 6x9, earlier images are 6x6; pass --size"):
        prepare_quick("imagefolder", tmp_path / "o", path=str(src))
    # --size makes the odd one fine.
    assert prepare_quick("imagefolder", tmp_path / "o", path=str(src), size=6).counts == {"train": 7}


def test_imagefolder_skip_bad_counts(tmp_path):
    src = _bad_folder(tmp_path / "src")
    with pytest.warns(UserWarning) as caught:
        result = prepare_quick("imagefolder", tmp_path / "o", path=str(src), skip_bad=True)
    assert result.counts == {"train": 6}
    skipped = result.meta["skipped"]
    assert skipped["count"] == 3 and skipped["skip_bad"] is True
    assert sorted(Path(e["where"]).name for e in skipped["examples"]) == ["broken.png", "deep.png", "tall.png"]
    assert sum("skipping" in str(w.message) for w in caught) == 3
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["skipped"]["count"] == 3
    assert sh.verify(tmp_path / "o").ok


def test_imagefolder_mixed_layout(tmp_path):
    write_image_folder(tmp_path / "src", {"a": 2}, size=(4, 4))
    shutil.copy(tmp_path / "src" / "a" / "000.png", tmp_path / "src" / "loose.png")
    with pytest.raises(UserError, match=r"src: has images directly inside \(loose.png"):
        prepare_quick("imagefolder", tmp_path / "o", path=str(tmp_path / "src"))
    assert prepare_quick("imagefolder", tmp_path / "o", path=str(tmp_path / "src"), labels="none").counts == {
        "train": 3
    }


# --------------------------------------------------------------------------- the real console script


def _cdm(forks, *args, cwd):
    """The real `cdm ARGS`, forked from a process that has imported what it imports (tests/cdm_forks.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CDM_DEBUG", "MLFLOW_TRACKING_URI")}
    return forks.run(list(args), cwd=cwd, env=env)


def test_cli_errors_have_no_traceback(ds, tmp_path, cdm_forks):
    r = _cdm(cdm_forks, "verify", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "no such directory" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout

    r = _cdm(
        cdm_forks,
        "prepare",
        "cifar10",
        "--path",
        str(tmp_path / "nope.tar.gz"),
        "--out",
        "o",
        "--no-track",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "nope.tar.gz: does not exist" in r.stderr and "Traceback" not in r.stderr

    data = (ds / "train-000001.tar").read_bytes()
    (ds / "train-000001.tar").write_bytes(data[:-2000])
    r = _cdm(cdm_forks, "verify", str(ds), cwd=tmp_path)
    assert r.returncode == 2 and "train-000001.tar" in r.stderr and "Traceback" not in r.stderr


def test_cli_prepare_and_verify_ok(tmp_path, cdm_forks):
    r = _cdm(
        cdm_forks,
        "prepare",
        "toy2d",
        "--name",
        "gmm8",
        "--num-train",
        "50",
        "--num-test",
        "10",
        "--out",
        "d",
        "--no-track",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote:" in r.stdout and "train 50, test 10" in r.stdout
    r = _cdm(cdm_forks, "verify", "d", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok:") and "60 samples decoded" in r.stdout
    r = _cdm(
        cdm_forks,
        "prepare",
        "toy2d",
        "--name",
        "gmm8",
        "--num-train",
        "50",
        "--num-test",
        "10",
        "--out",
        "d",
        "--no-track",
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stdout.startswith("up to date:")


# --------------------------------------------------------------------------- inputs that attack the reader


def _bomb_png(width: int, height: int, keep: int | None = None) -> bytes:
    """A valid 1-bit PNG of width×height black pixels: tens of KB on disk that decode to width·height bytes
    (`keep`: only the first `keep` bytes of its pixel data, so that only its header is whole)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    body = (b"".join(z.compress(row) for _ in range(height)) + z.flush())[:keep]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


def test_decompression_bombs_and_fifos_are_refused_by_name_and_skipped(tmp_path, cdm_forks):
    """A PNG over Pillow's own limit, one under it that still decodes to 144 MB, and a FIFO named like an image:
    each is refused naming the file (the bombs from their headers, before a pixel is decoded; the FIFO without
    opening it for a read that would block forever), and --skip-bad skips all three."""
    bad = {
        "over-pillow": ("zbig.png", _bomb_png(14000, 14000)),  # 196 Mpx: Pillow's DecompressionBombError
        "under-pillow": ("zmid.png", _bomb_png(12000, 12000)),  # 144 Mpx: Pillow would decode it
        "fifo": ("x.png", None),
    }
    expected = {
        "over-pillow": r"zbig\.png: too large to decode .*decompression bomb",
        "under-pillow": r"zmid\.png: the image header says 12000x12000 \(144 Mpx\), over the 64 Mpx cdm decodes",
        "fifo": r"x\.png: is a FIFO \(named pipe\), not an image file",
    }
    import re

    for case, (name, data) in bad.items():
        src = tmp_path / case
        write_image_folder(src, {"a": 3, "b": 3}, size=(8, 8))
        if data is None:
            os.mkfifo(src / "b" / name)
        else:
            (src / "b" / name).write_bytes(data)
        argv = ["prepare", "imagefolder", "--path", str(src), "--out", f"out-{case}", "--no-track"]
        line = _one_error(cdm_forks.run(argv, cwd=tmp_path, timeout=60))
        assert re.search(expected[case], line) and "--skip-bad" in line, line
    assert sorted(os.listdir(tmp_path)) == sorted(bad), "an output or a .partial folder was left"

    everything = tmp_path / "under-pillow"
    (everything / "a" / "zbig.png").write_bytes(bad["over-pillow"][1])
    os.mkfifo(everything / "a" / "x.png")
    argv = ["prepare", "imagefolder", "--path", str(everything), "--out", "kept", "--no-track", "--skip-bad"]
    result = cdm_forks.run(argv, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(Path(e["where"]).name for e in _meta_skipped(tmp_path / "kept")) == ["x.png", "zbig.png", "zmid.png"]
    assert sh.verify(tmp_path / "kept").ok


def _meta_skipped(ds: Path) -> list[dict]:
    return json.loads((ds / "dataset.json").read_text())["skipped"]["examples"]


def test_a_bomb_inside_a_shard_is_refused_from_its_header(ds):
    """A prepared shard whose PNG claims 12000×12000: the header is checked against dataset.json before decoding
    (the pixels here are cut off, so a reader that decoded first would report a decode error instead)."""

    def replace(samples):
        samples[0][1]["png"] = _bomb_png(12000, 12000, keep=100)
        return samples

    _rewrite_shard(ds, "train-000000.tar", replace)
    msg = _problems(ds)
    assert "train-000000.tar: sample train-00000000: image is 12000x12000 mode 1, dataset.json declares 5x6" in msg


# --------------------------------------------------------------------------- where the output goes


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), to fill. The suite runs as root, as the matrix's `chattr +i` needs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _toy_argv(out, num_train: int, *extra: str) -> list[str]:
    return ["prepare", "toy2d", "--name", "gmm8", "--num-train", str(num_train), "--num-test", "0"] + [
        "--out",
        str(out),
        "--no-track",
        *extra,
    ]


def test_a_full_disk_is_one_line_and_the_old_dataset_survives(small_disk, cdm_forks):
    old = small_disk / "d"
    prepare_quick("toy2d", old, name="gmm8", num_train=100, num_test=0)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    result = cdm_forks.run(_toy_argv(old, 5000, "--force"), cwd=small_disk)  # ~10 MB of shards
    line = _one_error(result)
    assert f"{old}: No space left on device while writing the new dataset beside it; free space" in line, line
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before and os.listdir(small_disk) == ["d"]
    assert sh.verify(old).ok


def test_an_out_name_of_250_bytes_is_prepared_and_replaced(tmp_path, cdm_forks):
    """The folders beside --out (`.NAME.partial-PID`, `.NAME.old-PID`, `.NAME.lock`) fit 255 bytes however
    long a legal NAME is; 125 two-byte letters also test the cut on a character's boundary."""
    name = "é" * 125
    for num_train in (20, 30):  # the second replaces the first (--force): the old folder is moved aside too
        result = cdm_forks.run(_toy_argv(name, num_train, "--force"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(tmp_path) == [name]
    assert sh.verify(tmp_path / name).ok and sh.open_dataset(tmp_path / name).count("train") == 30


def test_the_log_folder_is_private_and_never_followed_through_a_link(tmp_path, cdm_forks):
    """A quiet command's library output goes to <tmp>/cdm-logs-<uid>: made 0700 with 0600 logs, and when that name
    is a link or another user's folder (planted to read or redirect the logs), a fresh private folder instead.

    The library output here is Pillow's DecompressionBombWarning for a 100 Mpx image (which cdm then refuses)."""
    src = tmp_path / "src"
    write_image_folder(src, {"a": 1}, size=(8, 8))
    (src / "a" / "big.png").write_bytes(_bomb_png(10000, 10000))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("CDM_VERBOSE", None)
    mine = tmp / f"cdm-logs-{os.getuid()}"

    def run_and_find_log(where: Path | None) -> str:
        """Run; check the log in `where` (None: the fresh folder mkdtemp made beside `mine`); remove it."""
        argv = ["prepare", "imagefolder", "--path", str(src), "--out", "o", "--no-track"]
        result = cdm_forks.run(argv, cwd=tmp_path, env=env)
        assert result.returncode == 2 and "big.png" in result.stderr, result.stderr[-2000:]
        if where is None:
            (where,) = tmp.glob(f"{mine.name}-*")
        (log,) = where.glob("cdm-prepare-*.log")
        assert "DecompressionBombWarning" in log.read_text()
        assert stat.S_IMODE(where.lstat().st_mode) == 0o700 and stat.S_IMODE(log.lstat().st_mode) == 0o600
        log.unlink()
        if where != mine:
            where.rmdir()
        return result.stderr

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    mine.symlink_to(theirs)
    stderr = run_and_find_log(None)
    assert f"warning: {mine}: not a folder of yours" in stderr and os.listdir(theirs) == []

    mine.unlink()
    mine.mkdir(mode=0o777)
    os.chown(mine, 4321, 4321)  # another user's folder (the suite runs as root)
    stderr = run_and_find_log(None)
    assert f"warning: {mine}: owned by user 4321, not by you" in stderr and os.listdir(mine) == []

    mine.rmdir()
    stderr = run_and_find_log(mine)  # none there yet: made, private
    assert "warning: " not in stderr


def test_a_shard_name_leaving_a_dataset_in_an_object_store_is_refused():
    """The containment check is on the names, before any path is built: a URI dataset (memory:// here, as
    s3:// goes through the same Location) whose dataset.json names `../other/…` is refused like a local one."""
    import fsspec

    uri = "memory://cdm-escape/ds"
    prepare_quick("toy2d", "memory://cdm-escape/other", name="gmm8", num_train=10, num_test=0)
    prepare_quick("toy2d", uri, name="gmm8", num_train=10, num_test=0)
    fs = fsspec.filesystem("memory")
    meta = json.loads(fs.cat("/cdm-escape/ds/dataset.json"))
    meta["splits"]["train"]["shards"][0]["name"] = "../other/train-000000.tar"  # an intact shard of another dataset
    fs.pipe("/cdm-escape/ds/dataset.json", json.dumps(meta).encode())
    with pytest.raises(UserError, match=r"ds/dataset\.json: shard name '\.\./other/train-000000\.tar' of split"):
        sh.verify(uri)
    with pytest.raises(UserError, match=r"is not a file name inside the dataset's folder"):
        LocalReader(uri, "train")


def test_a_link_planted_as_the_lock_is_refused(tmp_path, cdm_forks):
    """`.NAME.lock` is opened without following links: one planted there would otherwise let a run go unlocked
    (or write a pid through it)."""
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("keep me")
    (tmp_path / ".d.lock").symlink_to(theirs)
    line = _one_error(cdm_forks.run(_toy_argv("d", 10), cwd=tmp_path))
    assert f"{tmp_path / '.d.lock'}: a symbolic link where cdm keeps its lock for {tmp_path / 'd'}; remove it" in line
    assert theirs.read_text() == "keep me" and not (tmp_path / "d").exists()
