"""Checks that need more than the config file (model folders, data files, layer names): all before any work."""

from __future__ import annotations

from pathlib import Path

from flows.config import RunConfig
from tasks.adapters import LoRASettings, QLoRASettings, check_target_modules, check_training_args
from tasks.data import check_data
from tasks.errors import UserError
from tasks.models import check_model_source, has_cuda, linear_module_names
from tasks.onnx_build import EXECUTION_PROVIDERS, ModelBuilderSettings


def check_before_work(cfg: RunConfig) -> None:
    """Raise a UserError for anything that would fail later, so a bad run writes nothing."""
    try:
        _check(cfg)
    except UserError as exc:
        raise cfg.user_error(exc) from None


def _check(cfg: RunConfig) -> None:
    if not isinstance(cfg.input_model.model_path, str):
        raise UserError(
            "input_model.model_path",
            "azureml_registry_model inputs cannot be fetched yet",
            "download the model and give its folder, or a hub id",
        )
    source = cfg.input_model.source()
    check_model_source(source, "input_model.model_path")
    adapter = cfg.input_model.adapter_path
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(
            "input_model.adapter_path",
            f"{adapter} has no adapter_config.json",
            "point it at a PEFT adapter folder",
        )
    linear_names: set[str] | None = None
    for name, settings in cfg.passes.items():
        if isinstance(settings, QLoRASettings) and settings.loftq and not has_cuda():
            raise UserError(f"passes.{name}.loftq", "peft's LoftQ initialisation runs on CUDA only",
                            "set loftq: false on a machine without a GPU")  # fmt: skip
        if isinstance(settings, LoRASettings):
            check_training_args(settings, f"passes.{name}.training_args")
            for data_name in filter(None, (settings.train_data_config, settings.eval_data_config)):
                check_data(*cfg.data_config(data_name))
            if settings.target_modules:
                if linear_names is None:
                    linear_names = linear_module_names(source.name, source.trust_remote_code)
                try:
                    check_target_modules(settings, linear_names)
                except UserError as exc:
                    raise UserError(f"passes.{name}.{exc.where}", exc.problem, exc.hint) from None
        if isinstance(settings, ModelBuilderSettings):
            provider = execution_provider(cfg, settings)
            if settings.precision == "bf16" and provider == "cpu":
                raise UserError(
                    f"passes.{name}.precision",
                    "bf16 models do not run on the CPU execution provider",
                    "use int4, int8, fp16 or fp32 for cpu",
                )


def execution_provider(cfg: RunConfig, settings: ModelBuilderSettings) -> str:
    """The pass's own provider, else the engine's first, else the target system's, else CPU."""
    if settings.execution_provider:
        return settings.execution_provider
    names, where = list(cfg.engine.execution_providers or []), "engine.execution_providers"
    target = cfg.systems.get(cfg.engine.target or "")
    if not names and target:
        where = f"systems.{cfg.engine.target}.accelerators"
        for accelerator in target.accelerators:
            if not isinstance(accelerator, str):
                names += accelerator.execution_providers or []
    if not names:
        return "cpu"
    if names[0] not in EXECUTION_PROVIDERS:
        raise UserError(where, f"unknown execution provider {names[0]!r}", "one of " + ", ".join(EXECUTION_PROVIDERS))
    return EXECUTION_PROVIDERS[names[0]]
