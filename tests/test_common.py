"""The plumbing every stage shares: storage (paths, URIs, JSON) and the flat view of a stage config."""

from __future__ import annotations

import dataclasses
import os

import pytest

from pipelines.common import config as cfg
from pipelines.common import storage
from pipelines.common.config import ConfigError, TrackingSection, option
from pipelines.common.errors import UserError
from pipelines.data.config import PrepareConfig
from pipelines.evaluate.config import NllConfig, PoolSection, ScoringSection
from pipelines.workflow.config import NllSection, PrepareSection

# --------------------------------------------------------------------------- storage


def test_local_paths_become_absolute_and_uris_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path, tmp_path / "link")
    assert storage.absolute("link/runs") == str(tmp_path / "runs")  # symlinks resolved: one name per folder
    assert storage.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.join("s3://bucket/runs/", "a", "b.json") == "s3://bucket/runs/a/b.json"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_json_round_trip_creates_the_folder_and_leaves_no_temp_file(tmp_path, where):
    root = str(tmp_path / "out") if where == "local" else f"memory://cdm-test-{os.getpid()}/out"
    uri = storage.join(root, "deep", "run.json")
    assert storage.read_json(uri) is None and not storage.exists(root)
    storage.write_json(uri, {"step": 3, "path": tmp_path})  # values JSON cannot hold become strings
    assert storage.read_json(uri) == {"step": 3, "path": str(tmp_path)}
    folder = storage.resolve(storage.join(root, "deep"))
    assert storage.exists(uri) and folder.kind() == "dir" and folder.list_names() == ["run.json"]
    assert folder.kind("run.json") == "file" and folder.kind("nothing") == "missing"


def test_sha256_of_a_file_and_of_a_location_agree(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 3_000_000)
    assert storage.sha256_file(tmp_path / "f.bin") == storage.resolve(tmp_path).sha256("f.bin")
    with storage.resolve(tmp_path).open_seekable("f.bin") as f:
        f.seek(2_999_999)
        assert f.read() == b"x"


def test_an_unknown_uri_scheme_is_a_user_error():
    with pytest.raises(UserError, match="unsupported URI"):
        storage.resolve("nosuchscheme://bucket/x")


# --------------------------------------------------------------------------- stage configs, flat


def test_nest_puts_each_setting_in_its_section():
    config = cfg.nest(NllConfig, checkpoint="c", dataset="d", dequantize=True, workers=2, tracking_uri="sqlite:///x")
    assert config.scoring == ScoringSection(dequantize=True)
    assert config.pool == PoolSection(workers=2)
    assert config.tracking == TrackingSection(tracking_uri="sqlite:///x")
    assert cfg.flat_values(config)["workers"] == 2 and cfg.flat_values(config)["checkpoint"] == "c"
    whole = cfg.nest(NllConfig, checkpoint="c", tracking=TrackingSection(experiment="e"))
    assert whole.tracking.experiment == "e"


def test_nest_refuses_unknown_settings_and_a_section_given_twice():
    with pytest.raises(ConfigError, match=r"dequantise: unknown setting \(did you mean 'dequantize'\?\)"):
        cfg.nest(NllConfig, dequantise=True)
    with pytest.raises(TypeError, match="tracking given whole and as tracking_uri"):
        cfg.nest(NllConfig, tracking=TrackingSection(), tracking_uri="x")


def test_flat_names_must_be_unique_across_sections():
    @dataclasses.dataclass
    class Clash:
        experiment: str = option("x")
        tracking: TrackingSection = dataclasses.field(default_factory=TrackingSection)

    with pytest.raises(TypeError, match="'experiment' is named twice"):
        cfg.flat_fields(Clash)


def test_help_and_defaults_come_from_the_fields():
    assert cfg.field_doc(NllConfig, "batch_size") == "Images per forward pass."
    assert cfg.field_doc(NllConfig, "scoring.batch_size") == "Images per forward pass."
    assert cfg.field_default(NllConfig, "batch_size") == 256
    assert cfg.field_default(PrepareConfig, "source") is dataclasses.MISSING


def test_a_workflow_table_holds_the_stage_settings_by_their_flat_names():
    names = [f.name for f in dataclasses.fields(NllSection)]
    assert {"split", "batch_size", "dequantize", "workers", "gpus_per_worker", "enabled", "untrained"} <= set(names)
    assert not {"checkpoint", "dataset", "out", "track", "address", "tracking_uri", "experiment"} & set(names)
    # A setting's help is the stage's own: the workflow's `cdm run --list-settings` and `cdm nll --help` agree.
    nll_doc = {f.name: f.metadata["doc"] for f in dataclasses.fields(NllSection)}
    assert nll_doc["batch_size"] == cfg.field_doc(NllConfig, "batch_size")
    assert {f.name: f.default for f in dataclasses.fields(PrepareSection)}["source"] is None


def test_progress_is_plain_periodic_lines_off_a_terminal(capsys):
    from pipelines.common.console import Progress

    with Progress("nll (one-pass)", 5, "samples", every_s=0.0) as progress:
        progress.advance(3)
        progress.advance(2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "  nll (one-pass): 3/5 samples (60%)",
        "  nll (one-pass): 5/5 samples (100%)",  # the closing line is not printed again right after it
    ]
    assert not any("\x1b[" in line for line in lines)
    with Progress("sample", 5, "images", every_s=3600.0) as progress:
        progress.advance(5)
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["  sample: 5/5 images (100%)"]
    with Progress("prepare train", 0, "samples", every_s=3600.0) as progress:  # a count not known ahead
        progress.advance(7)
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["  prepare train: 7 samples"]
