"""Adapter step: train a LoRA or QLoRA adapter with the Hugging Face Trainer and save it in PEFT format."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from olive_grove.tasks.artifact import read_memo, write_memo
from olive_grove.tasks.collate import pad_collator
from olive_grove.tasks.errors import UserError, nearest
from olive_grove.tasks.evaluate import heldout_loss
from olive_grove.tasks.models import NAMES_MEMO, has_cuda, load_causal_lm, load_tokenizer
from olive_grove.tasks.speed import local_rank, world_size

# Set by the training step itself, so a config may not set them.
OWNED_TRAINING_ARGS = {"output_dir", "report_to", "remove_unused_columns", "resume_from_checkpoint"}
DTYPES = Literal["bfloat16", "float16", "float32"]


@functools.cache
def training_arg_names() -> frozenset[str]:
    """TrainingArguments' fields. Importing it costs seconds (torch, accelerate), so the names are kept
    per transformers version: validating a config, or re-running a cached one, need not pay for it."""
    memo = NAMES_MEMO / f"training-args-{importlib.metadata.version('transformers')}.json"
    names = read_memo(memo, None)
    if names is None:
        from transformers.training_args import TrainingArguments

        names = sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
        write_memo(memo, names)
    return frozenset(names)


class LoRASettings(BaseModel):
    """The LoRA pass (Olive's `LoRA`): the adapter's shape and the Trainer's arguments."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["LoRA"] = "LoRA"
    train_data_config: str = Field(description="name of the data config to train on")
    eval_data_config: str | None = Field(None, description="name of a data config to evaluate on")
    eval_dataset_size: float | None = Field(
        None, gt=0, description="hold out this fraction (<1) or count (>=1) of the training samples"
    )
    target_modules: list[str] | None = Field(None, description="layer names to adapt; None: peft's default")
    r: int = Field(64, gt=0, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="scale = alpha / r")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    modules_to_save: list[str] | None = None
    use_dora: bool = Field(False, description="weight-decomposed LoRA (peft's DoRA)")
    torch_dtype: DTYPES = Field("bfloat16", description="dtype of the frozen base weights")
    training_args: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments")
    fused_kernels: bool = Field(True, description="olive-grove: Liger Kernel's fused layers and loss on CUDA")
    compile_layers: bool = Field(True, description="olive-grove: torch.compile each decoder layer on CUDA")
    cuda_graphs: bool = Field(
        True,
        description="olive-grove: replay the compiled layers as CUDA graphs (one process, samples of one length, "
        "no evaluation during training, no gradient checkpointing)",
    )
    processes: int | Literal["auto"] = Field(
        "auto",
        description="olive-grove: data-parallel training processes, one per GPU; auto: every GPU of the worker",
    )
    micro_batch_size: int | Literal["auto"] | None = Field(
        "auto",
        description="olive-grove: samples per forward pass, keeping the effective batch; auto: the most that "
        "fits on the GPU; null: per_device_train_batch_size as configured",
    )

    @field_validator("processes")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise UserError("processes", f"must be at least 1 (got {value})", "or auto: one per GPU")
        return value

    @field_validator("training_args")
    @classmethod
    def _known_training_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        names = training_arg_names()
        for key in args:
            if key in OWNED_TRAINING_ARGS:
                raise UserError(key, "is set by olive-grove", "outputs go to engine.output_dir")
            if key not in names:
                raise UserError(key, "is not a TrainingArguments field", nearest(key, names))
        return args

    def cache_view(self) -> dict[str, Any]:
        """The settings that decide the adapter; the data is in the dataset's fingerprint, not its name."""
        # `processes` only spreads the same steps over GPUs, like micro_batch_size splits them in time.
        return self.model_dump(mode="json", exclude={"train_data_config", "eval_data_config", "processes"})

    @property
    def seed(self) -> int:
        return int(self.training_args.get("data_seed", self.training_args.get("seed", 42)))


class QLoRASettings(LoRASettings):
    """The QLoRA pass: LoRA on a bitsandbytes 4-bit base."""

    type: Literal["QLoRA"] = "QLoRA"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: DTYPES = "bfloat16"
    loftq: bool = Field(
        False, description="olive-grove: start LoRA from LoftQ's fit of the 4-bit error (peft; needs safetensors)"
    )


def lora_config(settings: LoRASettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save,
        use_dora=settings.use_dora,
        task_type="CAUSAL_LM",
    )


def check_target_modules(settings: LoRASettings, linear_names: set[str]) -> None:
    for name in settings.target_modules or []:
        if name not in linear_names:
            raise UserError(
                f"target_modules.{name}", "is not a linear layer of this model", nearest(name, linear_names)
            )


def load_base_for_training(settings: LoRASettings, model_path: str, trust_remote_code: bool):
    """The frozen base: full precision weights for LoRA, bitsandbytes 4-bit for QLoRA."""
    if not isinstance(settings, QLoRASettings):
        return load_causal_lm(model_path, settings.torch_dtype, trust_remote_code)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from olive_grove.tasks.models import torch_dtype

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(settings.compute_dtype),
    )
    device_map = {"": local_rank()} if has_cuda() else {"": "cpu"}  # a GPU per process
    model = load_causal_lm(
        model_path,
        settings.compute_dtype,
        trust_remote_code,
        quantization_config=quant,
        device_map=device_map,
    )
    gradient_checkpointing = bool(settings.training_args.get("gradient_checkpointing", False))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def check_training_args(settings: LoRASettings, where: str) -> None:
    """Check the arguments' types and values before any work; the Trainer would only when it is built."""
    import typing

    from pydantic import TypeAdapter, ValidationError
    from transformers.training_args import TrainingArguments

    types = typing.get_type_hints(TrainingArguments)
    for key, value in settings.training_args.items():
        try:
            TypeAdapter(types[key]).validate_python(value)
        except ValidationError as exc:
            raise UserError(f"{where}.{key}", f"{exc.errors()[0]['msg']} (got {value!r})") from None
    try:
        trainer_arguments(settings, Path("unused"), has_eval=settings.eval_dataset_size is not None)
    except (ValueError, TypeError) as exc:
        raise UserError(where, str(exc).splitlines()[0]) from None


