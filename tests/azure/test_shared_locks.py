"""Two machines that share a step cache on Blob (Azurite) and step locks in Redis (Debian's redis-server on
loopback): two `grove server` workers, each with a local cache of its own, are given the same config at once.
Each step is computed by one of them; the other waits for its lock and reuses the shared result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
from grove_helpers import PHI3_MODULES, lora_pass, prefect_api, tiny_run_config, write_project

from olive_grove.flows import local_server

GROVE = Path(sys.executable).parent / "grove"
MACHINES = ("machine-a", "machine-b")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def api(tmp_path, monkeypatch):
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


@pytest.mark.slow
def test_one_machine_computes_each_step_and_the_other_waits_for_it(tmp_path, tiny_phi3, azure_storage, redis_url, api):
    cache = azure_storage.container("cache")
    lora = lora_pass(PHI3_MODULES)
    lora["training_args"]["max_steps"] = 30  # long enough that the second machine reaches it while it trains
    passes = {"lora": lora, "merge": {"type": "MergeAdapterWeights"}}
    config = write_project(tmp_path / "project", tiny_run_config(tiny_phi3, passes, cache_dir=f"az://{cache}/olive"))
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
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

        def deployment(machine: str):
            try:
                return prefect_api(api, f"/deployments/name/finetune/finetune-{machine}", method="GET")["id"]
            except urllib.error.HTTPError:
                return None  # not registered yet

        ids = [_wait_for(f"the {m} deployment", lambda m=m: deployment(m), 120, logs) for m in MACHINES]
        runs = [prefect_api(api, f"/deployments/{i}/create_flow_run",
                            {"parameters": {"config": config.name, "output_dir": f"out-{m}"}})["id"]
                for i, m in zip(ids, MACHINES)]  # fmt: skip

        def finished():
            states = [prefect_api(api, f"/flow_runs/{run}", method="GET")["state"] for run in runs]
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
    trains = prefect_api(api, "/task_runs/filter", {"task_runs": {"name": {"any_": ["lora"]}}})
    assert len(trains) == 2
    first, second = sorted(trains, key=lambda t: t["end_time"])
    assert second["start_time"] < first["end_time"], "the second machine never waited for the first"
