"""Training throughput: plain HF Trainer + PEFT (what Olive runs) against olive-grove's training step.

Both train the same random Phi-3-mini-shaped model (built from its config, nothing downloaded) on the
same synthetic tokens with the same LoRA settings; tokens/s counts real (non-pad) tokens after warm-up,
and peak memory is the most reserved from the GPU during those steps (CUDA graphs' memory is reserved,
never counted as allocated).

    python benchmarks/train_throughput.py                 # on a GPU: the full-size cases
    python benchmarks/train_throughput.py --set compile_layers=false   # ours with one speed-up off
    python benchmarks/train_throughput.py --tiny          # anywhere: a tiny model, a smoke test
    python benchmarks/train_throughput.py --profile 3     # then 3 more steps of ours under torch.profiler

Beside the baseline, the peers speed-minded users pick instead, at our micro-batch and on our samples
(packed where ours packs): `liger` (HF Trainer + PEFT + Liger Kernel) and `unsloth` (Unsloth's
FastLanguageModel with its defaults), each in a process of its own, since each patches transformers for
the whole process. A peer that cannot run here is recorded with the reason.

Prints a table and writes benchmarks/results/<gpu>-train[-<settings>].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
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

PEERS = ("liger", "unsloth")
CASES = ("lora-2048", "lora-short", "qlora-2048")
# Training arguments the benchmark sets itself: its step count, and its token count in the collator (which
# dataloader workers would run in other processes).
OWN_TRAIN_ARGS = ("max_steps", "dataloader_num_workers")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# What --set may change.
SPEED_SETTINGS = ("micro_batch_size", "compile_layers", "cuda_graphs", "fused_kernels", "offload_checkpoints")
LORA = {"r": 64, "alpha": 64, "lora_dropout": 0.1, "target_modules": ["qkv_proj", "o_proj"]}  # every side's adapter
ADAPTER = LoRASettings(train_data_config="x", **LORA)
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
    peers: dict[str, dict] = field(default_factory=dict)  # by peer: tok_s, peak_gib, ours_vs (ours / theirs), or error
    profile: dict = field(default_factory=dict)  # with --profile: where our step's device time went


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
    """Real tokens per second over the optimizer steps after warm-up (up to step `until`, if given); peak GPU
    memory counts from there too, so one-off work before training (our micro-batch probe, compiling) is not
    mistaken for training's."""

    def __init__(self, warmup: int, until: int | None = None) -> None:
        self.warmup, self.until, self.step, self.tokens, self.started = warmup, until, 0, 0, 0.0
        self.stopped: float | None = None
        self.stopped_peak: float | None = None  # the peak up to `until`: steps after it (profiled) do not count

    def collator(self, collate):
        def counting(batch):
            out = collate(batch)
            if self.step >= self.warmup and (self.until is None or self.step < self.until):
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
                if meter.step == meter.until:
                    _sync()
                    meter.stopped = time.perf_counter()
                    meter.stopped_peak = meter.peak_gib()

        return StepClock()

    def tokens_per_second(self) -> float:
        _sync()
        end = self.stopped if self.stopped is not None else time.perf_counter()
        return self.tokens / max(end - self.started, 1e-9)

    def peak_gib(self) -> float:
        if self.stopped_peak is not None:
            return self.stopped_peak
        return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0


# What a kernel (or, on a CPU, an operator) is, by its name; the first pattern that matches wins.
KINDS = {
    "attention": r"flash|fmha|sdpa|attention",
    "matmul": r"gemm|cutlass|xmma|nvjet|cublas|wgmma|aten::(mm|addmm|bmm)$",
    "compiled layers": r"^triton_",  # inductor's kernels: the fused element-wise work of each layer
    "4-bit dequantize": r"dequantize",  # bitsandbytes unpacking QLoRA's weights, forward and backward
    "optimizer": r"multi_tensor|adam|foreach|aten::_foreach",
    "copies": r"memcpy|memset|aten::copy_",
}


