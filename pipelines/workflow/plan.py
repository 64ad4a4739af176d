"""The plan of a workflow: its stages in order, each addressed by a hash of its settings and its inputs.

A stage's key is `sha256({stage, settings, inputs})[:12]`, where `inputs` are
the keys of the stages it reads from (and, for data from outside the workflow,
an identity of that data). So a key names the *content* of the stage's
output: the same key means the same settings applied to the same inputs,
and a change anywhere upstream changes every key below it. Outputs live in
`<workdir>/outputs/stages/<stage>-<key>/`, finished stages leave a record
`<stage>-<key>.json` beside their folder, and a stage whose record is there
is done. The record names the code that computed the output (its
fingerprint, `pipelines.workflow.fingerprints`): a done stage whose code has
changed since is *stale*; the plan says so, and only the user re-runs it.

Settings that cannot change a stage's result (worker counts, batch sizes of
deterministic stages, logging cadence, where MLflow is) are left out of its
key, so changing them does not redo work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipelines.common import config as cfg
from pipelines.common.errors import UserError
from pipelines.data import shards as sh
from pipelines.evaluate.features import resolve_extractor
from pipelines.workflow import fingerprints
from pipelines.workflow.config import WorkflowConfig

# Hashed into every key since before stages recorded their code; never changed now (a code change shows as a
# stale stage, not as a new key), so that work folders made before keep their keys.
KEY_VERSION = 2

# Training settings that only say how a run is watched, placed or named, never what it learns.
TRAIN_NOT_IN_KEY = (
    "data.uri",
    "run.",
    "tracking.",
    "scaling.",
    "train.log_every",
    "validation.",
    "sampling.",
    "checkpoint.",
)
# What the untrained network (the NLL baseline) depends on: its architecture, seed, schedule and prior.
UNTRAINED_KEYS = ("model.", "schedule.", "loss.prior", "train.seed")
# Per-stage settings that do not change a result (samples do not depend on batching or workers, by design).
NOT_IN_KEY = (
    "enabled",
    "untrained",
    "workers",
    "gpus_per_worker",
    "wait_s",
    "batch_size",
    "cache_dir",
    "use_cache",
    "threads",
)


def digest(value: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass
class Stage:
    name: str  # prepare | tune | nll_untrained | train | sample | nll | features | fid | sample-P | fid-P
    key: str
    output: str  # absolute folder of the stage's outputs
    needs: list[str]  # stages whose outputs it reads
    settings: dict[str, Any]  # what the key hashes, besides the inputs
    inputs: dict[str, str]  # upstream stage (or external input) -> its key / identity
    about: str = ""  # one line for the plan
    protocol: str = ""  # the sampling protocol of a sample-P / fid-P stage ("" for the one [sample] protocol)
    code: Optional[fingerprints.Code] = None  # the code that computes it now

    @property
    def kind(self) -> str:
        """What the stage does (its runner): its name without the protocol."""
        return self.name.removesuffix(f"-{self.protocol}") if self.protocol else self.name

    @property
    def record_file(self) -> Path:
        return Path(f"{self.output}.json")

    @property
    def started_file(self) -> Path:
        """The code the stage started on, while it is not done (a resumed training keeps its first start's)."""
        return Path(f"{self.output}.started.json")

    def started_code(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.started_file.read_text()).get("code")
        except (OSError, ValueError, AttributeError):
            return None

    def record(self) -> Optional[dict[str, Any]]:
        """The finished stage's record, if it is there, matches this key and its output still exists."""
        try:
            record = json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != self.key or not Path(self.output).exists():
            return None
        return record

    def stale(self, record: dict[str, Any]) -> str:
        """What changed in the code since the stage's record was written ("" if nothing, or if it did not say)."""
        recorded = record.get("code")
        if not recorded or self.code is None or recorded.get("fingerprint") == self.code.fingerprint:
            return ""
        return fingerprints.changed_parts(recorded, self.code) or "other code"


@dataclass
class Plan:
    config: WorkflowConfig
    name: str
    workdir: Path
    stages: list[Stage]
    dataset_uri: str  # what train, nll and fid read: the prepare stage's output or train.data.uri
    dataset_identity: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what would stop a run (a dry run lists them instead of failing)

    @property
    def key(self) -> str:
        """The whole workflow's address: one MLflow parent run per plan key."""
        return digest({"name": self.name, "stages": [(s.name, s.key) for s in self.stages]})

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.stages)


