"""The Prefect way, end to end: a server, the pools and deployments of deployments/prefect.yaml, a process
worker, and a run of `finetune-local` triggered from the CLI that leaves the outputs of Olive's E2E sample."""

from __future__ import annotations

import re
import subprocess

import pytest

from .e2e_helpers import BIN, REPO_ROOT, PrefectServer, assert_outputs, run_deployment, write_config

pytestmark = pytest.mark.e2e


def test_prefect_yaml_deploys_every_deployment(prefect_server: PrefectServer, deployments):
    local = deployments["finetune-local"]
    assert local["work_pool_name"] == "local"
    assert local["entrypoint"] == "olive_grove.flows.finetune.finetune"
    assert local["parameters"] == {"config": "examples/tone/tiny-cpu.json"}
    # Left as a template at deploy time; each worker resolves it from its own environment.
    assert local["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $OLIVE_GROVE_HOME }}"}}
    ]
    # The flow's parameters are typed: the UI draws a form for them.
    schema = local["parameter_openapi_schema"]
    assert schema["required"] == ["config"]
    assert list(schema["properties"]) == ["config", "max_steps", "learning_rate", "output_dir", "passes", "overrides"]
    assert all(field["description"] for field in schema["properties"].values())

    nightly = deployments["finetune-nightly"]
    assert nightly["work_pool_name"] == "local"
    assert [s["schedule"].get("cron") for s in nightly["schedules"]] == ["0 2 * * *"]
    assert all(s["active"] for s in nightly["schedules"])

    docker = deployments["finetune-docker-gpu"]
    assert docker["work_pool_name"] == "gpu-docker"
    assert docker["job_variables"]["image"] == "olive-grove-worker:latest"
    assert docker["job_variables"]["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    ]
    assert docker["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/olive-grove"

    k8s = deployments["finetune-k8s-gpu"]
    assert k8s["work_pool_name"] == "gpu-k8s"
    assert k8s["job_variables"]["gpu_limit"] == "1"

    # The pools carry the GPU templates: a container of the kubernetes pool asks for nvidia.com/gpu.
    pool = prefect_server.api.get("/work_pools/gpu-k8s").json()
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    pool = prefect_server.api.get("/work_pools/gpu-docker").json()
    assert pool["type"] == "docker"
    assert pool["base_job_template"]["variables"]["properties"]["container_create_kwargs"]["default"][
        "device_requests"
    ][0]["capabilities"] == [["gpu"]]

    listed = prefect_server.cli("deployment", "ls").stdout
    for name in deployments:
        assert f"finetune/{name}" in listed


def test_deployment_run_on_a_process_worker(prefect_server: PrefectServer, worker, tiny_model, tmp_path):
    config = write_config(tmp_path / "project", tiny_model)
    flow_run_id = run_deployment(prefect_server, "finetune-local", f"config={config}")

    run = prefect_server.wait_for_run(flow_run_id)
    assert run["state"]["type"] == "COMPLETED", prefect_server.describe(flow_run_id)

    report = assert_outputs(tmp_path / "project" / "outputs", run)
    assert report["cached_steps"] == []
    steps = {s["step"]: s for s in report["steps"]}
    assert {"lora/dataset", "lora", "merge", "builder"} <= set(steps)

    # The server saw every step as a task run of this flow run, named after the pass it ran for (a local
    # base model is fingerprinted by the flow itself, from its hash memo).
    names = {t["name"] for t in prefect_server.task_runs(flow_run_id)}
    models = ("base", "merged", "onnx/int4-cpu")
    assert names == {"lora/dataset", "lora/eval-dataset", "lora", "merge", "builder",
                     *(f"quality/{m}" for m in models), *(f"evaluate/tone_quality/{m}" for m in models)}  # fmt: skip
    # And the CLI lists the run as completed.
    listed = prefect_server.cli("flow-run", "ls", "--flow-name", "finetune", "--state", "COMPLETED").stdout
    assert run["name"] in listed


def test_grove_submit_sends_the_run_to_the_host_systems_pool(
    prefect_server: PrefectServer, worker, tiny_model, tmp_path
):
    """The config's host system is a LocalSystem: `grove submit` runs it through the `local` pool's deployment."""
    config = write_config(tmp_path / "project", tiny_model)
    result = subprocess.run(
        [str(BIN / "grove"), "submit", "--config", str(config), "--set", "passes.lora.training_args.max_steps=2"],
        cwd=REPO_ROOT, env=prefect_server.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"submitted flow run ([0-9a-f-]{36}) of finetune/finetune-(local|nightly)", result.stdout)
    assert match, result.stdout

    run = prefect_server.wait_for_run(match.group(1))
    assert run["state"]["type"] == "COMPLETED", prefect_server.describe(match.group(1))
    assert run["parameters"]["overrides"] == ["passes.lora.training_args.max_steps=2"]
    report = assert_outputs(tmp_path / "project" / "outputs", run)
    assert next(s for s in report["steps"] if s["step"] == "lora")["info"]["steps"] == 2
