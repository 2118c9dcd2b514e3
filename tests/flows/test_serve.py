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
import urllib.request
from pathlib import Path

from grove_helpers import lora_pass, tiny_run_config, write_project


def _api(url: str, path: str, body: dict | None = None, method: str = "POST"):
    data = json.dumps(body or {}).encode() if method == "POST" else None
    request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _run(url: str, deployment: dict, config: str, timeout: float = 300) -> dict:
    run = _api(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _api(url, f"/flow_runs/{run['id']}", method="GET")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {run['id']} did not finish in {timeout} s")


def test_grove_server_serves_the_installed_flow_until_ctrl_c(tiny_phi3: Path, tmp_path: Path):
    project = tmp_path / "project"
    write_project(project, tiny_run_config(tiny_phi3, passes={"lora": lora_pass(["o_proj", "qkv_proj"])}))
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("OLIVE_GROVE_LOCAL_SERVER", None)
    server = subprocess.Popen([sys.executable, "-m", "olive_grove.flows.cli", "server"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        said = []
        while not any("a worker takes the runs" in line for line in said):
            line = server.stdout.readline()
            assert line, "grove server ended early:\n" + "".join(said)
            said.append(line)
        assert "deployments: finetune-local" in "".join(said)
        url = json.loads((home / "olive-grove-server.json").read_text())["url"]
        assert f"Prefect UI: {url.removesuffix('/api')}" in "".join(said)
        deployment = _api(url, "/deployments/name/finetune/finetune-local", method="GET")
        assert deployment["entrypoint"] == "olive_grove.flows.finetune.finetune"  # the installed package, no checkout

        assert _run(url, deployment, "config.json")["type"] == "COMPLETED"  # relative to where grove server runs
        assert (project / "outputs" / "run" / "report.json").is_file()
        failed = _run(url, deployment, "missing.json")
        assert failed["type"] == "FAILED"
        assert failed["message"].startswith(f"missing.json: no such config file at {project / 'missing.json'}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(90)
    assert not (home / "olive-grove-server.json").exists()  # it started the server, so it stopped it