def trainer_arguments(settings: LoRASettings, checkpoint_dir: Path, has_eval: bool):
    from transformers import TrainingArguments

    args = {
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "logging_steps": 10,
        "ddp_find_unused_parameters": False,  # the frozen base has no gradients to wait for
        **settings.training_args,
        "output_dir": str(checkpoint_dir),
        "report_to": "none",
        "remove_unused_columns": False,
    }
    if not has_eval:
        args["eval_strategy"] = "no"
    if not has_cuda():
        args["use_cpu"] = True
        args.pop("bf16", None), args.pop("fp16", None)
    arguments = TrainingArguments(**args)
    if has_cuda() and world_size() == 1:
        _ = arguments.device  # one process trains on one GPU: several are `processes`' job, not nn.DataParallel's
        arguments._n_gpu = 1
    return arguments


def build_trainer(
    settings: LoRASettings,
    base_model,
    pad_id: int,
    train_set,
    eval_set,
    checkpoint_dir: Path,
    on_progress: Callable[[int, int, float | None], None] | None = None,
    log: Callable[[str], None] = print,
):
    """The Hugging Face Trainer for a PEFT adapter on `base_model`, with the speed-ups the settings allow."""
    from peft import get_peft_model
    from transformers import Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from olive_grove.tasks.speed import (
        compile_layers,
        fast_training_args,
        gradients_outside_graphs,
        layers_to_compile,
        mark_graph_steps,
        replays_cuda_graphs,
    )

    base_model.config.use_cache = False  # a cache makes transformers ignore packed position_ids
    set_seed(int(settings.training_args.get("seed", 42)))  # the adapter's initial weights follow the seed too
    model = get_peft_model(base_model, lora_config(settings))
    if isinstance(settings, QLoRASettings) and settings.loftq:
        from peft import replace_lora_weights_loftq

        source = base_model.config._name_or_path  # a local folder must be named; a hub model is found
        replace_lora_weights_loftq(model, model_path=source if Path(source).is_dir() else None)
        log("LoRA weights initialised with LoftQ")
    lengths = {len(ids) for ids in train_set["input_ids"]}
    max_len = max(lengths)
    args = trainer_arguments(settings, checkpoint_dir, eval_set is not None)
    layers = layers_to_compile(settings, model)
    for key, value in fast_training_args(settings, model, max_len, log, compiled_layers=bool(layers)).items():
        setattr(args, key, value)
    graphs = replays_cuda_graphs(settings, layers, lengths, evaluates=eval_set is not None)
    if layers:  # after the micro-batch probe, which would compile every size it tries
        compile_layers(layers, cuda_graphs=graphs)
        log(f"compiling {len(layers)} decoder layers on the first step{', replayed as CUDA graphs' if graphs else ''}")
    if graphs:
        mark_graph_steps(model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=pad_collator(pad_id),
    )
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    for callback in progress_callbacks(on_progress):
        trainer.add_callback(callback)
    if graphs:
        trainer.add_callback(gradients_outside_graphs(model))
    return trainer


