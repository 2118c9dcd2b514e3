"""RunConfig: an Olive run config, loaded from JSON or YAML, normalised, validated and resolved."""

from __future__ import annotations

import os
import re
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlparse

import pydantic
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from olive_grove.flows.config_file import apply_overrides, checked_mapping, read_config_file
from olive_grove.flows.olive_compat import RENAMED_KEYS, Normalised, normalise
from olive_grove.tasks.artifact import Settings, no_effect
from olive_grove.tasks.data import AzureMLDatastore, DataConfig, listed_files
from olive_grove.tasks.errors import UserError, UserErrors, each_once, nearest, shown
from olive_grove.tasks.evaluators import Evaluator, Metric
from olive_grove.tasks.models import ModelSource
from olive_grove.tasks.onnx_build import EXECUTION_PROVIDERS, ModelBuilderSettings
from olive_grove.tasks.passes import BUILD_ONNX_MODEL, EXTRACT_ADAPTERS, MERGE_ADAPTER, PASS_TYPES, Output

AnyPass = Annotated[Union[tuple(t.settings for t in PASS_TYPES.values())], Field(discriminator="type")]  # noqa: UP007
AZURE_PROTOCOLS = {"az", "abfs", "abfss"}
DESCRIBED: dict[Output, str] = {"model": "a model", "adapter": "an adapter", "onnx": "an ONNX model"}


class LoadKwargs(Settings):
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: Any = no_effect("transformers picks the attention implementation")
    torch_dtype: Any = no_effect("each pass sets the dtype it loads the model in")


class RegistryModel(Settings):
    """An Azure ML registry model (`azureml_registry_model`)."""

    type: Literal["azureml_registry_model"]
    name: str
    registry_name: str
    version: str | int


class InputModel(Settings):
    type: Literal["HfModel"] = "HfModel"
    model_path: str | dict[str, Any] = Field(description="a local model folder, a hub id, or a registry model")
    task: Any = no_effect("olive-grove fine-tunes text generation")
    load_kwargs: LoadKwargs = Field(default_factory=LoadKwargs)
    adapter_path: str | None = Field(None, description="a trained PEFT adapter to merge or build from")
    model_file_format: Any = no_effect()
    generative: Any = no_effect("olive-grove fine-tunes generative models")
    model_attributes: Any = no_effect("transformers reads the model's own config")

    @model_validator(mode="after")
    def _registry(self) -> InputModel:
        if isinstance(self.model_path, dict):
            try:
                RegistryModel.model_validate(self.model_path)
            except ValidationError as exc:
                first = exc.errors()[0]
                key = ".".join(str(p) for p in first["loc"])
                raise UserError(
                    f"model_path.{key}",
                    first["msg"],
                    "a registry model needs type, name, registry_name and version",
                ) from None
        return self

    def source(self, azureml_client: AzureMLClient | None = None) -> ModelSource:
        """Where the base model comes from; a registry model is reached through the config's azureml_client."""
        common = {"revision": self.load_kwargs.revision, "trust_remote_code": self.load_kwargs.trust_remote_code}
        if isinstance(self.model_path, str):
            return ModelSource(name=self.model_path, **common)
        registry = RegistryModel.model_validate(self.model_path)
        return ModelSource(
            name=registry.name,
            registry_name=registry.registry_name,
            version=str(registry.version),
            azureml_client=azureml_client.model_dump(exclude_none=True) if azureml_client else None,
            **common,
        )


