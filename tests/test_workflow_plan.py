"""The workflow's config and plan, without running anything: loading, errors, and which settings move which keys."""

from __future__ import annotations

import json
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


# The paper's evaluation protocol (Sec. 4, Tables 2 and 3), as each paper workflow plans it.
PAPER_PROTOCOLS = {
    "cifar10": {"ddpm1000": ("ddpm", 1000, 0.0), "ddim50": ("ddim", 50, 0.0), "dpms25": ("dpmsolver2m", 25, 0.0)},
    "celeba64": {"ddpm1000": ("ddpm", 1000, 0.0), "ddim50": ("ddim", 50, 0.0), "dpms25": ("dpmsolver2m", 25, 0.0)},
    "cifar10_uniform": {"ddim50": ("ddim", 50, 0.0)},
    "cifar10_ot": {"euler1000": ("euler", 1000, 0.0)},
    "cifar10_cond": {f"ddim50_w{str(w).replace('.', '_')}": ("ddim", 50, w) for w in (0.25, 0.5, 0.75, 1)},
}


@pytest.mark.parametrize("name", sorted(PAPER_PROTOCOLS))
def test_the_paper_workflows_sample_and_score_as_the_paper(tmp_path, name):
    path = tmp_path / "faces" if name == "celeba64" else tmp_path / "cifar-10-python.tar.gz"
    path.mkdir() if name == "celeba64" else path.write_bytes(b"not really")
    plan, _ = prepare_plan(CONFIGS / "run" / f"{name}.toml", [f"prepare.path={path}"], workdir=tmp_path, strict=False)
    expected = PAPER_PROTOCOLS[name]
    samples = {s.protocol: s for s in plan.stages if s.kind == "sample"}
    assert sorted(samples) == sorted(expected)
    for protocol, (sampler, steps, w) in expected.items():
        settings = samples[protocol].settings
        assert (settings["sampler"], settings["steps"], settings["cfg"]) == (sampler, steps, w), protocol
        # 50,000 samples on the official code's time grid, x̂0 not clipped (as the official samplers)
        assert (settings["n"], settings["time_grid"], settings["clip_x0"]) == (50000, "official", 0.0), protocol
        fid = plan.stage(f"fid-{protocol}")
        assert fid.needs[-1] == f"sample-{protocol}" and fid.inputs["sample"] == samples[protocol].key
        assert fid.settings["features"] == "inception" and fid.settings["reference_split"] == "train"
    assert plan.stage("nll").settings["split"] == "test" and not plan.has("sample") and not plan.has("fid")