def train_adapter(
    settings: LoRASettings,
    model_path: str,
    dataset_dir: Path,
    checkpoint_dir: Path,
    out_dir: Path,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int, float | None], None] | None = None,
    log: Callable[[str], None] = print,
    eval_dir: Path | None = None,
) -> dict[str, Any]:
    """Train on `dataset_dir/train`, evaluating on `eval_dir` (samples saved by the dataset step), resuming
    from the newest checkpoint in `checkpoint_dir`; save the adapter to `out_dir`."""
    import datasets

    train_set = datasets.load_from_disk(str(dataset_dir / "train"))
    eval_set = datasets.load_from_disk(str(eval_dir)) if eval_dir else None
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    base = load_base_for_training(settings, model_path, trust_remote_code)
    trainer = build_trainer(
        settings, base, tokenizer.pad_token_id, train_set, eval_set, checkpoint_dir, on_progress, log
    )
    model = trainer.model
    resume = last_complete_checkpoint(checkpoint_dir)
    if resume:
        log(f"resuming training from {resume.name}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": result.global_step}
    if not trainer.is_world_process_zero():
        return metrics  # data parallel: process 0 evaluates and saves
    if eval_set is not None:  # token-weighted, as the merge step measures the merged model
        metrics["eval_loss"] = heldout_loss(model, eval_dir, tokenizer.pad_token_id)
    if isinstance(settings, QLoRASettings):
        metrics["quantization"] = settings.model_dump(include={"quant_type", "double_quant", "compute_dtype"})
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    history = trainer.state.log_history
    metrics["loss_curve"] = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e]
    metrics["eval_curve"] = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in history if "eval_loss" in e]
    metrics["resumed_from"] = resume.name if resume else None
    metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics["train_samples"] = len(train_set)
    metrics["micro_batch"] = [trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps]
    metrics["processes"] = trainer.args.world_size
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing; newer, half-written ones (a kill) are removed.

    The Trainer writes `trainer_state.json` last, so a checkpoint whose state file parses is complete.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    numbered = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            return candidate
        except (OSError, ValueError):
            shutil.rmtree(candidate, ignore_errors=True)
    return None


def progress_callbacks(on_progress: Callable[[int, int, float | None], None] | None) -> list:
    """A terminal progress bar without the Trainer's raw log dicts, plus a hook for whoever shows progress."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class TerminalBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # losses reach the run log through on_progress instead

    class ProgressHook(TrainerCallback):
        loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            on_progress(state.global_step, state.max_steps, self.loss)

    return [TerminalBar()] + ([ProgressHook()] if on_progress else [])
