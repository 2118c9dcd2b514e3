"""Adapter step: train a LoRA, DoRA, QLoRA, LoftQ, LoHa or LoKr adapter with the Hugging Face Trainer and save it
in PEFT format.

Read top to bottom: what the step reports, then the training recipe — data, model, adapter, speed-ups,
trainer, train, evaluate, save — and the helpers it calls. What each pass is configured with, and how that
becomes peft's config and the Trainer's arguments, is in `adapter_settings.py`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from olive_grove.tasks.adapter_settings import (
    AdapterSettings,
    LoftQSettings,
    QLoRASettings,
    check_target_modules,
)
from olive_grove.tasks.artifact import Artifact, Reporter, StepFiles, StepInfo, TrainingProgress
from olive_grove.tasks.collate import pad_collator
from olive_grove.tasks.data import DatasetInfo
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.evaluate import heldout_loss
from olive_grove.tasks.files import INTERNAL_PREFIX
from olive_grove.tasks.models import (
    ModelInfo,
    has_cuda,
    linear_module_names,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from olive_grove.tasks.speed import Placement

# Inside the adapter's folder: the samples it was evaluated on, so a merge measures the merged model on them.
EVAL_SAMPLES = f"{INTERNAL_PREFIX}eval"


# ------------------------------------------------------------------------------------- what it reports


class LossPoint(BaseModel):
    step: int
    loss: float


class AdapterInfo(StepInfo):
    """A trained PEFT adapter: how training went, and what a merge needs to know of it."""

    dtype: str | None = Field(None, description="the dtype it was trained in; the merge's default")
    train_loss: float | None = None
    eval_loss: float | None = None
    steps: int | None = None
    trainable_params: int | None = None
    train_samples: int | None = None
    micro_batch: list[int] | None = Field(None, description="samples per pass x accumulation steps")
    processes: int | None = None
    resumed_from: str | None = None
    quantization: dict[str, Any] | None = Field(None, description="the 4-bit base it was trained on")
    merge_into: Literal["original", "quantized"] = Field(
        "original", description="LoftQ's adapter fits the 4-bit base: it merges into that base, dequantized"
    )
    loss_curve: list[LossPoint] = Field(default_factory=list)
    eval_curve: list[LossPoint] = Field(default_factory=list)
    eval_samples: str | None = Field(None, description="folder of the eval samples, relative to the adapter's")


# -------------------------------------------------------------------------------------- the recipe


def train_adapter(
    settings: AdapterSettings,
    files: StepFiles,
    report: Reporter,
    *,
    model: Artifact[ModelInfo],
    dataset: Artifact[DatasetInfo],
    eval_dataset: Artifact[DatasetInfo] | None = None,
    placement: Placement | None = None,
) -> AdapterInfo:
    """Train on the dataset's train split and evaluate on `eval_dataset` (Olive's eval_data_config), else on
    the dataset's own held-out split; resume from the newest checkpoint in `files.work`; save to `files.out`.

    Without a `placement` the step decides how many processes train: several relaunch it under torchrun.
    """
    if settings.target_modules:  # checked before the run for local and hub models; others are here now
        check_target_modules(settings, linear_module_names(model.path, model.info.trust_remote_code))
    if placement is None:
        from olive_grove.tasks import data_parallel

        processes = data_parallel.process_count(settings)
        if processes > 1:
            return data_parallel.launch(processes, settings, files, report, model=model, dataset=dataset,
                                        eval_dataset=eval_dataset)  # fmt: skip
    from olive_grove.tasks.speed import release_compiled_layers

    try:
        return _train_in_this_process(settings, files, report, model, dataset, eval_dataset, placement or Placement())
    finally:
        release_compiled_layers()


def _train_in_this_process(
    settings: AdapterSettings,
    files: StepFiles,
    report: Reporter,
    model: Artifact[ModelInfo],
    dataset: Artifact[DatasetInfo],
    eval_dataset: Artifact[DatasetInfo] | None,
    placement: Placement,
) -> AdapterInfo:
    import datasets
    from peft import get_peft_model
    from transformers import set_seed

    # Data: the dataset step's samples.
    train_set = datasets.load_from_disk(str(Path(dataset.path) / "train"))
    eval_dir = Path(eval_dataset.path) / "train" if eval_dataset else Path(dataset.path) / "eval"
    eval_dir = eval_dir if eval_dir.exists() else None
    eval_set = datasets.load_from_disk(str(eval_dir)) if eval_dir else None

    # Model: the frozen base, and the adapter on it (its initial weights follow the seed).
    trust = model.info.trust_remote_code
    tokenizer = load_tokenizer(model.path, trust)
    base = load_base_for_training(settings, model.path, trust, placement)
    base.config.use_cache = False  # a cache makes transformers ignore packed position_ids
    set_seed(int(settings.training_args.get("seed", 42)))
    layers = settings.layers_to_adapt(base.config.model_type)
    peft_model = get_peft_model(base, settings.peft_config(layers))
    if isinstance(settings, LoftQSettings):
        start_from_loftq(peft_model, Path(model.path))
        report.log("the adapter starts from LoftQ's fit of the 4-bit error")

    # Speed-ups and the trainer, then training: resumed from the newest complete checkpoint.
    checkpoints = files.work / "checkpoints"
    trainer = make_trainer(settings, peft_model, tokenizer.pad_token_id, train_set, eval_set, checkpoints,
                           placement, report)  # fmt: skip
    resume = last_complete_checkpoint(checkpoints)
    if resume:
        report.log(f"resuming training from {resume.name}")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        _close_progress_bars(trainer)  # an interrupted bar would leave the next line (an error) after it
    info = AdapterInfo(dtype=settings.dtype, steps=result.global_step, processes=trainer.args.world_size,
                       train_loss=_finite(result.training_loss))  # fmt: skip
    check_weights_finite(peft_model)
    if placement.rank != 0:
        return info  # data parallel: process 0 evaluates and saves

    # Evaluate (token-weighted, as the merge step measures the merged model) and save.
    if eval_set is not None:
        info.eval_loss = _finite(heldout_loss(peft_model, eval_dir, tokenizer.pad_token_id))
        shutil.copytree(eval_dir, files.out / EVAL_SAMPLES)
        info.eval_samples = EVAL_SAMPLES
    peft_model.save_pretrained(str(files.out))
    tokenizer.save_pretrained(str(files.out))
    history = trainer.state.log_history
    info.loss_curve = [LossPoint(step=e["step"], loss=e["loss"]) for e in history if _finite(e.get("loss")) is not None]
    info.eval_curve = [
        LossPoint(step=e["step"], loss=e["eval_loss"]) for e in history if _finite(e.get("eval_loss")) is not None
    ]
    info.resumed_from = resume.name if resume else None
    info.trainable_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info.train_samples = len(train_set)
    info.micro_batch = [trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps]
    if isinstance(settings, QLoRASettings):
        info.quantization = settings.model_dump(include={"quant_type", "double_quant", "compute_dtype"})
        info.merge_into = "quantized" if isinstance(settings, LoftQSettings) else "original"
    report.log(f"adapter trained: {info.summary()}")
    return info


# ------------------------------------------------------------------------------------------ helpers


def load_base_for_training(settings: AdapterSettings, model_path: str, trust_remote_code: bool, placement: Placement):
    """The frozen base: full precision weights, or bitsandbytes 4-bit for QLoRA and LoftQ."""
    if not isinstance(settings, QLoRASettings):
        return load_causal_lm(model_path, settings.torch_dtype, trust_remote_code)
    from peft import prepare_model_for_kbit_training

    device_map = {"": placement.local_rank} if has_cuda() else {"": "cpu"}  # a GPU per process
    model = load_4bit(model_path, settings.model_dump(include={"quant_type", "double_quant", "compute_dtype"}),
                      trust_remote_code, device_map)  # fmt: skip
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.recomputes_layers)


def load_4bit(model_path: str, quantization: dict[str, Any], trust_remote_code: bool, device_map: dict[str, Any]):
    """A model in bitsandbytes 4-bit, as a QLoRA pass's `quant_type`, `double_quant` and `compute_dtype` say."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization["quant_type"],
        bnb_4bit_use_double_quant=quantization["double_quant"],
        bnb_4bit_compute_dtype=torch_dtype(quantization["compute_dtype"]),
    )
    return load_causal_lm(model_path, quantization["compute_dtype"], trust_remote_code, quantization_config=quant,
                          device_map=device_map)  # fmt: skip