def test_the_dry_run_of_the_paper_s_cifar10_workflow_lists_its_stages(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "cifar-10-python.tar.gz"
    data.write_bytes(b"not really")
    out = subprocess.run(
        [str(Path(sys.executable).with_name("cdm")), "run", str(CONFIGS / "run" / "cifar10.toml"), "--dry-run"]
        + ["--set", f"prepare.path={data}", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    listed = [line.split()[1] for line in out.stdout.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
    assert listed == ["prepare", "nll_untrained", "train"] + [
        f"{kind}-{p}" for p in ("ddpm1000", "ddim50", "dpms25") for kind in ("sample",)
    ] + ["nll"] + [f"fid-{p}" for p in ("ddpm1000", "ddim50", "dpms25")], out.stdout
    assert "50000 samples, dpmsolver2m 25 steps" in out.stdout


def test_protocol_mistakes_name_the_setting():
    with pytest.raises(ConfigError, match=r"protocols\.ddim50\.stepz: unknown setting \(did you mean 'steps'\?\)"):
        load(CONFIGS / "demo.toml", ["protocols.ddim50.stepz=50"])
    with pytest.raises(ConfigError, match=r"protocols\.ddim50\.steps: 'many' is not an integer"):
        load(CONFIGS / "demo.toml", ["protocols.ddim50.steps=many"])
    with pytest.raises(ConfigError, match=r"protocols\.ddim50\.enabled: sample\.enabled switches every protocol"):
        load(CONFIGS / "demo.toml", ["protocols.ddim50.enabled=false"])


def test_protocols_keep_the_one_protocol_keys_and_move_only_their_own(tmp_path):
    before = keys(CONFIGS / "demo.toml", workdir=tmp_path)
    after = keys(CONFIGS / "demo.toml", "protocols.ddim20.steps=20", "protocols.ddim10.steps=10", workdir=tmp_path)
    same = ("prepare", "nll_untrained", "train", "nll", "features")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    assert "sample" not in after and "fid" not in after
    # The ddim20 protocol is the demo's own [sample] (it samples with 20 DDIM steps): same settings, another stage.
    assert after["sample-ddim20"] != after["sample-ddim10"]


def test_a_bad_sampler_stops_the_workflow_before_it_starts():
    with pytest.raises(ConfigError, match=r"sample\.sampler: 'dpm2' is no longer a sampler name .*dpmsolver2m"):
        load(CONFIGS / "demo.toml", ["sample.sampler=dpm2"])
    with pytest.raises(ConfigError, match=r"protocols\.x\.time_grid: 'uneven' is not one of even, official"):
        load(CONFIGS / "demo.toml", ["protocols.x.time_grid=uneven"])


def test_a_workflow_parent_nests_under_a_study_run_of_its_store(tmp_path):
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from pipelines.common.tracking import PatientClient, experiment_id
    from pipelines.workflow.parent_run import ParentRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = PatientClient(uri)
    study = client.create_run(experiment_id("cdm", uri), run_name="study").info.run_id
    other = client.create_run(experiment_id("elsewhere", uri), run_name="x").info.run_id

    parent = ParentRun(tmp_path, "wf", "key1", uri, "cdm", nest_under=study)
    run_id = parent.open({}, {"cdm.stage": "workflow"})
    assert client.get_run(run_id).data.tags[MLFLOW_PARENT_RUN_ID] == study
    again = ParentRun(tmp_path, "wf", "key1", uri, "cdm", nest_under=run_id)  # the same plan, another study
    assert again.open({}, {}) == run_id and client.get_run(run_id).data.tags[MLFLOW_PARENT_RUN_ID] == run_id

    for bad, says in (("0" * 32, "no run 0000"), (other, "run [0-9a-f]+ is in another experiment than 'cdm'")):
        with pytest.raises(UserError, match=f"tracking.parent_run_id: {says}"):
            ParentRun(tmp_path, "wf2", "key2", uri, "cdm", nest_under=bad).open({}, {})


# --------------------------------------------------------------------------- the code a stage ran on


def _sources_copy(root: Path) -> Path:
    """A copy of the packages' Python sources, for the fingerprints to read in place of the installed ones."""
    import shutil

    for package in ("pipelines", "cdm_core"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def _edit_per_sample(root: Path, *, code: bool) -> None:
    """Change `cdm_core.likelihood._per_sample`: its code (code=True), or only a comment, its docstring and layout."""
    path = root / "cdm_core" / "likelihood.py"
    text = path.read_text()
    old = (
        '    """(B,) values shaped (B, 1, …, 1) in like\'s dtype, to broadcast against it."""\n'
        "    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))\n"
    )
    assert old in text
    new = (
        "    return values.to(like.dtype).reshape(-1, *([1] * like.dim()))[..., 0]\n"
        if code
        else '    """Reshaped to broadcast."""\n'
        "    # a comment\n"
        "    return values.to(like.dtype).reshape(\n        -1, *([1] * (like.dim() - 1))\n    )\n"
    )
    path.write_text(text.replace(old, new))


def _fingerprints_read_an_edited_likelihood(tmp_path: Path, monkeypatch, *, code: bool) -> None:
    """From now on the fingerprints read a copy of the sources with `_per_sample` edited (see `_edit_per_sample`)."""
    from pipelines.workflow import fingerprints

    edited = _sources_copy(tmp_path / ("edited" if code else "cosmetic"))
    _edit_per_sample(edited, code=code)
    monkeypatch.setattr(fingerprints, "ROOT", edited)


def _all_done(plan) -> None:
    """Every stage of the plan done, its record written as the runner writes it (with the code it ran on)."""
    from pipelines.workflow.runner import write_record

    for stage in plan.stages:
        Path(stage.output).mkdir(parents=True, exist_ok=True)
        write_record(stage, {"outputs": {}, "metrics": {}}, seconds=1.0)


def _decisions(workdir: Path, *overrides: str, **kw) -> dict[str, tuple[str, str]]:
    from pipelines.workflow.runner import decide

    plan, _ = prepare_plan(CONFIGS / "demo.toml", list(overrides), workdir=workdir)
    return {name: (d.action, d.why) for name, d in decide(plan, **kw).items()}


def _acting(decisions: dict[str, tuple[str, str]], action: str) -> set[str]:
    return {name for name, (a, _) in decisions.items() if a == action}


def _stale(decisions: dict[str, tuple[str, str]]) -> set[str]:
    return {name for name, (_, why) in decisions.items() if why.startswith("stale")}


def test_a_changed_cdm_core_function_marks_exactly_the_stages_whose_code_imports_it(tmp_path, monkeypatch):
    from pipelines.workflow import fingerprints

    work = tmp_path / "work"
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=work)
    _all_done(plan)
    everything = {s.name for s in plan.stages}
    assert _decisions(work) == {name: ("skip", "done") for name in everything}

    # Only a comment, a docstring and the layout of a likelihood function: the same code, nothing stale.
    _fingerprints_read_an_edited_likelihood(tmp_path, monkeypatch, code=False)
    assert _decisions(work) == {name: ("skip", "done") for name in everything}

    # A Fréchet-distance function: only the fid stage computes with cdm_core.frechet; --rerun-stale takes it alone.
    frechet = _sources_copy(tmp_path / "frechet")
    path = frechet / "cdm_core" / "frechet.py"
    old = "    x = np.asarray(x, dtype=np.float64)\n"
    assert path.read_text().count(old) == 1
    path.write_text(path.read_text().replace(old, "    x = np.asarray(x, dtype=np.float32).astype(np.float64)\n"))
    monkeypatch.setattr(fingerprints, "ROOT", frechet)
    decisions = _decisions(work)
    assert _acting(decisions, "skip") == everything and _stale(decisions) == {"fid"}
    assert decisions["fid"][1] == "stale: ran on other code, cdm_core.frechet changed; --rerun-stale to re-run"
    decisions = _decisions(work, rerun_stale=True)
    assert _acting(decisions, "rerun") == {"fid"} and _acting(decisions, "skip") == everything - {"fid"}
    assert decisions["fid"][1] == "stale: ran on other code, cdm_core.frechet changed"

    # A likelihood function: the NLL stages and training (its validation reports the ELBO) compute with it.
    _fingerprints_read_an_edited_likelihood(tmp_path, monkeypatch, code=True)
    decisions = _decisions(work)
    assert _acting(decisions, "skip") == everything
    assert _stale(decisions) == {"nll_untrained", "train", "nll"}
    assert decisions["nll"][1] == "stale: ran on other code, cdm_core.likelihood changed; --rerun-stale to re-run"
    # --rerun-stale takes exactly them, and the stages that read the new training (their input changes).
    decisions = _decisions(work, rerun_stale=True)
    assert _acting(decisions, "rerun") == {"nll_untrained", "train", "nll", "sample", "fid"}
    assert {name: why for name, (action, why) in decisions.items() if action == "rerun"} == {
        "nll_untrained": "stale: ran on other code, cdm_core.likelihood changed",
        "train": "stale: ran on other code, cdm_core.likelihood changed",
        "nll": "stale: ran on other code, cdm_core.likelihood changed",
        "sample": "reads train, which re-runs",
        "fid": "reads sample, which re-runs",
    }
    assert _acting(decisions, "skip") == {"prepare", "features"}


def test_rerun_takes_a_stage_and_every_stage_that_reads_it(tmp_path):
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=tmp_path)
    _all_done(plan)
    decisions = _decisions(tmp_path, rerun=["train"])
    assert _acting(decisions, "rerun") == {"train", "sample", "nll", "fid"}
    assert decisions["train"][1] == "--rerun" and decisions["sample"][1] == "reads train, which re-runs"
    assert _acting(decisions, "skip") == {"prepare", "nll_untrained", "features"}
    assert _acting(_decisions(tmp_path, rerun=["features", "nll"]), "rerun") == {"features", "nll", "fid"}
    assert _acting(_decisions(tmp_path, rerun_stale=True), "rerun") == set()  # nothing is stale

    # A kind names every protocol's stage of it.
    protocols = ["protocols.ddim10.steps=10", "protocols.ddim20.steps=20"]
    plan, _ = prepare_plan(CONFIGS / "demo.toml", protocols, workdir=tmp_path)
    _all_done(plan)
    assert _acting(_decisions(tmp_path, *protocols, rerun=["sample"]), "rerun") == {
        "sample-ddim10",
        "sample-ddim20",
        "fid-ddim10",
        "fid-ddim20",
    }
    assert _acting(_decisions(tmp_path, *protocols, rerun=["fid-ddim10"]), "rerun") == {"fid-ddim10"}
    with pytest.raises(UserError, match=r"^--rerun sample-ddim50: workflow demo has no such stage; its stages: "):
        _decisions(tmp_path, *protocols, rerun=["sample-ddim50"])


def test_a_record_that_names_no_code_is_kept_and_not_called_stale(tmp_path):
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=tmp_path)
    _all_done(plan)
    train = plan.stage("train")
    record = json.loads(train.record_file.read_text())
    del record["code"]  # as cdm 0.1.0 wrote it
    train.record_file.write_text(json.dumps(record))
    for decisions in (_decisions(tmp_path), _decisions(tmp_path, rerun_stale=True)):
        assert _acting(decisions, "skip") == {s.name for s in plan.stages}
        assert decisions["train"][1] == "done, by a cdm that did not record its code; --rerun train to re-run"


def test_the_dry_run_shows_the_stages_that_ran_on_other_code_and_what_rerun_stale_runs(
    tmp_path, monkeypatch, cdm_forks
):
    """Records written by edited code; the real `cdm` (the installed code) finds exactly the stages using it stale."""

    _fingerprints_read_an_edited_likelihood(tmp_path, monkeypatch, code=True)
    work = tmp_path / "work"
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=work)
    _all_done(plan)

    def dry_run(*args: str) -> dict[str, str]:
        out = cdm_forks.run(["run", str(CONFIGS / "demo.toml"), "--dry-run", "--workdir", str(work), *args], tmp_path)
        assert out.returncode == 0, out.stderr
        lines = [line.split(maxsplit=4) for line in out.stdout.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
        assert [line[1] for line in lines] == [s.name for s in plan.stages], out.stdout
        return {line[1]: f"{line[3]} {line[4]}" for line in lines}, out.stdout

    shown, stdout = dry_run()
    for name, line in shown.items():
        if name in ("nll_untrained", "train", "nll"):
            assert line.startswith("skip") and line.endswith(
                "(stale: ran on other code, cdm_core.likelihood changed; --rerun-stale to re-run)"
            ), line
        else:
            assert line.startswith("skip") and line.endswith("(done)"), line
    assert "3 done stage(s) ran on other code and are kept" in stdout

    shown, _ = dry_run("--rerun-stale")
    assert {name for name, line in shown.items() if line.startswith("rerun")} == {
        "nll_untrained",
        "train",
        "sample",
        "nll",
        "fid",
    }
    assert {name for name, line in shown.items() if line.startswith("skip")} == {"prepare", "features"}

    out = cdm_forks.run(["run", str(CONFIGS / "demo.toml"), "--dry-run", "--rerun", "trian"], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: --rerun trian: workflow demo has no such stage; its stages: prepare, nll_untrained, train, sample, "
        "nll, features, fid"
    ]


def test_a_run_keeps_the_stale_stages_with_one_warning_each_and_runs_nothing(tmp_path, monkeypatch):
    """The runner follows the plan's decisions: every stage done, three of them on other code, nothing runs."""
    import ray

    from pipelines.workflow.runner import run_workflow

    _fingerprints_read_an_edited_likelihood(tmp_path, monkeypatch, code=True)
    work = tmp_path / "work"
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=work)
    _all_done(plan)
    monkeypatch.undo()

    lines: list[str] = []
    result = run_workflow(CONFIGS / "demo.toml", workdir=work, echo=lines.append)
    assert result.ran == [] and not ray.is_initialized()
    warnings = [line for line in lines if "warning" in line]
    assert warnings == [
        f"[{i}/7] {name} {plan.stage(name).key}: warning: ran on other code (cdm_core.likelihood changed), kept as "
        f"it is; --rerun {name} or --rerun-stale re-runs it"
        for i, name in ((2, "nll_untrained"), (3, "train"), (5, "nll"))
    ]


def test_a_runner_s_own_code_counts_for_its_kind_only(tmp_path, monkeypatch):
    from pipelines.workflow import fingerprints

    work = tmp_path / "work"
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=work)
    _all_done(plan)
    edited = _sources_copy(tmp_path / "edited")
    stages = edited / "pipelines" / "workflow" / "stages.py"
    old = '        "outputs": {"samples": result.uri, "grid": result.grid},\n'
    assert old in stages.read_text()
    stages.write_text(stages.read_text().replace(old, '        "outputs": {"samples": result.uri},\n'))
    monkeypatch.setattr(fingerprints, "ROOT", edited)
    decisions = _decisions(work)
    assert {name for name, (_, why) in decisions.items() if why != "done"} == {"sample"}
    assert "pipelines.workflow.stages:run_sample changed" in decisions["sample"][1]


