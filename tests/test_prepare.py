"""The prepare stage on real data: every source, the on-disk format, determinism, reruns, tracking."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CIFAR_CLASSES, prepare_quick, tar_gz_folder, write_cifar10, write_image_folder

from pipelines.common.errors import UserError
from pipelines.data import shards as sh
from pipelines.data.readers import load_split


def _meta(out) -> dict:
    return json.loads((out / "dataset.json").read_text())


def _manifest(out):
    return pq.read_table(out / "manifest.parquet").to_pandas()


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --------------------------------------------------------------------------- sources


def test_mnist5k_real(tmp_path):
    from pipelines.data.sources import load_mnist5k

    out = tmp_path / "mnist"
    result = prepare_quick("mnist5k", out)
    meta = _meta(out)
    assert result.counts == {"train": 4500, "test": 500} and not result.up_to_date
    assert meta["sample"] == {
        "kind": "image",
        "encoding": "png",
        "labeled": True,
        "height": 28,
        "width": 28,
        "channels": 1,
    }
    assert meta["num_classes"] == 10 and meta["class_names"] == [str(d) for d in range(10)]
    assert [s["name"] for s in meta["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["count"] for s in meta["splits"]["train"]["shards"]] == [1000] * 4 + [500]
    for split in ("train", "test"):
        for shard in meta["splits"][split]["shards"]:
            assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]

    images, labels, _ = load_mnist5k()
    manifest = _manifest(out)
    assert list(manifest.columns) == [
        "key",
        "split",
        "shard",
        "index",
        "label",
        "height",
        "width",
        "channels",
        "source_id",
    ]
    assert len(manifest) == 5000
    for split, per_class in (("train", 450), ("test", 50)):
        x, y = load_split(out, split)
        rows = manifest[manifest.split == split].sort_values("index")
        orig = np.array([int(s.split(":")[1]) for s in rows.source_id])
        assert np.array_equal(x, images[orig]) and np.array_equal(y, labels[orig])
        assert np.array_equal(np.bincount(y), [per_class] * 10)  # stratified
        assert len(np.unique(orig)) == len(orig)
        assert meta["splits"][split]["mean"] == pytest.approx([x.mean() / 255], abs=1e-6)
        assert meta["splits"][split]["std"] == pytest.approx([(x / 255).std()], abs=1e-6)
    # Shards mix classes (the bundled file is sorted by digit).
    first = manifest[manifest.shard == "train-000000.tar"]
    assert first.label.nunique() == 10


def test_digits_scaled_and_upsampled(tmp_path, digits_dataset):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    meta = _meta(digits_dataset)
    assert meta["counts"] == {"train": 1618, "test": 179}  # per class round(10%)
    manifest = _manifest(digits_dataset)
    x, y = load_split(digits_dataset, "test")
    rows = manifest[manifest.split == "test"].sort_values("index")
    orig = np.array([int(s.split(":")[1]) for s in rows.source_id])
    want = np.round(bunch.images[orig] * 255 / 16).astype(np.uint8)[..., None]
    assert np.array_equal(x, want) and np.array_equal(y, bunch.target[orig])
    assert x.max() == 255

    out = tmp_path / "digits16"
    prepare_quick("digits", out, size=16, test_fraction=0.5, seed=3)
    meta = _meta(out)
    assert (meta["sample"]["height"], meta["sample"]["width"]) == (16, 16)
    assert meta["options"] == {"test_fraction": 0.5, "seed": 3, "size": 16}
    assert abs(meta["counts"]["test"] - 1797 / 2) < 10


@pytest.mark.parametrize("packed", [True, False])
def test_cifar10_official_layout(tmp_path, packed):
    folder, arrays = write_cifar10(tmp_path / "src")
    path = tar_gz_folder(folder, tmp_path / "cifar-10-python.tar.gz") if packed else folder
    out = tmp_path / "out"
    prepare_quick("cifar10", out, path=str(path), samples_per_shard=25)
    meta = _meta(out)
    assert meta["class_names"] == CIFAR_CLASSES
    assert meta["counts"] == {"train": 60, "test": 10}
    assert meta["sample"]["height"] == 32 and meta["sample"]["channels"] == 3
    x, y = load_split(out, "train")  # official order: data_batch_1 … 5
    want_x = np.concatenate([arrays[f"data_batch_{k}"][0] for k in range(1, 6)])
    want_y = sum((arrays[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert np.array_equal(x, want_x) and y.tolist() == want_y
    x, y = load_split(out, "test")
    assert np.array_equal(x, arrays["test_batch"][0]) and y.tolist() == arrays["test_batch"][1]
    assert _manifest(out).source_id.iloc[0] == "data_batch_1:0:img_0_0.png"
    # The extracted folder's parent works too, and gives byte-identical shards.
    if not packed:
        out2 = tmp_path / "out2"
        prepare_quick("cifar10", out2, path=str(folder.parent), samples_per_shard=25)
        assert all((out / n).read_bytes() == (out2 / n).read_bytes() for n in ("train-000000.tar", "test-000000.tar"))


def test_imagefolder_class_folders(tmp_path):
    src = tmp_path / "imgs"
    originals = write_image_folder(src, {"cat": 5, "dog": 7}, size=(10, 12))
    (src / "notes.txt").write_text("not an image")  # ignored, and counted
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="ignored 1 file"):
        prepare_quick("imagefolder", out, path=str(src), samples_per_shard=4)
    meta = _meta(out)
    assert meta["class_names"] == ["cat", "dog"] and meta["counts"] == {"train": 12}
    assert meta["ignored_files"] == 1
    assert meta["sample"] == {
        "kind": "image",
        "encoding": "png",
        "labeled": True,
        "height": 12,
        "width": 10,
        "channels": 3,
    }
    assert [s["count"] for s in meta["splits"]["train"]["shards"]] == [4, 4, 4]
    x, y = load_split(out, "train")
    ids = _manifest(out).sort_values("index").source_id.tolist()
    assert sorted(ids) == sorted(originals)
    for i, rel in enumerate(ids):
        assert np.array_equal(x[i], originals[rel]) and y[i] == ["cat", "dog"].index(rel.split("/")[0])


def test_imagefolder_options_and_splits(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    originals = write_image_folder(src / "train", {"a": 6, "b": 6}, size=(20, 16))
    write_image_folder(src / "test", {"a": 2, "b": 2}, size=(20, 16), seed=1)
    out = tmp_path / "gray8"
    prepare_quick("imagefolder", out, path=str(src), size=8, crop=14, channels=1)
    meta = _meta(out)
    assert meta["counts"] == {"test": 4, "train": 12} or meta["counts"] == {"train": 12, "test": 4}
    assert (meta["sample"]["height"], meta["sample"]["width"], meta["sample"]["channels"]) == (8, 8, 1)
    x, _ = load_split(out, "train")
    rel = _manifest(out).query("split == 'train'").sort_values("index").source_id.iloc[0]
    pil = Image.fromarray(originals[rel.split("/", 1)[1]]).convert("L").crop((3, 1, 17, 15))
    assert np.array_equal(x[0, :, :, 0], np.asarray(pil.resize((8, 8), Image.Resampling.BILINEAR)))

    flat = tmp_path / "flat"
    write_image_folder(flat, {"x": 20}, size=(6, 6))
    out = tmp_path / "split"
    prepare_quick("imagefolder", out, path=str(flat / "x"), test_fraction=0.25)
    meta = _meta(out)
    assert meta["counts"] == {"train": 15, "test": 5} and meta["class_names"] is None
    assert meta["sample"]["labeled"] is False
    _, y = load_split(out, "train")
    assert (y == -1).all()


def test_imagefolder_celeba_preset(tmp_path):
    from PIL import Image

    src = tmp_path / "celeba" / "img_align_celeba"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines, arrays = [], {}
    for i in range(1, 7):
        arr = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
        Image.fromarray(arr).save(src / f"{i:06d}.jpg", quality=95)
        arrays[f"{i:06d}.jpg"] = np.asarray(Image.open(src / f"{i:06d}.jpg").convert("RGB"))
        lines.append(f"{i:06d}.jpg {0 if i <= 3 else (1 if i == 4 else 2)}")
    (src.parent / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "celeba64"
    prepare_quick("imagefolder", out, path=str(src), preset="celeba")
    meta = _meta(out)
    assert meta["counts"] == {"train": 3, "valid": 1, "test": 2}
    assert meta["options"]["crop_box"] == [25, 57, 153, 185] and meta["options"]["size"] == 64
    assert (meta["sample"]["height"], meta["sample"]["width"], meta["sample"]["channels"]) == (64, 64, 3)
    x, _ = load_split(out, "valid")
    want = Image.fromarray(arrays["000004.jpg"]).crop((25, 57, 153, 185)).resize((64, 64), Image.Resampling.BILINEAR)
    assert np.array_equal(x[0], np.asarray(want))


@pytest.mark.parametrize("name", ["gmm", "gmm8", "gmm25", "checkerboard", "two_moons"])
def test_toy2d(tmp_path, name):
    from pipelines.data.sources import toy_log_density

    out = tmp_path / name
    prepare_quick("toy2d", out, name=name, num_train=400, num_test=100, samples_per_shard=150)
    meta = _meta(out)
    assert meta["sample"] == {
        "kind": "vector",
        "encoding": "npy",
        "labeled": name != "checkerboard",
        "shape": [2],
        "dtype": "float32",
    }
    assert meta["counts"] == {"train": 400, "test": 100}
    x, y = load_split(out, "test")
    assert x.dtype == np.float32 and x.shape == (100, 2) and np.abs(x).max() < 6
    dist = meta["toy"]["distribution"]
    logp = toy_log_density(dist, x)
    if name == "two_moons":
        assert logp is None and "test_mean_log_density" not in meta["toy"]
    else:
        # Recorded from the float64 points; the stored float32 points give the same value to ~1e-5.
        assert meta["toy"]["test_mean_log_density"] == pytest.approx(float(np.mean(logp)), abs=1e-4)
    if name == "checkerboard":
        assert np.allclose(logp, -math.log(8))
    if name == "gmm":
        import torch

        from cdm_core.mixture import toy_mixture

        ref = toy_mixture(2).log_prob(torch.as_tensor(x, dtype=torch.float64)).numpy()
        assert np.allclose(logp, ref, atol=1e-9)
    assert meta["splits"]["train"]["mean"] == pytest.approx(load_split(out, "train")[0].mean(0).tolist(), abs=1e-5)


# --------------------------------------------------------------------------- determinism and reruns


def test_byte_identical_and_rerun_skips(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_quick("toy2d", a, name="gmm8", num_train=300, num_test=50, samples_per_shard=128)
    prepare_quick("toy2d", b, name="gmm8", num_train=300, num_test=50, samples_per_shard=128)
    assert _files(a) == _files(b)  # shards, manifest and dataset.json
    names = [n for n in _files(a) if n.endswith(".tar")]
    assert names == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # Fixed tar metadata: no wall-clock mtimes, fixed owner.
    import tarfile

    with tarfile.open(a / "train-000000.tar") as tar:
        infos = tar.getmembers()
    assert {i.mtime for i in infos} == {0} and {i.uname for i in infos} == {"cdm"}
    assert [i.name for i in infos[:4]] == [
        "train-00000000.cls",
        "train-00000000.npy",
        "train-00000001.cls",
        "train-00000001.npy",
    ]

    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    again = prepare_quick("toy2d", a, name="gmm8", num_train=300, num_test=50, samples_per_shard=128)
    assert again.up_to_date and {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == before

    forced = prepare_quick("toy2d", a, name="gmm8", num_train=300, num_test=50, samples_per_shard=128, force=True)
    assert not forced.up_to_date and _files(a) == _files(b)

    # A damaged shard is not "valid output": the rerun rewrites it.
    (a / "train-000001.tar").write_bytes(b"garbage")
    fixed = prepare_quick("toy2d", a, name="gmm8", num_train=300, num_test=50, samples_per_shard=128)
    assert not fixed.up_to_date and _files(a) == _files(b)

    # Different options replace the dataset (with --force), and shards it no longer has are removed.
    changed = prepare_quick("toy2d", a, name="gmm8", num_train=300, num_test=50, samples_per_shard=400, force=True)
    assert not changed.up_to_date
    assert sorted(n for n in os.listdir(a) if n.endswith(".tar")) == ["test-000000.tar", "train-000000.tar"]
    assert sh.verify(a).ok


def _toy(out, **kw):
    return prepare_quick("toy2d", out, name="gmm8", num_train=40, num_test=10, **kw)


def test_never_replaces_another_dataset_without_force(tmp_path):
    out = tmp_path / "m"
    _toy(out)
    before = _files(out)
    with pytest.raises(UserError, match=r"holds a dataset prepared from 'toy2d'.*Give --force"):
        prepare_quick("digits", out)
    assert _files(out) == before
    prepare_quick("digits", out, force=True)
    assert _meta(out)["source"] == "digits" and sh.verify(out).ok


def test_force_rewrites_a_damaged_dataset(tmp_path):
    out = tmp_path / "d"
    _toy(out)
    good = _files(out)
    (out / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match=r"damaged; rewrite it with --force"):
        _toy(out)
    assert (out / "dataset.json").read_text() == "{not json"
    _toy(out, force=True)
    assert _files(out) == good and sh.verify(out).ok


def test_a_failed_prepare_leaves_the_old_dataset_and_no_half_written_one(tmp_path):
    images = tmp_path / "imgs"
    write_image_folder(images, {"a": 30, "b": 30}, size=(8, 8))
    (images / "b" / "zz-broken.png").write_bytes(b"not a png")
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match=r"zz-broken\.png: not a readable image"):
        prepare_quick("imagefolder", fresh, path=str(images), samples_per_shard=8)
    assert sorted(os.listdir(tmp_path)) == ["imgs"]  # no empty --out, no partial folder beside it

    old = tmp_path / "old"
    _toy(old)
    before = _files(old)
    with pytest.raises(UserError, match=r"zz-broken\.png"):
        prepare_quick("imagefolder", old, path=str(images), samples_per_shard=8, force=True)
    assert _files(old) == before and sorted(os.listdir(tmp_path)) == ["imgs", "old"]


def test_a_killed_prepare_leaves_the_old_dataset_and_a_second_prepare_meanwhile_is_refused(tmp_path, cdm_forks):
    """SIGKILL while the new dataset is being written: the old one is untouched; the next run cleans up.

    While the first writes, a second `cdm prepare` into the same folder, even with --force, is refused at
    once (issue 29: both used to write, and the last rename won)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    old = tmp_path / "old"
    _toy(old)
    before = _files(old)
    cdm = str(Path(sys.executable).with_name("cdm"))
    # 50,000 points take ~12 s to write (after the ~6 s start): the kill lands mid-write.
    many = ["--name", "gmm8", "--num-train", "50000", "--num-test", "0", "--out", str(old), "--force", "--no-track"]
    proc = subprocess.Popen([cdm, "prepare", "toy2d", *many], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / f".old.partial-{proc.pid}"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no partial folder"
    second = cdm_forks.run(
        ["prepare", "toy2d", "--name", "gmm8", "--num-train", "40", "--num-test", "10", "--out", "old", "--force"]
        + ["--no-track"],
        cwd=tmp_path,
    )
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
    assert f"{old}: another `cdm prepare` (pid {proc.pid}) is writing this dataset now" in errors[0]
    assert proc.poll() is None, "the first run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _files(old) == before and sh.verify(old).ok

    # Killed between its two renames: the old dataset lies aside and nothing is at --out.
    aside = tmp_path / ".old.old-999999999"
    os.replace(old, aside)
    again = _toy(old)  # puts the old dataset back, finds it up to date, and removes the dead run's leftovers
    assert again.up_to_date and _files(old) == before
    assert sorted(os.listdir(tmp_path)) == ["old"]  # the killed run's lock file too: the next run took and removed it


def test_sigterm_while_writing_is_ctrl_c_and_keeps_the_old_dataset(tmp_path, cdm_forks):
    """SIGTERM (kill, Kubernetes, Slurm) mid-write ends `cdm prepare` as Ctrl-C does: one line, exit 130, the
    old dataset untouched, nothing left beside it (issue 29: exit 143 without a word)."""
    import signal
    import time

    old = tmp_path / "old"
    _toy(old)
    before = _files(old)

    def stop_midway(pid: int) -> None:
        partial, deadline = tmp_path / f".old.partial-{pid}", time.monotonic() + 60
        while not any(partial.glob("train-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)

    many = ["--name", "gmm8", "--num-train", "50000", "--num-test", "0", "--out", "old", "--force", "--no-track"]
    result = cdm_forks.run(["prepare", "toy2d", *many], cwd=tmp_path, on_start=stop_midway)
    assert result.returncode == 130, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: what was finished is kept"), result.stderr[-2000:]
    assert _files(old) == before and sorted(os.listdir(tmp_path)) == ["old"]


def test_refuses_foreign_output_dir(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match=r"not empty and not a prepared dataset.*thesis\.tex"):
        prepare_quick("toy2d", out, name="gmm8", num_train=10, num_test=0)
    # What an interrupted run leaves (shards, a temp file, no dataset.json) is ours to replace.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "train-000000.tar").write_bytes(b"half")
    (crashed / ".train-000001.tar.tmp-123").write_bytes(b"half")
    prepare_quick("toy2d", crashed, name="gmm8", num_train=10, num_test=0)
    assert sorted(os.listdir(crashed)) == ["dataset.json", "manifest.parquet", "train-000000.tar"]
    assert sh.verify(crashed).ok
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_quick("toy2d", tmp_path / "afile", name="gmm8", num_train=10, num_test=0)


def test_option_validation():
    with pytest.raises(UserError, match="unknown source"):
        prepare_quick("imagenet", "/tmp/never")
    with pytest.raises(UserError, match="does not take --path"):
        prepare_quick("mnist5k", "/tmp/never", path="/x")
    with pytest.raises(UserError, match="needs --name"):
        prepare_quick("toy2d", "/tmp/never")
    with pytest.raises(UserError, match="toy2d distributions are"):
        prepare_quick("toy2d", "/tmp/never", name="swirl")
    with pytest.raises(UserError, match="samples-per-shard"):
        prepare_quick("toy2d", "/tmp/never", name="gmm8", samples_per_shard=0)
    with pytest.raises(UserError, match="test-fraction"):
        prepare_quick("digits", "/tmp/never", test_fraction=1.5)
    assert not os.path.exists("/tmp/never")


def test_fsspec_uri_output():
    """Any pyarrow/fsspec URI works as output (memory:// here); the plain reader and verify read it back."""
    uri = "memory://cdm-test/gmm25"
    result = prepare_quick("toy2d", uri, name="gmm25", num_train=60, num_test=20, samples_per_shard=25)
    assert result.uri == uri
    report = sh.verify(uri)
    assert report.ok and report.counts == {"train": 60, "test": 20} and report.decoded == 80
    x, y = load_split(uri, "train")
    assert x.shape == (60, 2) and y.min() >= 0
    assert prepare_quick("toy2d", uri, name="gmm25", num_train=60, num_test=20, samples_per_shard=25).up_to_date


# --------------------------------------------------------------------------- tracking


def test_prepare_logs_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    src = tmp_path / "imgs"
    write_image_folder(src, {"a": 3, "b": 3}, size=(8, 8))
    result = prepare_quick("imagefolder", tmp_path / "out", path=str(src), track=True, tracking_uri=uri, experiment="t")
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "prepare-imagefolder"
    assert run.data.params["source"] == "imagefolder" and run.data.params["options.channels"] == "3"
    assert run.data.metrics["data/train_count"] == 6 and run.data.metrics["data/skipped_bad"] == 0
    assert run.data.tags["cdm.stage"] == "prepare"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert artifacts == {"dataset.json", "samples.png"}
    local = client.download_artifacts(result.run_id, "dataset.json", str(tmp_path))
    assert json.loads(open(local).read())["counts"] == {"train": 6}
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the db

    # A failing prepare leaves a FAILED run, not a RUNNING one.
    (src / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        prepare_quick("imagefolder", tmp_path / "out2", path=str(src), track=True, tracking_uri=uri, experiment="t")
    assert not (tmp_path / "out2").exists()  # nothing half-written is left
    runs = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FAILED"


# --------------------------------------------------------------------------- config files and the CLI


def test_config_file_with_cli_overrides(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.data.prepare import load_config

    cfg = tmp_path / "toy.toml"
    cfg.write_text('[prepare]\nsource = "toy2d"\nname = "gmm8"\nnum_train = 30\nnum_test = 5\ntrack = false\n')
    config = load_config(cfg, {"out": str(tmp_path / "a"), "seed": 4})
    assert (config.source, config.name, config.num_train, config.seed, config.track) == ("toy2d", "gmm8", 30, 4, False)

    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "--config", str(cfg), "--out", str(tmp_path / "b"), "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert _meta(tmp_path / "b")["options"]["seed"] == 4 and _meta(tmp_path / "b")["counts"] == {"train": 30, "test": 5}

    cfg.write_text('source = "toy2d"\nnmae = "gmm8"\n')
    with pytest.raises(UserError, match=r"toy.toml: unknown prepare option\(s\) \['nmae'\]"):
        load_config(cfg, {"out": "x"})
    cfg.write_text('source = "toy2d"\nseed = "one"\n')
    with pytest.raises(UserError, match=r"toy.toml: 'seed' must be int"):
        load_config(cfg, {"out": "x"})
    cfg.write_text('source = "toy2d"\n')
    with pytest.raises(UserError, match=r"toy.toml: needs out"):
        load_config(cfg)
    with pytest.raises(UserError, match="config file does not exist"):
        load_config(tmp_path / "nope.toml")
