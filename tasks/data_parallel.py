"""Data-parallel training on every GPU of a worker: the training step launches itself under torchrun.

Each process trains on its share of every optimizer step's samples (the Trainer's DDP), so the effective
batch and the number of optimizer steps stay what the config says; process 0 saves the adapter and
reports progress and metrics back to the step, which stays one Prefect task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from olive_grove.tasks import adapters
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.speed import effective_batch, local_rank, release_compiled_layers

# Lines process 0 prints for the launching step: progress, and messages for the run log.
PROGRESS = "olive-grove-progress "
LOG = "olive-grove-log "


def process_count(settings: adapters.LoRASettings) -> int:
    """One process per GPU (or as many as `processes` asks for), as many as evenly split the batch."""
    import torch

    gpus = torch.cuda.device_count()
    wanted = gpus if settings.processes == "auto" else settings.processes
    if gpus:
        wanted = min(wanted, gpus)  # one process per GPU at most; on the CPU, gloo runs any number
    effective = effective_batch(settings)
    return max(d for d in range(1, max(wanted, 1) + 1) if effective % d == 0)


def train(
    settings: adapters.LoRASettings,
    model_path: str,
    dataset_dir: Path,
    checkpoint_dir: Path,
    out_dir: Path,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int, float | None], None] | None = None,
    log: Callable[[str], None] = print,
    eval_dir: Path | None = None,
) -> dict[str, Any]:
    """`adapters.train_adapter`, in this process or, with several processes, under torchrun."""
    processes = process_count(settings)
    if processes == 1:
        try:
            return adapters.train_adapter(settings, model_path, dataset_dir, checkpoint_dir, out_dir,
                                          trust_remote_code, on_progress, log, eval_dir)  # fmt: skip
        finally:
            release_compiled_layers()
    call = {
        "settings": settings.model_dump(mode="json"),
        "model_path": model_path,
        "dataset_dir": str(dataset_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "out_dir": str(out_dir),
        "trust_remote_code": trust_remote_code,
        "eval_dir": str(eval_dir) if eval_dir else None,
    }
    log(f"data parallel: {processes} processes, effective batch {effective_batch(settings)} split between them")
    with tempfile.TemporaryDirectory(prefix="grove-ddp-") as tmp:
        spec, metrics, error = (Path(tmp) / name for name in ("call.json", "metrics.json", "error.json"))
        spec.write_text(json.dumps({**call, "metrics": str(metrics), "error": str(error)}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "olive_grove.tasks.data_parallel", str(spec)]  # fmt: skip
        failed = _follow(command, on_progress, log)
        if error.is_file():  # a user mistake found by a process: the same one-line error as in-process
            raise UserError(*json.loads(error.read_text()))
        if failed:
            raise RuntimeError(failed)
        return json.loads(metrics.read_text())


def _follow(command: list[str], on_progress, log: Callable[[str], None]) -> str | None:
    """Run the launcher, passing process 0's progress and log lines on; on failure, the output's tail."""
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            line = line.rstrip()  # a marked line may follow a progress bar's carriage returns
            if PROGRESS in line:
                step, total, loss = json.loads(line.split(PROGRESS, 1)[1])
                if on_progress:
                    on_progress(step, total, loss)
            elif LOG in line:
                log(line.split(LOG, 1)[1])
            elif line:
                tail = [*tail[-40:], line]
    if process.returncode:
        return f"data-parallel training failed (exit {process.returncode}):\n" + "\n".join(tail)
    return None


def _main(spec_path: str) -> None:
    """One torchrun process: train, and on process 0 write the metrics for the launching step."""
    import torch

    if torch.cuda.is_available():  # "cuda" means this process's GPU, for every library that says only that
        torch.cuda.set_device(local_rank())
    call = json.loads(Path(spec_path).read_text())
    kind = adapters.QLoRASettings if call["settings"]["type"] == "QLoRA" else adapters.LoRASettings
    first = int(os.environ.get("RANK", "0")) == 0

    def progress(step: int, total: int, loss: float | None) -> None:
        if first:
            print(PROGRESS + json.dumps([step, total, loss]), flush=True)

    try:
        metrics = adapters.train_adapter(
            kind.model_validate(call["settings"]),
            call["model_path"],
            Path(call["dataset_dir"]),
            Path(call["checkpoint_dir"]),
            Path(call["out_dir"]),
            trust_remote_code=call["trust_remote_code"],
            on_progress=progress,
            log=lambda text: print(LOG + text, flush=True) if first else None,
            eval_dir=Path(call["eval_dir"]) if call["eval_dir"] else None,
        )
    except UserError as exc:
        Path(call["error"]).write_text(json.dumps([exc.where, exc.problem, exc.hint]))
        raise
    if first:
        Path(call["metrics"]).write_text(json.dumps(metrics))


if __name__ == "__main__":
    _main(sys.argv[1])
