"""Checks that need more than the config file (model folders, data files, layer names): all before any work."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from olive_grove.flows.config import RunConfig, unmerged_adapters
from olive_grove.tasks.azureml import connect
from olive_grove.tasks.data import AzureMLDatastore, DataConfig, check_data, listed_files
from olive_grove.tasks.errors import Unreachable, UserError, located
from olive_grove.tasks.evaluators import Evaluator, LMEvaluatorSettings, load_user_function
from olive_grove.tasks.lm_harness import check_tasks
from olive_grove.tasks.models import ModelFacts, check_adapter_folder, check_model_source
from olive_grove.tasks.passes import BUILD_ONNX_MODEL, EXTRACT_ADAPTERS, PASS_TYPES
from olive_grove.tasks.quiet import quiet_libraries
from olive_grove.tasks.step_cache import StepContext
from olive_grove.tasks.storage import Remote, is_url


def check_before_work(cfg: RunConfig, ctx: StepContext, unchecked: list[UserError] | None = None) -> None:
    """Raise a UserError for anything that would fail later, so a bad run writes nothing.

    With `unchecked`, what this machine cannot reach (no credentials, no network, no Azure ML library) is
    noted there instead, and the checks that do not depend on it go on: `grove validate` on a laptop.
    """
    try:
        with quiet_libraries():  # the checks call into transformers and datasets
            _check(cfg, ctx, _Attempts(cfg, unchecked))
    except UserError as exc:
        raise cfg.user_error(exc) from None


class _Attempts:
    """Runs one check; an unreachable resource fails the run, or is noted for `grove validate`."""

    def __init__(self, cfg: RunConfig, unchecked: list[UserError] | None) -> None:
        self.cfg, self.unchecked = cfg, unchecked

    def __call__(self, where: str, check: Callable[[], object]) -> bool:
        try:
            with located(where):
                check()
        except Unreachable as exc:
            if self.unchecked is None:
                raise
            self.unchecked.append(self.cfg.user_error(exc))
            return False
        return True


def _check(cfg: RunConfig, ctx: StepContext, attempt: _Attempts) -> None:
    resolved = {
        data.name: attempt("", lambda i=i: resolve_datastore(cfg, i)) for i, data in enumerate(cfg.data_configs)
    }
    for key in ("cache_dir", "output_dir"):
        url = getattr(cfg.engine, key)
        if is_url(url):
            attempt(f"engine.{key}", lambda url=url: Remote(url, "").check_container())
    source = cfg.model_source()
    attempt("input_model.model_path", lambda: check_model_source(source))
    if cfg.input_model.adapter_path:
        with located("input_model.adapter_path"):
            check_adapter_folder(Path(cfg.input_model.adapter_path))
            check_given_adapter_buildable(cfg)
    check_locations(cfg)
    evaluators = cfg.used_evaluators()
    used = {name for settings in cfg.passes.values() for name in settings.data_config_names().values()}
    used |= {name for evaluator in evaluators.values() for name in evaluator.data_names()}
    for data in cfg.data_configs:
        if data.name in used and resolved[data.name]:
            attempt(cfg.data_where(data.name), lambda data=data: check_data(data, Path(ctx.downloads)))
    for name, evaluator in evaluators.items():
        with located(cfg.evaluator_key(name)):
            check_evaluator(evaluator, cfg, Path(ctx.downloads))
    facts = ModelFacts(source)
    with located("input_model.model_path"):
        facts.check()
    longest = facts.max_positions()
    for data in cfg.data_configs:
        if data.name in used and longest and data.pre_process_data_config.max_seq_len > longest:
            raise UserError(f"{cfg.data_where(data.name)}.pre_process_data_config.max_seq_len",
                            f"{data.pre_process_data_config.max_seq_len} is more than the model's "
                            f"{longest} positions", f"at most {longest}")  # fmt: skip
    for name, settings in cfg.passes.items():
        with located(f"passes.{name}"):
            settings.check_before_work(facts)
    check_extracted_adapters_match(cfg, facts)


def check_evaluator(evaluator: Evaluator, cfg: RunConfig, downloads: Path) -> None:
    """What an evaluator needs is here: lm-eval and its tasks' data; each metric's rows, with answers to
    compare where it compares them; a custom metric's function."""
    if isinstance(evaluator, LMEvaluatorSettings):
        check_tasks(evaluator)
        return
    for index, metric in enumerate(evaluator.metrics):
        where, data = f"metrics[{index}]", metric.data_config
        if isinstance(data, DataConfig):
            with located(f"{where}.data_config"):
                check_data(data, downloads)
        text = cfg.data_named(data).pre_process_data_config if data is not None else None
        compares = metric.type == "custom" or any(s.name != "perplexity" for s in metric.sub_types)
        if metric.type in ("accuracy", "custom") and compares and not (text.chat_template or text.text_template):
            raise UserError(f"{where}.data_config", f"the {metric.type} metric compares the model's answer with each "
                            "row's, and its rows have no answer to tell apart",
                            "give the data config a text_template whose last {column} is the answer, or chat "
                            "rows (chat_template: true)")  # fmt: skip
        if metric.type == "custom":
            with located(where):
                config = metric.user_config
                load_user_function(config.user_script, config.metric_func, config.script_dir)


