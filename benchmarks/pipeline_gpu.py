"""The guide's run end to end, step by step, on a random Phi-3-mini-shaped model: how long each step takes
and how much host and GPU memory it needs at its peak — what a machine must have to run the guide, and
whether ModelBuilder's int4 build of Phi-3-mini fits in 16 GiB of host memory (the goal the JSON records).

The config is the guide's (`examples/tone/phi3-mini-gpu.json`), loaded as `grove run` loads it, with the
model path pointed at the random model (built from Phi-3-mini's config, bfloat16 like Phi-3-mini, with a
tokenizer trained on the tone dataset; nothing downloaded). The steps are olive-grove's own functions,
called without Prefect as the flow calls them: prepare the dataset, train the LoRA adapter, merge it, and
build the merged model with ModelBuilder in int4 for CUDA and for CPU. Each step runs in a process of its
own, so its host peak (the process's RSS high-water mark, interpreter and imports included, as in a run)
is that step's alone. GPU peak is the most torch reserved during the step; ONNX Runtime's own GPU memory
is not counted (ModelBuilder quantizes on the CPU).

    python benchmarks/pipeline_gpu.py                   # on a GPU: Phi-3-mini's shape, the guide's 10 steps
    python benchmarks/pipeline_gpu.py --tiny --steps 2  # anywhere: a tiny model, a smoke test
    python benchmarks/pipeline_gpu.py --builds-only     # a CPU machine: the two int4 builds of the random model
    python benchmarks/pipeline_gpu.py --builder-alone   # beside each build, ModelBuilder's own (all in memory)

Prints a markdown table and writes benchmarks/results/<gpu>-pipeline.json (tiny-<gpu>-... with --tiny,
<gpu>-pipeline-builds.json with --builds-only: the random model is the merged model's shape and dtype, so
its builds need what the merged model's do, without training it on a machine that cannot).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import phi3_mini_config
from olive_grove.flows.config import RunConfig, load_run_config
from olive_grove.flows.project import corpus_lines
from olive_grove.tasks import onnx_build
from olive_grove.tasks.adapters import AdapterInfo
from olive_grove.tasks.artifact import Artifact, Reporter, StepFiles, StepInfo
from olive_grove.tasks.data import DatasetInfo, fingerprint_data
from olive_grove.tasks.merge import MergedInfo
from olive_grove.tasks.models import ModelInfo
from olive_grove.tasks.onnx_build import ModelBuilderSettings, OnnxInfo
from olive_grove.tasks.passes import BUILD_ONNX_MODEL, PASS_TYPES, PREPARE_DATASET, Step
from olive_grove.tasks.quiet import quiet_libraries, quiet_library_defaults
from olive_grove.tasks.tiny_model import train_tokenizer

GUIDE = Path(__file__).resolve().parents[1] / "examples" / "tone" / "phi3-mini-gpu.json"
GOAL_GIB = 16.0
GOAL = f"ModelBuilder int4 of Phi-3-mini with host peak <= {GOAL_GIB:g} GiB"


@dataclass(frozen=True)
class Job:
    """One measured step: the function and settings the flow would call, the earlier jobs whose Artifacts it
    is handed (by the step's input name), and the kind of info it gives, to rebuild its Artifact from JSON."""

    name: str
    step: Step
    settings: Any
    inputs: dict[str, str]
    gives: type[StepInfo]


def builder_alone(settings: ModelBuilderSettings, files: StepFiles, report: Reporter, *, model) -> OnnxInfo:
    """The step with ModelBuilder saving as it does on its own, every float weight in memory as it quantizes
    (no scratch file): the host peak the scratch file saves, side by side."""
    with mock.patch.object(onnx_build, "float_weights_on_disk", lambda scratch: contextlib.nullcontext([])):
        return onnx_build.build_onnx_model(settings, files, report, model=model)


BUILDER_ALONE = Step(builder_alone, version="benchmark")


def load_guide(state: dict[str, Any]) -> RunConfig:
    """The guide's config on the random model, trained in one process: several GPUs would train in torchrun
    processes whose memory the step's process does not see."""
    overrides = [f"input_model.model_path={state['model']}", "passes.lora.processes=1"]
    return load_run_config(GUIDE, overrides, training_args=state["training_args"])[0]


def plan(cfg: RunConfig, builds_only: bool = False, builder_alone: bool = False) -> list[Job]:
    """The guide's three passes as `run_passes` walks them (it imports Prefect, so its walk is written out
    here for these passes: the dataset step the LoRA pass asks for, then each pass on what the one before
    left), with the int4 build made once for CUDA and once for CPU."""
    lora, merge, builder = cfg.passes.values()
    data_configs = {d.name: d for d in cfg.data_configs}
    fingerprints = {name: fingerprint_data(data_configs[name]) for name in lora.data_config_names().values()}
    dataset = lora.datasets(data_configs, fingerprints)["dataset"]
    built = "input" if builds_only else "merge"
    variants = [(BUILD_ONNX_MODEL, ""), *([(BUILDER_ALONE, "-builder-alone")] if builder_alone else [])]
    builds = []
    for ep in ("cuda", "cpu"):
        b = builder.model_copy(update={"execution_provider": ep})
        builds += [Job(f"{b.precision}-{ep}{suffix}", step, b, {"model": built}, OnnxInfo) for step, suffix in variants]
    if builds_only:
        return builds
    return [
        Job("dataset", PREPARE_DATASET, dataset, {"model": "input"}, DatasetInfo),
        Job("lora", PASS_TYPES[lora.type].step, lora, {"model": "input", "dataset": "dataset"}, AdapterInfo),
        Job("merge", PASS_TYPES[merge.type].step, merge, {"model": "input", "adapter": "lora"}, MergedInfo),
        *builds,
    ]


# ------------------------------------------------------------------------------- one step, in a child


def run_job(name: str, state_path: Path) -> None:
    """Run one step in this process; write its Artifact, seconds and peaks beside the state for the parent."""
    import torch

    state = json.loads(state_path.read_text())
    jobs = {job.name: job for job in plan(load_guide(state), state["builds_only"], state["builder_alone"])}
    job = jobs[name]
    kinds = {"input": ModelInfo, **{j.name: j.gives for j in jobs.values()}}
    inputs = {arg: Artifact[kinds[src]].model_validate(state["artifacts"][src]) for arg, src in job.inputs.items()}
    root = Path(state["work"]) / name
    files = StepFiles(out=root / "out", work=root / "work", downloads=Path(state["work"]) / "downloads")
    files.out.mkdir(parents=True)
    started = time.perf_counter()
    with quiet_libraries():
        info = job.step.run(job.settings, files, Reporter(), **inputs)
    info.seconds = round(time.perf_counter() - started, 2)
    artifact = Artifact(path=str(files.out), fingerprint=f"benchmark:{name}", info=info)
    host = host_peak_bytes()
    gpu = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    result = {"artifact": artifact.model_dump(mode="json"), "host_peak_gib": round(host / 2**30, 2),
              "gpu_peak_gib": None if gpu is None else round(gpu / 2**30, 2)}  # fmt: skip
    (state_path.parent / f"{name}.json").write_text(json.dumps(result))


def host_peak_bytes() -> int:
    """This process's RSS high-water mark since it started. Not getrusage's ru_maxrss: Linux carries that
    over from the process that spawned it (the parent's peak, which building the model made gigabytes)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


# ------------------------------------------------------------------------------------ the whole run


def save_model(work: Path, tiny: bool) -> Path:
    """The random model and its tokenizer, kept in `work` for the next run (whole, or not at all)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = work / ("tiny-phi3" if tiny else "phi3-mini-random")
    if folder.exists():
        return folder
    tokenizer = train_tokenizer(corpus_lines([]))
    cfg = phi3_mini_config(tiny)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                            tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is minutes on a CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the GPU is the steps' own while they run
    return folder


def run_pipeline(model: Path, work: Path, max_steps: int | None, builds_only: bool,
                 builder_alone: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Each step in a child process of its own, handed the Artifacts the ones before it wrote."""
    steps_dir = work / "steps"
    shutil.rmtree(steps_dir, ignore_errors=True)  # training would resume from an earlier run's checkpoints
    steps_dir.mkdir(parents=True)
    state: dict[str, Any] = {"model": str(model), "work": str(steps_dir),
                             "training_args": {"max_steps": max_steps} if max_steps else None,
                             "builds_only": builds_only, "builder_alone": builder_alone}  # fmt: skip
    cfg = load_guide(state)
    source = cfg.model_source()
    info = ModelInfo(source="local", name=source.name, trust_remote_code=source.trust_remote_code)
    state["artifacts"] = {"input": Artifact(path=str(model), fingerprint="benchmark:input", info=info).model_dump()}
    state_path, rows = steps_dir / "state.json", []
    for job in plan(cfg, builds_only, builder_alone):
        state_path.write_text(json.dumps(state))
        print(f"{job.name} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--step", job.name, "--state", str(state_path)], check=True)
        result = json.loads((steps_dir / f"{job.name}.json").read_text())
        state["artifacts"][job.name] = result["artifact"]
        step_info = job.gives.model_validate(result["artifact"]["info"])
        rows.append({"step": job.name, "function": job.step.name, "seconds": step_info.seconds,
                     "host_peak_gib": result["host_peak_gib"], "gpu_peak_gib": result["gpu_peak_gib"],
                     "info": scalars(step_info)})  # fmt: skip
    return rows


def scalars(info: StepInfo) -> dict[str, Any]:
    """What a step measured beside its time, as its report row shows it: sizes, losses, counts."""
    fields = info.model_dump(mode="json", exclude_none=True, exclude={"seconds"})
    return {key: value for key, value in fields.items() if not isinstance(value, (list, dict))}


def goal(rows: list[dict[str, Any]], tiny: bool) -> dict[str, Any]:
    """Whether every int4 ModelBuilder build stayed within the goal; a tiny model's builds say nothing of it."""
    peak = max(r["host_peak_gib"] for r in rows if r["function"] == BUILD_ONNX_MODEL.name)
    return {"what": GOAL, "limit_gib": GOAL_GIB, "host_peak_gib": peak, "met": None if tiny else peak <= GOAL_GIB}


def print_table(rows: list[dict[str, Any]], gpu: str, target: dict[str, Any]) -> None:
    print(f"\n{gpu}\n\n| step | function | seconds | host peak GiB | GPU peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        gpu_peak = "–" if r["gpu_peak_gib"] is None else f"{r['gpu_peak_gib']:.2f}"
        print(f"| {r['step']} | {r['function']} | {r['seconds']:.2f} | {r['host_peak_gib']:.2f} | {gpu_peak} |")
    verdict = {True: "met", False: "not met", None: "not measured (tiny model)"}[target["met"]]
    print(f"\ngoal: {GOAL}: {verdict} (ModelBuilder host peak {target['host_peak_gib']:.2f} GiB)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on any device: a smoke test, not a measurement")
    parser.add_argument("--builds-only", action="store_true", help="only the int4 builds, of the random model")
    parser.add_argument(
        "--builder-alone",
        action="store_true",
        help="beside each build, ModelBuilder's own, every weight in memory: the host peak it saves",
    )
    parser.add_argument("--steps", type=int, default=None, help="training max_steps; default: the guide's")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olive-grove-pipeline"))
    parser.add_argument("--step", help=argparse.SUPPRESS)  # in a child process: run this one step
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    quiet_library_defaults()
    if opts.step:
        run_job(opts.step, opts.state)
        return {}
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = run_pipeline(save_model(opts.work, opts.tiny), opts.work, opts.steps, opts.builds_only, opts.builder_alone)
    shape = phi3_mini_config(opts.tiny)
    target = goal(rows, opts.tiny)
    summary = {
        "gpu": gpu,
        "model": {key: getattr(shape, key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size", "vocab_size")} | {"dtype": "bfloat16"},
        "config": GUIDE.relative_to(GUIDE.parents[2]).as_posix(),
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "onnxruntime-genai")},
        "command": " ".join(sys.argv),
        "steps": rows,
        "goal": target,
    }  # fmt: skip
    print_table(rows, gpu, target)
    opts.out.mkdir(parents=True, exist_ok=True)
    name = gpu.split()[1].lower() if torch.cuda.is_available() else "cpu"
    file = opts.out / f"{'tiny-' if opts.tiny else ''}{name}-pipeline{'-builds' if opts.builds_only else ''}.json"
    file.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {file}")
    return summary


if __name__ == "__main__":
    main()
