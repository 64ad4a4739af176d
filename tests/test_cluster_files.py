"""The files under cluster/ parse, agree with each other, and name the right entry points, images and GPUs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _docs(path: Path) -> dict[str, dict]:
    """The YAML documents of a manifest, by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def _dockerfile_ray_version() -> str:
    match = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", (CLUSTER / "Dockerfile").read_text())
    assert match, "cluster/Dockerfile should build FROM a rayproject/ray GPU image"
    return match.group(1)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _check_ray_cluster_spec(spec: dict, image: str) -> None:
    assert spec["rayVersion"] == _dockerfile_ray_version()
    head = _containers(spec["headGroupSpec"]["template"])[0]
    assert head["image"] == image
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    gpu_groups = [
        g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"]
    ]
    assert gpu_groups, "a worker group must request GPUs"
    for group in gpu_groups:
        worker = _containers(group["template"])[0]
        assert worker["image"] == image
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
    claims = set()
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        container = _containers(pod)[0]
        env = _env(container)
        # Token authentication on every Ray process, the token from a Secret (never inline).
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        # Relative outputs/ and data/ resolve to the same shared files on every node.
        assert {"/home/ray/cdm/outputs", "/home/ray/cdm/data"} <= mounts
        claims |= {
            v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
        }
    assert claims == {"cdm-shared"}