class ProfiledSteps:
    """torch.profiler over `steps` optimizer steps from step `start` on: device time by kind, the busiest
    kernels, and how much of the wall time the device was busy (on a CPU: operators' self time)."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps, self.summary, self._profiler, self._began = start, steps, {}, None, 0.0

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Profile(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == outer.start:
                    outer._begin()
                elif state.global_step == outer.start + outer.steps:
                    outer._end()

        return Profile()

    def _begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        self._profiler = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
        _sync()
        self._profiler.__enter__()
        self._began = time.perf_counter()

    def _end(self) -> None:
        _sync()
        wall_us = (time.perf_counter() - self._began) * 1e6
        self._profiler.__exit__(None, None, None)
        self.summary = {"steps": self.steps, **where_time_goes(self._profiler, wall_us, torch.cuda.is_available())}


def where_time_goes(profiler, wall_us: float, cuda: bool) -> dict:
    from torch.autograd import DeviceType

    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    averages = [a for a in profiler.key_averages() if a.device_type == wanted]
    self_us = {a.key: (a.self_device_time_total if cuda else a.self_cpu_time_total) for a in averages}
    total = sum(self_us.values()) or 1.0
    kinds: dict[str, float] = {}
    for name, us in self_us.items():
        kind = next((k for k, pattern in KINDS.items() if re.search(pattern, name.lower())), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    busiest = sorted(averages, key=lambda a: -self_us[a.key])[:12]
    return {
        "device_busy": round(min(_busy_us(profiler, wanted) / wall_us, 1.0), 3) if cuda else None,
        "wall_ms": round(wall_us / 1e3, 1),
        "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "busiest": [{"name": a.key[:120], "ms": round(self_us[a.key] / 1e3, 2), "calls": a.count} for a in busiest],
    }


def _busy_us(profiler, device_type) -> float:
    """Time with at least one kernel running: the union of the kernels' intervals."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == device_type)
    busy, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


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


def run_baseline(model, data: dict, args: dict, steps: int, warmup: int, out: Path, liger: bool = False):
    """Plain HF Trainer + PEFT with the guide's settings: what Olive's LoRA/QLoRA pass runs; with `liger`,
    Liger Kernel's fused layers too (the Trainer's use_liger_kernel)."""
    from peft import get_peft_model

    return run_trainer(get_peft_model(model, ADAPTER.peft_config(ADAPTER.target_modules)), data, args, steps, warmup,
                       out, liger)  # fmt: skip


def run_trainer(peft_model, data: dict, args: dict, steps: int, warmup: int, out: Path, liger: bool = False):
    """HF Trainer on an adapter-wrapped model, as the baseline and the peers run it: tokens/s and peak GiB."""
    from transformers import Trainer, TrainingArguments

    meter = Meter(warmup)
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            report_to="none",
            remove_unused_columns=False,
            bf16=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            use_liger_kernel=liger,
            **args,
        ),
        train_dataset=as_dataset(data),
        data_collator=meter.collator(pad_collator(0)),
        callbacks=[meter.callback()],
    )
    trainer.train()
    return meter.tokens_per_second(), meter.peak_gib()


