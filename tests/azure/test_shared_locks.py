"""Two machines that share a step cache on Blob (Azurite) and step locks in Redis (Debian's redis-server on
loopback): two `grove server` workers, each with a local cache of its own, are given the same config at once.
Each step is computed by one of them; the other waits for its lock and reuses the shared result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from grove_helpers import PHI3_MODULES, lora_pass, tiny_run_config, write_project

from olive_grove.flows import local_server

GROVE = Path(sys.executable).parent / "grove"
MACHINES = ("machine-a", "machine-b")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def prefect_api(tmp_path, monkeypatch):
    """A real Prefect server both machines talk to (the one `grove run` keeps, in a home of its own)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    server = local_server.start(home).ready()
    yield server.url
    local_server.stop(home)


def _wait_for(what: str, check, seconds: float, logs: list[Path]):
    deadline = time.monotonic() + seconds
    while (found := check()) is None:
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
            raise AssertionError(f"{what} took over {seconds} s\n{tails}")
        time.sleep(0.5)
    return found


def _start_run(api: httpx.Client, deployment_id: str, parameters: dict) -> str:
    for _ in range(5):  # SQLite busy under two workers' polling answers 503, as Prefect's own client retries
        response = api.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
        if response.status_code < 500:
            break
        time.sleep(1)
    response.raise_for_status()
    return response.json()["id"]


def test_one_machine_computes_each_step_and_the_other_waits_for_it(
    tmp_path, tiny_phi3, azure_storage, redis_url, prefect_api
):
    cache = azure_storage.container("cache")
    lora = lora_pass(PHI3_MODULES)
    lora["training_args"]["max_steps"] = 30  # long enough that the second machine reaches it while it trains
    passes = {"lora": lora, "merge": {"type": "MergeAdapterWeights"}}
    config = write_project(tmp_path / "project", tiny_run_config(tiny_phi3, passes, cache_dir=f"az://{cache}/olive"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    saved = subprocess.run([GROVE, "blocks", "set-locks", redis_url], env=env, capture_output=True, text=True)
    assert saved.returncode == 0, saved.stderr[-3000:]

    workers, logs = [], []
    try:
        for machine in MACHINES:
            log = tmp_path / f"{machine}.log"
            logs.append(log)
            workers.append(subprocess.Popen(
                [GROVE, "server", "--pool", machine], cwd=config.parent, stdout=log.open("w"),
                stderr=subprocess.STDOUT, env={**env, "OLIVE_GROVE_LOCAL_CACHE": str(tmp_path / machine)},
            ))  # fmt: skip
        api = httpx.Client(base_url=prefect_api, timeout=30)

        def deployment(machine: str):
            response = api.get(f"/deployments/name/finetune/finetune-{machine}")
            return response.json()["id"] if response.status_code == 200 else None

        ids = [_wait_for(f"the {m} deployment", lambda m=m: deployment(m), 120, logs) for m in MACHINES]
        runs = [_start_run(api, i, {"config": config.name, "options": {"output_dir": f"out-{m}"}})
                for i, m in zip(ids, MACHINES)]  # fmt: skip

        def finished():
            states = [api.get(f"/flow_runs/{run}").json()["state"] for run in runs]
            return states if all(s["type"] in TERMINAL for s in states) else None

        states = _wait_for("both runs", finished, 420, logs)
        assert [s["type"] for s in states] == ["COMPLETED", "COMPLETED"], states
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)

    reports = [json.loads((config.parent / f"out-{m}" / "report.json").read_text()) for m in MACHINES]
    # Each machine fingerprints the base model it reads (its own files, no step); every step is computed once.
    computed = {s["step"]: [] for s in reports[0]["steps"] if s["step"] != "input_model"}
    for machine, report in zip(MACHINES, reports):
        for s in report["steps"]:
            if s["step"] in computed and not s["cached"]:
                computed[s["step"]].append(machine)
    assert {step: len(machines) for step, machines in computed.items()} == dict.fromkeys(computed, 1), computed

    # The reuser's training task was running (waiting on the lock) while the other machine trained.
    trains = api.post("/task_runs/filter", json={"task_runs": {"name": {"any_": ["lora"]}}}).json()
    assert len(trains) == 2
    first, second = sorted(trains, key=lambda t: t["end_time"])
    assert second["start_time"] < first["end_time"], "the second machine never waited for the first"