def test_kuberay_raycluster():
    docs = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    image = _containers(cluster["spec"]["headGroupSpec"]["template"])[0]["image"]
    _check_ray_cluster_spec(cluster["spec"], image)
    claim = docs["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "cdm-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_rayjob_runs_cifar10():
    job = _docs(CLUSTER / "kuberay" / "rayjob.yaml")["RayJob"]
    cluster = _docs(CLUSTER / "kuberay" / "raycluster.yaml")["RayCluster"]
    image = _containers(cluster["spec"]["headGroupSpec"]["template"])[0]["image"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("cdm run configs/run/cifar10.toml ")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], image)
    submitter = _containers(job["spec"]["submitterPodTemplate"])[0]
    assert submitter["image"] == image
    assert _env(submitter)["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in _env(submitter)


def test_kuberay_mlflow_server():
    docs = _docs(CLUSTER / "kuberay" / "mlflow.yaml")
    container = _containers(docs["Deployment"]["spec"]["template"])[0]
    command = " ".join(container["args"])
    assert (
        "mlflow server" in command and "--backend-store-uri" in command and "--artifacts-destination s3://" in command
    )
    assert docs["Service"]["metadata"]["name"] == "mlflow"  # what MLFLOW_TRACKING_URI=http://mlflow:5000 names
    assert docs["Service"]["spec"]["ports"][0]["port"] == 5000


def test_aws_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema, as `ray up` checks it
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and gpu_types[0]["node_config"]["InstanceType"].startswith(("g", "p"))
    k8s_image = _containers(
        _docs(CLUSTER / "kuberay" / "raycluster.yaml")["RayCluster"]["spec"]["headGroupSpec"]["template"]
    )[0]["image"]
    assert config["docker"]["image"] == k8s_image
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_runtime_env_template_is_accepted_by_cdm_submit(monkeypatch):
    from pipelines.cluster.submit import build_runtime_env, load_runtime_env_file

    monkeypatch.chdir(CLUSTER.parent)
    template = load_runtime_env_file(str(CLUSTER / "runtime_env.yaml"))
    env = build_runtime_env(None, ["s3fs"], {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, base=template)
    assert env["working_dir"] == str(CLUSTER.parent)
    assert {".git", ".venv", "data"} <= set(env["excludes"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "RAY_AUTH_TOKEN" not in template.get("env_vars", {})


def test_dockerfile_installs_the_tested_cuda_torch_before_cdm_and_torch_fidelity():
    text = (CLUSTER / "Dockerfile").read_text()
    torch_at = text.index('pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url')
    assert "download.pytorch.org/whl/cu" in text
    assert torch_at < text.index("pip install --no-cache-dir . ")
    pinned = re.search(r"TORCH_SPEC \?= torch==(\S+)", (CLUSTER.parent / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text  # the image runs the torch the tests ran
    fidelity = re.search(r'"torch-fidelity==[\d.]+"', (CLUSTER.parent / "Makefile").read_text()).group(0)
    assert f"pip install --no-cache-dir --no-deps {fidelity}" in text  # FID works in the image
    assert "ENV CDM_WEIGHTS_DIR=/home/ray/cdm/data/weights" in text  # on the shared volume


def test_local_cluster_script_is_valid_bash():
    script = CLUSTER / "local_cluster.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run([str(script), "bogus"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "start|stop|status" in usage.stderr


@pytest.mark.parametrize(
    "command", ["cdm submit", "cdm jobs", "cdm ui", "local_cluster.sh", "storage_path", "mlflow server"]
)
def test_cluster_readme_covers(command):
    assert command in (CLUSTER / "README.md").read_text()


# --------------------------------------------------------------------------- the commands they run


def _cluster_commands() -> list[tuple[str, str]]:
    """(where, command) for every `cdm run` command the cluster files give: the RayJob's entrypoint and
    each `cdm submit … -- cdm run …` they tell a user to type."""
    job = _docs(CLUSTER / "kuberay" / "rayjob.yaml")["RayJob"]
    found = [("kuberay/rayjob.yaml", job["spec"]["entrypoint"])]
    for path in (CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "aws" / "cluster.yaml", CLUSTER / "README.md"):
        for line in path.read_text().splitlines():
            if "cdm submit" in line and " -- cdm run " in line:
                command = line.split(" -- ", 1)[1].split("#")[0].strip()
                found.append((str(path.relative_to(CLUSTER)), command))
    return found


def _gpus_on_offer(where: str) -> int:
    """The most GPUs the file's cluster can have (worker groups at their maximum size)."""
    if where.startswith("kuberay/"):
        docs = _docs(CLUSTER / "kuberay" / ("rayjob.yaml" if "rayjob" in where else "raycluster.yaml"))
        spec = docs["RayJob"]["spec"]["rayClusterSpec"] if "rayjob" in where else docs["RayCluster"]["spec"]
        return sum(
            int(g.get("maxReplicas", g["replicas"]))
            * int(_containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in spec["workerGroupSpecs"]
        )
    config = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    return sum(
        t.get("max_workers", 0) * t.get("resources", {}).get("GPU", 0) for t in config["available_node_types"].values()
    )


@pytest.mark.parametrize("where, command", _cluster_commands())
def test_every_cluster_command_plans_and_trains_on_the_gpus(tmp_path, monkeypatch, where, command, cdm_forks):
    from pipelines.workflow.runner import prepare_plan
    from pipelines.workflow.stages import Context

    words = shlex.split(command)
    assert words[:2] == ["cdm", "run"], command
    config, sets = words[2], [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    # The job's working directory: the repo's configs, and the shared volume's data/ with the inputs it names.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(CLUSTER.parent / "configs")
    (tmp_path / "data").mkdir()
    for value in sets:
        key, _, path = value.partition("=")
        if key == "prepare.path":
            assert path.startswith("data/"), f"{where}: {key} should be on the shared volume (data/)"
            (tmp_path / path).write_bytes(b"a stand-in for the dataset file")
    plan, uri = prepare_plan(config, sets, workdir=tmp_path, strict=False)
    assert [s.name for s in plan.stages][:1] == ["prepare"] and plan.has("train")
    cli = cdm_forks.run([*words[1:], "--dry-run"], cwd=tmp_path, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    if "cifar10" not in config:
        return
    scaling = plan.config.train.scaling
    assert scaling.use_gpu and scaling.gpus_per_worker == 1 and scaling.num_workers == 4, (where, scaling)
    assert scaling.num_workers <= _gpus_on_offer(where), f"{where}: more training workers than GPUs"
    # The batch stages after training wait for GPUs too, rather than take whatever is up when they start.
    ctx = Context(plan, uri, "cdm", "parent")
    for section in (plan.config.sample, plan.config.nll, plan.config.fid):
        assert ctx.pool_settings(section)["gpus_per_worker"] == 1.0
