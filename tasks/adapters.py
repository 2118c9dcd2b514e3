"""Adapter step: train a LoRA or QLoRA adapter with the Hugging Face Trainer and save it in PEFT format.

Read top to bottom: the pass settings, what the step reports, then the training recipe — data, model,
adapter, speed-ups, trainer, train, evaluate, save — and the helpers it calls.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from olive_grove.tasks.artifact import Artifact, PassSettings, Reporter, StepFiles, StepInfo, TrainingProgress
from olive_grove.tasks.collate import pad_collator
from olive_grove.tasks.data import DataConfig, DatasetInfo, DatasetSettings
from olive_grove.tasks.errors import UserError, nearest, shown
from olive_grove.tasks.evaluate import heldout_loss
from olive_grove.tasks.files import INTERNAL_PREFIX, USER_CACHE, read_memo, write_memo
from olive_grove.tasks.models import (
    ModelFacts,
    ModelInfo,
    has_cuda,
    linear_module_names,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from olive_grove.tasks.speed import Placement

# Set by the training step itself, so a config may not set them.
OWNED_TRAINING_ARGS = {"output_dir", "report_to", "remove_unused_columns", "resume_from_checkpoint"}
DTYPES = Literal["bfloat16", "float16", "float32"]
# Inside the adapter's folder: the samples it was evaluated on, so a merge measures the merged model on them.
EVAL_SAMPLES = f"{INTERNAL_PREFIX}eval"


# ------------------------------------------------------------------------------------------- settings


@functools.cache
def training_arg_names() -> frozenset[str]:
    """TrainingArguments' fields. Importing it costs seconds (torch, accelerate), so the names are kept
    per transformers version: validating a config, or re-running a cached one, need not pay for it."""
    memo = USER_CACHE / f"training-args-{importlib.metadata.version('transformers')}.json"
    names = read_memo(memo, None)
    if names is None:
        from transformers.training_args import TrainingArguments

        names = sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
        write_memo(memo, names)
    return frozenset(names)


class LoRASettings(PassSettings):
    """The LoRA pass (Olive's `LoRA`): the adapter's shape and the Trainer's arguments."""

    type: Literal["LoRA"] = "LoRA"
    train_data_config: str = Field(description="name of the data config to train on")
    eval_data_config: str | None = Field(None, description="name of a data config to evaluate on")
    eval_dataset_size: float | None = Field(
        None, gt=0, description="hold out this fraction (<1) or count (>=1) of the training samples"
    )
    target_modules: list[str] | None = Field(
        None, min_length=1, description="layer names to adapt; None (left out): the model type's default"
    )
    r: int = Field(64, gt=0, description="LoRA rank; at most the model's hidden size")
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
    micro_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
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
                raise UserError(key, "is set by olive-grove", "checkpoints go to the step's cache folder")
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

    @property
    def dtype(self) -> str:
        """The dtype the adapter is trained in (and, by default, merged in)."""
        return self.torch_dtype

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            use_dora=self.use_dora,
            task_type="CAUSAL_LM",
        )

    def data_config_names(self) -> dict[str, str]:
        names = {"train_data_config": self.train_data_config, "eval_data_config": self.eval_data_config}
        return {key: name for key, name in names.items() if name is not None}

    def datasets(self, data_configs: dict[str, DataConfig], fingerprints: dict[str, str]) -> dict[str, DatasetSettings]:
        """The dataset steps this pass trains and evaluates on, by the name of the step's input."""
        # Like Olive: an eval_data_config takes precedence over holding out eval_dataset_size.
        split = None if self.eval_data_config else self.eval_dataset_size
        wanted = {"dataset": (self.train_data_config, split), "eval_dataset": (self.eval_data_config, None)}
        return {
            arg: DatasetSettings(
                data=data_configs[name],
                files_fingerprint=fingerprints[name],
                eval_dataset_size=size,
                seed=self.seed if size else None,  # it only seeds the split
            )
            for arg, (name, size) in wanted.items()
            if name is not None
        }

    def check_before_work(self, model: ModelFacts) -> None:
        """What can be known wrong before training: the Trainer's arguments, the rank, the layers to adapt."""
        check_training_args(self)
        hidden = model.hidden_size()
        if hidden is not None and self.r > hidden:
            raise UserError("r", f"{self.r} is more than the model's hidden size ({hidden})",
                            "a LoRA rank is much smaller: 8 to 64 is usual")  # fmt: skip
        names = model.linear_names() if self.target_modules else None
        if names is not None:
            check_target_modules(self, names)


class QLoRASettings(LoRASettings):
    """The QLoRA pass: LoRA on a bitsandbytes 4-bit base."""

    type: Literal["QLoRA"] = "QLoRA"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: DTYPES = "bfloat16"
    loftq: bool = Field(
        False, description="olive-grove: start LoRA from LoftQ's fit of the 4-bit error (peft; needs safetensors)"
    )

    @property
    def dtype(self) -> str:
        return self.compute_dtype

    def check_before_work(self, model: ModelFacts) -> None:
        if self.loftq and not has_cuda():
            raise UserError(
                "loftq", "peft's LoftQ initialisation runs on CUDA only", "set loftq: false on a machine without a GPU"
            )
        super().check_before_work(model)


