"""`grove server`: the Prefect UI as a place to start runs, in one command, from an installed olive-grove.

It uses PREFECT_API_URL when one is configured, else the local server `grove run` keeps (starting it), makes
the process work pool, registers the deployments of the installed `finetune` flow (by module path, so the
worker needs no checkout: it imports olive_grove), and runs a worker for the pool until Ctrl-C. Runs started
from the UI read relative config paths from the folder `grove server` was started in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from olive_grove.flows import local_server
from olive_grove.tasks.errors import UserError

POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}")
EXTRAS = {"nightly": "the config every night at 02:00 UTC (a smoke test of the pipeline)"}


def deployments(pool: str, extras: set[str]) -> list:
    """The `finetune` flow's deployments for a process pool: one to run on request, and those asked for."""
    from prefect.types.entrypoint import EntrypointType

    from olive_grove.flows.finetune import finetune

    def deployment(name: str, description: str, **kwargs):
        return finetune.to_deployment(name=name, description=description, work_pool_name=pool,
                                      entrypoint_type=EntrypointType.MODULE_PATH, tags=["olive-grove", pool],
                                      job_variables={"working_dir": str(Path.cwd())}, **kwargs)  # fmt: skip

    found = [deployment(f"finetune-{pool}", "Fine-tune from an Olive config on this worker's machine")]
    if "nightly" in extras:
        found.append(deployment("finetune-nightly", EXTRAS["nightly"], cron="0 2 * * *"))
    return found


def ensure_pool(pool: str) -> bool:
    """The process work pool, made if missing; True if it was made here."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            return False
    return True


def parse_extras(text: str) -> set[str]:
    extras = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(extras - set(EXTRAS))
    if unknown:
        raise UserError("--with", f"'{unknown[0]}' is not a deployment grove server registers",
                        f"one of: {', '.join(EXTRAS)}; the Docker and Kubernetes deployments are in "
                        "deployments/prefect.yaml (prefect deploy)")  # fmt: skip
    return extras


def serve(pool: str, extras: set[str], say) -> int:
    """Register, then run a worker until Ctrl-C; stops what it started (the worker, a server it started)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not POOL_NAME.fullmatch(pool):
        raise UserError("--pool", f"{pool!r} is not a work pool name", "letters, digits, spaces, '_', '-' and '.'")
    home = local_server.prefect_home()
    url, started = local_server.configured_api_url(), None
    if url is not None:
        local_server.check_answers(url)
    else:
        if local_server.mode() == "temporary":
            raise UserError("OLIVE_GROVE_LOCAL_SERVER", "is 'temporary': grove server needs a server that stays",
                            "unset it, or set PREFECT_API_URL to a running server")  # fmt: skip
        starting = local_server.start(home)
        server = starting.ready()
        url, started = server.url, server if starting.new else None
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            made = ensure_pool(pool)
            names = []
            for deployment in deployments(pool, extras):
                deployment.apply()
                names.append(deployment.name)
        say(f"work pool '{pool}' ({'made' if made else 'there already'}); deployments: {', '.join(names)}")
        say(f"Prefect UI: {url.removesuffix('/api')} — Deployments → finetune-{pool} → Run; runs read relative "
            f"config paths from {Path.cwd()}")  # fmt: skip
        say("a worker takes the runs; Ctrl-C stops it" + (" and the server" if started else ""))
        return _worker(pool, url)
    finally:
        if started is not None:
            local_server.stop(home)


def _worker(pool: str, url: str) -> int:
    env = {**os.environ, "PREFECT_API_URL": url}
    # SIGINT as Ctrl-C gives it, also when grove server was started with it ignored (`&` in a script, nohup).
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: stopped as by Ctrl-C
    try:
        return worker.wait()
    except KeyboardInterrupt:
        worker.send_signal(signal.SIGINT)  # the worker cancels what it runs and deregisters
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
