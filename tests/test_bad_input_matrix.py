"""The bad-input matrix: the real `cdm` command on every bad input we know of, old and new.

Each case must end with exit code 2, one `error:` line that names the problem (the
pattern below), no traceback, and every file that was there before unchanged (the
prepared datasets and checkpoints are hashed before and after each case). None of
these starts Ray: every mistake is caught before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prepare_quick, write_image_folder

from cdm_core.checkpoint import save_checkpoint
from pipelines.common import config as cfg
from pipelines.train.config import TrainConfig
from pipelines.train.step import build_network

CDM = str(Path(sys.executable).with_name("cdm"))
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train_tiny.toml")
DEMO = str(ROOT / "configs" / "demo.toml")
PWNED = "pwned-by-a-checkpoint"


class _RunsCode:
    """A pickle that would write a file if it were ever unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _checkpoint(path: Path, *overrides: str) -> None:
    config = cfg.load(TrainConfig, TINY, ["data.uri=unused", *overrides])
    torch.manual_seed(0)
    save_checkpoint(path / "checkpoint.pt", model=build_network(config, 1, 8), step=0, config=cfg.to_dict(config))


def _bad_arrays(w: Path) -> None:
    import numpy as np

    x = np.zeros((20, 3), np.float32)
    x[17, 1] = np.nan
    np.save(w / "nan.npy", x)
    np.save(w / "rank3.npy", np.zeros((4, 2, 3), np.float32))
    np.save(w / "ints.npy", np.zeros((4, 3), np.int64))
    np.save(w / "vec.npy", np.arange(60, dtype=np.float64).reshape(20, 3))
    np.save(w / "labels19.npy", np.zeros(19, np.int64))
    np.savez(w / "two.npz", a=np.zeros((4, 3)), b=np.zeros((4, 3)))
    huge = np.zeros(20, np.int64)
    huge[3] = 2**40  # the classes would be 0..2**40, one name each: 23 GB before the fix
    np.save(w / "huge_labels.npy", huge)
    (w / "garbage.npy").write_bytes(b"not numpy at all " * 8)  # numpy's answer: "load it with allow_pickle"
    np.save(w / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of good data and models, and of bad files beside them."""
    w = tmp_path_factory.mktemp("matrix")
    prepare_quick("digits", w / "data", samples_per_shard=600)
    prepare_quick("toy2d", w / "toy", name="gmm", num_train=30, num_test=10)
    prepare_quick("mnist5k", w / "mnist")
    _checkpoint(w / "cdm")
    _checkpoint(w / "ddm", "model.kind=ddm", "checkpoint.score=val/mse")
    _checkpoint(w / "cond", "model.conditional=true", "data.num_labels=10")  # for `cdm classify`
    prepare_quick("toy2d", w / "board", name="checkerboard", num_train=10, num_test=5)  # no labels
    _bad_arrays(w)  # for `cdm prepare arrays`
    good = (w / "cdm" / "checkpoint.pt").read_bytes()
    (w / "truncated").mkdir()
    (w / "truncated" / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    (w / "evil").mkdir()
    torch.save({"format": "cdm-checkpoint", "payload": _RunsCode()}, w / "evil" / "checkpoint.pt")
    (w / "foreign").mkdir()
    torch.save(torch.nn.Linear(2, 2).state_dict(), w / "foreign" / "checkpoint.pt")
    (w / "pickled").mkdir()
    (w / "pickled" / "checkpoint.pt").write_bytes(pickle.dumps(_RunsCode()))
    for name, edit in (("flipped", "flip"), ("short", "truncate"), ("nomanifest", "manifest"), ("badjson", "json")):
        shutil.copytree(w / "data", w / name)
        shard = w / name / "train-000000.tar"
        if edit == "flip":
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        elif edit == "truncate":
            shard.write_bytes(shard.read_bytes()[:1000])
        elif edit == "manifest":
            (w / name / "manifest.parquet").unlink()
        else:
            (w / name / "dataset.json").write_text("{not json")
    # dataset.json files whose shard names lead out of the dataset's folder (issue 29): `escape` names a real,
    # intact shard of `data`, so only the containment check can refuse it.
    for name, shard in (
        ("escape", "../data/test-000000.tar"),
        ("passwd", "../../../../../../../../etc/passwd"),
        ("absolute", str(w / "data" / "train-000000.tar")),
    ):
        shutil.copytree(w / "data", w / name)
        meta = json.loads((w / name / "dataset.json").read_text())
        meta["splits"]["test" if name != "absolute" else "train"]["shards"][0]["name"] = shard
        (w / name / "dataset.json").write_text(json.dumps(meta))
    (w / "emptyfolder").mkdir()
    (w / "loop").symlink_to("loop")  # a symbolic link that leads to itself
    (w / "notes").mkdir()
    (w / "notes" / "mine.txt").write_text("my own notes")
    (w / "afile").write_text("a file where a folder must be")
    write_image_folder(w / "imgs", {"a": 2}, size=(4, 4))
    (w / "bad.toml").write_text("[optim\nlr = 1")
    (w / "a.toml").write_text('extends = "b.toml"\n')
    (w / "b.toml").write_text('extends = "a.toml"\n')
    (w / "latin1.toml").write_bytes('[data]\nuri = "caf\xe9"\n'.encode("latin-1"))
    (w / "odd.yaml").write_text("?\n")  # found by tests/test_fuzz.py: a key that is not text
    (w / "typo.toml").write_text('[data]\nuri = "data"\n[optim]\nlrr = 1e-4\n')
    (w / "space.toml").write_text('[space]\n"optim.lrr" = { choice = [1e-4] }\n')
    (w / "space_ok.toml").write_text('[space]\n"optim.lr" = { choice = [1e-4, 2e-4] }\n')
    (w / "prepare.toml").write_text('[prepare]\nsource = "digits"\nsizee = 3\n')
    (w / "workflow.toml").write_text(
        '[train]\nextends = "' + TINY + '"\n[prepare]\nsource = "digits"\n[nll]\nspiltt = 1\n'
    )
    (w / "weights").mkdir()
    (w / "corrupt").mkdir()  # an MLflow store whose file is not SQLite's (a damaged disk, a copy cut short)
    (w / "corrupt" / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    (w / "locked").mkdir()  # a folder no one may write into, not even root (as CI runs)
    subprocess.run(["chattr", "+i", str(w / "locked")], check=True)
    assert not os.access(w / "locked", os.W_OK) or _cannot_create(w / "locked"), "chattr +i did not lock the folder"
    yield w
    subprocess.run(["chattr", "-i", str(w / "locked")], check=True)


def _cannot_create(folder: Path) -> bool:
    try:
        (folder / "probe").touch()
    except PermissionError:
        return True
    return False


def _hashes(w: Path) -> dict[str, str]:
    kept = ("data", "toy", "mnist", "cdm", "ddm", "cond", "board", "notes", "afile", "imgs", "corrupt")
    out = {}
    for name in kept:
        for path in sorted((w / name).rglob("*")) if (w / name).is_dir() else [w / name]:
            if path.is_file():
                out[str(path.relative_to(w))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


_OUTSIDE = r".* is not a file name inside the dataset's folder.*--force"

CASES = [
    # prepare
    ("prepare-unknown-source", "prepare nosuch --out o1 --no-track", r"unknown source 'nosuch'"),
    ("prepare-cifar-without-path", "prepare cifar10 --out o2 --no-track", r"--path"),
    ("prepare-missing-path", "prepare cifar10 --path nowhere.tar.gz --out o3 --no-track", r"nowhere\.tar\.gz"),
    ("prepare-out-is-a-file", "prepare digits --out afile --no-track", r"afile: is a file"),
    ("prepare-out-under-a-file", "prepare digits --out afile/x --no-track", r"afile/x: cannot write there"),
    ("prepare-out-read-only", "prepare digits --out locked/x --no-track", r"locked/x: cannot write there"),
    (
        "prepare-replaces-another-dataset",
        "prepare digits --size 28 --out mnist --no-track",
        r"mnist: holds a dataset prepared from 'mnist5k'.*--force",
    ),
    (
        "prepare-damaged-dataset-json",
        "prepare digits --out badjson --no-track",
        r"badjson.*damaged; rewrite it with --force",
    ),
    (
        "prepare-into-a-folder-of-my-own",
        "prepare digits --out notes --no-track",
        r"notes: not empty and not a prepared dataset",
    ),
    ("prepare-empty-image-folder", "prepare imagefolder --path emptyfolder --out o4 --no-track", r"emptyfolder"),
    ("prepare-bad-fraction", "prepare digits --test-fraction 1.5 --out o5 --no-track", r"--test-fraction 1.5"),
    ("prepare-arrays-nan", "prepare arrays --path nan.npy --out oa1 --no-track", r"nan\.npy: sample 17 holds NaN"),
    (
        "prepare-arrays-rank",
        "prepare arrays --path rank3.npy --out oa2 --no-track",
        r"rank3\.npy: shape \(4, 2, 3\) has rank 3; .*\(N, D\) vectors or \(N, C, H, W\)",
    ),
    ("prepare-arrays-int", "prepare arrays --path ints.npy --out oa3 --no-track", r"ints\.npy: dtype int64; .*float"),
    (
        "prepare-arrays-label-count",
        "prepare arrays --path vec.npy --labels labels19.npy --out oa4 --no-track",
        r"labels19\.npy: 19 labels for the 20 samples of .*vec\.npy",
    ),
    (
        "prepare-arrays-npz-without-key",
        "prepare arrays --path two.npz --out oa5 --no-track",
        r"two\.npz: holds several arrays \(a, b\); choose the data with --key",
    ),
    (
        "train-image-preset-on-vectors",
        f"train {TINY} --set data.uri=toy",
        r"model\.preset: 'tiny' is a U-Net for images, .* holds vectors of dimension 2; set model\.preset=mlp",
    ),
    (
        "train-dequantize-continuous-data",
        f"train {TINY} --set data.uri=toy --set model.preset=mlp --set model.base_channels=none "
        "--set data.dequantize=true",
        r"data\.dequantize: true dequantizes 8-bit images, and \S*toy holds continuous data; set data\.dequantize=false",
    ),
    (
        "prepare-config-unknown-option",
        "prepare --config prepare.toml --out o6 --no-track",
        r"unknown prepare option\(s\) \['sizee'\]",
    ),
    ("prepare-config-not-toml", "prepare --config bad.toml --out o7 --no-track", r"bad\.toml: not valid TOML"),
    ("prepare-wrong-image-size-option", "prepare imagefolder --path imgs --size 0 --out o8 --no-track", r"--size"),
    # one value that would exhaust memory, a path that cannot be followed or encoded (issue 29)
    (
        "prepare-arrays-huge-label",
        "prepare arrays --path vec.npy --labels huge_labels.npy --out oa6 --no-track",
        r"--labels \S*huge_labels\.npy: label 1099511627776 at index 3 makes 1,099,511,627,777 classes, over the "
        r"100,000",
    ),
    (
        "prepare-toy-billion-points",
        "prepare toy2d --name gmm8 --num-train 1000000000 --out o11 --no-track",
        r"--num-train 1000000000: toy2d draws its points in memory, at most 10,000,000",
    ),
    ("prepare-huge-size", "prepare digits --size 100000 --out o10 --no-track", r"--size 100000: must be between 1 and"),
    (
        "prepare-arrays-garbage-npy",
        "prepare arrays --path garbage.npy --out oa7 --no-track",
        r"garbage\.npy: not a \.npy file \(it does not start as numpy\.save writes one\)",
    ),
    (
        "prepare-arrays-object-npy",
        "prepare arrays --path objects.npy --out oa8 --no-track",
        r"objects\.npy: holds Python objects \(an object array\), which cdm does not load",
    ),
    ("prepare-out-symlink-loop", "prepare digits --out loop --no-track", r"loop: cannot follow this path .*loop"),
    (
        "prepare-path-symlink-loop",
        "prepare imagefolder --path loop --out x --no-track",
        r"loop: cannot follow this path",
    ),
    (
        "prepare-out-not-utf8",
        "prepare digits --out caf\udce9 --no-track",
        r"caf\\xe9: the path holds bytes that are not",
    ),
    # verify
    ("verify-flipped-byte", "verify flipped", r"SHA-256"),
    ("verify-truncated-shard", "verify short", r"truncated|bytes"),
    ("verify-missing-manifest", "verify nomanifest", r"manifest\.parquet: missing"),
    ("verify-not-a-dataset", "verify emptyfolder", r"not a prepared dataset"),
    ("verify-damaged-json", "verify badjson", r"dataset\.json: not valid JSON.*--force"),
    ("verify-symlink-loop", "verify loop", r"loop: cannot follow this path .*a symbolic link"),
    ("verify-not-utf8", "verify caf\udce9", r"caf\\xe9: the path holds bytes that are not UTF-8"),
    ("verify-shard-outside-dataset", "verify escape", rf"escape/dataset\.json: shard name '\.\./data/{_OUTSIDE}"),
    (
        "verify-shard-is-etc-passwd",
        "verify passwd",
        rf"passwd/dataset\.json: shard name '(\.\./)+etc/passwd'{_OUTSIDE}",
    ),
    # train
    ("train-bad-toml", "train bad.toml", r"bad\.toml: not valid TOML"),
    ("train-extends-loop", "train a.toml", r"`extends` goes round in a loop"),
    ("train-not-utf8", "train latin1.toml", r"not a text file in UTF-8"),
    ("train-yaml-key-not-text", "train odd.yaml", r"a setting's name must be text"),
    ("train-unknown-setting", "train typo.toml", r"optim\.lrr: unknown setting \(did you mean 'lr'\?\)"),
    (
        "train-infinite-lr",
        f"train {TINY} --set data.uri=data --set optim.lr=inf",
        r"optim\.lr: inf is not a finite number",
    ),
    ("train-zero-steps", f"train {TINY} --set data.uri=data --set train.steps=0", r"train\.steps: 0 must be >= 1"),
    ("train-config-is-a-folder", f"train {ROOT / 'configs'}", r"is a folder; give a config file"),
    ("train-set-without-equals", f"train {TINY} --set optim.lr", r"expected KEY=VALUE"),
    (
        "train-unwritable-storage",
        f"train {TINY} --set data.uri=data --set run.storage_path=afile/runs",
        r"afile/runs: cannot write there.*run\.storage_path",
    ),
    (
        "train-read-only-storage",
        f"train {TINY} --set data.uri=data --set run.storage_path=locked/runs",
        r"locked/runs: cannot write there.*run\.storage_path",
    ),
    ("train-resume-nothing", "train --resume emptyfolder", r"not a run folder with cdm_run\.json"),
    (
        "train-from-checkpoint-alone",
        f"train {TINY} --from-checkpoint checkpoint_00000002",
        r"--from-checkpoint needs --resume",
    ),
    (
        "train-absolute-shard",
        f"train {TINY} --set data.uri=absolute",
        rf"shard name '/\S+/train-000000\.tar'{_OUTSIDE}",
    ),
    ("train-missing-dataset", f"train {TINY} --set data.uri=nodata", r"nodata: no such directory"),
    (
        "train-fractional-gpus",
        f"train {TINY} --set data.uri=data --set scaling.use_gpu=true --set scaling.num_workers=2 "
        "--set scaling.gpus_per_worker=0.5 --set train.batch_size=8",
        r"NCCL refuses two ranks on one device",
    ),
    # nll, ood
    ("nll-truncated-checkpoint", "nll truncated data --no-track", r"truncated or damaged"),
    ("nll-code-in-a-checkpoint", "nll evil data --no-track", r"refused without running them"),
    ("nll-bare-pickle", "nll pickled data --no-track", r"cannot load checkpoint"),
    ("nll-foreign-torch-file", "nll foreign data --no-track", r"not a cdm checkpoint"),
    ("nll-no-checkpoint", "nll emptyfolder data --no-track", r"no checkpoint at emptyfolder"),
    ("nll-ddm-one-pass", "nll ddm data --method one-pass --no-track", r"needs a CDM.*use --method ode"),
    ("nll-unknown-method", "nll cdm data --method exactly --no-track", r"--method 'exactly' is not one of"),
    ("nll-wrong-shape", "nll cdm toy --no-track", r"the model takes \(1, 8, 8\)"),
    (
        "nll-dataset-json-as-checkpoint",
        "nll data/dataset.json data --no-track",
        r"data/dataset\.json is not a checkpoint but JSON text: give the checkpoint\.pt",
    ),
    ("nll-shard-outside-dataset", "nll cdm escape --no-track", rf"escape/dataset\.json: shard name{_OUTSIDE}"),
    ("nll-unknown-split", "nll cdm data --split valid --no-track", r"no split 'valid'"),
    ("nll-unwritable-out", "nll cdm data --out afile/scores --no-track", r"afile/scores: cannot write there"),
    ("nll-read-only-out", "nll cdm data --out locked/scores --no-track", r"locked/scores: cannot write there"),
    ("nll-bad-convention", "nll cdm data --bpd-convention metric --no-track", r"--bpd-convention 'metric'"),
    ("ood-shape-mismatch", "ood cdm data toy --no-track", r"one shape"),
    # classify
    ("classify-unconditional", "classify cdm data --no-track", r"unconditional CDM; .*needs a class-cond"),
    ("classify-ddm", "classify ddm data --no-track", r"'ddm' model; .*needs a class-cond"),
    ("classify-unlabeled-dataset", "classify cond board --no-track", r"board: the dataset has no labels"),
    ("classify-other-classes", "classify cond toy --no-track", r"the model has 10 classes, \S*toy has 3"),
    # sample
    ("sample-unknown-sampler", "sample cdm --out s1 --sampler heun --no-track", r"--sampler 'heun'"),
    ("sample-too-many-steps", "sample cdm --out s2 --steps 500 --no-track", r"between 1 and the model's T=20"),
    ("sample-no-samples", "sample cdm --out s3 --n 0 --no-track", r"--n 0"),
    ("sample-guidance-unconditional", "sample cdm --out s4 --steps 5 --cfg 1 --no-track", r"needs a class-conditional"),
    ("sample-label-unconditional", "sample cdm --out s5 --steps 5 --label 3 --no-track", r"unconditional"),
    ("sample-over-a-dataset", "sample cdm --out data --steps 5 --no-track", r"holds a prepared dataset"),
    ("sample-unwritable-out", "sample cdm --out afile/s --steps 5 --no-track", r"afile/s: cannot write there"),
    ("sample-read-only-out", "sample cdm --out locked/s --steps 5 --no-track", r"locked/s: cannot write there"),
    # fid
    ("fid-missing-inception-weights", "fid data data --no-track", r"Inception-v3 FID weights not found"),
    ("fid-unknown-features", "fid data data --features vgg --no-track", r"--features 'vgg'"),
    ("fid-missing-classifier", "fid data data --features classifier:nothere.pt --no-track", r"nothere\.pt"),
    (
        "fid-shape-mismatch",
        "fid data toy --features raw --samples-split test --no-track",
        r"compare samples of the reference's shape",
    ),
    # tune, run
    ("tune-unknown-setting", f"tune {TINY} --space space.toml --set data.uri=data", r"optim\.lrr: unknown setting"),
    (
        "tune-unknown-scheduler",
        f"tune {TINY} --space space_ok.toml --scheduler hyperband --set data.uri=data",
        r"hyperband",
    ),
    ("run-unknown-setting", "run workflow.toml --dry-run", r"nll\.spiltt: unknown setting"),
    ("run-a-training-config", f"run {TINY} --dry-run", r"unknown setting"),
    # the same mistakes with tracking on: each is found before the stage opens its MLflow run
    ("prepare-bad-fraction-tracked", "prepare digits --test-fraction 1.5 --out o9", r"--test-fraction 1.5"),
    ("nll-unknown-split-tracked", "nll cdm data --split valid", r"no split 'valid'"),
    ("ood-unknown-split-tracked", "ood cdm data data --out-split valid", r"no split 'valid'"),
    ("classify-other-classes-tracked", "classify cond toy", r"the model has 10 classes, \S*toy has 3"),
    ("sample-too-many-steps-tracked", "sample cdm --out s6 --steps 500", r"between 1 and the model's T=20"),
    ("fid-unknown-features-tracked", "fid data data --features vgg", r"--features 'vgg'"),
    ("train-features-on-vectors-tracked", "train-features toy --out f1", r"toy: holds vectors"),
    ("run-s3-workdir", f"run {DEMO} --dry-run --workdir s3://bucket/x", r"--workdir s3://bucket/x: must be a folder"),
    ("run-no-samples", f"run {DEMO} --dry-run --set sample.n=0", r"sample\.n: 0 must be >= 1"),
    (
        "run-name-leaves-workdir",
        f"run {DEMO} --dry-run --set name=../../../x",
        r"name: '\.\./\.\./\.\./x': a workflow's",
    ),
    ("run-rerun-no-such-stage", f"run {DEMO} --rerun trian", r"--rerun trian: workflow demo has no such stage; its"),
    # clusters and the UI
    ("jobs-unreachable", "jobs list --address http://127.0.0.1:9", r"127\.0\.0\.1:9"),
    ("ui-missing-workdir", "ui --workdir nowhere/at/all", r"nowhere/at/all: no such directory"),
    # an unreachable Ray or MLflow server: one line in seconds, not minutes of silence (issue 29, case 5); the
    # tracked ones also leave no run behind (test_no_mistake_leaves_an_mlflow_run_behind)
    (
        "nll-ray-address-refused",
        "RAY_ADDRESS=127.0.0.1:1 nll cdm data",
        r"RAY_ADDRESS=127\.0\.0\.1:1: no Ray cluster answers there \(Connection refused\).*unset RAY_ADDRESS",
    ),
    (
        "nll-ray-address-silent",
        "RAY_ADDRESS=127.0.0.1:{full} nll cdm data",
        r"RAY_ADDRESS=127\.0\.0\.1:\d+: no Ray cluster answers there \(no answer in 1 s\)",
    ),
    (
        "sample-address-refused",
        "sample cdm --out s7 --steps 5 --address 127.0.0.1:1 --no-track",
        r"--address=127\.0\.0\.1:1: no Ray cluster answers there",
    ),
    (
        "train-ray-address-refused",
        f"train {TINY} --set data.uri=data --set run.ray_address=ray://127.0.0.1:1",
        r"run\.ray_address=ray://127\.0\.0\.1:1: no Ray cluster answers there",
    ),
    (
        "nll-tracking-server-refused",
        "nll cdm data --tracking-uri http://127.0.0.1:1",
        r"tracking URI http://127\.0\.0\.1:1: no MLflow server answers there \(Connection refused\)",
    ),
    (
        "prepare-tracking-server-silent",
        "prepare digits --out o12 --tracking-uri http://127.0.0.1:{silent}",
        r"tracking URI http://127\.0\.0\.1:\d+: no MLflow server answers there \(no answer in 1 s\)",
    ),
    (
        "tune-ray-address-refused",
        f"RAY_ADDRESS=127.0.0.1:1 tune {TINY} --space space_ok.toml --set data.uri=data",
        r"RAY_ADDRESS=127\.0\.0\.1:1: no Ray cluster answers there",
    ),
    (
        "run-ray-address-refused",
        f"RAY_ADDRESS=127.0.0.1:1 run {DEMO} --workdir wf1",
        r"RAY_ADDRESS=127\.0\.0\.1:1: no Ray cluster answers there",
    ),
    (
        "run-tracking-server-refused",
        f"run {DEMO} --workdir wf2 --tracking-uri http://127.0.0.1:1",
        r"tracking URI http://127\.0\.0\.1:1: no MLflow server answers there",
    ),
    # the tracking store itself (issue 29, case 6)
    (
        "nll-unknown-store-scheme",
        "nll cdm data --tracking-uri bogus://x",
        r"tracking URI 'bogus://x': MLflow has no store of the kind 'bogus'",
    ),
    (
        "nll-damaged-store",
        "nll cdm data --tracking-uri sqlite:///corrupt/mlflow.db",
        r"corrupt/mlflow\.db: the MLflow store is damaged \(file is not a database\); move that file aside",
    ),
    ("ui-damaged-store", "ui --workdir corrupt", r"corrupt/mlflow\.db: the MLflow store is damaged"),
    (
        "train-empty-experiment",
        f"train {TINY} --set data.uri=data --set tracking.experiment=",
        r"tracking\.experiment: empty; name the MLflow experiment",
    ),
    # a usage error of a command whose library output goes to the log reaches the console
    ("train-unknown-option", f"train {TINY} --no-track", r"No such option: --no-track \(see `cdm train --help`\)"),
]


def _env(world: Path, argv: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{world / 'mlflow.db'}",
        "CDM_WEIGHTS_DIR": str(world / "weights"),
        "CDM_CONNECT_TIMEOUT_S": "1",  # a server that does not answer is given 1 s, not the 10 s a user gets
    }
    env.pop("RAY_ADDRESS", None)
    if argv.startswith("ui "):  # the UI serves the store the environment names, if it names one
        env.pop("MLFLOW_TRACKING_URI")
    env.update(_split(argv)[0])
    return env


def _split(argv: str) -> tuple[dict[str, str], list[str]]:
    """A case's leading `NAME=value` words (its environment) and its arguments."""
    words = argv.split()
    lead = 0
    while lead < len(words) and re.fullmatch(r"[A-Z_]+=\S*", words[lead]):
        lead += 1
    return dict(w.split("=", 1) for w in words[:lead]), words[lead:]


@pytest.fixture(scope="module")
def silent_servers():
    """Two ports where nothing answers, so that only a client's own timeout ends the wait: `silent`'s listener
    takes connections and never answers (a hung server: the kernel completes the handshake from the backlog);
    `full`'s backlog is full, so the kernel drops new connections unanswered (as a firewall that drops them)."""
    import socket

    silent, full = socket.socket(), socket.socket()
    for listener, backlog in ((silent, 8), (full, 0)):
        listener.bind(("127.0.0.1", 0))
        listener.listen(backlog)
    queued = []
    for _ in range(4):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(full.getsockname())
        queued.append(client)
    yield {"silent": silent.getsockname()[1], "full": full.getsockname()[1]}
    for sock in (silent, full, *queued):
        sock.close()


@pytest.fixture(scope="module")
def outcomes(world, cdm_forks, silent_servers) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """Each case's process and the files it changed (hashed after every case). The cases run in
    processes forked from one that has imported what `cdm` imports (tests/cdm_forks.py): a case is
    then 0.2–0.5 s instead of the 5–8 s a fresh interpreter spends importing torch, Ray and MLflow."""
    out = {}
    before = _hashes(world)
    for name, argv, _ in CASES:
        argv = argv.format(**silent_servers) if "{" in argv else argv
        result = cdm_forks.run(_split(argv)[1], cwd=world, env=_env(world, argv))
        after = _hashes(world)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if (world / PWNED).exists():
            changed.append(PWNED)
        out[name] = (result, changed)
        before = after
    return out


def test_the_installed_command_prints_what_its_forked_runs_print(world, outcomes):
    """The forks run what the console script runs: the same cases through the installed `cdm` agree."""
    argvs = {name: argv for name, argv, _ in CASES}
    for name in ("prepare-unknown-source", "train-unknown-setting", "nll-truncated-checkpoint", "ui-missing-workdir"):
        argv = argvs[name]
        real = subprocess.run([CDM, *argv.split()], cwd=world, env=_env(world, argv), capture_output=True, text=True)
        forked = outcomes[name][0]
        assert (real.returncode, real.stdout, real.stderr) == (forked.returncode, forked.stdout, forked.stderr), name


def test_no_mistake_leaves_an_mlflow_run_behind(world, outcomes, cdm_forks):
    """Every stage checks its inputs before it opens its MLflow run, so the tracked cases above leave no run (not
    even a FAILED one) in the store they name; a good tracked command beside them leaves exactly its own."""
    from mlflow.tracking import MlflowClient

    assert outcomes  # every case has run, tracking to world/mlflow.db where it tracks
    argv = "prepare digits --out good-tracked"
    done = cdm_forks.run(argv.split(), cwd=world, env=_env(world, argv))
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{world / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [(r.data.tags["cdm.stage"], r.info.status) for r in runs] == [("prepare", "FINISHED")]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(outcomes, name, argv, message):
    result, changed = outcomes[name]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr
    assert re.search(message, result.stderr, re.S), (message, result.stderr)
    assert not changed, f"{name} or the case run beside it changed files that were there before: {changed}"
