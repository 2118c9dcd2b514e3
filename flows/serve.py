"""`grove server`: the Prefect UI as a place to start runs, in one command, from an installed olive-grove.

It uses PREFECT_API_URL when one is configured, else the local server `grove run` keeps (starting it), makes
the process work pool, registers the deployments of the installed `finetune` flow (by module path, so the
worker needs no checkout: it imports olive_grove), and runs a worker for the pool until Ctrl-C.

The run form's `config` starts as a config object to edit (`--config FILE`, else ./olive-config.json, else
the guide's config that `grove init` writes); runs read its relative paths from that file's folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from olive_grove.flows import local_server
from olive_grove.flows.config import load_run_config
from olive_grove.flows.config_file import read_config_file
from olive_grove.flows.project import TEMPLATES
from olive_grove.tasks.errors import UserError

POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}")
EXTRAS = {
    "nightly": "the config every night at 02:00 UTC (a smoke test of the pipeline)",
    "docker": "finetune-docker-gpu on pool gpu-docker: the worker image on a Docker host with NVIDIA GPUs",
    "k8s": "finetune-k8s-gpu on pool gpu-k8s: a Kubernetes Job with one NVIDIA GPU",
}
# The GPU deployments of deployments/prefect.yaml (installed with the package): pool, its type and job template.
GPU_DEPLOYMENTS = {
    "docker": ("finetune-docker-gpu", "gpu-docker", "docker", "docker-gpu.json"),
    "k8s": ("finetune-k8s-gpu", "gpu-k8s", "kubernetes", "kubernetes-gpu.json"),
}
DEPLOYMENTS_DIR = Path(__file__).resolve().parents[1] / "deployments"


def form_default(config: Path | None) -> tuple[dict[str, Any], Path, str]:
    """The config the run form starts with, as an object; the folder its relative paths are read from; and
    where it came from, for people."""
    if config is None and Path("olive-config.json").is_file():
        config = Path("olive-config.json")
    if config is None:
        guide = json.loads((TEMPLATES / "olive-config.json").read_text())
        return guide, Path.cwd(), "the guide's config (grove init's fine-tuning/olive-config.json)"
    load_run_config(config)  # a mistake in it is one line now, not a failed run later
    return read_config_file(config), config.resolve().parent, str(config)


def deployments(pool: str, extras: set[str], config: dict[str, Any], folder: Path) -> list:
    """The `finetune` flow's deployments for a process pool: one to run on request, and those asked for."""
    from prefect.types.entrypoint import EntrypointType

    from olive_grove.flows.finetune import finetune

    def deployment(name: str, description: str, **kwargs):
        return finetune.to_deployment(name=name, description=description, work_pool_name=pool,
                                      entrypoint_type=EntrypointType.MODULE_PATH, tags=["olive-grove", pool],
                                      parameters={"config": config}, job_variables={"working_dir": str(folder)},
                                      **kwargs)  # fmt: skip

    found = [deployment(f"finetune-{pool}", "Fine-tune from an Olive config on this worker's machine")]
    if "nightly" in extras:
        found.append(deployment(f"finetune-{pool}-nightly", EXTRAS["nightly"], cron="0 2 * * *"))
    return found


