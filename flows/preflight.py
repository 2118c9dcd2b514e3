"""Checks that need more than the config file (model folders, data files, layer names): all before any work."""

from __future__ import annotations

import os
from pathlib import Path

from olive_grove.flows.config import RunConfig
from olive_grove.tasks.adapters import LoRASettings, QLoRASettings, check_target_modules, check_training_args
from olive_grove.tasks.azureml import connect
from olive_grove.tasks.data import AzureMLDatastore, check_data
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import check_model_source, has_cuda, linear_module_names
from olive_grove.tasks.onnx_build import EXECUTION_PROVIDERS, ModelBuilderSettings
from olive_grove.tasks.storage import Remote, is_url


def check_before_work(cfg: RunConfig) -> None:
    """Raise a UserError for anything that would fail later, so a bad run writes nothing."""
    try:
        _check(cfg)
    except UserError as exc:
        raise cfg.user_error(exc) from None


def _check(cfg: RunConfig) -> None:
    resolve_datastores(cfg)
    for key in ("cache_dir", "output_dir"):
        url = getattr(cfg.engine, key)
        if is_url(url):
            Remote(url, f"engine.{key}").check_container()
    source = cfg.model_source()
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
            if settings.target_modules and source.kind in ("local", "hub"):  # others: checked once fetched
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


def resolve_datastores(cfg: RunConfig) -> None:
    """Point each `azureml_datastore` data file at its blob URL, through the workspace that owns it."""
    for index, data in enumerate(cfg.data_configs):
        load = data.load_dataset_config
        files = load.data_files
        if not isinstance(files, AzureMLDatastore):
            continue
        where = f"data_configs[{index}].load_dataset_config.data_files"
        client = files.azureml_client or (
            cfg.azureml_client.model_dump(exclude_none=True) if cfg.azureml_client else None
        )
        if not client:
            raise UserError(f"{where}.azureml_client", "is required for an azureml_datastore", "or set azureml_client")
        location = connect(client, f"{where}.azureml_client").datastore(files.datastore_name)
        check_account(location.account_name, where)
        load.data_files = location.url(files.relative_path)
        load.storage_options = {"account_name": location.account_name, **(load.storage_options or {})}


def check_account(account: str, where: str) -> None:
    """A connection string in the environment names one account, and adlfs prefers it to any other."""
    text = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    named = dict(p.split("=", 1) for p in text.split(";") if "=" in p).get("AccountName")
    if named and named != account:
        raise UserError(
            where,
            f"the datastore is in storage account '{account}', AZURE_STORAGE_CONNECTION_STRING is for '{named}'",
            "unset it to use your Azure login, or give that account's connection string",
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
