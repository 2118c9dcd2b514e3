"""`grove submit`: send a run to the work pool that the config's host system maps to, through its deployment."""

from __future__ import annotations

from olive_grove.flows.config import RunConfig
from olive_grove.flows.run_setup import RunOptions, deployed_run_folder
from olive_grove.tasks.errors import UserError

FLOW_NAME = "finetune"
# Olive's system types and the work pools of deployments/prefect.yaml that stand for them.
DEFAULT_POOLS = {
    "LocalSystem": "local",
    "PythonEnvironment": "local",
    "IsolatedORT": "local",
    "Docker": "gpu-docker",
    "AzureML": "gpu-k8s",
}


def work_pool_for(cfg: RunConfig) -> str:
    """The host system's `work_pool`, else the pool its type maps to; no host runs on `local`."""
    host = cfg.systems.get(cfg.engine.host or "")
    if host is None:
        return "local"
    return host.work_pool or DEFAULT_POOLS[host.type]


def submit(cfg: RunConfig, config_path: str, options: RunOptions) -> tuple[str, str, str]:
    """Create a flow run of the pool's `finetune` deployment; returns the deployment's name, the flow run's
    id and where its outputs will be."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserError("PREFECT_API_URL", "is not set", "grove submit sends runs to a Prefect server; see README")
    pool = work_pool_for(cfg)
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
    if not found:
        where = f"systems.{cfg.engine.host}" if cfg.engine.host else "engine.host"
        raise UserError(where, f"no '{FLOW_NAME}' deployment on work pool '{pool}'",
                        "prefect deploy --all --prefect-file deployments/prefect.yaml")  # fmt: skip
    deployment = min(found, key=lambda d: (bool(d.schedules), d.name))  # an unscheduled one, if any
    run = run_deployment(deployment.id, parameters={"config": config_path, **options.as_parameters()}, timeout=0)
    outputs = deployed_run_folder(cfg, options, run.name, str(run.id))
    return f"{FLOW_NAME}/{deployment.name}", str(run.id), outputs