class Accelerator(Settings):
    device: Literal["cpu", "gpu", "npu"] = "cpu"
    execution_providers: list[str] | None = None

    @field_validator("device", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # Olive's configs write "GPU"


POOL_DECIDES = "the work pool's job template decides where and how the flow runs"


class SystemConfig(Settings):
    """An Olive system; here it names the Prefect work pool that runs the flow."""

    type: Literal["LocalSystem", "AzureML", "Docker", "PythonEnvironment", "IsolatedORT"]
    accelerators: list[Accelerator | Literal["cpu", "gpu", "npu"]] = Field(default_factory=list)
    work_pool: str | None = Field(None, description="the Prefect work pool; default: by system type")
    hf_token: bool = Field(False, description="hand the Secret block 'hf-token' to the hub client")
    aml_compute: Any = no_effect(POOL_DECIDES)
    aml_docker_config: Any = no_effect(POOL_DECIDES)
    aml_environment_config: Any = no_effect(POOL_DECIDES)
    is_dev: Any = no_effect()
    instance_count: Any = no_effect(POOL_DECIDES)
    image_name: Any = no_effect(POOL_DECIDES)
    local_docker_config: Any = no_effect(POOL_DECIDES)
    python_environment_path: Any = no_effect(POOL_DECIDES)


class AzureMLClient(Settings):
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    keyvault_name: Any = no_effect("secrets live in Prefect blocks")
    aml_config_path: str | None = None
    read_timeout: int | None = None
    max_operation_retries: int | None = None
    operation_retry_interval: int | None = None
    default_auth_params: dict[str, Any] | None = None


class EngineConfig(Settings):
    host: str | None = Field(None, description="the systems entry the flow runs on")
    target: str | None = Field(None, description="the systems entry the model is built for")
    cache_dir: str = Field(".olive-cache", min_length=1, description="where step results are kept")
    output_dir: str = Field("outputs", min_length=1, description="where finished outputs are published")
    retries: int = Field(0, ge=0, description="olive-grove: retries of a step that failed for a passing reason")
    retry_delay_seconds: float = Field(30, ge=0, description="olive-grove: wait before each retry")
    execution_providers: list[str] | None = None
    log_severity_level: int = Field(1, ge=0, le=4, description="the run log's level: 0 debug, 1 info … 4 fatal")
    search_strategy: Any = no_effect("every pass runs once, with its settings")
    evaluate_input_model: bool = Field(True, description="the evaluators measure the base model too")
    clean_cache: Any = no_effect("grove cache prune removes cached steps")
    clean_evaluation_cache: Any = no_effect()
    packaging_config: Any = no_effect()
    output_name: Any = no_effect()
    plot_pareto_frontier: Any = no_effect()
    no_artifacts: Any = no_effect()
    evaluator: str | dict[str, Any] | None = Field(
        None, description="measures the run's models: an evaluators name, or one in place"
    )
    ort_log_severity_level: Any = no_effect()
    ort_py_log_severity_level: Any = no_effect()
    log_to_file: Any = no_effect("the run's log is kept by Prefect (grove run prints it, the UI shows it)")
    cache_config: Any = no_effect("engine.cache_dir says where steps are cached")
    enable_shared_cache: Any = no_effect("a cache_dir URL is shared by every machine that runs the config")


PASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAMED = {"passes": "pass", "evaluators": "evaluator"}  # the mappings whose keys name output folders


class RunConfig(Settings):
    """One fine-tuning run: the base model, data, passes in order, and where things go."""

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    _written_at: dict[str, str] = PrivateAttr(default_factory=dict)  # an in-place evaluator's key, by its name

    input_model: InputModel
    data_configs: list[DataConfig] = Field(default_factory=list)
    passes: dict[str, AnyPass] = Field(min_length=1, description="the passes to run, in order")
    systems: dict[str, SystemConfig] = Field(default_factory=dict)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    azureml_client: AzureMLClient | None = None
    evaluators: dict[str, Evaluator] = Field(default_factory=dict, description="evaluators by name")
    workflow_id: Any = no_effect("each run is a Prefect flow run with its own id")
    auto_optimizer_config: Any = no_effect("every pass runs as configured")

    @field_validator("passes", "evaluators", mode="before")
    @classmethod
    def _names_are_folder_names(cls, entries: Any, info: pydantic.ValidationInfo) -> Any:
        """A pass's or evaluator's name names its outputs (adapters/<pass>, evaluation/<evaluator>/): a plain
        file name."""
        for name in entries if isinstance(entries, dict) else []:
            if not PASS_NAME.fullmatch(str(name)) or set(str(name)) == {"."}:
                raise UserError(repr(str(name)), f"is not a usable {NAMED[info.field_name]} name",
                                "letters, digits, '_', '-' and '.', starting with a letter or digit")  # fmt: skip
        return entries

    @model_validator(mode="after")
    def _cross_references(self) -> RunConfig:
        names = [d.name for d in self.data_configs]
        each_once(names, "data_configs", "names an earlier data config too", "give each data config its own name")
        for name, settings in self.passes.items():
            for key, ref in settings.data_config_names().items():
                if ref not in names:
                    raise UserError(f"passes.{name}.{key}", f"no data config named '{ref}'", nearest(ref, names))
        for key in ("host", "target"):
            ref = getattr(self.engine, key)
            if ref is not None and ref not in self.systems:
                raise UserError(f"engine.{key}", f"no systems entry named '{ref}'", nearest(ref, self.systems))
        check_pass_order(self)
        self._name_inline_evaluators()
        for name, evaluator in self.evaluators.items():
            for index, metric in enumerate(getattr(evaluator, "metrics", [])):
                ref = metric.data_config
                if isinstance(ref, str) and ref not in names:
                    raise UserError(f"{self.evaluator_key(name)}.metrics[{index}].data_config",
                                    f"no data config named '{ref}'", nearest(ref, names))  # fmt: skip
        return self

    def _name_inline_evaluators(self) -> None:
        """An evaluator written in place (on the engine or a pass) joins `evaluators` under a name of its own,
        and the key names it: from here on every evaluator is an `evaluators` entry."""
        holders = [("engine", self.engine), *((f"passes.{n}", s) for n, s in self.passes.items())]
        for where, holder in holders:
            ref = holder.evaluator
            if isinstance(ref, str) and ref not in self.evaluators:
                raise UserError(
                    f"{where}.evaluator",
                    f"no evaluators entry named '{ref}'",
                    nearest(ref, self.evaluators) or "name one of evaluators, or write it here",
                )
            if isinstance(ref, dict):
                name = where.split(".")[-1] + "-evaluator"
                while name in self.evaluators:
                    name += "_"
                self.evaluators[name] = _evaluator(ref, f"{where}.evaluator")
                self._written_at[name] = f"{where}.evaluator"
                holder.evaluator = name

    def evaluator_key(self, name: str) -> str:
        """Where the named evaluator is written: `evaluators.<name>`, or the key that holds it in place."""
        return self._written_at.get(name, f"evaluators.{name}")

    def used_evaluators(self) -> dict[str, Evaluator]:
        """The evaluators the engine or a pass names, by name."""
        names = [self.engine.evaluator, *(s.evaluator for s in self.passes.values())]
        return {name: self.evaluators[name] for name in names if name}

    def data_named(self, ref: str | DataConfig) -> DataConfig:
        """A data config a key names (or holds in place)."""
        return ref if isinstance(ref, DataConfig) else next(d for d in self.data_configs if d.name == ref)

    def evaluator_of(self, pass_name: str | None) -> tuple[str, Evaluator] | None:
        """What evaluates a pass's model (None: the base model): its own evaluator, else the engine's."""
        name = (self.passes[pass_name].evaluator if pass_name else None) or self.engine.evaluator
        return (name, self.evaluators[name]) if name else None

    def user_error(self, error: UserError) -> UserError:
        """The same error, located where the user wrote the key (the nested form nests deeper)."""
        normalised = Normalised(config={}, origins=self._origins)
        if isinstance(error, UserErrors):
            return UserErrors([self.user_error(e) for e in error.errors])
        return type(error)(normalised.user_path(error.where), error.problem, error.hint)

    def uses_azure_storage(self) -> bool:
        """Whether any location the run reads or writes is in Azure Storage."""
        places = [self.engine.cache_dir, self.engine.output_dir]
        places += [self.input_model.model_path] if isinstance(self.input_model.model_path, str) else []
        for data in self.data_configs:
            files = data.load_dataset_config.data_files
            if isinstance(files, AzureMLDatastore):
                return True
            places += [file for _, file in listed_files(files, "")]
        return any(urlparse(place).scheme in AZURE_PROTOCOLS for place in places)

    def model_source(self) -> ModelSource:
        return self.input_model.source(self.azureml_client)

    def output_folders(self) -> dict[str, str]:
        """Each pass's folder in engine.output_dir: `adapter/` (`adapters/<pass>/` when there are several),
        `merged/` (the last merge; earlier ones `merged-<pass>/`), `onnx/<precision>-<provider>/`; a pass with
        none refines the one before it."""
        folders: dict[str, str] = {}
        for name, settings in self.passes.items():
            folders[name] = PASS_TYPES[settings.type].output(settings) or folders.get(_previous(folders), "")
        adapters = [name for name, folder in folders.items() if folder == "adapter"]
        if len(adapters) > 1:
            folders.update({name: f"adapters/{name}" for name in adapters})
        merges = [name for name, folder in folders.items() if folder == "merged"]
        folders.update({name: f"merged-{name}" for name in merges[:-1]})  # the last merge is the model built on
        return folders

    def data_where(self, name: str) -> str:
        """The config path of the named data config."""
        return f"data_configs[{[d.name for d in self.data_configs].index(name)}]"


def _evaluator(raw: dict[str, Any], where: str) -> Evaluator:
    try:
        return pydantic.TypeAdapter(Evaluator).validate_python(raw)
    except ValidationError as exc:
        raise _user_errors(exc, Normalised(config={}, origins={}))[0].under(where) from None


def _previous(folders: dict[str, str]) -> str:

    return next(reversed(folders), "")


def unmerged_adapters(cfg: RunConfig) -> Iterator[tuple[str, Any, list[str]]]:
    """Each pass, with the adapters left unmerged before it (`input_model.adapter_path` for a given one):
    what a merge merges, ModelBuilder builds unmerged and ExtractAdapters extracts."""
    pending = ["input_model.adapter_path"] if cfg.input_model.adapter_path else []
    for name, settings in cfg.passes.items():
        yield name, settings, list(pending)
        gives = PASS_TYPES[settings.type].gives
        if gives == "adapter":
            pending.append(name)
        elif gives == "model":  # the adapters are in the model now
            pending = []


def check_pass_order(cfg: RunConfig) -> None:
    """Each pass must be able to take what the one before it leaves (the table's `after`), and what it takes
    must be there: one adapter to merge, LoRA adapters for ModelBuilder to build, LoRA layers to extract."""
    given = Path(cfg.input_model.adapter_path).name if cfg.input_model.adapter_path else None
    if given in cfg.passes:
        raise UserError("input_model.adapter_path", f"is named '{given}' by its folder, as passes.{given} is",
                        "adapters are published and extracted by name: rename the pass")  # fmt: skip
    previous: Output = "adapter" if cfg.input_model.adapter_path else "model"
    before, last = "input_model", None  # the pass before this one: its config path, its settings
    for name, settings, unmerged in unmerged_adapters(cfg):
        entry, where = PASS_TYPES[settings.type], f"passes.{name}"
        if previous not in entry.after:
            problem = f"{entry.name} cannot follow {before}, which leaves {DESCRIBED[previous]}"
            raise UserError(where, problem, _order_hint(entry.after, previous, before))
        if entry.step is MERGE_ADAPTER and len(unmerged) > 1:
            raise UserError(where, f"merges one adapter, and {', '.join(unmerged)} each left one",
                            "merge each adapter before the next adapter pass")  # fmt: skip
        if entry.step is BUILD_ONNX_MODEL:
            _check_buildable(cfg, where, unmerged)
        if entry.step is EXTRACT_ADAPTERS:
            _check_extractable(cfg, where, unmerged, before, last)
        previous, before, last = entry.gives, where, settings


def _check_buildable(cfg: RunConfig, where: str, unmerged: list[str]) -> None:
    unbuildable = [p for p in unmerged if p in cfg.passes and not _lora_kind(cfg.passes[p])]
    if unbuildable:
        adapter = cfg.passes[unbuildable[0]]
        by_setting = adapter.type in ("LoRA", "QLoRA") and getattr(adapter, "use_dora", False)
        kind = "DoRA (use_dora)" if by_setting else adapter.type
        problem = f"builds LoRA adapters unmerged, and passes.{unbuildable[0]} is a {kind} adapter"
        raise UserError(where, problem, "merge it first (MergeAdapterWeights)")


def _check_extractable(cfg: RunConfig, where: str, unmerged: list[str], before: str, last: Any) -> None:
    """ExtractAdapters follows the ModelBuilder that built the unmerged adapters into the graph it wrote."""
    if not unmerged:
        raise UserError(where, "has no LoRA layers to extract: ModelBuilder built the model without an adapter",
                        "put the LoRA passes before ModelBuilder, without a merge between")  # fmt: skip
    if last.type == "ExtractAdapters":
        raise UserError(where, f"extracts the adapters {before} extracted", "one ExtractAdapters is enough")
    if not last.writes_graph:
        raise UserError(where, f"has no model graph to take the LoRA layers from: {before} writes only its "
                        "config (metadata_only)", "build the model with metadata_only: false")  # fmt: skip
    whole = [p for p in unmerged if p in cfg.passes and cfg.passes[p].modules_to_save]
    if whole:
        raise UserError(f"passes.{whole[0]}.modules_to_save", "trains whole layers, which cannot be swapped "
                        "as an ONNX adapter (the base would carry this adapter's copy)",
                        "train without modules_to_save, or merge the adapter instead")  # fmt: skip


def _lora_kind(settings: Any) -> bool:
    """An adapter ModelBuilder can build unmerged: plain LoRA (QLoRA's too), not DoRA, LoftQ, LoHa, LoKr."""
    return settings.type in ("LoRA", "QLoRA") and not getattr(settings, "use_dora", False)


def _order_hint(wanted: frozenset[Output], previous: Output, before: str) -> str:
    bridges = [t.name for t in PASS_TYPES.values() if previous in t.after and t.gives in wanted]
    if not bridges:
        return f"put {before} after it"
    hint = f"put {bridges[0]} before it" if len(bridges) == 1 else f"put one of {', '.join(bridges)} before it"
    return hint + ", or set input_model.adapter_path" if before == "input_model" and "adapter" in wanted else hint


def load_run_config(
    source: str | Path | dict[str, Any],
    overrides: list[str] | None = None,
    passes: list[str] | None = None,
    training_args: dict[str, Any] | None = None,
    output_dir: str | None = None,
) -> tuple[RunConfig, list[str]]:
    """Read, normalise, override, validate and resolve paths; returns the config and notes for the log.

    `source` is a config file, or the config itself (from the Prefect UI's form), whose relative paths are
    read from the current folder. `passes` keeps only the named passes (in the config's order);
    `training_args` is merged into every training pass — what the run form sets without knowing the names.
    """
    if isinstance(source, dict):
        read, base = checked_mapping(source, "config"), Path.cwd()  # read is a copy
    else:
        read = read_config_file(Path(source))
        base = Path(os.path.abspath(source)).parent  # a symlinked config reads beside the link
    engine_keys = set(EngineConfig.model_fields)
    normalised = normalise(read, engine_keys, set(PASS_TYPES))
    raw = normalised.config
    check_pass_types(raw, normalised)
    # The flat form's top-level engine keys work in --set too: cache_dir=... is engine.cache_dir=...
    apply_overrides(
        raw, [f"engine.{o}" if o.split(".")[0].split("=")[0] in engine_keys else o for o in overrides or []]
    )
    if output_dir:
        raw.setdefault("engine", {})["output_dir"] = output_dir
    all_passes = raw.get("passes") if isinstance(raw.get("passes"), dict) else {}
    if passes is not None:
        raw["passes"] = all_passes = select_passes(all_passes, passes)
    trains = [name for name, entry in PASS_TYPES.items() if "training_args" in entry.settings.model_fields]
    for settings in all_passes.values():
        if training_args and isinstance(settings, dict) and settings.get("type") in trains:
            settings["training_args"] = {**(settings.get("training_args") or {}), **training_args}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserErrors(_user_errors(exc, normalised)) from None
    cfg._origins = normalised.origins
    resolve_paths(cfg, base)
    try:
        resolve_execution_providers(cfg)
    except UserError as exc:
        raise cfg.user_error(exc) from None
    return cfg, normalised.notes + [normalised.user_path(key) + note for key, note in no_effect_notes(cfg)]


def check_pass_types(raw: dict[str, Any], normalised: Normalised) -> None:
    """A config with passes olive-grove does not run fails on that first, naming them all."""
    passes = raw.get("passes") if isinstance(raw.get("passes"), dict) else {}
    for name, settings in passes.items():
        if isinstance(settings, dict) and "type" not in settings:
            raise UserError(normalised.user_path(f"passes.{name}.type"), "is required",
                            f"olive-grove runs {', '.join(PASS_TYPES)}")  # fmt: skip
    others = {n: p["type"] for n, p in passes.items() if isinstance(p, dict) and isinstance(p.get("type"), str)
              and p["type"] not in PASS_TYPES}  # fmt: skip
    if not others:
        return
    supported = f"olive-grove runs {', '.join(PASS_TYPES)}"
    if len(others) == 1:
        [(name, kind)] = others.items()
        close = nearest(kind, PASS_TYPES)
        hint = close if close.startswith("did you mean") else supported
        raise UserError(normalised.user_path(f"passes.{name}.type"), f"olive-grove does not run {kind!r} passes", hint)
    listed = ", ".join(f"{name} ({kind})" for name, kind in others.items())
    raise UserError("passes", f"olive-grove does not run {listed}", supported)


def select_passes(all_passes: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The first passes of the config, up to the named ones: a run may stop early, never skip a pass.

    Skipping would feed a later pass the wrong model (ModelBuilder the base instead of the merged one)
    and overwrite that pass's outputs.
    """
    for name in names:
        if name not in all_passes:
            raise UserError("passes", f"the config has no pass named '{name}'", nearest(name, all_passes))
    order = list(all_passes)
    if sorted(order.index(n) for n in names) != list(range(len(names))):
        raise UserError("passes", f"{names} skips a pass", f"choose the first passes in order: {order}")
    return {name: all_passes[name] for name in order[: len(names)]}


def resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Relative paths are read from the config file's folder, so a run works from any directory; `~` and
    `$VARIABLES` are expanded, as a shell would."""

    def local(value: str) -> str:
        if "://" in value:
            return value
        value = os.path.expandvars(os.path.expanduser(value))
        return value if Path(value).is_absolute() else os.path.normpath(base / value)

    for data in cfg.data_configs + [m.data_config for m in _metrics(cfg) if isinstance(m.data_config, DataConfig)]:
        load = data.load_dataset_config
        files = load.data_files
        if load.data_dir:
            load.data_dir = local(load.data_dir)
        if isinstance(files, AzureMLDatastore):
            continue
        if isinstance(files, str):
            load.data_files = local(files)
        elif isinstance(files, list):
            load.data_files = [local(f) for f in files]
        elif isinstance(files, dict):
            load.data_files = {k: local(v) if isinstance(v, str) else [local(f) for f in v] for k, v in files.items()}
    for user in (m.user_config for m in _metrics(cfg)):
        user.user_script = user.user_script and local(user.user_script)
        user.script_dir = user.script_dir and local(user.script_dir)
    for evaluator in cfg.evaluators.values():
        if getattr(evaluator, "include_path", None):
            evaluator.include_path = local(evaluator.include_path)
    model_path = cfg.input_model.model_path
    if isinstance(model_path, str) and (_looks_local(model_path) or (base / local(model_path)).exists()):
        cfg.input_model.model_path = local(model_path)
    if cfg.input_model.adapter_path:
        cfg.input_model.adapter_path = local(cfg.input_model.adapter_path)
    for key in ("cache_dir", "output_dir"):
        setattr(cfg.engine, key, local(getattr(cfg.engine, key)))


def _metrics(cfg: RunConfig) -> list[Metric]:
    return [m for e in cfg.evaluators.values() for m in getattr(e, "metrics", [])]


def _looks_local(path: str) -> bool:
    """A model_path no hub id could be: `./x`, `../x`, `~/x`, `/x`, `$VAR/x`, or more than org/name."""
    return path.startswith((".", "/", "~", "$")) or path.count("/") > 1 or "\\" in path


def resolve_execution_providers(cfg: RunConfig) -> None:
    """Each ModelBuilder pass's provider: its own, else the engine's first, else the target system's, else CPU.

    Only a pass that needs one reads the run's: a provider olive-grove does not build for (QNN, OpenVINO)
    is fine in a config whose ModelBuilder passes name their own, or that has none.
    """
    builders = [s for s in cfg.passes.values() if isinstance(s, ModelBuilderSettings)]
    if any(s.execution_provider is None for s in builders):
        default = _run_execution_provider(cfg)
        for settings in builders:
            settings.execution_provider = settings.execution_provider or default
    writers: dict[str, str] = {}
    for name, folder in cfg.output_folders().items():
        if folder in writers and cfg.passes[name].type != "ExtractAdapters":
            raise UserError(f"passes.{name}", f"writes {folder}, as passes.{writers[folder]} does",
                            "give it another precision or execution_provider")  # fmt: skip
        writers[folder] = name


def _run_execution_provider(cfg: RunConfig) -> str:
    names, where = list(cfg.engine.execution_providers or []), "engine.execution_providers"
    target = cfg.systems.get(cfg.engine.target or "")
    if not names and target:
        where = f"systems.{cfg.engine.target}.accelerators"
        for accelerator in target.accelerators:
            if not isinstance(accelerator, str):
                names += accelerator.execution_providers or []
    if names and names[0] not in EXECUTION_PROVIDERS:
        raise UserError(where, f"unknown execution provider {names[0]!r}", "one of " + ", ".join(EXECUTION_PROVIDERS))
    return EXECUTION_PROVIDERS[names[0]] if names else "cpu"


def no_effect_notes(cfg: RunConfig) -> list[tuple[str, str]]:
    """(key, note) for each key the config sets that olive-grove accepts from Olive and does not use."""
    found: list[tuple[str, str]] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, BaseModel):
            for name in sorted(node.model_fields_set):
                field = type(node).model_fields.get(name)
                extra = field.json_schema_extra if field and isinstance(field.json_schema_extra, dict) else {}
                key = f"{path}.{name}" if path else name
                if "no_effect" in extra:
                    why = f": {extra['no_effect']}" if extra["no_effect"] else ""
                    found.append((key, f" has no effect in olive-grove{why}"))
                else:
                    visit(getattr(node, name), key)
        elif isinstance(node, dict):
            for name, value in node.items():
                visit(value, f"{path}.{name}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(value, f"{path}[{index}]")

    visit(cfg, "")
    found = _once_per_kind(found)
    for name, settings in cfg.passes.items():
        if getattr(settings, "eval_data_config", None) and getattr(settings, "eval_dataset_size", None):
            found.append((f"passes.{name}.eval_dataset_size", " has no effect: eval_data_config gives the eval data"))
    return found


def _once_per_kind(notes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The same key in several list entries (each metric's `priority`) is one note, `metrics[*].priority`."""
    kinds = Counter(re.sub(r"\[\d+\]", "[*]", key) for key, _ in notes)
    merged: dict[str, str] = {}
    for key, note in notes:
        kind = re.sub(r"\[\d+\]", "[*]", key)
        merged.setdefault(kind if kinds[kind] > 1 else key, note)
    return list(merged.items())


def _user_errors(exc: ValidationError, normalised: Normalised) -> list[UserError]:
    errors, seen = [], set()
    found = [(err, _key_path(err)) for err in exc.errors()]
    for err, loc in found:
        if err["type"].endswith("_type") and any(len(other) > len(loc) and other[: len(loc)] == loc
                                                 for _, other in found):  # fmt: skip
            continue  # a union member of another type (`str` for an object): the member that fits says more
        path = normalised.user_path(_dotted(loc))
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, UserError):
            ours = cause.under(_dotted(loc)).where
            error = UserError(normalised.user_path(ours), cause.problem, cause.hint)
        elif err["type"] == "extra_forbidden":
            error = UserError(path, "unknown key", nearest(str(loc[-1]), allowed_keys(err["loc"][:-1])))
        elif err["type"] == "union_tag_invalid":
            tags = err["ctx"]["expected_tags"].replace("'", "")
            error = UserError(f"{path}.type", f"unknown pass type {err['ctx']['tag']!r}", f"supported: {tags}")
        elif err["type"] == "missing":
            error = UserError(path, "is required")
        elif "storage_options" in loc:  # may hold secrets: never echoed
            error = UserError(path, err["msg"].removeprefix("Value error, "))
        else:
            error = UserError(path, f"{err['msg'].removeprefix('Value error, ')} (got {shown(err['input'])})")
        if error.where not in seen:  # a union reports each member's failure; the first is enough
            seen.add(error.where)
            errors.append(error)
    return errors


# Parts of a pydantic error location that name a union member rather than a key.
_UNION_TAGS = {
    *PASS_TYPES,
    "Accelerator",
    "AzureMLDatastore",
    "DataConfig",
    "OliveEvaluator",
    "LMEvaluator",
    "str",
    "int",
    "float",
    "bool",
}


def _key_path(err: dict[str, Any]) -> list[Any]:
    """An error's location without pydantic's union tags. An unknown key is the user's own, even one that
    looks like a tag (`data_configs[0]`)."""
    loc = list(err["loc"])
    unknown = loc[-1:] if err["type"] == "extra_forbidden" else []
    return [p for p in loc[: len(loc) - len(unknown)] if not _is_tag(p)] + unknown


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in _UNION_TAGS or "[" in part or part.startswith(("literal", "constrained-"))
    )


def _dotted(loc: list[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys valid at a location of the normalised config, for 'did you mean'."""
    node: Any = RunConfig
    tags = {name: entry.settings for name, entry in PASS_TYPES.items()}
    for part in loc:
        if isinstance(part, str) and part in tags:
            node = tags[part]
            continue
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            node = node.model_fields[part].annotation if part in node.model_fields else None
        elif typing.get_origin(node) in (dict, list):
            node = typing.get_args(node)[-1]
        if node is None:
            return []
    node = _unwrap(node)
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return []
    keys = list(node.model_fields)
    keys += [old for old, new in RENAMED_KEYS.items() if new in node.model_fields]
    return sorted(keys)


def _unwrap(node: Any) -> Any:
    while typing.get_origin(node) in (Union, Annotated) or type(node).__name__ == "UnionType":
        args = [a for a in typing.get_args(node) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        node = models[0] if models else args[0]
    return node