def start_from_loftq(peft_model, model_dir: Path) -> None:
    """LoftQ's start: each adapted 4-bit layer's LoRA weights are the best rank-r fit of what quantization lost
    (the original weights minus the dequantized 4-bit ones), by SVD.

    peft's replace_lora_weights_loftq does this on CUDA only (its device is fixed); this is the same fit, with
    peft's own safetensors loader and decomposition, on whatever device the layer is.
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    originals = _SafetensorLoader(peft_model, str(model_dir / "model.safetensors"))
    prefix = "base_model.model."
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if not isinstance(layer, Linear4bit):
                continue
            weight = originals.get_tensor(name.removeprefix(prefix) + ".weight").to(layer.weight.device, torch.float32)
            dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            fit = _low_rank_decomposition(weight - dequantized, reduced_rank=layer.r["default"])
            layer.lora_A["default"].weight.data = fit["R"].to(layer.lora_A["default"].weight.dtype)
            layer.lora_B["default"].weight.data = fit["L"].to(layer.lora_B["default"].weight.dtype)


def make_trainer(
    settings: AdapterSettings,
    peft_model,
    pad_id: int,
    train_set,
    eval_set,
    checkpoint_dir: Path,
    placement: Placement,
    report: Reporter,
):
    """The Hugging Face Trainer for the adapter, with the speed-ups the settings and the hardware allow."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from olive_grove.tasks import speed

    lengths = {len(ids) for ids in train_set["input_ids"]}
    args = settings.trainer_arguments(checkpoint_dir, eval_set is not None, placement)
    layers = speed.layers_to_compile(settings, peft_model)
    chosen = speed.fast_training_args(settings, peft_model, max(lengths), placement, report.log, bool(layers))
    for key, value in chosen.items():
        setattr(args, key, value)
    graphs = speed.replays_cuda_graphs(settings, layers, lengths, eval_set is not None, placement)
    if layers:  # after the micro-batch probe, which would compile every size it tries
        speed.compile_layers(layers, cuda_graphs=graphs)
        report.log(f"compiling {len(layers)} decoder layers on the first step"
                   f"{', replayed as CUDA graphs' if graphs else ''}")  # fmt: skip
    if graphs:
        speed.mark_graph_steps(peft_model)
    if settings.offload_checkpoints and has_cuda():
        speed.offload_saved_tensors(peft_model)
        report.log("checkpointed layer inputs wait in host memory for the backward pass")
    # Packed samples fall a few tokens short of max_seq_len, each by its own count. Compiled layers would
    # recompile for each new length (measured on an H200: 3.6k tokens/s for 20-60-token rows, where rows of
    # one length gave 23k), so every pass is padded to the longest sample; the padding is a few percent.
    packed = "position_ids" in train_set.column_names
    pad_to = max(lengths) if layers and packed else 0
    trainer = Trainer(model=peft_model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=pad_collator(pad_id, pad_to))  # fmt: skip
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    for callback in progress_callbacks(report):
        trainer.add_callback(callback)
    if graphs:
        trainer.add_callback(speed.gradients_outside_graphs(peft_model))
    return trainer


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