# --------------------------------------------------------------------------- identities of outside inputs


def path_identity(path: Optional[str]) -> Any:
    """A cheap identity of a local input file or folder (sizes and modification times); URIs as given."""
    if not path:
        return None
    if "://" in path:
        return path
    p = Path(path).expanduser().resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        entries = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                entries.append((os.path.relpath(os.path.join(root, name), p), st.st_size, st.st_mtime_ns))
        return {"path": str(p), "files": digest(entries, 64), "count": len(entries)}
    raise UserError(
        f"prepare.path: {path} does not exist; give the dataset file or folder "
        "(e.g. --set prepare.path=~/cifar-10-python.tar.gz)"
    )


def dataset_identity(uri: str) -> dict[str, Any]:
    """A prepared dataset's identity from its dataset.json: its fingerprint and every shard's SHA-256."""
    try:
        ds = sh.open_dataset(uri)
    except UserError as err:
        raise UserError(
            f"train.data.uri: {err}. Prepare it first (`cdm prepare …`) or set prepare.source in the workflow"
        ) from None
    return {
        "uri": ds.loc.uri,
        "fingerprint": ds.meta.get("fingerprint"),
        "shards": {split: [s["sha256"] for s in ds.shards(split)] for split in ds.splits},
    }


# --------------------------------------------------------------------------- settings per stage


def _without(section: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in names}


def train_settings(config: WorkflowConfig) -> dict[str, Any]:
    flat = cfg.flatten(cfg.to_dict(config.train))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in TRAIN_NOT_IN_KEY)
    }


def tune_settings(config: WorkflowConfig) -> dict[str, Any]:
    """What the tune stage's key hashes: the whole [tune] table and the sweep file's content (not just its name)."""
    settings = dict(config.tune)
    space = settings.get("space")
    if isinstance(space, str):
        if not Path(space).is_file():
            raise UserError(f"tune.space: {space} does not exist (a sweep file, as for `cdm tune --space`)")
        settings["space_file"] = cfg.read_file(space)
    return settings


def untrained_settings(config: WorkflowConfig) -> dict[str, Any]:
    return {
        k: v
        for k, v in train_settings(config).items()
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in UNTRAINED_KEYS)
    }


def _stage(
    workdir: Path,
    name: str,
    needs: list[str],
    settings: dict[str, Any],
    inputs: dict[str, str],
    about: str,
    protocol: str = "",
) -> Stage:
    key = digest({"version": KEY_VERSION, "stage": name, "settings": settings, "inputs": inputs})
    output = str(stages_dir(workdir) / f"{name}-{key}")
    code = fingerprints.current(name.removesuffix(f"-{protocol}") if protocol else name)
    return Stage(name, key, output, needs, settings, inputs, about, protocol, code)


def protocol_stage(kind: str, protocol: str) -> str:
    """The name of a protocol's sample or fid stage: `sample-ddim50`, or `sample` for the one [sample] protocol."""
    return f"{kind}-{protocol}" if protocol else kind


def stages_dir(workdir: Path) -> Path:
    return workdir / "outputs" / "stages"


# Sources that read the user's files, and what `prepare.path` must then name.
NEEDS_PATH = {
    "cifar10": "cifar-10-python.tar.gz or the extracted cifar-10-batches-py folder",
    "imagefolder": "a folder of images (optionally in class subfolders)",
}


