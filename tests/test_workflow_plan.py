"""The workflow's config and plan, without running anything: loading, errors, and which settings move which keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.common.config import ConfigError
from pipelines.common.errors import UserError
from pipelines.workflow.config import load
from pipelines.workflow.runner import prepare_plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def keys(config: Path, *overrides: str, workdir: Path, **kw) -> dict[str, str]:
    plan, _ = prepare_plan(config, list(overrides), workdir=workdir, **kw)
    return {s.name: s.key for s in plan.stages}


def test_the_demo_plan_has_every_stage_in_order_with_absolute_outputs(tmp_path):
    plan, uri = prepare_plan(CONFIGS / "demo.toml", workdir=tmp_path)
    assert [s.name for s in plan.stages] == ["prepare", "nll_untrained", "train", "sample", "nll", "features", "fid"]
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    for stage in plan.stages:
        assert stage.output == str(tmp_path.resolve() / "outputs" / "stages" / f"{stage.name}-{stage.key}")
    assert plan.dataset_uri == plan.stage("prepare").output
    # The same config plans the same keys, wherever it is planned from.
    assert keys(CONFIGS / "demo.toml", workdir=tmp_path / "elsewhere") == {s.name: s.key for s in plan.stages}


@pytest.mark.parametrize(
    "override, changed",
    [
        ("train.optim.lr=1e-3", {"train", "sample", "nll", "fid"}),
        ("train.model.base_channels=8", {"nll_untrained", "train", "sample", "nll", "fid"}),
        ("sample.steps=10", {"sample", "fid"}),
        ("nll.dequantize=true", {"nll_untrained", "nll"}),
        ("prepare.seed=1", {"prepare", "nll_untrained", "train", "sample", "nll", "features", "fid"}),
        ("features.epochs=4", {"features", "fid"}),
        ("fid.reference_split=test", {"fid"}),
        # Settings that cannot change a result leave every key alone.
        ("sample.workers=1", set()),
        ("nll.batch_size=100", set()),
        ("train.scaling.num_workers=2", set()),
        ("train.train.log_every=5", set()),
        ("train.checkpoint.every=100", set()),
        ("tracking.experiment=other", set()),
    ],
)
def test_a_setting_changes_the_keys_of_its_stage_and_of_everything_downstream(tmp_path, override, changed):
    before = keys(CONFIGS / "demo.toml", workdir=tmp_path)
    after = keys(CONFIGS / "demo.toml", override, workdir=tmp_path)
    assert {name for name in before if before[name] != after[name]} == changed


def test_train_extends_a_training_config_and_the_workflow_states_only_what_differs(tmp_path):
    config, _ = load(CONFIGS / "run" / "mnist.toml")
    from pipelines.common import config as cfg
    from pipelines.train.config import TrainConfig

    standalone = cfg.load(TrainConfig, CONFIGS / "mnist.toml")
    ours, theirs = cfg.to_dict(config.train), cfg.to_dict(standalone)
    ours["data"].pop("uri"), theirs["data"].pop("uri")  # the prepare stage's output replaces data/mnist5k
    assert ours == theirs
    # The paper's variants: the workflow file extends the CIFAR-10 workflow and swaps the training config.
    ot, _ = load(CONFIGS / "run" / "cifar10_ot.toml", ["prepare.path=x"])
    assert ot.train.schedule.name == "ot" and ot.name == "cifar10_ot" and ot.sample.n == 50000
    cond, _ = load(CONFIGS / "run" / "cifar10_cond.toml", ["prepare.path=x"])
    assert cond.train.model.conditional and cond.train.optim.lr == 2e-4


def test_every_shipped_workflow_plans(tmp_path):
    data = tmp_path / "cifar-10-python.tar.gz"
    data.write_bytes(b"not really")
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("mnist", "mnist_tune", "cifar10", "cifar10_uniform", "cifar10_ot", "cifar10_cond", "celeba64"):
        path = faces if name == "celeba64" else data
        plan, _ = prepare_plan(
            CONFIGS / "run" / f"{name}.toml",
            [f"prepare.path={path}"] if "cifar" in name or name == "celeba64" else [],
            workdir=tmp_path,
            strict=False,
        )
        assert plan.name == name and plan.has("train") and plan.has("nll")


def test_a_workflow_on_an_already_prepared_dataset_has_no_prepare_stage(tmp_path, digits_dataset):
    config = tmp_path / "wf.toml"
    config.write_text(
        f'[train]\nextends = "{CONFIGS / "train_tiny.toml"}"\n[train.data]\nuri = "{digits_dataset}"\n'
        "[fid]\nenabled = false\n[sample]\nenabled = false\n"
    )
    plan, _ = prepare_plan(config, workdir=tmp_path)
    assert [s.name for s in plan.stages] == ["nll_untrained", "train", "nll"]
    assert plan.dataset_uri == str(Path(digits_dataset).resolve())
    assert plan.name == "wf"


def test_mistakes_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.optim\.lrr: unknown setting \(did you mean 'lr'\?\)"):
        load(CONFIGS / "demo.toml", ["train.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"sample\.steps: 'many' is not an integer"):
        load(CONFIGS / "demo.toml", ["sample.steps=many"])
    with pytest.raises(ConfigError, match=r"train\.data\.uri is set, and so is prepare\.source"):
        load(CONFIGS / "demo.toml", ["train.data.uri=data/x"])
    with pytest.raises(ConfigError, match=r"train\.extends: .*nope\.toml does not exist"):
        load(CONFIGS / "demo.toml", ["train.extends=nope.toml"])
    with pytest.raises(ConfigError, match=r"fid\.enabled"):
        load(CONFIGS / "demo.toml", ["sample.enabled=false"])
    with pytest.raises(UserError, match=r"prepare\.path: the cifar10 source"):
        prepare_plan(CONFIGS / "run" / "cifar10.toml", workdir=tmp_path)
    with pytest.raises(UserError, match=r"prepare\.path: .* does not exist"):
        prepare_plan(CONFIGS / "run" / "cifar10.toml", ["prepare.path=/no/such/file"], workdir=tmp_path)
    with pytest.raises(UserError, match=r"train\.data\.uri: .*Prepare it first"):
        prepare_plan(
            CONFIGS / "demo.toml", ["prepare.source=none", f"train.data.uri={tmp_path / 'missing'}"], workdir=tmp_path
        )
    with pytest.raises(UserError, match=r"--workdir"):
        prepare_plan(CONFIGS / "demo.toml", workdir="s3://bucket/cdm")
