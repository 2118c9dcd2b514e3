"""End-to-end fixtures: a real Prefect server (SQLite, temporary PREFECT_HOME), the work pools and deployments
of deployments/prefect.yaml, a process worker, and a tiny model built with `grove tiny-model`.

Everything runs as the user would run it: the `prefect` and `grove` commands in subprocesses, talking over
loopback HTTP. The server, the deployments and the worker are made once per session and shared by the tests.
Each process is started in its own process group and the whole group is killed at teardown.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from grove_helpers import free_port

from .e2e_helpers import (
    BIN,
    REPO_ROOT,
    SERVER_START_TIMEOUT,
    WORK_POOLS,
    Background,
    PrefectServer,
    start_background,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end against a real Prefect server, worker and (for the UI) headless Chromium"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep the call phase's report on the item, so a fixture's teardown knows whether the test failed."""
    report = yield
    if report.when == "call":
        item.e2e_call_report = report
    return report


def _fastapi_problem() -> str | None:
    """Prefect 3.8.8's client sends explicit nulls (`"limit": null`) that FastAPI 0.151+ rejects with a 422."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("fastapi").split(".")[:2])
    if (major, minor) >= (0, 151):
        return (
            f"fastapi {version('fastapi')} is installed: Prefect 3.8.8's server then answers 422 to `prefect deploy`, "
            "`prefect deployment ls` and `prefect flow-run ls` (explicit nulls in request bodies are rejected from "
            "FastAPI 0.151 on). Pin fastapi>=0.139,<0.151 in pyproject.toml."
        )
    return None


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME (SQLite)."""
    problem = _fastapi_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    root = tmp_path_factory.mktemp("prefect-server")
    home = root / "home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "COLUMNS": "200",
        "PYTHONUNBUFFERED": "1",
    }
    # A profile of the developer's must not point these processes somewhere else.
    env.pop("PREFECT_PROFILE", None)
    # The UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says.
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_UI_API_URL": f"{url}/api"}
    process = start_background(
        "server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        server_env,
        root / "server.log",
    )
    api = httpx.Client(base_url=f"{url}/api", timeout=30)
    server = PrefectServer(url=url, home=home, env=env, process=process, api=api)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.proc.poll() is not None:
                raise AssertionError(f"prefect server exited {process.proc.returncode}:\n{process.tail()}")
            try:
                if api.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/api/health did not answer in {SERVER_START_TIMEOUT} s:\n{process.tail()}")
            time.sleep(0.5)
        yield server
    finally:
        for worker in server.workers:
            worker.stop()
        api.close()
        process.stop()


@pytest.fixture(scope="session")
def deployments(prefect_server: PrefectServer) -> dict[str, dict[str, Any]]:
    """The three work pools, then `prefect deploy --all --prefect-file deployments/prefect.yaml` from the repo root."""
    server = prefect_server
    server.cli("work-pool", "create", "local", "--type", "process")
    server.cli(
        "work-pool",
        "create",
        "gpu-docker",
        "--type",
        "docker",
        "--base-job-template",
        str(WORK_POOLS / "docker-gpu.json"),
    )
    server.cli(
        "work-pool",
        "create",
        "gpu-k8s",
        "--type",
        "kubernetes",
        "--base-job-template",
        str(WORK_POOLS / "kubernetes-gpu.json"),
    )
    # OLIVE_GROVE_HOME is deliberately unset here: the pull step keeps its template, and the worker resolves it.
    env = {k: v for k, v in server.env.items() if k != "OLIVE_GROVE_HOME"}
    result = subprocess.run(
        [str(BIN / "prefect"), "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"prefect deploy failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    names = ("finetune-local", "finetune-nightly", "finetune-docker-gpu", "finetune-k8s-gpu")
    return {name: server.deployment(name) for name in names}


@pytest.fixture(scope="session")
def worker(prefect_server: PrefectServer, deployments, tmp_path_factory) -> Background:
    """`prefect worker start --pool local` with OLIVE_GROVE_HOME at this checkout; waits until the pool sees it."""
    server = prefect_server
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **server.env,
        "OLIVE_GROVE_HOME": str(REPO_ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # poll often: runs start within seconds
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }
    name = f"e2e-{os.getpid()}"
    process = start_background(
        "worker", [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--name", name], env, log
    )
    server.workers.append(process)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise AssertionError(f"the worker exited {process.proc.returncode}:\n{process.tail()}")
        response = server.api.post("/work_pools/local/workers/filter", json={})
        if response.status_code == 200 and any(w["name"] == name and w["status"] == "ONLINE" for w in response.json()):
            return process
        time.sleep(1)
    raise AssertionError(f"the worker did not come online:\n{process.tail()}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Phi-3 built the documented way, `grove tiny-model DIR --arch phi3`."""
    target = tmp_path_factory.mktemp("model") / "tiny-phi3"
    result = subprocess.run(
        [str(BIN / "grove"), "tiny-model", str(target), "--arch", "phi3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return target