def check_target_modules(settings: LoRASettings, linear_names: set[str]) -> None:
    for name in settings.target_modules or []:
        if name not in linear_names:
            raise UserError(
                f"target_modules.{name}", "is not a linear layer of this model", nearest(name, linear_names)
            )


def check_training_args(settings: LoRASettings) -> None:
    """Check the arguments' types and values before any work; the Trainer would only when it is built."""
    import typing

    from pydantic import TypeAdapter, ValidationError
    from transformers.training_args import TrainingArguments

    types = typing.get_type_hints(TrainingArguments)
    for key, value in settings.training_args.items():
        try:
            TypeAdapter(types[key]).validate_python(value, strict=True)  # `true` is no batch size of 1
        except ValidationError as exc:
            hint = "YAML reads 2e-4 as text: write 2.0e-4" if isinstance(value, str) and _is_number(value) else ""
            raise UserError(f"training_args.{key}", f"{exc.errors()[0]['msg']} (got {shown(value)})", hint) from None
        minimum = TRAINING_ARG_MINIMUMS.get(key)
        if minimum is not None and isinstance(value, (int, float)) and not _at_least(value, *minimum):
            bound, inclusive = minimum
            raise UserError(f"training_args.{key}", f"must be {'at least' if inclusive else 'more than'} {bound} "
                            f"(got {value!r})")  # fmt: skip
    steps = settings.training_args.get("max_steps", -1)
    if steps == 0 or steps < -1:
        raise UserError("training_args.max_steps", f"must be positive (got {steps})", "or -1: train num_train_epochs")
    if steps == -1 and settings.training_args.get("num_train_epochs", 3) <= 0:
        raise UserError("training_args.num_train_epochs", "must be more than 0 when max_steps is not set",
                        "an untrained adapter is no adapter")  # fmt: skip
    evaluates = settings.eval_dataset_size is not None or settings.eval_data_config is not None
    try:
        trainer_arguments(settings, Path("unused"), has_eval=evaluates)
    except (ValueError, TypeError) as exc:
        raise UserError("training_args", " ".join(str(exc).split())[:300]) from None


# TrainingArguments that have a smallest sensible value: (bound, whether the bound itself is allowed).
TRAINING_ARG_MINIMUMS: dict[str, tuple[float, bool]] = {
    "learning_rate": (0, False),
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "eval_accumulation_steps": (1, True),
    "logging_steps": (0, False),
    "save_steps": (0, False),
    "eval_steps": (0, False),
    "save_total_limit": (1, True),
    "warmup_steps": (0, True),
    "weight_decay": (0, True),
    "max_grad_norm": (0, True),
    "adam_epsilon": (0, False),
}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _at_least(value: float, bound: float, inclusive: bool) -> bool:
    return value >= bound if inclusive else value > bound


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
    quantization: dict[str, Any] | None = None
    loss_curve: list[LossPoint] = Field(default_factory=list)
    eval_curve: list[LossPoint] = Field(default_factory=list)
    eval_samples: str | None = Field(None, description="folder of the eval samples, relative to the adapter's")


# -------------------------------------------------------------------------------------- the recipe


def train_adapter(
    settings: LoRASettings,
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
    settings: LoRASettings,
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
    peft_model = get_peft_model(base, settings.peft_config())
    if isinstance(settings, QLoRASettings) and settings.loftq:
        from peft import replace_lora_weights_loftq

        replace_lora_weights_loftq(peft_model, model_path=model.path)
        report.log("LoRA weights initialised with LoftQ")

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
    report.log(f"adapter trained: {info.summary()}")
    return info


# ------------------------------------------------------------------------------------------ helpers


def load_base_for_training(settings: LoRASettings, model_path: str, trust_remote_code: bool, placement: Placement):
    """The frozen base: full precision weights for LoRA, bitsandbytes 4-bit for QLoRA."""
    if not isinstance(settings, QLoRASettings):
        return load_causal_lm(model_path, settings.torch_dtype, trust_remote_code)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(settings.compute_dtype),
    )
    device_map = {"": placement.local_rank} if has_cuda() else {"": "cpu"}  # a GPU per process
    model = load_causal_lm(model_path, settings.compute_dtype, trust_remote_code, quantization_config=quant,
                           device_map=device_map)  # fmt: skip
    gradient_checkpointing = bool(settings.training_args.get("gradient_checkpointing", False))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def trainer_arguments(settings: LoRASettings, checkpoint_dir: Path, has_eval: bool, placement: Placement | None = None):
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
    if has_cuda() and (placement or Placement()).world_size == 1:
        _ = arguments.device  # one process trains on one GPU: several are `processes`' job, not nn.DataParallel's
        arguments._n_gpu = 1
    return arguments


def make_trainer(
    settings: LoRASettings,
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
    args = trainer_arguments(settings, checkpoint_dir, eval_set is not None, placement)
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
    trainer = Trainer(model=peft_model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=pad_collator(pad_id))  # fmt: skip
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


def progress_callbacks(report: Reporter) -> list:
    """A terminal progress bar without the Trainer's raw log dicts, and progress for whoever shows it.

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

    return [TerminalBar(), Progress()]


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
