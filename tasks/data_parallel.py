"""Data-parallel training on every GPU of a worker: the training step launches itself under torchrun.

Each process trains on its share of every optimizer step's samples (the Trainer's DDP), so the effective
batch and the number of optimizer steps stay what the config says; process 0 saves the adapter and
reports progress and log lines back to the step, which stays one Prefect task. Every process runs the
same `adapters.train_adapter` call as a single process would, with its `Placement`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from olive_grove.tasks.adapter_settings import AdapterSettings
from olive_grove.tasks.adapters import AdapterInfo, train_adapter
from olive_grove.tasks.artifact import Artifact, Reporter, StepFiles, TrainingProgress
from olive_grove.tasks.data import DatasetInfo
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import ModelInfo
from olive_grove.tasks.speed import Placement, effective_batch

# Lines process 0 prints for the launching step: progress, and messages for the run log.
PROGRESS = "olive-grove-progress "
LOG = "olive-grove-log "
INPUT_TYPES = {"model": Artifact[ModelInfo], "dataset": Artifact[DatasetInfo], "eval_dataset": Artifact[DatasetInfo]}


def process_count(settings: AdapterSettings) -> int:
    """One process per GPU (or as many as `processes` asks for), as many as evenly split the batch."""
    import torch

    gpus = torch.cuda.device_count()
    wanted = gpus if settings.processes == "auto" else settings.processes
    if gpus:
        wanted = min(wanted, gpus)  # one process per GPU at most; on the CPU, gloo runs any number
    effective = effective_batch(settings)
    return max(d for d in range(1, max(wanted, 1) + 1) if effective % d == 0)


def launch(
    processes: int, settings: AdapterSettings, files: StepFiles, report: Reporter, **inputs: Artifact | None
) -> AdapterInfo:
    """`train_adapter` in `processes` torchrun processes; returns process 0's result."""
    report.log(f"data parallel: {processes} processes, effective batch {effective_batch(settings)} split between them")
    with tempfile.TemporaryDirectory(prefix="grove-ddp-") as tmp:
        spec, result, error = (Path(tmp) / name for name in ("call.json", "result.json", "error.json"))
        call = {
            "settings": settings.model_dump(mode="json"),
            "files": {k: str(v) for k, v in asdict(files).items()},
            "inputs": {k: a.model_dump(mode="json") for k, a in inputs.items() if a is not None},
            "result": str(result),
            "error": str(error),
        }
        spec.write_text(json.dumps(call))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "olive_grove.tasks.data_parallel", str(spec)]  # fmt: skip
        failed = _follow(command, report)
        if error.is_file():  # a user mistake found by a process: the same one-line error as in-process
            raise UserError(*json.loads(error.read_text()))
        if failed:
            raise RuntimeError(failed)
        return AdapterInfo.model_validate_json(result.read_text())


def _follow(command: list[str], report: Reporter) -> str | None:
    """Run the launcher, passing process 0's progress and log lines on; on failure, the output's tail."""
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            line = line.rstrip()  # a marked line may follow a progress bar's carriage returns
            if PROGRESS in line:
                report.progress(TrainingProgress(**json.loads(line.split(PROGRESS, 1)[1])))
            elif LOG in line:
                report.log(line.split(LOG, 1)[1])
            elif line:
                tail = [*tail[-40:], line]
    if process.returncode:
        return f"data-parallel training failed (exit {process.returncode}):\n" + "\n".join(tail)
    return None


class _FirstProcessReporter(Reporter):
    """Process 0 prints marked lines for the launching step; the others stay quiet."""

    def __init__(self, first: bool) -> None:
        self.first = first

    def log(self, message: str) -> None:
        if self.first:
            print(LOG + message, flush=True)

    def progress(self, update: TrainingProgress) -> None:
        if self.first:
            print(PROGRESS + json.dumps(asdict(update)), flush=True)


def _main(spec_path: str) -> None:
    """One torchrun process: train with its placement, and on process 0 write the result for the launcher."""
    import torch

    from olive_grove.tasks.passes import PASS_TYPES

    placement = Placement(
        rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]), world_size=int(os.environ["WORLD_SIZE"])
    )
    if torch.cuda.is_available():  # "cuda" means this process's GPU, for every library that says only that
        torch.cuda.set_device(placement.local_rank)
    call = json.loads(Path(spec_path).read_text())
    settings = PASS_TYPES[call["settings"]["type"]].settings.model_validate(call["settings"])
    files = StepFiles(**{k: Path(v) for k, v in call["files"].items()})
    inputs = {k: INPUT_TYPES[k].model_validate(v) for k, v in call["inputs"].items()}
    try:
        info = train_adapter(settings, files, _FirstProcessReporter(placement.rank == 0), placement=placement,
                             **inputs)  # fmt: skip
    except UserError as exc:
        Path(call["error"]).write_text(json.dumps([exc.where, exc.problem, exc.hint]))
        raise
    if placement.rank == 0:
        Path(call["result"]).write_text(info.model_dump_json())


if __name__ == "__main__":
    _main(sys.argv[1])
