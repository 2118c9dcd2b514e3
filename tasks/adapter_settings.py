"""What each adapter pass is configured with — Olive's LoRA, DoRA, QLoRA, LoftQ, LoHa and LoKr — and how those
settings become peft's config and the Trainer's arguments. The training itself is in `adapters.py`.

Every field means what it means in Olive; olive-grove's own settings say so in their description.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import platform
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from olive_grove.tasks.artifact import PassSettings, no_effect
from olive_grove.tasks.data import DataConfig, DatasetSettings
from olive_grove.tasks.errors import UserError, nearest, shown
from olive_grove.tasks.files import remembered
from olive_grove.tasks.models import ModelFacts, has_cuda
from olive_grove.tasks.speed import Placement

DTYPES = Literal["bfloat16", "float16", "float32"]
# Where Olive's training defaults differ from transformers', so a config written for Olive trains the same.
# (Olive also turns gradient checkpointing on; here micro_batch_size picks what fits, and a config that wants
# checkpointing's memory sets gradient_checkpointing: true.)
# Its name in Olive's configs and older transformers, and the one transformers 5.24 gives it.
CHECKPOINTING_ARGS = ("gradient_checkpointing", "activation_checkpointing")
OLIVE_TRAINING_DEFAULTS = {"learning_rate": 2e-4, "lr_scheduler_type": "constant", "warmup_steps": 0.03}
# Set by the training step itself, so a config may not set them.
OWNED_TRAINING_ARGS = {"output_dir", "report_to", "remove_unused_columns", "resume_from_checkpoint"}
# Olive's own default layers for model types peft has none for (olive/passes/pytorch/lora.py).
OLIVE_TARGET_MODULES = {"phi3": ["o_proj", "qkv_proj"]}
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


@functools.cache
def training_arg_names() -> frozenset[str]:
    """TrainingArguments' fields. Importing it costs seconds (torch, accelerate, peft), so the names are kept
    per transformers version: validating a config, or re-running a cached one, need not pay for it."""

    def names() -> list[str]:
        from transformers.training_args import TrainingArguments

        return sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)

    return frozenset(remembered("training-args", importlib.metadata.version("transformers"), names))


def peft_default_layers(table: str, model_type: str | None) -> list[str] | None:
    """peft's default layers for this model type in `table` (None: it has none); its tables import
    transformers' models (seconds), so the answer is kept per peft version."""

    def layers() -> list[str] | bool:
        from peft.utils import constants

        found = getattr(constants, table).get(model_type)
        return sorted(found) if found else False  # False: remembered as "none" (None is "not remembered")

    return remembered("peft-layers", [importlib.metadata.version("peft"), table, model_type], layers) or None