def ensure_pool(pool: str, kind: str = "process", job_template: dict[str, Any] | None = None) -> bool:
    """The work pool, made if missing; True if it was made here."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=kind, base_job_template=job_template or {}))
        except ObjectAlreadyExists:
            return False
    return True


def parse_extras(text: str) -> set[str]:
    extras = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(extras - set(EXTRAS))
    if unknown:
        raise UserError("--with", f"'{unknown[0]}' is not a deployment grove server registers",
                        f"one or more of: {', '.join(EXTRAS)}")  # fmt: skip
    return extras


def register_gpu_deployment(extra: str, url: str) -> str:
    """A GPU deployment of the installed prefect.yaml, and its pool with the GPU job template."""
    name, pool, kind, template = GPU_DEPLOYMENTS[extra]
    ensure_pool(pool, kind, json.loads((DEPLOYMENTS_DIR / "work-pools" / template).read_text()))
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
               str(DEPLOYMENTS_DIR / "prefect.yaml"), "--name", name]  # fmt: skip
    done = subprocess.run(command, cwd=DEPLOYMENTS_DIR, env={**os.environ, "PREFECT_API_URL": url},
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError("--with", f"{extra}: prefect deploy failed ({last[0]})", "see `prefect deploy --help`")
    return name


def serve(pool: str, extras: set[str], config: Path | None, say) -> int:
    """Register, then run a worker until Ctrl-C; stops what it started (the worker, a server it started)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not POOL_NAME.fullmatch(pool):
        raise UserError("--pool", f"{pool!r} is not a work pool name", "letters, digits, spaces, '_', '-' and '.'")
    default, folder, shown = form_default(config)
    home = local_server.prefect_home()
    url, started = local_server.configured_api_url(), None
    if url is not None:
        local_server.check_answers(url)
    else:
        if local_server.mode() == "temporary":
            raise UserError("OLIVE_GROVE_LOCAL_SERVER", "is 'temporary': grove server needs a server that stays",
                            "unset it, or set PREFECT_API_URL to a running server")  # fmt: skip
        starting = local_server.start(home)
        try:
            server = starting.ready()
        except local_server.ServerFailed as exc:
            if starting.new:
                local_server.stop(home)
            raise UserError("grove server", str(exc), "or set PREFECT_API_URL to a running server") from None
        url, started = server.url, server if starting.new else None
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            made = ensure_pool(pool)
            names = []
            for deployment in deployments(pool, extras, default, folder):
                deployment.apply()
                names.append(deployment.name)
            names += [register_gpu_deployment(extra, url) for extra in sorted(extras & set(GPU_DEPLOYMENTS))]
        say(f"work pool '{pool}' ({'made' if made else 'there already'}); deployments: {', '.join(names)}")
        say(f"Prefect UI: {url.removesuffix('/api')} — Deployments → finetune-{pool} → Run → Custom run; the "
            f"form's config is {shown}; its relative paths are read from {folder}")  # fmt: skip
        say("a worker takes the runs; Ctrl-C stops it" + (" and the server" if started else ""))
        code, stopped = _worker(pool, url)
        if stopped:
            with temporary_settings({PREFECT_API_URL: url}):
                crashed = mark_stopped_runs_crashed(pool, stopped)
            if crashed:
                say(f"{crashed} run(s) stopped with the worker: Crashed in the UI; Retry runs them again")
        return code
    finally:
        if started is not None:
            local_server.stop(home)


def _worker(pool: str, url: str) -> tuple[int, set[int]]:
    """The worker, until it ends or Ctrl-C; returns its exit code and, when stopped, the PIDs of the flow
    runs it was running (its child processes then)."""
    env = {**os.environ, "PREFECT_API_URL": url}
    # SIGINT as Ctrl-C gives it, also when grove server was started with it ignored (`&` in a script, nohup).
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: stopped as by Ctrl-C
    try:
        return worker.wait(), set()
    except KeyboardInterrupt:
        running = _children(worker.pid)
        worker.send_signal(signal.SIGINT)  # the worker stops its runs' processes and deregisters
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        return 0, running


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux's /proc; elsewhere none are known)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def mark_stopped_runs_crashed(pool: str, pids: set[int]) -> int:
    """Runs the stopped worker was running would stay Running in the UI forever: they are Crashed, with
    what to do, so Retry takes them up from their cached steps. Returns how many."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    states = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=states),
                                     work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))  # fmt: skip
        stopped = {str(p) for p in pids}
        ours = [r for r in runs if str(r.infrastructure_pid or "").rsplit(":", 1)[-1] in stopped]
        message = "grove server stopped while this run ran; Retry runs it again from its cached steps"
        for run in ours:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return len(ours)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
