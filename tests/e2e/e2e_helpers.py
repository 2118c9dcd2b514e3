"""Helpers of the end-to-end tests: processes, the Prefect server's CLI and REST API, configs, outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
WORK_POOLS = REPO_ROOT / "deployments" / "work-pools"
TINY_EXAMPLE = REPO_ROOT / "examples" / "tone" / "tiny-cpu.json"
TONE_DATASET = REPO_ROOT / "examples" / "tone" / "dataset" / "dataset-classification.json"
BIN = Path(sys.executable).parent  # the venv's prefect and grove

SERVER_START_TIMEOUT = 180  # a cold start on the 2-core machine takes ~20 s; the first ever run migrates the DB
RUN_TIMEOUT = 360  # one flow run of the tiny pipeline: ~30 s of imports and ~10 s of work
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Background:
    """A command running in its own process group, its output in a log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_background(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO_ROOT) -> Background:
    out = log.open("ab")
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    out.close()
    return Background(name, proc, log)


# ------------------------------------------------------------------------------------------ the server


@dataclass
class PrefectServer:
    url: str  # the UI
    home: Path
    env: dict[str, str]  # for `prefect ...` subprocesses: this server's API, this home
    process: Background
    api: httpx.Client = field(repr=False)
    workers: list[Background] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def cli(self, *args: str, timeout: float = 180, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` against this server, from the repository root."""
        result = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=REPO_ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"prefect {' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                f"\n--- stderr\n{result.stderr[-4000:]}\n--- server log\n{self.process.tail(30)}"
            )
        return result

    # --- REST helpers (the same endpoints the UI calls)

    def deployment(self, name: str) -> dict[str, Any]:
        response = self.api.get(f"/deployments/name/finetune/{name}")
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        response = self.api.get(f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return response.json()

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        response = self.api.post(
            "/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        )
        response.raise_for_status()
        return response.json()

    def logs(self, flow_run_id: str) -> str:
        response = self.api.post(
            "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"}
        )
        response.raise_for_status()
        return "\n".join(f"{r['level']:>2} {r['message']}" for r in response.json())

    def wait_for_run(self, flow_run_id: str, timeout: float = RUN_TIMEOUT, after_state: str | None = None) -> dict:
        """Poll until the run reaches a terminal state (other than the state it was in when retried)."""
        deadline = time.monotonic() + timeout
        run = self.flow_run(flow_run_id)
        while time.monotonic() < deadline:
            run = self.flow_run(flow_run_id)
            state = run["state"] or {}
            if state.get("type") in TERMINAL and state.get("id") != after_state:
                return run
            for worker in self.workers:
                if worker.proc.poll() is not None:
                    raise AssertionError(f"the worker died (rc {worker.proc.returncode}):\n{worker.tail()}")
            time.sleep(2)
        raise AssertionError(
            f"flow run {flow_run_id} not finished after {timeout} s; state {run['state']}\n"
            f"--- run logs\n{self.logs(flow_run_id)[-4000:]}\n--- worker\n"
            + "\n".join(w.tail(40) for w in self.workers)
        )

    def describe(self, flow_run_id: str) -> str:
        """What to print when a run ends other than expected."""
        run = self.flow_run(flow_run_id)
        return (
            f"state {run['state']['type']} {run['state']['name']}: {run['state'].get('message')}\n"
            f"--- run logs\n{self.logs(flow_run_id)[-6000:]}\n--- worker\n"
            + "\n".join(w.tail(40) for w in self.workers)
        )


# ------------------------------------------------------------------------------------------ the model and configs


def write_config(folder: Path, model: Path, *, builder: dict[str, Any] | None = None) -> Path:
    """examples/tone/tiny-cpu.json with absolute paths, 3 training steps, cache and outputs inside `folder`."""
    config = json.loads(TINY_EXAMPLE.read_text())
    config["input_model"]["model_path"] = str(model)
    for data in config["data_configs"]:  # the training rows and the held-out ones
        data["load_dataset_config"]["data_files"] = str(TONE_DATASET)
    config["passes"]["lora"]["training_args"].update(max_steps=3, logging_steps=1, eval_steps=3, save_steps=3)
    if builder is not None:
        config["passes"]["builder"] = builder
    config["cache_dir"] = str(folder / "cache")
    config["output_dir"] = str(folder / "outputs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "olive-config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


FLOW_RUN_ID = re.compile(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def run_deployment(server: PrefectServer, name: str, *params: str) -> str:
    """`prefect deployment run 'finetune/NAME' --param K=V ...`; returns the new flow run's id."""
    args = ["deployment", "run", f"finetune/{name}"]
    for param in params:
        args += ["--param", param]
    result = server.cli(*args)
    match = FLOW_RUN_ID.search(result.stdout)
    assert match, f"no flow run id in:\n{result.stdout}"
    return match.group(1)


def assert_outputs(output_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The layout of Olive's E2E sample, and the report that describes it, in the folder of its own that a
    deployed flow run publishes to under the config's output_dir."""
    output_dir = output_dir / "runs" / f"{run['name']}-{run['id'][-8:]}"
    assert (output_dir / "adapter" / "adapter_config.json").is_file(), sorted(output_dir.rglob("*"))
    assert (output_dir / "merged" / "config.json").is_file()
    assert (output_dir / "onnx" / "int4-cpu" / "model.onnx").is_file()
    assert (output_dir / "onnx" / "int4-cpu" / "genai_config.json").is_file()
    report = json.loads((output_dir / "report.json").read_text())
    answers = {f"evaluation/tone_quality/{m}" for m in ("base", "merged", "onnx/int4-cpu")}
    assert set(report["outputs"]) == {"adapter", "merged", "onnx/int4-cpu", *answers}
    assert report["flow_run"]["id"] == run["id"]
    return report


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None
