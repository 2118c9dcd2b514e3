"""One peer of the training benchmark on one case, in a process of its own. Each peer patches transformers
for the whole process — Unsloth as it is imported (so it must come first), Liger Kernel when the Trainer
applies it (Phi-3's module-level RMSNorm, rotary and MLP) — and that must not reach the runs after it.

    python benchmarks/peer_run.py PEER CASE MODEL_DIR TRAINING_ARGS_JSON STEPS WARMUP OUT [--tiny]

`liger`: HF Trainer + PEFT with `use_liger_kernel`. `unsloth`: its FastLanguageModel with its own defaults
(its offloaded gradient checkpointing). Both on the benchmark's LoRA, rows and training arguments (our
micro-batch). Prints one JSON line: tok_s and peak_gib, or error.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model folder: nothing to ask the hub
if sys.argv[1:2] == ["unsloth"]:
    try:
        import unsloth  # noqa: F401  (first: it patches what follows)
    except ImportError as exc:
        print(f'{{"error": "not installed: {exc}"}}')
        sys.exit(0)

import json
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as bench


def main(argv: list[str]) -> dict:
    peer, case, model_dir, args, steps, warmup, out = argv[:7]
    tiny = "--tiny" in argv
    cfg = bench.phi3_mini_config(tiny)
    rows, quantized, pack_to, _ = bench.make_cases(cfg.vocab_size, tiny, int(steps))[case]
    data = bench.samples(rows, pack_to)
    if peer == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            return {"error": f"not installed: {exc}"}
        model = bench.load_base(Path(model_dir), quantized)
        tok_s, peak = bench.run_baseline(model, data, json.loads(args), int(steps), int(warmup), Path(out), liger=True)
    else:
        tok_s, peak = unsloth_run(model_dir, data, quantized, json.loads(args), int(steps), int(warmup), out)
    return {"tok_s": round(tok_s, 1), "peak_gib": round(peak, 2)}


def unsloth_run(model_dir: str, data: dict, quantized: bool, args: dict, steps: int, warmup: int, out: str):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=max(map(len, data["input_ids"])),
                                                 dtype=torch.bfloat16, load_in_4bit=quantized)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=bench.LORA["r"], lora_alpha=bench.LORA["alpha"],
                                             lora_dropout=bench.LORA["lora_dropout"],
                                             target_modules=bench.LORA["target_modules"])  # fmt: skip
    return bench.run_trainer(model, data, args, steps, warmup, Path(out))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
