"""One peer of the training benchmark on one case, in a process of its own. Each peer patches transformers
for the whole process — Unsloth as it is imported (so it must come first), Liger Kernel when the Trainer
applies it (Phi-3's module-level RMSNorm, rotary and MLP) — and that must not reach the runs after it.

    python benchmarks/peer_run.py PEER CASE MODEL_DIR TRAINING_ARGS_JSON STEPS WARMUP OUT [--tiny]

`liger`: HF Trainer + PEFT with `use_liger_kernel`. `unsloth`: its FastLanguageModel with its own defaults
(its offloaded gradient checkpointing). Both on the benchmark's LoRA, rows and training arguments (our
micro-batch). Prints one line, `peer result: ` and JSON: tok_s, peak_gib and version, or error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "unsloth": ("unsloth", "unsloth")}  # module, distribution


def make_parser() -> argparse.ArgumentParser:
    """The case is checked after the peer's import, since the benchmark that knows the cases imports transformers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=sorted(PACKAGES))
    parser.add_argument("case")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("training_args", type=json.loads)
    parser.add_argument("steps", type=int)
    parser.add_argument("warmup", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    return parser


def main(argv: list[str]) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    module, distribution = PACKAGES[args.peer]
    try:
        importlib.import_module(module)  # before train_throughput brings transformers in: Unsloth patches it
    except ImportError as exc:
        return {"error": f"not installed: {exc}"}
    import train_throughput as bench

    if args.case not in bench.CASES:
        parser.error(f"argument case: invalid choice: {args.case!r} (choose from {', '.join(bench.CASES)})")
    cfg = bench.phi3_mini_config(args.tiny)
    rows, quantized, pack_to, _ = bench.make_cases(cfg.vocab_size, args.tiny, args.steps)[args.case]
    data = bench.samples(rows, pack_to)
    if args.peer == "liger":
        model = bench.load_base(args.model_dir, quantized)
        tok_s, peak = bench.run_baseline(model, data, args.training_args, args.steps, args.warmup, args.out, liger=True)
    else:
        tok_s, peak = unsloth_run(bench, args, data, quantized)
    version = importlib.metadata.version(distribution)
    return {"tok_s": round(tok_s, 1), "peak_gib": round(peak, 2), "version": version}


def unsloth_run(bench, args: argparse.Namespace, data: dict, quantized: bool) -> tuple[float, float]:
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(args.model_dir), dtype=torch.bfloat16,
                                                 max_seq_length=max(map(len, data["input_ids"])),
                                                 load_in_4bit=quantized)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=bench.LORA["r"], lora_alpha=bench.LORA["alpha"],
                                             lora_dropout=bench.LORA["lora_dropout"],
                                             target_modules=bench.LORA["target_modules"])  # fmt: skip
    return bench.run_trainer(model, data, args.training_args, args.steps, args.warmup, args.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model folder: nothing to ask the hub
    result = main(sys.argv[1:])
    from train_throughput import PEER_RESULT

    print(PEER_RESULT + json.dumps(result))
