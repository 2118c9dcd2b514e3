"""Unsloth on one case of the training benchmark, in a process of its own: Unsloth patches transformers and
peft as it is imported, so it must come first, and must not change the other runs.

    python benchmarks/unsloth_peer.py CASE MODEL_DIR TRAINING_ARGS_JSON STEPS WARMUP OUT [--tiny]

Its FastLanguageModel with its own defaults (its offloaded gradient checkpointing), the benchmark's LoRA,
rows and training arguments (our micro-batch); prints one JSON line: tok_s and peak_gib.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model folder: nothing to ask the hub
import unsloth  # noqa: F401, I001  (first: it patches what follows)
from unsloth import FastLanguageModel

import json
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as bench


def main(argv: list[str]) -> dict:
    case, model_dir, args, steps, warmup, out = argv[:6]
    cfg = bench.phi3_mini_config("--tiny" in argv)
    rows, quantized, pack_to, _ = bench.make_cases(cfg.vocab_size, "--tiny" in argv, int(steps))[case]
    data = bench.samples(rows, pack_to)
    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=max(map(len, data["input_ids"])),
                                                 dtype=torch.bfloat16, load_in_4bit=quantized)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=bench.LORA["r"], lora_alpha=bench.LORA["alpha"],
                                             lora_dropout=bench.LORA["lora_dropout"],
                                             target_modules=bench.LORA["target_modules"])  # fmt: skip
    from transformers import Trainer, TrainingArguments

    meter = bench.Meter(int(warmup))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out,
            max_steps=int(steps),
            report_to="none",
            remove_unused_columns=False,
            bf16=True,
            disable_tqdm=True,
            **json.loads(args),
        ),
        train_dataset=bench.as_dataset(data),
        data_collator=meter.collator(bench.pad_collator(0)),
        callbacks=[meter.callback()],
    )
    trainer.train()
    return {"tok_s": round(meter.tokens_per_second(), 1), "peak_gib": round(meter.peak_gib(), 2)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