def run_ours(model, data: dict, args, steps, warmup, out: Path, quantized: bool, overrides: dict,
             profiled: int = 0):  # fmt: skip
    """olive-grove's training step: the same LoRA, the same effective batch, with its speed-ups on. Returns
    tokens/s, peak GiB, the training arguments it chose (the micro-batch the peers run at), and with
    `profiled` steps after the timed ones, where their device time went."""
    kind = QLoRASettings if quantized else LoRASettings
    settings = kind(train_data_config="x", **LORA, **overrides,
                    training_args={**args, "bf16": torch.cuda.is_available(), "max_steps": steps + profiled,
                                   "disable_tqdm": True})  # fmt: skip
    meter = Meter(warmup, until=steps if profiled else None)
    profiler = ProfiledSteps(steps, profiled)
    from peft import get_peft_model

    model.config.use_cache = False
    peft_model = get_peft_model(model, settings.peft_config(settings.target_modules))
    trainer = make_trainer(settings, peft_model, 0, as_dataset(data), None, out, Placement(), IndentedReporter())
    trainer.data_collator = meter.collator(trainer.data_collator)
    trainer.add_callback(meter.callback())
    if profiled:
        trainer.add_callback(profiler.callback())
    trainer.train()
    chosen = {k: getattr(trainer.args, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps")}
    return meter.tokens_per_second(), meter.peak_gib(), chosen, profiler.summary


def samples(rows: list[list[int]], pack_to: int | None) -> dict:
    """A case's training samples: the rows as they are, or packed whole into pack_to-token samples."""
    return pack_rows([(r, [True] * len(r)) for r in rows], pack_to) if pack_to else unpacked(rows)


PEER_RESULT = "peer result: "  # the line peer_run.py prints its JSON on; the Trainer prints dicts of its own
PEER_TIMEOUT_S = 1800


def run_peer(peer: str, case: str, model_dir: Path, train_args: dict, steps: int, warmup: int, out: Path,
             tiny: bool) -> dict:  # fmt: skip
    """One peer on a case, at our micro-batch (`train_args`), in a process of its own (`peer_run.py`): its
    tokens/s, peak GiB and version, or why it could not run."""
    if not torch.cuda.is_available():
        return {"error": "needs a CUDA GPU"}
    command = [sys.executable, *peer_arguments(peer, case, model_dir, train_args, steps, warmup, out, tiny)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PEER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {PEER_TIMEOUT_S} s"}
    lines = [line.removeprefix(PEER_RESULT) for line in done.stdout.splitlines() if line.startswith(PEER_RESULT)]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {last[:300]}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"unreadable result: {lines[-1][:300]}"}


def peer_arguments(peer: str, case: str, model_dir: Path, train_args: dict, steps: int, warmup: int, out: Path,
                   tiny: bool) -> list[str]:  # fmt: skip
    """peer_run.py's command line, after the interpreter."""
    return [str(Path(__file__).with_name("peer_run.py")), peer, case, str(model_dir), json.dumps(train_args),
            str(steps), str(warmup), str(out / f"{case}-{peer}"), *(["--tiny"] * tiny)]  # fmt: skip


class IndentedReporter(Reporter):
    def log(self, message: str) -> None:
        print(f"  {message}")


def flops_per_token(cfg, n_params: int, context: float) -> float:
    """4·N for a frozen base (forward + activation gradients), plus causal attention over `context` tokens."""
    return 4 * n_params + 6 * cfg.num_hidden_layers * context * cfg.hidden_size


def measure(name, model_dir, cfg, rows, args, ours_args, steps, warmup, out, quantized, pack_to, context, peak_flops,
            overrides, peers=(), tiny=False, profiled=0):  # fmt: skip
    results, chosen, profile = {}, {}, {}
    for who in ("baseline", "ours"):
        gc.collect()
        release_compiled_layers()  # each run compiles for its own model
        model = load_base(model_dir, quantized)
        n_params = sum(p.numel() for p in model.parameters()) if not quantized else _dense_params(cfg)
        if who == "baseline":
            tok_s, peak = run_baseline(model, unpacked(rows), args, steps, warmup, out / f"{name}-base")
        else:
            ours_dir = out / f"{name}-ours"
            tok_s, peak, chosen, profile = run_ours(model, samples(rows, pack_to), ours_args, steps, warmup, ours_dir,
                                                    quantized, overrides, profiled)  # fmt: skip
        results[who] = (tok_s, peak, tok_s * flops_per_token(cfg, n_params, context) / peak_flops)
        del model
    (base_tok, base_peak, base_mfu), (ours_tok, ours_peak, ours_mfu) = results["baseline"], results["ours"]
    measured = {}
    for peer in peers:
        gc.collect()
        release_compiled_layers()
        print(f"  {peer} ...", flush=True)
        measured[peer] = run_peer(peer, name, model_dir, {**args, **chosen}, steps, warmup, out, tiny)
        if "tok_s" in measured[peer]:
            measured[peer]["ours_vs"] = round(ours_tok / max(measured[peer]["tok_s"], 1e-9), 2)
    return Result(name, round(ours_tok, 1), round(base_tok, 1), round(ours_tok / max(base_tok, 1e-9), 2),
                  round(ours_mfu, 4), round(base_mfu, 4), round(ours_peak, 2), round(base_peak, 2),
                  measured, profile)  # fmt: skip


def make_cases(vocab: int, tiny: bool, steps: int) -> dict[str, tuple]:
    """Each case: its rows, whether the base is 4-bit, the length ours packs to (None: as they are), and the mean
    attention context per token."""
    seq = 128 if tiny else 2048
    n_rows = 4 * steps * 8
    long_rows = synthetic_rows(vocab, [seq] * n_rows)
    lengths = random.Random(1)
    short_lengths = [lengths.randint(20, 60) for _ in range(n_rows * 40)]
    short_rows = synthetic_rows(vocab, short_lengths, seed=2)
    cases = {
        "lora-2048": (long_rows, False, None, seq / 2),
        "lora-short": (short_rows, False, seq, sum(short_lengths) / len(short_lengths) / 2),
        "qlora-2048": (long_rows, True, None, seq / 2),
    }
    assert set(cases) == set(CASES)
    return cases


def word_level_tokenizer(vocab: int):
    """A tokenizer of `vocab` made-up words: the random model's ids need no real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")  # fmt: skip


def _dense_params(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


def main(argv: list[str] | None = None) -> list[Result]:
    parser = make_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = phi3_mini_config(args.tiny)
    gpu, label, peak_flops = gpu_in_use()
    model_dir = args.work / ("tiny-phi3" if args.tiny else "phi3-mini-random")
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is minutes on a CPU
            AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(model_dir))
        word_level_tokenizer(cfg.vocab_size).save_pretrained(str(model_dir))  # what a peer's loader asks for
    overrides = dict(args.set)
    ours_args = {**GUIDE_ARGS, **dict(args.train_arg)}
    cases = make_cases(cfg.vocab_size, args.tiny, args.steps)
    file = args.out / f"{'tiny-' if args.tiny else ''}{label}-train{variant_name(parser, args)}.json"
    summary = {"gpu": gpu, "torch": torch.__version__, "command": command_line(__file__, argv), "settings": overrides,
               "training_args": dict(args.train_arg),
               "env": {k: v for k, v in os.environ.items() if k.startswith(("PYTORCH_", "TORCHINDUCTOR_"))},
               "cases": []}  # fmt: skip
    results = []
    restore_phi3 = as_it_is_now("transformers.models.phi3.modeling_phi3")
    for name in args.cases:
        restore_phi3()  # ours without compiled layers gets Liger's kernels, patched into the module for the process
        rows, quantized, pack_to, context = cases[name]
        print(f"{name} ...", flush=True)
        results.append(measure(name, model_dir, cfg, rows, GUIDE_ARGS, ours_args, args.steps, args.warmup, args.work,
                               quantized, pack_to, context, peak_flops, overrides, args.peers, args.tiny,
                               args.profile))  # fmt: skip
        summary["cases"] = [asdict(r) for r in results]
        summary["complete"] = len(results) == len(args.cases)
        write_results(file, summary)  # after each case: a run cut short keeps the cases it finished
    print_table(results, gpu)
    return results


def as_it_is_now(module_name: str):
    """A function that puts a module's names back as they are now: what Liger Kernel replaces (Phi-3's
    RMSNorm, rotary and MLP) for the whole process when the Trainer applies it to layers that are not
    compiled, which would reach the next case's baseline."""
    import importlib

    module = importlib.import_module(module_name)
    saved = dict(vars(module))

    def restore() -> None:
        for name, value in saved.items():
            setattr(module, name, value)

    return restore


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on any device: a smoke test, not a measurement")
    parser.add_argument("--cases", default=",".join(CASES), type=names_of("case", CASES))
    parser.add_argument("--peers", default=",".join(PEERS), type=names_of("peer", PEERS, none_ok=True),
                        help=f"peers to run beside ours ({', '.join(PEERS)}; '' for none)")  # fmt: skip
    parser.add_argument("--steps", type=at_least(2), default=15, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=at_least(1), default=3, help="steps not timed: the first one compiles")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=setting,
                        help=f"a speed setting of ours ({', '.join(SPEED_SETTINGS)})")  # fmt: skip
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE", type=train_arg,
                        help="a training_args entry of ours, e.g. gradient_checkpointing=true")  # fmt: skip
    parser.add_argument("--profile", type=at_least(0), default=0, metavar="STEPS",
                        help="after the timed steps, this many more of ours under torch.profiler")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olive-grove-bench"))
    return parser


