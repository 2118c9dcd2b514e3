"""A run that fails at its ONNX build, fixed in its config and retried as the Prefect UI retries it: the same
flow run goes back to Scheduled, the worker runs it again, and training is not done twice.

The failure is one that only the build finds: `extra_options: {"use_paged_attention": true}` — a ModelBuilder
option of GPU configs — is handed to ModelBuilder as it is, and ModelBuilder refuses it for the CPU execution
provider (PagedAttention needs CUDA or WebGPU with fp16/bf16) once the adapter is trained and merged.
"""

from __future__ import annotations

import json

import pytest

from .e2e_helpers import PrefectServer, assert_outputs, run_deployment, write_config

pytestmark = pytest.mark.e2e

# What the UI's Retry button sends (prefect 3.8.8, ui-v2 flow run page; the v1 UI sends the same state with
# force=false): POST /api/flow_runs/{id}/set_state.
UI_RETRY = {"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True}


def _states(server: PrefectServer, flow_run_id: str, task: str) -> list[str]:
    """The states of a step's task runs in this flow run (named after its pass), oldest first."""
    return [t["state"]["name"] for t in server.task_runs(flow_run_id) if t["name"] == task]


def test_failed_build_fixed_and_retried_reuses_training(prefect_server: PrefectServer, worker, tiny_model, tmp_path):
    server = prefect_server
    project = tmp_path / "project"
    config = write_config(
        project,
        tiny_model,
        builder={"type": "ModelBuilder", "precision": "int4", "extra_options": {"use_paged_attention": True}},
    )
    flow_run_id = run_deployment(server, "finetune-local", f"config={config}")

    failed = server.wait_for_run(flow_run_id)
    assert failed["state"]["type"] == "FAILED", server.describe(flow_run_id)
    logs = server.logs(flow_run_id)
    assert "PagedAttention" in logs, logs[-4000:]
    # Training and the merge finished before the build failed; nothing was published.
    assert _states(server, flow_run_id, "lora") == ["Completed"]
    assert _states(server, flow_run_id, "merge") == ["Completed"]
    assert _states(server, flow_run_id, "builder") == ["Failed"]
    assert not list((project / "outputs").rglob("report.json"))

    # The fix, in place: drop the GPU-only option.
    fixed = json.loads(config.read_text())
    del fixed["passes"]["builder"]["extra_options"]
    config.write_text(json.dumps(fixed, indent=2))

    response = server.api.post(f"/flow_runs/{flow_run_id}/set_state", json=UI_RETRY)
    response.raise_for_status()
    assert response.json()["status"] == "ACCEPT", response.json()

    retried = server.wait_for_run(flow_run_id, after_state=failed["state"]["id"])
    assert retried["state"]["type"] == "COMPLETED", server.describe(flow_run_id)
    assert retried["id"] == flow_run_id
    assert retried["run_count"] == 2

    report = assert_outputs(project / "outputs", retried)
    # The steps before the failed one came from the cache; the build ran with the fixed settings.
    assert {"lora/dataset", "lora", "merge"} <= set(report["cached_steps"]), report["cached_steps"]
    assert "builder" not in report["cached_steps"]
    # The server agrees: the retry's training task run is Cached, not a second Completed training.
    assert _states(server, flow_run_id, "lora") == ["Completed", "Cached"]
    assert _states(server, flow_run_id, "builder") == ["Failed", "Completed"]