def test_a_re_run_moves_the_earlier_outputs_aside_first_and_keeps_a_record_written_meanwhile(tmp_path):
    """What the runner does before the first stage runs (the stages themselves need Ray)."""
    from pipelines.common.tracking import PatientClient, experiment_id
    from pipelines.workflow.parent_run import STAGE_TAG, ParentRun
    from pipelines.workflow.runner import decide, done_record, set_aside_reruns, write_record

    plan, uri = prepare_plan(CONFIGS / "demo.toml", workdir=tmp_path)
    _all_done(plan)
    nll, sample, fid = plan.stage("nll"), plan.stage("sample"), plan.stage("fid")
    (Path(nll.output) / "scores.parquet").write_bytes(b"the first scores")
    parent = ParentRun(tmp_path, "demo", plan.key, uri, "cdm")
    parent.open({}, {})
    client = PatientClient(uri)
    child = client.create_run(experiment_id("cdm", uri), tags={"mlflow.parentRunId": parent.run_id}).info.run_id
    parent.tag_child(child, "nll", nll.key)

    decisions = decide(plan, ["nll", "sample"])
    assert _acting({n: (d.action, d.why) for n, d in decisions.items()}, "rerun") == {"nll", "sample", "fid"}
    # Another `cdm run` re-ran the sample stage after this one planned: its record is kept.
    newer = write_record(sample, {"outputs": {}, "metrics": {}}, seconds=2.0)
    lines: list[str] = []
    set_aside_reruns(plan, decisions, parent, lines.append)

    [kept_nll] = Path(nll.output).parent.glob(f"nll-{nll.key}.replaced-*[0-9]")
    [kept_fid] = Path(fid.output).parent.glob(f"fid-{fid.key}.replaced-*[0-9]")
    assert lines == [  # the last stage first
        f"[7/7] fid {fid.key}: re-runs (reads sample, which re-runs); the earlier output is kept in {kept_fid}",
        f"[5/7] nll {nll.key}: re-runs (--rerun); the earlier output is kept in {kept_nll}",
    ]
    assert (kept_nll / "scores.parquet").read_bytes() == b"the first scores"
    assert json.loads(Path(f"{kept_nll}.json").read_text())["key"] == nll.key
    for stage in (nll, fid):
        assert not Path(stage.output).exists() and not stage.record_file.exists() and stage.record() is None
    assert sample.record() == newer and not list(Path(sample.output).parent.glob("sample-*.replaced-*"))
    assert done_record(sample, "[4/7] sample", lines.append) == newer
    assert lines[-1] == "[4/7] sample: done earlier (2 s), skipped"
    assert parent.children_by_stage() == {"nll (replaced)": child}
    assert client.get_run(child).data.tags[STAGE_TAG] == "nll (replaced)"
    assert client.get_run(child).info.run_name == "nll (replaced)"


