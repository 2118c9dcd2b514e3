"""`grove server`: one command gives the UI a pool, the installed flow's deployment and a worker; a run
started through the API completes, a mistake fails with its one line as the state message, Ctrl-C stops
everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grove_helpers import lora_pass, prefect_api, tiny_run_config, write_project


def _run(url: str, deployment: dict, parameters: dict | None = None, timeout: float = 300) -> dict:
    """Start a run as the form does (its parameters over the deployment's defaults); the finished flow run."""
    run = prefect_api(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters or {}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = prefect_api(url, f"/flow_runs/{run['id']}", method="GET")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run['id']} did not finish in {timeout} s")


@pytest.mark.slow
def test_grove_server_serves_the_installed_flow_until_ctrl_c(tiny_phi3: Path, tmp_path: Path):
    project = tmp_path / "project"
    cfg = tiny_run_config(tiny_phi3, passes={"lora": lora_pass(["o_proj", "qkv_proj"])})
    write_project(project, cfg, name="olive-config.json")
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("OLIVE_GROVE_LOCAL_SERVER", None)
    server = subprocess.Popen([sys.executable, "-m", "olive_grove.flows.cli", "server", "--with", "docker,k8s"],
                              cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        said = []
        while not any("a worker takes the runs" in line for line in said):
            line = server.stdout.readline()
            assert line, "grove server ended early:\n" + "".join(said)
            said.append(line)
        assert "deployments: finetune-local, finetune-docker-gpu, finetune-k8s-gpu" in "".join(said)
        url = json.loads((home / "olive-grove-server.json").read_text())["url"]
        assert f"Prefect UI: {url.removesuffix('/api')}" in "".join(said)
        deployment = prefect_api(url, "/deployments/name/finetune/finetune-local", method="GET")
        assert deployment["entrypoint"] == "olive_grove.flows.finetune.finetune"  # the installed package, no checkout
        assert deployment["parameters"] == {"config": json.loads((project / "olive-config.json").read_text())}
        for name, pool in (("finetune-docker-gpu", "gpu-docker"), ("finetune-k8s-gpu", "gpu-k8s")):
            gpu = prefect_api(url, f"/deployments/name/finetune/{name}", method="GET")
            assert gpu["work_pool_name"] == pool
            assert prefect_api(url, f"/work_pools/{pool}", method="GET")["base_job_template"]["job_configuration"]

        # The form's default: the config as an object, its relative paths read from the project.
        run = _run(url, deployment)
        assert run["state"]["type"] == "COMPLETED", run["state"]["message"]
        # A run from a deployment keeps its outputs in a folder of its own; the report names the run.
        [folder] = (project / "outputs" / "run" / "runs").iterdir()
        assert folder.name == f"{run['name']}-{run['id'][-8:]}"
        assert json.loads((folder / "report.json").read_text())["flow_run"]["id"] == run["id"]

        # A config edited in the form is what runs: tests/e2e/test_ui.py edits one in the browser.

        failed = _run(url, deployment, {"config": "missing.json"})["state"]
        assert failed["type"] == "FAILED"
        assert failed["message"].startswith(f"missing.json: no such config file at {project / 'missing.json'}")
        failed = _run(url, deployment, {"max_steps": -1})["state"]
        assert failed["type"] == "FAILED"
        assert failed["message"].startswith("max_steps: input should be greater than 0 (got -1)"), failed["message"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(90)
    assert not (home / "olive-grove-server.json").exists()  # it started the server, so it stopped it


def test_each_pool_has_its_own_nightly_deployment():
    """A fourth prober's find: `--with nightly` on two pools registered one `finetune-nightly`, the last
    pool's, silently taking it from the first."""
    from olive_grove.flows.serve import deployments

    names = {pool: [d.name for d in deployments(pool, {"nightly"}, {}, Path.cwd())] for pool in ("local", "p2")}
    assert names == {
        "local": ["finetune-local", "finetune-local-nightly"],
        "p2": ["finetune-p2", "finetune-p2-nightly"],
    }


@pytest.mark.slow
def test_a_run_stopped_with_grove_server_is_crashed_not_running_forever(tiny_phi3: Path, tmp_path: Path):
    """A prober's find: a deployed run being trained when grove server stopped stayed Running in the UI."""
    from olive_grove.flows import local_server

    project = tmp_path / "project"
    lora = lora_pass(["o_proj", "qkv_proj"])
    lora["training_args"]["max_steps"] = 5000  # still training when grove server stops
    write_project(project, tiny_run_config(tiny_phi3, passes={"lora": lora}), name="olive-config.json")
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env.pop("OLIVE_GROVE_LOCAL_SERVER", None)
    url = local_server.start(home).ready().url  # a server that outlives grove server, to read the run from
    try:
        server = subprocess.Popen([sys.executable, "-m", "olive_grove.flows.cli", "server"], cwd=project, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        said = []
        while not any("a worker takes the runs" in line for line in said):
            line = server.stdout.readline()
            assert line, "grove server ended early:\n" + "".join(said)
            said.append(line)
        deployment = prefect_api(url, "/deployments/name/finetune/finetune-local", method="GET")
        run = prefect_api(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {}})
        deadline = time.monotonic() + 120
        while prefect_api(url, f"/flow_runs/{run['id']}", method="GET")["state"]["type"] != "RUNNING":
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.5)
        time.sleep(3)
        server.send_signal(signal.SIGINT)
        rest = server.communicate(timeout=90)[0]
        assert "1 run(s) stopped with the worker" in rest, rest[-2000:]
        state = prefect_api(url, f"/flow_runs/{run['id']}", method="GET")["state"]
        assert state["type"] == "CRASHED"
        assert state["message"].startswith("grove server stopped while this run ran; Retry runs it again")
    finally:
        local_server.stop(home)