def make_plan(config: WorkflowConfig, name: str, workdir: Path, *, strict: bool = True) -> Plan:
    """Every stage of `config`, in the order they run, with keys and output folders (nothing is run or written).

    strict=False (a dry run) records what would stop the run in `plan.problems` instead of raising.
    """
    workdir = workdir.resolve()
    stages: list[Stage] = []
    problems: list[str] = []
    c = config
    if c.prepare.source in NEEDS_PATH and not c.prepare.path:
        raise UserError(
            f"prepare.path: the {c.prepare.source} source reads your copy of the dataset; give "
            f"{NEEDS_PATH[c.prepare.source]} with --set prepare.path=PATH"
        )
    if c.prepare.source is not None:
        prepare = cfg.to_dict(c.prepare)
        settings = {**prepare, "format": sh.FORMAT, "path": None}
        identity = {"path": path_identity(c.prepare.path)}
        stage = _stage(
            workdir,
            "prepare",
            [],
            settings,
            identity,
            f"{c.prepare.source}" + (f" from {c.prepare.path}" if c.prepare.path else ""),
        )
        stages.append(stage)
        dataset_uri, data_in = stage.output, {"dataset": stage.key}
        ds_identity = {"stage": stage.key}
    else:
        ds_identity = dataset_identity(c.train.data.uri)
        dataset_uri, data_in = ds_identity["uri"], {"dataset": digest(ds_identity)}
    data_needs = ["prepare"] if c.prepare.source is not None else []

    train_in = dict(data_in)
    train_set = train_settings(c)
    if c.tune:
        tune = _stage(
            workdir,
            "tune",
            data_needs,
            tune_settings(c),
            {**data_in, "train": digest(train_set)},
            "Ray Tune sweep; the best trial's settings go to train",
        )
        stages.append(tune)
        train_in["tune"] = tune.key
    if c.nll.enabled and c.nll.untrained:
        nll = _without(cfg.to_dict(c.nll), NOT_IN_KEY)
        stages.append(
            _stage(
                workdir,
                "nll_untrained",
                data_needs + (["tune"] if c.tune else []),
                nll,
                {**train_in, "network": digest(untrained_settings(c))},
                f"NLL of the untrained network on {c.nll.split}",
            )
        )
    m = c.train
    train = _stage(
        workdir,
        "train",
        data_needs + (["tune"] if c.tune else []),
        train_set,
        train_in,
        f"{m.model.kind} {m.model.preset}, {m.schedule.name} T={m.schedule.T}, {m.train.steps} steps of "
        f"{m.train.batch_size}, {m.scaling.num_workers} worker(s)"
        + (", with the best tuned settings" if c.tune else ""),
    )
    stages.append(train)
    protocols = c.sampling_protocols() if c.sample.enabled else {}
    for protocol, s in protocols.items():
        stages.append(
            _stage(
                workdir,
                protocol_stage("sample", protocol),
                ["train"],
                _without(cfg.to_dict(s), NOT_IN_KEY),
                {"train": train.key},
                f"{s.n} samples, {s.sampler} {s.steps} steps" + (f", guidance w={s.cfg:g}" if s.cfg else ""),
                protocol,
            )
        )
    if c.nll.enabled:
        stages.append(
            _stage(
                workdir,
                "nll",
                data_needs + ["train"],
                _without(cfg.to_dict(c.nll), NOT_IN_KEY),
                {**data_in, "train": train.key},
                f"NLL of the trained model on {c.nll.split}",
            )
        )
    if c.uses_feature_classifier:
        stages.append(
            _stage(
                workdir,
                "features",
                data_needs,
                _without(cfg.to_dict(c.features), NOT_IN_KEY),
                data_in,
                f"feature classifier for fd ({c.features.epochs} epochs)",
            )
        )
    if c.fid.enabled:
        keys = {s.name: s.key for s in stages}
        extractor = {}
        if c.uses_feature_classifier:
            extractor["features"] = keys["features"]
        else:
            try:
                extractor["extractor"] = extractor_identity(c)
            except UserError as err:
                if strict:
                    raise
                problems.append(str(err))
                extractor["extractor"] = "unavailable"
        for protocol in protocols:
            sample = protocol_stage("sample", protocol)
            stages.append(
                _stage(
                    workdir,
                    protocol_stage("fid", protocol),
                    data_needs + [sample] + (["features"] if c.uses_feature_classifier else []),
                    _without(cfg.to_dict(c.fid), NOT_IN_KEY),
                    {**data_in, "sample": keys[sample], **extractor},
                    f"Fréchet distance ({c.fid.features} features) to {c.fid.reference_split}"
                    + (f" of the {protocol} samples" if protocol else ""),
                    protocol,
                )
            )
    return Plan(config, name, workdir, stages, dataset_uri, ds_identity, problems)


def extractor_identity(config: WorkflowConfig) -> str:
    """inception / classifier:PATH / raw, checked now (weights present, hash right) so a long run cannot fail at the end."""
    f = config.fid
    try:
        return resolve_extractor(f.features, f.inception_weights, f.inception_sha256).id
    except UserError as err:
        raise UserError(
            f"fid.features: {err}\nIn a workflow: --set fid.inception_weights=PATH, or --set fid.features=classifier "
            "(FD in the features of a classifier trained on the data, eval/fd_<dataset>), or "
            "--set fid.enabled=false"
        ) from None