def test_a_training_resumed_on_other_code_says_so_and_is_stale_once_done(tmp_path, monkeypatch):
    from pipelines.train.run_dir import RUN_FILE
    from pipelines.workflow.runner import _note_start, write_record

    _fingerprints_read_an_edited_likelihood(tmp_path, monkeypatch, code=True)
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=tmp_path)
    for stage in plan.stages[:2]:  # prepare, nll_untrained
        Path(stage.output).mkdir(parents=True)
        write_record(stage, {"outputs": {}}, seconds=1.0)
    train = plan.stage("train")
    _note_start(train)  # as the runner does before a stage runs, here on the edited code; then the run is killed
    (Path(train.output) / "checkpoint_000003").mkdir(parents=True)
    (Path(train.output) / RUN_FILE).write_text("{}")
    monkeypatch.undo()

    decisions = _decisions(tmp_path)
    assert decisions["train"] == (
        "resume",
        "interrupted; continues from checkpoint_000003; it started on other code (cdm_core.likelihood changed), "
        "so it will show as stale",
    )
    plan, _ = prepare_plan(CONFIGS / "demo.toml", workdir=tmp_path)
    train = plan.stage("train")
    _note_start(train)  # resumed on the installed code: the first start's code stays
    write_record(train, {"outputs": {}}, seconds=1.0)
    assert not train.started_file.exists()
    assert _decisions(tmp_path)["train"] == (
        "skip",
        "stale: ran on other code, cdm_core.likelihood changed; --rerun-stale to re-run",
    )