class AdapterSettings(PassSettings):
    """What every adapter pass has: its data, the layers it adapts, the Trainer's arguments, and
    olive-grove's speed settings."""

    train_data_config: str = Field(description="name of the data config to train on")
    eval_data_config: str | None = Field(None, description="name of a data config to evaluate on")
    eval_dataset_size: float | None = Field(
        None, gt=0, description="hold out this fraction (<1) or count (>=1) of the training samples"
    )
    target_modules: list[str] | None = Field(
        None, min_length=1, description="layer names to adapt; left out: the model type's default, as in Olive"
    )
    modules_to_save: list[str] | None = Field(None, description="layers trained in full and saved with the adapter")
    torch_dtype: DTYPES = Field("bfloat16", description="dtype of the frozen base weights")
    training_args: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments")
    fused_kernels: bool = Field(True, description="olive-grove: Liger Kernel's fused layers and loss on CUDA")
    compile_layers: bool = Field(True, description="olive-grove: torch.compile each decoder layer on CUDA")
    cuda_graphs: bool = Field(
        True,
        description="olive-grove: replay the compiled layers as CUDA graphs (one process, samples of one length, "
        "no evaluation during training, no gradient checkpointing)",
    )
    offload_checkpoints: bool = Field(
        False,
        description="olive-grove: with gradient_checkpointing on CUDA, each layer's input waits in pinned host "
        "memory for the backward pass (the lean-memory setting)",
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
    device_map: Any = no_effect("each training process loads the model onto its own GPU")
    use_ort_trainer: Any = no_effect("the Hugging Face Trainer trains, with olive-grove's speed-ups")
    allow_tf32: Any = no_effect()
    ephemeral_gpu_offload: Any = no_effect()

    # The data counts by the dataset's fingerprint, not its name; `processes` only spreads the same steps
    # over GPUs, as micro_batch_size splits them in time.
    not_in_cache_key: ClassVar[frozenset[str]] = frozenset({"train_data_config", "eval_data_config", "processes"})
    # peft's table of default layers for this kind of adapter, and what is left when it has none.
    default_targets_table: ClassVar[str] = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
    fallback_targets: ClassVar[str | None] = None

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

    @property
    def seed(self) -> int:
        return int(self.training_args.get("data_seed", self.training_args.get("seed", 42)))

    @property
    def dtype(self) -> str:
        """The dtype the adapter is trained in."""
        return self.torch_dtype

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is loaded in 4 bits."""
        return False

    def peft_config(self, target_modules: list[str] | str | None):
        raise NotImplementedError

    def layers_to_adapt(self, model_type: str | None) -> list[str] | str | None:
        """The configured target_modules, else Olive's default for the model type (None: peft's own)."""
        if self.target_modules:
            return self.target_modules
        if peft_default_layers(self.default_targets_table, model_type):
            return None  # peft knows this model type
        return OLIVE_TARGET_MODULES.get(model_type or "", self.fallback_targets)

    def adapted_layers(self, model: ModelFacts) -> frozenset[str] | None:
        """The short names of the layers it adapts in this model; None where that is known only at training."""
        layers = self.layers_to_adapt(model.model_type())
        if layers is None:
            layers = peft_default_layers(self.default_targets_table, model.model_type())
        if layers == "all-linear":
            names = model.linear_names()
            return None if names is None else frozenset(names - {"lm_head"})  # peft leaves the output layer out
        return frozenset(layers) if layers else None

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
        """What can be known wrong before training: the Trainer's arguments, the layers to adapt."""
        check_training_args(self)
        if self.offload_checkpoints and not self.recomputes_layers:
            raise UserError("offload_checkpoints", "keeps the inputs of checkpointed layers on the host, and "
                            "gradient checkpointing is off",
                            "set training_args.gradient_checkpointing: true too")  # fmt: skip
        names = model.linear_names()
        if names is None:
            return
        if self.target_modules:
            check_target_modules(self, names)
        elif self.layers_to_adapt(model.model_type()) is None and not peft_default_layers(
            self.default_targets_table, model.model_type()
        ):
            raise UserError("target_modules", f"has no default for '{model.model_type()}' models",
                            f"name the layers to adapt, from: {', '.join(sorted(names))}")  # fmt: skip

    @property
    def recomputes_layers(self) -> bool:
        """Activation (gradient) checkpointing: each layer re-run in the backward pass."""
        return any(self.training_args.get(name) for name in CHECKPOINTING_ARGS)

    def trainer_arguments(self, checkpoint_dir: Path, has_eval: bool, placement: Placement | None = None):
        """transformers.TrainingArguments: Olive's defaults, then the config's, then what the step decides."""
        from transformers import TrainingArguments

        args = {
            **OLIVE_TRAINING_DEFAULTS,
            "save_strategy": "steps",
            "save_steps": 50,
            "save_total_limit": 2,
            "logging_steps": 10,
            "ddp_find_unused_parameters": False,  # the frozen base has no gradients to wait for
            **self.training_args,
            "output_dir": str(checkpoint_dir),
            "report_to": "none",
            "remove_unused_columns": False,
        }
        if not has_eval:
            args["eval_strategy"] = "no"
        for name in CHECKPOINTING_ARGS:
            if args.get(name):
                # The lean-memory setting: recompute each layer in the backward pass. PyTorch's non-reentrant
                # kind works with frozen inputs (PEFT's) and compiled layers, where the reentrant one does not.
                args.setdefault(f"{name}_kwargs", {"use_reentrant": False})
        if not has_cuda():
            args["use_cpu"] = True
            args.pop("bf16", None), args.pop("fp16", None)
        arguments = TrainingArguments(**args)
        if has_cuda() and (placement or Placement()).world_size == 1:
            _ = arguments.device  # one process trains on one GPU: several are `processes`' job, not nn.DataParallel's
            arguments._n_gpu = 1
        return arguments


class LoRASettings(AdapterSettings):
    """The LoRA pass (Olive's `LoRA`)."""

    type: Literal["LoRA"] = "LoRA"
    r: int = Field(64, gt=0, description="LoRA rank; at most the model's hidden size")
    alpha: float = Field(16, gt=0, description="scale = alpha / r")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    use_dora: bool = Field(False, description="weight-decomposed LoRA (peft's DoRA; Olive's DoRA pass)")

    def peft_config(self, target_modules: list[str] | str | None):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.lora_dropout,
                          target_modules=target_modules, modules_to_save=self.modules_to_save,
                          use_dora=self.use_dora, bias="none", task_type="CAUSAL_LM")  # fmt: skip

    def check_before_work(self, model: ModelFacts) -> None:
        hidden = model.hidden_size()
        if hidden is not None and self.r > hidden:
            raise UserError("r", f"{self.r} is more than the model's hidden size ({hidden})",
                            "a LoRA rank is much smaller: 8 to 64 is usual")  # fmt: skip
        super().check_before_work(model)


class DoRASettings(LoRASettings):
    """Olive's `DoRA` pass: LoRA with the weights' magnitude and direction trained apart (peft's use_dora)."""

    type: Literal["DoRA"] = "DoRA"  # type: ignore[assignment]
    use_dora: Literal[True] = True