def variant_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """What a run changed from the defaults, for its results file's name, so that runs of other cases, peers,
    step counts or settings keep files of their own (a run without peers writes `-peers-none`)."""
    parts = [] if args.cases == list(CASES) else list(args.cases)
    if args.peers != list(PEERS):
        parts += ["peers", *(args.peers or ["none"])]
    counts = {key: getattr(args, key) for key in ("steps", "warmup")}
    parts += [f"{key}-{value}" for key, value in counts.items() if value != parser.get_default(key)]
    varied = {**dict(args.set), **dict(args.train_arg)}
    parts += [f"{key}-{json.dumps(value)}".replace('"', "") for key, value in varied.items()]
    parts += ["profiled"] * bool(args.profile)
    return re.sub(r"[^\w.=+-]", "_", "".join(f"-{part}" for part in parts))


def gpu_in_use() -> tuple[str, str, float]:
    """The device's name, its label in results files' names (h200, or cpu), and its bf16 peak FLOP/s."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    key = next((k for k in PEAK_BF16_FLOPS if k in gpu), None)
    return gpu, (key or gpu).lower().replace(" ", "-"), PEAK_BF16_FLOPS.get(key, 989e12)


def write_results(file: Path, summary: dict) -> None:
    """The JSON, whole or not at all: written beside the file, then moved over it."""
    partial = file.with_name(f".{file.name}.partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(partial, file)
    print(f"wrote {file}")


def at_least(smallest: int):
    """An argparse type: a whole number no smaller than `smallest`."""

    def whole(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < smallest:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least {smallest}")
        return int(text)

    return whole


def names_of(what: str, known: tuple[str, ...], none_ok: bool = False):
    """An argparse type: comma-separated names, each one of `known`; with `none_ok`, empty ones are left out."""

    def listed(text: str) -> list[str]:
        names = list(dict.fromkeys(name for name in text.split(",") if name or not none_ok))  # each once
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"no {what} {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        return names

    return listed


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every mistake in the arguments, as one line before any model is built or trained."""
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}: make --steps larger")
    own = sorted(set(dict(args.train_arg)) & set(OWN_TRAIN_ARGS))
    if own:
        parser.error(f"--train-arg {own[0]}: set by the benchmark itself (--steps and --profile give the steps)")
    from pydantic import ValidationError

    for kind in (LoRASettings, QLoRASettings):
        try:
            kind(train_data_config="x", **LORA, **dict(args.set), training_args={**GUIDE_ARGS, **dict(args.train_arg)})
        except ValidationError as exc:
            error = exc.errors()[0]
            parser.error(f"--set/--train-arg {error['loc'][0]}: {error['msg']}")
    make_out(parser, args.out)


