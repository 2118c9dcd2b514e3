"""Training throughput: plain HF Trainer + PEFT (what Olive runs) against olive-grove's training step.

Both train the same random Phi-3-mini-shaped model (built from its config, nothing downloaded) on the
same synthetic tokens with the same LoRA settings; tokens/s counts real (non-pad) tokens after warm-up,
and peak memory is the most reserved from the GPU during those steps (CUDA graphs' memory is reserved,
never counted as allocated).

    python benchmarks/train_throughput.py                 # on a GPU: the full-size cases
    python benchmarks/train_throughput.py --set compile_layers=false   # ours with one speed-up off
    python benchmarks/train_throughput.py --tiny          # anywhere: a tiny model, a smoke test

Prints a table and writes benchmarks/results/<gpu>-train[-<settings>].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olive_grove.tasks.adapter_settings import LoRASettings, QLoRASettings
from olive_grove.tasks.adapters import make_trainer
from olive_grove.tasks.artifact import Reporter
from olive_grove.tasks.collate import pad_collator
from olive_grove.tasks.data import pack_rows
from olive_grove.tasks.speed import Placement, release_compiled_layers

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SPEED_SETTINGS = ("micro_batch_size", "compile_layers", "cuda_graphs", "fused_kernels")  # what --set may change
GUIDE_ARGS = {  # the guide's training_args, as Olive hands them to the Trainer
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 4,
    "learning_rate": 1e-4,
    "adam_beta2": 0.999,
    "max_grad_norm": 0.3,
    "seed": 0,
    "logging_steps": 1000,
    "save_strategy": "no",
}


@dataclass
class Result:
    name: str
    ours_tok_s: float
    baseline_tok_s: float
    speedup: float
    mfu: float
    baseline_mfu: float
    peak_gib: float
    baseline_peak_gib: float


def phi3_mini_config(tiny: bool):
    from transformers import Phi3Config

    if tiny:
        return Phi3Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096, pad_token_id=0,
        )  # fmt: skip
    return Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
    )  # fmt: skip


def synthetic_rows(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def as_dataset(columns: dict[str, list[list[int]]]):
    import datasets

    return datasets.Dataset.from_dict(columns)


def unpacked(rows: list[list[int]]) -> dict[str, list[list[int]]]:
    return {"input_ids": rows, "labels": rows, "attention_mask": [[1] * len(r) for r in rows]}


class Meter:
    """Real tokens per second over the optimizer steps after warm-up; peak GPU memory counts from there too,
    so one-off work before training (our micro-batch probe, compiling) is not mistaken for training's."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.step, self.tokens, self.started = warmup, 0, 0, 0.0

    def collator(self, collate):
        def counting(batch):
            out = collate(batch)
            if self.step >= self.warmup:
                self.tokens += int((out["labels"][:, 1:] != -100).sum())
            return out

        return counting

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.step = state.global_step
                if meter.step == meter.warmup:
                    _sync()
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    meter.tokens, meter.started = 0, time.perf_counter()

        return StepClock()

    def tokens_per_second(self) -> float:
        _sync()
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    @staticmethod
    def peak_gib() -> float:
        return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_base(model_dir: Path, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32}
    kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def run_baseline(model, rows, args: dict, steps: int, warmup: int, out: Path):
    """Plain HF Trainer + PEFT with the guide's settings: what Olive's LoRA/QLoRA pass runs."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    settings = LoRASettings(train_data_config="x", r=64, alpha=64, lora_dropout=0.1,
                            target_modules=["qkv_proj", "o_proj"])  # fmt: skip
    meter = Meter(warmup)
    trainer = Trainer(
        model=get_peft_model(model, settings.peft_config(settings.target_modules)),
        args=TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            report_to="none",
            remove_unused_columns=False,
            bf16=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            **args,
        ),
        train_dataset=as_dataset(unpacked(rows)),
        data_collator=meter.collator(pad_collator(0)),
        callbacks=[meter.callback()],
    )
    trainer.train()
    return meter.tokens_per_second(), meter.peak_gib()


def run_ours(model, rows, args, steps, warmup, out: Path, quantized: bool, pack_to: int | None, overrides: dict):
    """olive-grove's training step: the same LoRA, the same effective batch, with its speed-ups on."""
    kind = QLoRASettings if quantized else LoRASettings
    settings = kind(train_data_config="x", r=64, alpha=64, lora_dropout=0.1, target_modules=["qkv_proj", "o_proj"],
                    training_args={**args, "bf16": torch.cuda.is_available(), "max_steps": steps,
                                   "disable_tqdm": True}, **overrides)  # fmt: skip
    data = pack_rows([(r, [True] * len(r)) for r in rows], pack_to) if pack_to else unpacked(rows)
    meter = Meter(warmup)
    from peft import get_peft_model

    model.config.use_cache = False
    peft_model = get_peft_model(model, settings.peft_config(settings.target_modules))
    trainer = make_trainer(settings, peft_model, 0, as_dataset(data), None, out, Placement(), IndentedReporter())
    trainer.data_collator = meter.collator(trainer.data_collator)
    trainer.add_callback(meter.callback())
    trainer.train()
    return meter.tokens_per_second(), meter.peak_gib()