def check_extracted_adapters_match(cfg: RunConfig, facts: ModelFacts) -> None:
    """ExtractAdapters swaps adapters in the LoRA layers ModelBuilder built: each must adapt those layers."""
    for name, settings, unmerged in unmerged_adapters(cfg):
        trained = [n for n in unmerged if n in cfg.passes]  # a given adapter's layers are its own file's
        if PASS_TYPES[settings.type].step is not EXTRACT_ADAPTERS or len(trained) < 2:
            continue
        layers = {n: cfg.passes[n].adapted_layers(facts) for n in trained}
        first = trained[0]
        for other in trained[1:]:
            if None not in (layers[first], layers[other]) and layers[other] != layers[first]:
                raise UserError(f"passes.{other}.target_modules", f"adapts {', '.join(sorted(layers[other]))}, and "
                                f"passes.{first} adapts {', '.join(sorted(layers[first]))}",
                                f"adapters passes.{name} extracts share one set of layers: give them the same "
                                "target_modules")  # fmt: skip


def check_given_adapter_buildable(cfg: RunConfig) -> None:
    """ModelBuilder builds only plain LoRA unmerged: a given adapter of another kind must be merged first
    (the pass order checks this for adapters the run trains; a given one is known by its config file)."""
    first = next((name for name, settings, unmerged in unmerged_adapters(cfg)
                  if PASS_TYPES[settings.type].step is BUILD_ONNX_MODEL and "input_model.adapter_path" in unmerged),
                 None)  # fmt: skip
    if first is None:
        return
    adapter = json.loads((Path(cfg.input_model.adapter_path) / "adapter_config.json").read_text())
    kind = "DoRA" if adapter.get("use_dora") else str(adapter.get("peft_type"))
    if kind != "LORA":
        raise UserError("", f"is a {kind} adapter, and passes.{first} builds LoRA adapters unmerged",
                        "merge it first (MergeAdapterWeights)")  # fmt: skip


# What a run publishes into engine.output_dir: these are replaced, whatever was there.
PUBLISHED = ("adapter", "adapters", "merged", "onnx", "evaluation", "report.json", "report.md", "loss.svg")


def check_locations(cfg: RunConfig) -> None:
    """The output and cache folders are safe to write and can be written; no input lives where outputs go."""
    output, cache = cfg.engine.output_dir, cfg.engine.cache_dir
    for key, place in (("engine.output_dir", output), ("engine.cache_dir", cache)):
        if not is_url(place):
            check_writable_folder(Path(place), key)
    if is_url(output):
        return
    replaced = [Path(output) / name for name in PUBLISHED]
    if not is_url(cache):
        out, steps = Path(output), Path(cache)
        if out == steps:
            raise UserError("engine.output_dir", "is the same folder as engine.cache_dir", "give each its own folder")
        if steps in out.parents:
            raise UserError("engine.output_dir", f"{out} is inside engine.cache_dir", "keep outputs out of the cache")
        if any(steps == r or r in steps.parents for r in replaced):
            raise UserError("engine.cache_dir", f"{steps} is inside a folder this run's outputs replace",
                            "keep the cache out of engine.output_dir's adapter/, merged/ and onnx/")  # fmt: skip
    for key, path in _input_paths(cfg):
        if any(path == r or r in path.parents for r in replaced):
            raise UserError(key, f"{path} is inside engine.output_dir, where this run's outputs replace it",
                            "move it, or give engine.output_dir a folder of its own")  # fmt: skip


def check_writable_folder(path: Path, key: str) -> None:
    """A folder that is not the file system root or the home folder, and that this user can create or write."""
    if path in (Path(path.anchor), Path.home()) or path in Path.home().parents:
        raise UserError(key, f"{path} is {'your home folder' if path == Path.home() else 'a system folder'}",
                        "give a folder of its own, such as outputs/<run name>")  # fmt: skip
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under the file {existing}"
        raise UserError(key, f"{path} {what}", "give a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(
            key, f"{path} cannot be written ({exc.strerror}: {existing})", "give a folder you can write"
        ) from None


def _input_paths(cfg: RunConfig) -> list[tuple[str, Path]]:
    found = []
    if isinstance(cfg.input_model.model_path, str) and Path(cfg.input_model.model_path).is_absolute():
        found.append(("input_model.model_path", Path(cfg.input_model.model_path)))
    if cfg.input_model.adapter_path:
        found.append(("input_model.adapter_path", Path(cfg.input_model.adapter_path)))
    for index, data in enumerate(cfg.data_configs):
        files, where = data.load_dataset_config.data_files, f"data_configs[{index}].load_dataset_config.data_files"
        if not isinstance(files, AzureMLDatastore):
            found += [(w, Path(f)) for w, f in listed_files(files, where) if not is_url(f)]
    return found


def resolve_datastores(cfg: RunConfig) -> None:
    """Point each `azureml_datastore` data file at its blob URL, through the workspace that owns it."""
    for index in range(len(cfg.data_configs)):
        resolve_datastore(cfg, index)


def resolve_datastore(cfg: RunConfig, index: int) -> None:
    load = cfg.data_configs[index].load_dataset_config
    files = load.data_files
    if not isinstance(files, AzureMLDatastore):
        return
    where = f"data_configs[{index}].load_dataset_config.data_files"
    client = files.azureml_client or (cfg.azureml_client.model_dump(exclude_none=True) if cfg.azureml_client else None)
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
