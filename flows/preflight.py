"""Checks that need more than the config file (model folders, data files, layer names): all before any work."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from olive_grove.flows.config import RunConfig
from olive_grove.tasks.azureml import connect
from olive_grove.tasks.caching import StepContext
from olive_grove.tasks.data import AzureMLDatastore, check_data
from olive_grove.tasks.errors import UserError, located
from olive_grove.tasks.models import check_model_source, linear_module_names
from olive_grove.tasks.quiet import quiet_libraries
from olive_grove.tasks.storage import Remote, is_url


def check_before_work(cfg: RunConfig, ctx: StepContext) -> None:
    """Raise a UserError for anything that would fail later, so a bad run writes nothing."""
    try:
        with quiet_libraries():  # the checks call into transformers and datasets
            _check(cfg, ctx)
    except UserError as exc:
        raise cfg.user_error(exc) from None


def _check(cfg: RunConfig, ctx: StepContext) -> None:
    resolve_datastores(cfg)
    for key in ("cache_dir", "output_dir"):
        url = getattr(cfg.engine, key)
        if is_url(url):
            Remote(url, f"engine.{key}").check_container()
    source = cfg.model_source()
    with located("input_model.model_path"):
        check_model_source(source)
    adapter = cfg.input_model.adapter_path
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError("input_model.adapter_path", f"{adapter} has no adapter_config.json",
                        "point it at a PEFT adapter folder")  # fmt: skip
    used = {name for settings in cfg.passes.values() for name in settings.data_config_names().values()}
    for data in cfg.data_configs:
        if data.name in used:
            with located(cfg.data_where(data.name)):
                check_data(data, Path(ctx.downloads))

    @functools.cache
    def linear_names() -> set[str] | None:
        """The base model's linear layers, where they can be read before the run fetches it."""
        if source.kind not in ("local", "hub"):
            return None  # checked by the training step once the model is fetched
        try:
            return linear_module_names(source.name, source.trust_remote_code)
        except UserError:
            return None  # an unreadable model is reported by the step that loads it

    for name, settings in cfg.passes.items():
        with located(f"passes.{name}"):
            settings.check_before_work(linear_names)


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