class QLoRASettings(LoRASettings):
    """The QLoRA pass: LoRA on a bitsandbytes 4-bit base. Left out, target_modules is every linear layer
    (Olive's choice for QLoRA)."""

    type: Literal["QLoRA"] = "QLoRA"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: DTYPES = "bfloat16"
    save_quant_config: Any = no_effect("the merged model is saved unquantized, for ModelBuilder")

    fallback_targets: ClassVar[str | None] = "all-linear"

    @property
    def dtype(self) -> str:
        return self.compute_dtype

    @property
    def quantized(self) -> bool:
        return True

    def layers_to_adapt(self, model_type: str | None) -> list[str] | str | None:
        return self.target_modules or "all-linear"


class LoftQSettings(QLoRASettings):
    """Olive's `LoftQ` pass: QLoRA whose adapter starts from LoftQ's fit of the 4-bit quantization error, so
    the 4-bit base plus the adapter start out as close to the original weights as the rank allows."""

    type: Literal["LoftQ"] = "LoftQ"  # type: ignore[assignment]
    loftq_iter: Literal[1] = Field(1, description="alternating fits; peft's replace_lora_weights_loftq does one")


class LoHaSettings(AdapterSettings):
    """Olive's `LoHa` pass: a low-rank Hadamard product adapter (peft's LoHa). Left out, target_modules is
    peft's default for the model type, else Olive's, else every linear layer."""

    type: Literal["LoHa"] = "LoHa"
    r: int = Field(64, gt=0, description="rank of each factor")
    alpha: float = Field(16, gt=0, description="scale = alpha / r")
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    use_effective_conv2d: bool = True
    exclude_modules: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    lora_dropout: Any = no_effect("LoHa has rank_dropout and module_dropout")

    default_targets_table: ClassVar[str] = "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING"
    fallback_targets: ClassVar[str | None] = "all-linear"
    peft_class: ClassVar[str] = "LoHaConfig"

    def check_before_work(self, model: ModelFacts) -> None:
        layers = model.num_layers()
        beyond = [i for i in self.layers_to_transform or [] if layers is not None and not 0 <= i < layers]
        if beyond:
            raise UserError("layers_to_transform", f"layer {beyond[0]} is not one of the model's {layers} layers",
                            f"indexes 0 to {layers - 1}")  # fmt: skip
        if self.exclude_modules and self.target_modules and set(self.target_modules) <= set(self.exclude_modules):
            raise UserError("exclude_modules", "leaves none of target_modules to adapt", "exclude fewer layers")
        super().check_before_work(model)

    def _shape(self) -> dict[str, Any]:
        return self.model_dump(include={"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
                                        "exclude_modules", "init_weights", "layers_to_transform", "layers_pattern",
                                        "rank_pattern", "alpha_pattern"})  # fmt: skip

    def peft_config(self, target_modules: list[str] | str | None):
        import peft

        config = getattr(peft, self.peft_class)
        return config(**self._shape(), target_modules=target_modules, modules_to_save=self.modules_to_save,
                      task_type="CAUSAL_LM")  # fmt: skip


class LoKrSettings(LoHaSettings):
    """Olive's `LoKr` pass: a low-rank Kronecker product adapter (peft's LoKr)."""

    type: Literal["LoKr"] = "LoKr"  # type: ignore[assignment]
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    default_targets_table: ClassVar[str] = "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING"
    peft_class: ClassVar[str] = "LoKrConfig"

    def _shape(self) -> dict[str, Any]:
        return {**super()._shape(), **self.model_dump(include={"decompose_both", "decompose_factor",
                                                                "rank_dropout_scale"})}  # fmt: skip


def check_target_modules(settings: AdapterSettings, linear_names: set[str]) -> None:
    for name in settings.target_modules or []:
        if name not in linear_names:
            raise UserError(
                f"target_modules.{name}", "is not a linear layer of this model", nearest(name, linear_names)
            )


def check_training_args(settings: AdapterSettings) -> None:
    """Check the arguments' types and values before any work; the Trainer would only when it is built.

    The check imports transformers' Trainer (seconds), so arguments that passed are remembered per machine
    and versions: a config checked once validates, and re-runs, without it.
    """
    evaluates = settings.eval_dataset_size is not None or settings.eval_data_config is not None
    versions = [importlib.metadata.version(name) for name in ("transformers", "torch", "accelerate")]
    key = [platform.node(), versions, settings.training_args, evaluates]  # the machine: whether it has a GPU
    remembered("training-args-ok", key, lambda: _check_training_args(settings, evaluates) or True)


def _check_training_args(settings: AdapterSettings, evaluates: bool) -> None:
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
    try:
        settings.trainer_arguments(Path("unused"), has_eval=evaluates)
    except (ValueError, TypeError) as exc:
        raise UserError("training_args", " ".join(str(exc).split())[:300]) from None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _at_least(value: float, bound: float, inclusive: bool) -> bool:
    return value >= bound if inclusive else value > bound
