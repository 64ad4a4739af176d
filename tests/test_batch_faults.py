"""A batch stage's worker dies mid-stage (a lost node, an OOM kill): the stage still scores or draws every
sample exactly once, with the figures of a run where nothing died.

The worker dies by the test hook CDM_KILL_WORKER_AFTER (read on the driver, passed to the workers):
one worker exits, hard, on its next call after that many. Ray starts it again and retries the call.
The run where nothing died is the stage's one worker in the test's process (`workers=0`: the same worker class
and calls, and the same figures as a pool's, which test_nll, test_sample and test_fid check); only the run that
loses a worker needs a pool.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import exact_mixture_checkpoint, prepare_quick

ray = pytest.importorskip("ray")

from pipelines.common.config import nest  # noqa: E402
from pipelines.data.readers import load_split  # noqa: E402
from pipelines.evaluate.config import FidConfig, NllConfig, SampleConfig  # noqa: E402
from pipelines.evaluate.fid import run as run_fid  # noqa: E402
from pipelines.evaluate.nll import read_scores  # noqa: E402
from pipelines.evaluate.nll import run as run_nll  # noqa: E402
from pipelines.evaluate.sample import run as run_sample  # noqa: E402

T = 20


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    data = tmp_path_factory.mktemp("gmm") / "ds"
    prepare_quick("toy2d", data, name="gmm", num_train=200, num_test=240, samples_per_shard=30)
    return data, exact_mixture_checkpoint(data, tmp_path_factory.mktemp("exact"), T)


def _killing(monkeypatch, tmp_path, after: int = 2):
    marker = tmp_path / "killed"
    monkeypatch.setenv("CDM_KILL_WORKER_AFTER", str(after))
    monkeypatch.setenv("CDM_FAIL_MARKER", str(marker))
    return marker


def test_nll_scores_every_sample_exactly_once_after_a_worker_died(setup, tmp_path, monkeypatch):
    data, checkpoint = setup
    common = dict(checkpoint=str(checkpoint), dataset=str(data), track=False, workers=2, batch_size=20)
    calm = run_nll(nest(NllConfig, **common | {"workers": 0}, out=str(tmp_path / "calm")))
    marker = _killing(monkeypatch, tmp_path)
    hit = run_nll(nest(NllConfig, **common, out=str(tmp_path / "hit")))
    assert marker.is_file(), "the hook did not kill a worker"
    # run_nll checks the scored keys against the manifest (each exactly once) before it returns.
    a, b = read_scores(calm.scores_uri), read_scores(tmp_path / "hit")
    assert b.column("key").to_pylist() == a.column("key").to_pylist() and hit.count == 240
    np.testing.assert_allclose(b.column("log_px").to_numpy(), a.column("log_px").to_numpy(), rtol=1e-12)


def test_sampling_draws_the_same_samples_after_a_worker_died(setup, tmp_path, monkeypatch):
    _, checkpoint = setup
    common = dict(checkpoint=str(checkpoint), n=60, batch_size=10, steps=5, track=False, workers=2)
    run_sample(nest(SampleConfig, **common | {"workers": 0}, out=str(tmp_path / "calm")))
    marker = _killing(monkeypatch, tmp_path)
    run_sample(nest(SampleConfig, **common, out=str(tmp_path / "hit")))
    assert marker.is_file(), "the hook did not kill a worker"
    calm, _ = load_split(tmp_path / "calm", "samples")
    hit, _ = load_split(tmp_path / "hit", "samples")
    assert hit.shape == (60, 2) and np.array_equal(hit, calm)


def test_fid_statistics_are_exact_after_a_worker_died(setup, tmp_path, monkeypatch):
    data, _ = setup
    common = dict(
        samples=str(data),
        samples_split="test",
        reference=str(data),
        features="raw",
        use_cache=False,
        track=False,
        workers=2,
    )
    calm = run_fid(nest(FidConfig, **common | {"workers": 0}))
    marker = _killing(monkeypatch, tmp_path, after=1)
    hit = run_fid(nest(FidConfig, **common))
    assert marker.is_file(), "the hook did not kill a worker"
    assert (hit.samples_count, hit.reference_count) == (240, 200)  # each shard merged once
    assert hit.value == pytest.approx(calm.value, rel=1e-12)
