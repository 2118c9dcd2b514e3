"""Data-parallel scaling of olive-grove's training step: one GPU against all of them, same everything else.

The real step (`olive_grove.tasks.adapters.train_adapter`, which launches itself under torchrun for several GPUs) trains
a random Phi-3-mini-shaped model, saved to disk first, on synthetic 2048-token samples; the same LoRA,
effective batch and optimizer steps in both runs. Tokens/s counts the steps after warm-up, timed by the
progress process 0 reports.

    python benchmarks/data_parallel.py            # on a machine with 2+ GPUs
    python benchmarks/data_parallel.py --tiny     # anywhere (CPU: gloo processes), a smoke test

Prints a table and writes benchmarks/results/<gpu>x<n>-data-parallel.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import GUIDE_ARGS, phi3_mini_config
from olive_grove.tasks.adapter_settings import LoRASettings
from olive_grove.tasks.adapters import train_adapter
from olive_grove.tasks.artifact import Artifact, Reporter, StepFiles, TrainingProgress
from olive_grove.tasks.data import DatasetInfo
from olive_grove.tasks.models import ModelInfo
from olive_grove.tasks.tiny_model import train_tokenizer


def save_model(root: Path, tiny: bool) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = phi3_mini_config(tiny)
    tokenizer = train_tokenizer(["olive grove benchmark text"] * 8, vocab_size=min(cfg.vocab_size, 512))
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    return root / "model"


def save_samples(root: Path, vocab: int, count: int, length: int) -> Path:
    import datasets

    rng = random.Random(0)
    rows = [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(count)]
    datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}).save_to_disk(str(root / "data" / "train"))
    return root / "data"


def measure(model: Path, data: Path, root: Path, processes: int, steps: int, warmup: int, tiny: bool) -> dict:
    args = {**GUIDE_ARGS, "max_steps": steps, "bf16": torch.cuda.is_available(), "disable_tqdm": True}
    settings = LoRASettings(train_data_config="x", r=64, alpha=64, lora_dropout=0.1,
                            target_modules=["qkv_proj", "o_proj"], processes=processes, training_args=args,
                            torch_dtype="bfloat16" if torch.cuda.is_available() else "float32")  # fmt: skip
    clock = StepClock()
    started = time.perf_counter()
    length = 64 if tiny else 2048
    rows = steps * args["per_device_train_batch_size"] * args["gradient_accumulation_steps"]
    dataset = DatasetInfo(rows=rows, samples={"train": rows}, tokens=rows * length, strategy="join", max_seq_len=length)
    out = root / f"adapter{processes}"
    out.mkdir()
    base = Artifact(path=str(model), fingerprint="", info=ModelInfo(source="local", name=str(model)))
    info = train_adapter(settings, StepFiles(out=out, work=root / f"work{processes}", downloads=root), clock,
                         model=base, dataset=Artifact(path=str(data), fingerprint="", info=dataset))  # fmt: skip
    samples = (steps - warmup) * args["per_device_train_batch_size"] * args["gradient_accumulation_steps"]
    seconds = clock.stamps[steps] - clock.stamps[warmup]
    return {"processes": info.processes, "micro_batch": info.micro_batch, "tok_s": samples * length / seconds,
            "train_loss": info.train_loss, "wall_s": time.perf_counter() - started}  # fmt: skip


class StepClock(Reporter):
    """When each optimizer step ended, from the step's own progress reports."""

    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}

    def log(self, message: str) -> None:
        print(f"  {message}")

    def progress(self, update: TrainingProgress) -> None:
        self.stamps.setdefault(update.step, time.perf_counter())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, any device: a smoke test, not a measurement")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--processes", type=int, default=None, help="default: every GPU (2 on the CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    opts = parser.parse_args(argv)
    many = opts.processes or max(torch.cuda.device_count(), 2)
    with tempfile.TemporaryDirectory(prefix="grove-dp-bench-") as tmp:
        root = Path(tmp)
        model = save_model(root, opts.tiny)
        samples = opts.steps * GUIDE_ARGS["per_device_train_batch_size"] * GUIDE_ARGS["gradient_accumulation_steps"]
        data = save_samples(root, 512, samples, 64 if opts.tiny else 2048)
        one = measure(model, data, root, 1, opts.steps, opts.warmup, opts.tiny)
        all_ = measure(model, data, root, many, opts.steps, opts.warmup, opts.tiny)
    gpu = torch.cuda.get_device_name(0).split()[1] if torch.cuda.is_available() else "cpu"
    result = {"gpu": gpu, "case": "lora-2048" if not opts.tiny else "tiny", "one": one, "all": all_,
              "scaling": all_["tok_s"] / one["tok_s"]}  # fmt: skip
    print("| processes | micro-batch | tokens/s |\n|---|---|---|")
    for run in (one, all_):
        print(f"| {run['processes']} | {run['micro_batch'][0]} x {run['micro_batch'][1]} | {run['tok_s']:.0f} |")
    print(f"scaling: {result['scaling']:.2f}x on {all_['processes']} ({gpu})")
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{gpu.lower()}x{all_['processes']}-data-parallel.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