def make_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """The results folder, made before any measuring, or one line saying why it cannot be."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: cannot be made ({exc.strerror})")


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a results file: the script with the arguments its main() was given."""
    return " ".join([f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


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
    peers = list(dict.fromkeys(p for r in results for p in r.peers))
    header = ("case", "baseline tok/s", "ours tok/s", "speedup", "MFU", "peak GiB", "base GiB",
              *(f"{p} tok/s (GiB)" for p in peers))  # fmt: skip
    print("{:<12} {:>15} {:>11} {:>8} {:>7} {:>9} {:>9}".format(*header[:7]), *(f"{h:>22}" for h in header[7:]))
    for r in results:
        shown = [f"{r.peers[p]['tok_s']:.1f} ({r.peers[p]['peak_gib']:.1f})" if "tok_s" in r.peers.get(p, {})
                 else "-" for p in peers]  # fmt: skip
        print(f"{r.name:<12} {r.baseline_tok_s:>15.1f} {r.ours_tok_s:>11.1f} {r.speedup:>7.2f}x "
              f"{100 * r.mfu:>6.1f}% {r.peak_gib:>9.2f} {r.baseline_peak_gib:>9.2f}",
              *(f"{v:>22}" for v in shown))  # fmt: skip
    for r in results:
        for peer, got in r.peers.items():
            if "error" in got:
                print(f"{r.name} {peer}: not measured: {got['error']}")
    for r in results:
        if r.profile:
            print_profile(r.name, r.profile)


def print_profile(case: str, profile: dict) -> None:
    busy = f", device busy {100 * profile['device_busy']:.1f}% of it" if profile["device_busy"] is not None else ""
    print(f"\n{case}: where our step's time went ({profile['steps']} steps, {profile['wall_ms']:.0f} ms{busy})")
    print("  " + ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in profile["share"].items()))
    for kernel in profile["busiest"]:
        print(f"  {kernel['ms']:>9.2f} ms {kernel['calls']:>6}x  {kernel['name']}")


if __name__ == "__main__":
    main()