def check_weights_finite(peft_model) -> None:
    """Training that diverged leaves NaN or inf in the trained weights (the logged loss may still look
    fine): that adapter is a mistake to fix, never a result to cache and publish."""
    import torch

    for name, weight in peft_model.named_parameters():
        if weight.requires_grad and not torch.isfinite(weight).all():
            raise UserError("training_args.learning_rate", f"training diverged: the trained weight {name} holds "
                            "NaN or inf", "lower learning_rate (or set max_grad_norm)")  # fmt: skip


def progress_callbacks(report: Reporter) -> list:
    """A progress bar in a terminal (not in a worker's log, where it would be noise), without the Trainer's
    raw log dicts, and progress for whoever shows it.

    A loss is logged with the step it was measured at, so the log and the report's loss curve agree.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class TerminalBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # losses reach the run log through the report instead

    class Progress(TrainerCallback):
        started = 0.0
        loss: float | None = None
        eval_loss: float | None = None
        waiting_for_log = False  # a step whose loss is logged right after it: report it with that loss

        def update(self, state) -> TrainingProgress:
            return TrainingProgress(state.global_step, state.max_steps, self.loss, self.eval_loss,
                                    time.perf_counter() - self.started)  # fmt: skip

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.waiting_for_log = control.should_log  # the Trainer's own callback decided just before this one
            if not self.waiting_for_log:
                report.progress(self.update(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            measured = {key: _finite(logs[key]) for key in ("loss", "eval_loss") if key in logs}
            self.loss = measured.get("loss", self.loss)
            self.eval_loss = measured.get("eval_loss", self.eval_loss)
            if measured:
                report.log(self.update(state).line())
            if self.waiting_for_log:
                self.waiting_for_log = False
                report.progress(self.update(state))

    return [TerminalBar(), Progress()] if sys.stderr.isatty() else [Progress()]


def _close_progress_bars(trainer) -> None:
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _finite(value: Any) -> float | None:
    """A measured loss, or None when there is none or it is not a number (a NaN loss is no measurement)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