class IndentedReporter(Reporter):
    def log(self, message: str) -> None:
        print(f"  {message}")


def flops_per_token(cfg, n_params: int, context: float) -> float:
    """4·N for a frozen base (forward + activation gradients), plus causal attention over `context` tokens."""
    return 4 * n_params + 6 * cfg.num_hidden_layers * context * cfg.hidden_size


def measure(name, model_dir, cfg, rows, args, ours_args, steps, warmup, out, quantized, pack_to, context, peak_flops,
            overrides):  # fmt: skip
    results = {}
    for who in ("baseline", "ours"):
        gc.collect()
        release_compiled_layers()  # each run compiles for its own model
        model = load_base(model_dir, quantized)
        n_params = sum(p.numel() for p in model.parameters()) if not quantized else _dense_params(cfg)
        if who == "baseline":
            tok_s, peak = run_baseline(model, rows, args, steps, warmup, out / f"{name}-base")
        else:
            ours_dir = out / f"{name}-ours"
            tok_s, peak = run_ours(model, rows, ours_args, steps, warmup, ours_dir, quantized, pack_to, overrides)
        results[who] = (tok_s, peak, tok_s * flops_per_token(cfg, n_params, context) / peak_flops)
        del model
    (base_tok, base_peak, base_mfu), (ours_tok, ours_peak, ours_mfu) = results["baseline"], results["ours"]
    return Result(name, round(ours_tok, 1), round(base_tok, 1), round(ours_tok / max(base_tok, 1e-9), 2),
                  round(ours_mfu, 4), round(base_mfu, 4), round(ours_peak, 2), round(base_peak, 2))  # fmt: skip


def _dense_params(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on any device: a smoke test, not a measurement")
    parser.add_argument("--cases", default="lora-2048,lora-short,qlora-2048")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed: the first one compiles")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=setting,
                        help=f"a speed setting of ours ({', '.join(SPEED_SETTINGS)})")  # fmt: skip
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE", type=train_arg,
                        help="a training_args entry of ours, e.g. gradient_checkpointing=true")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olive-grove-bench"))
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = phi3_mini_config(args.tiny)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    gpu_key = next((k for k in PEAK_BF16_FLOPS if k in gpu), None)
    peak_flops = PEAK_BF16_FLOPS.get(gpu_key, 989e12)
    model_dir = args.work / ("tiny-phi3" if args.tiny else "phi3-mini-random")
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is minutes on a CPU
            AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(model_dir))
    overrides = dict(args.set)
    ours_args = {**GUIDE_ARGS, **dict(args.train_arg)}
    seq = 128 if args.tiny else 2048
    n_rows = 4 * args.steps * 8
    long_rows = synthetic_rows(cfg.vocab_size, [seq] * n_rows)
    short_lengths = [random.Random(1).randint(20, 60) for _ in range(n_rows * 40)]
    short_rows = synthetic_rows(cfg.vocab_size, short_lengths, seed=2)
    cases = {
        "lora-2048": (long_rows, False, None, seq / 2),
        "lora-short": (short_rows, False, seq, sum(short_lengths) / len(short_lengths) / 2),
        "qlora-2048": (long_rows, True, None, seq / 2),
    }
    results = []
    for name in args.cases.split(","):
        rows, quantized, pack_to, context = cases[name]
        print(f"{name} ...", flush=True)
        results.append(measure(name, model_dir, cfg, rows, GUIDE_ARGS, ours_args, args.steps, args.warmup, args.work,
                               quantized, pack_to, context, peak_flops, overrides))  # fmt: skip
    print_table(results, gpu)
    args.out.mkdir(parents=True, exist_ok=True)
    varied = {**overrides, **dict(args.train_arg)}
    variant = "".join(f"-{key}-{json.dumps(value)}".replace('"', "") for key, value in varied.items())
    file = args.out / f"{'tiny-' if args.tiny else ''}{(gpu_key or gpu).lower().replace(' ', '-')}-train{variant}.json"
    summary = {"gpu": gpu, "torch": torch.__version__, "command": " ".join(sys.argv), "settings": overrides,
               "training_args": dict(args.train_arg),
               "cases": [asdict(r) for r in results]}  # fmt: skip
    file.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {file}")
    return results


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as YAML (so 1, false and null have their types), as `grove run --set` reads it.
    Only speed settings: the adapter and the data stay the baseline's."""
    key, sep, value = text.partition("=")
    if not sep or key not in SPEED_SETTINGS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, KEY one of {', '.join(SPEED_SETTINGS)}")
    return key, yaml.safe_load(value)


def train_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE for ours' training_args, the value read as YAML; the baseline keeps the guide's."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def print_table(results: list[Result], gpu: str) -> None:
    print(f"\n{gpu}")
    header = ("case", "baseline tok/s", "ours tok/s", "speedup", "MFU", "peak GiB", "base GiB")
    print("{:<12} {:>15} {:>11} {:>8} {:>7} {:>9} {:>9}".format(*header))
    for r in results:
        print(f"{r.name:<12} {r.baseline_tok_s:>15.1f} {r.ours_tok_s:>11.1f} {r.speedup:>7.2f}x "
              f"{100 * r.mfu:>6.1f}% {r.peak_gib:>9.2f} {r.baseline_peak_gib:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
