"""RunConfig: an Olive run config, loaded from JSON or YAML, normalised, validated and resolved."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from olive_grove.flows.olive_compat import RENAMED_KEYS, Normalised, normalise
from olive_grove.tasks.data import AzureMLDatastore, DataConfig, listed_files
from olive_grove.tasks.errors import UserError, UserErrors, nearest
from olive_grove.tasks.models import ModelSource
from olive_grove.tasks.onnx_build import EXECUTION_PROVIDERS, ModelBuilderSettings
from olive_grove.tasks.passes import PASS_TYPES, TRAIN_ADAPTER, Output

AnyPass = Annotated[Union[tuple(t.settings for t in PASS_TYPES.values())], Field(discriminator="type")]  # noqa: UP007
AZURE_PROTOCOLS = {"az", "abfs", "abfss"}
DESCRIBED: dict[Output, str] = {"model": "a model", "adapter": "an adapter", "onnx": "an ONNX model"}


def no_effect(why: str = "") -> Any:
    """A key Olive has that changes nothing here: accepted, and named once in the log (with `why`)."""
    return Field(None, json_schema_extra={"no_effect": why})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadKwargs(_Strict):
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = no_effect("transformers picks the attention implementation")
    torch_dtype: str | None = no_effect("each pass sets the dtype it loads the model in")


class RegistryModel(_Strict):
    """An Azure ML registry model (`azureml_registry_model`)."""

    type: Literal["azureml_registry_model"]
    name: str
    registry_name: str
    version: str | int


class InputModel(_Strict):
    type: Literal["HfModel"] = "HfModel"
    model_path: str | dict[str, Any] = Field(description="a local model folder, a hub id, or a registry model")
    task: str | None = no_effect("olive-grove fine-tunes text generation")
    load_kwargs: LoadKwargs = Field(default_factory=LoadKwargs)
    adapter_path: str | None = Field(None, description="a trained PEFT adapter to merge or build from")
    model_file_format: str | None = no_effect()

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


class Accelerator(_Strict):
    device: Literal["cpu", "gpu", "npu"] = "cpu"
    execution_providers: list[str] | None = None


POOL_DECIDES = "the work pool's job template decides where and how the flow runs"


class SystemConfig(_Strict):
    """An Olive system; here it names the Prefect work pool that runs the flow."""

    type: Literal["LocalSystem", "AzureML", "Docker", "PythonEnvironment", "IsolatedORT"]
    accelerators: list[Accelerator | Literal["cpu", "gpu", "npu"]] = Field(default_factory=list)
    work_pool: str | None = Field(None, description="the Prefect work pool; default: by system type")
    hf_token: bool = Field(False, description="hand the Secret block 'hf-token' to the hub client")
    aml_compute: str | None = no_effect(POOL_DECIDES)
    aml_docker_config: dict[str, Any] | None = no_effect(POOL_DECIDES)
    aml_environment_config: dict[str, Any] | None = no_effect(POOL_DECIDES)
    is_dev: bool | None = no_effect()
    instance_count: int | None = no_effect(POOL_DECIDES)
    image_name: str | None = no_effect(POOL_DECIDES)
    local_docker_config: dict[str, Any] | None = no_effect(POOL_DECIDES)
    python_environment_path: str | None = no_effect(POOL_DECIDES)


class AzureMLClient(_Strict):
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    keyvault_name: str | None = no_effect("secrets live in Prefect blocks")
    aml_config_path: str | None = None
    read_timeout: int | None = None
    max_operation_retries: int | None = None
    operation_retry_interval: int | None = None
    default_auth_params: dict[str, Any] | None = None


class EngineConfig(_Strict):
    host: str | None = Field(None, description="the systems entry the flow runs on")
    target: str | None = Field(None, description="the systems entry the model is built for")
    cache_dir: str = Field(".olive-cache", description="where step results are kept")
    output_dir: str = Field("outputs", description="where finished outputs are published")
    retries: int = Field(0, ge=0, description="olive-grove: retries of a step that failed for a passing reason")
    retry_delay_seconds: float = Field(30, ge=0, description="olive-grove: wait before each retry")
    execution_providers: list[str] | None = None
    log_severity_level: int = Field(1, ge=0, le=4, description="the run log's level: 0 debug, 1 info … 4 fatal")
    search_strategy: Any = no_effect("every pass runs once, with its settings")
    evaluate_input_model: bool | None = no_effect()
    clean_cache: bool | None = no_effect("grove cache prune removes cached steps")
    clean_evaluation_cache: bool | None = no_effect()
    packaging_config: Any = no_effect()
    output_name: str | None = no_effect()
    plot_pareto_frontier: bool | None = no_effect()
    no_artifacts: bool | None = no_effect()
    evaluator: Any = no_effect()
    ort_log_severity_level: int | None = no_effect()


class RunConfig(_Strict):
    """One fine-tuning run: the base model, data, passes in order, and where things go."""

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    input_model: InputModel
    data_configs: list[DataConfig] = Field(default_factory=list)
    passes: dict[str, AnyPass]
    systems: dict[str, SystemConfig] = Field(default_factory=dict)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    azureml_client: AzureMLClient | None = None

    @model_validator(mode="after")
    def _cross_references(self) -> RunConfig:
        names = [d.name for d in self.data_configs]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise UserError(f"data_configs[{index}].name", f"'{name}' names an earlier data config too",
                                "give each data config its own name")  # fmt: skip
        for name, settings in self.passes.items():
            for key, ref in settings.data_config_names().items():
                if ref not in names:
                    raise UserError(f"passes.{name}.{key}", f"no data config named '{ref}'", nearest(ref, names))
        for key in ("host", "target"):
            ref = getattr(self.engine, key)
            if ref is not None and ref not in self.systems:
                raise UserError(f"engine.{key}", f"no systems entry named '{ref}'", nearest(ref, self.systems))
        check_pass_order(self)
        return self

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

    def data_where(self, name: str) -> str:
        """The config path of the named data config."""
        return f"data_configs[{[d.name for d in self.data_configs].index(name)}]"


def check_pass_order(cfg: RunConfig) -> None:
    """Each pass must be able to take what the one before it leaves (the table's `after`)."""
    previous: Output = "adapter" if cfg.input_model.adapter_path else "model"
    before = "input_model"
    for name, settings in cfg.passes.items():
        entry = PASS_TYPES[settings.type]
        if previous not in entry.after:
            needs = " or ".join(DESCRIBED[o] for o in sorted(entry.after))
            raise UserError(f"passes.{name}", f"{entry.name} takes {needs}, and {before} leaves {DESCRIBED[previous]}",
                            _order_hint(entry.after, previous, before))  # fmt: skip
        previous, before = entry.gives, f"passes.{name}"


def _order_hint(wanted: frozenset[Output], previous: Output, before: str) -> str:
    bridges = sorted(t.name for t in PASS_TYPES.values() if previous in t.after and t.gives in wanted)
    if not bridges:
        return f"nothing takes {DESCRIBED[previous]}: put {before} last"
    hint = f"put {' or '.join(bridges)} before it"
    return hint + ", or set input_model.adapter_path" if before == "input_model" and "adapter" in wanted else hint


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(str(path), "no such config file")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(str(path), f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "the config must be a mapping at the top level")
    return raw


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> None:
    """`a.b.c=value` sets a key of the normalised config (`data_configs.0.name` indexes a list).

    The value is read as YAML: 5, true and [a, b] keep their types.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}", "expected KEY=VALUE", "for example passes.lora.training_args.max_steps=5")
        if "storage_options" in key.split("."):
            raise UserError(
                f"--set {key}",
                "storage options may hold secrets, and overrides are kept with the run's parameters",
                "put them in the config file or the environment",
            )
        *parents, leaf = key.split(".")
        node: Any = cfg
        for part in parents:
            node = _child(node, part, key)
        value = yaml.safe_load(text) if text else ""
        if isinstance(node, list):
            node[_index(node, leaf, key)] = value
        else:
            node[leaf] = value


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise UserError(f"--set {key}", f"'{part}' is inside a value, not a section")
    if not isinstance(node.get(part), (dict, list)):
        node[part] = {}
    return node[part]


def _index(node: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {key}", f"'{part}' is not an index of a {len(node)}-entry list")
    return int(part)


def load_run_config(
    path: str | Path,
    overrides: list[str] | None = None,
    passes: list[str] | None = None,
    training_args: dict[str, Any] | None = None,
    output_dir: str | None = None,
) -> tuple[RunConfig, list[str]]:
    """Read, normalise, override, validate and resolve paths; returns the config and notes for the log.

    `passes` keeps only the named passes (in the config's order); `training_args` is merged into every
    training pass — what the Prefect UI's run form sets without knowing the pass names.
    """
    path = Path(path)
    normalised = normalise(read_config_file(path), set(EngineConfig.model_fields))
    raw = normalised.config
    apply_overrides(raw, overrides or [])
    if output_dir:
        raw.setdefault("engine", {})["output_dir"] = output_dir
    all_passes = raw.get("passes") if isinstance(raw.get("passes"), dict) else {}
    if passes is not None:
        raw["passes"] = all_passes = select_passes(all_passes, passes)
    trains = [name for name, entry in PASS_TYPES.items() if entry.step is TRAIN_ADAPTER]
    for settings in all_passes.values():
        if training_args and isinstance(settings, dict) and settings.get("type") in trains:
            settings["training_args"] = {**(settings.get("training_args") or {}), **training_args}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserErrors(_user_errors(exc, normalised)) from None
    cfg._origins = normalised.origins
    resolve_paths(cfg, path.resolve().parent)
    try:
        resolve_execution_providers(cfg)
    except UserError as exc:
        raise cfg.user_error(exc) from None
    return cfg, normalised.notes + [normalised.user_path(key) + note for key, note in no_effect_notes(cfg)]


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
    """Relative paths are read from the config file's folder, so a run works from any directory."""

    def local(value: str) -> str:
        return value if "://" in value or Path(value).is_absolute() else str((base / value).resolve())

    for data in cfg.data_configs:
        files = data.load_dataset_config.data_files
        if isinstance(files, AzureMLDatastore):
            continue
        if isinstance(files, str):
            data.load_dataset_config.data_files = local(files)
        elif isinstance(files, list):
            data.load_dataset_config.data_files = [local(f) for f in files]
        elif isinstance(files, dict):
            data.load_dataset_config.data_files = {
                k: local(v) if isinstance(v, str) else [local(f) for f in v] for k, v in files.items()
            }
    model_path = cfg.input_model.model_path
    if isinstance(model_path, str) and (base / model_path).is_dir():
        cfg.input_model.model_path = local(model_path)
    if cfg.input_model.adapter_path:
        cfg.input_model.adapter_path = local(cfg.input_model.adapter_path)
    for key in ("cache_dir", "output_dir"):
        setattr(cfg.engine, key, local(getattr(cfg.engine, key)))


def resolve_execution_providers(cfg: RunConfig) -> None:
    """Each ModelBuilder pass's provider: its own, else the engine's first, else the target system's, else CPU."""
    names, where = list(cfg.engine.execution_providers or []), "engine.execution_providers"
    target = cfg.systems.get(cfg.engine.target or "")
    if not names and target:
        where = f"systems.{cfg.engine.target}.accelerators"
        for accelerator in target.accelerators:
            if not isinstance(accelerator, str):
                names += accelerator.execution_providers or []
    if names and names[0] not in EXECUTION_PROVIDERS:
        raise UserError(where, f"unknown execution provider {names[0]!r}", "one of " + ", ".join(EXECUTION_PROVIDERS))
    default = EXECUTION_PROVIDERS[names[0]] if names else "cpu"
    for settings in cfg.passes.values():
        if isinstance(settings, ModelBuilderSettings) and settings.execution_provider is None:
            settings.execution_provider = default


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
    for name, settings in cfg.passes.items():
        if getattr(settings, "eval_data_config", None) and getattr(settings, "eval_dataset_size", None):
            found.append((f"passes.{name}.eval_dataset_size", " has no effect: eval_data_config gives the eval data"))
    return found


def _user_errors(exc: ValidationError, normalised: Normalised) -> list[UserError]:
    errors, seen = [], set()
    for err in exc.errors():
        loc = [p for p in err["loc"] if not _is_tag(p)]
        path = normalised.user_path(_dotted(loc))
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, UserError):
            ours = f"{_dotted(loc)}.{cause.where}" if loc else cause.where
            error = UserError(normalised.user_path(ours), cause.problem, cause.hint)
        elif err["type"] == "extra_forbidden":
            error = UserError(path, "unknown key", nearest(str(loc[-1]), allowed_keys(err["loc"][:-1])))
        elif err["type"] == "union_tag_invalid":
            tags = err["ctx"]["expected_tags"].replace("'", "")
            error = UserError(f"{path}.type", f"unknown pass type {err['ctx']['tag']!r}", f"supported: {tags}")
        elif err["type"] == "missing":
            error = UserError(path, "is required")
        else:
            error = UserError(path, f"{err['msg'].removeprefix('Value error, ')} (got {err['input']!r})")
        if error.where not in seen:  # a union reports each member's failure; the first is enough
            seen.add(error.where)
            errors.append(error)
    return errors


# Parts of a pydantic error location that name a union member rather than a key.
_UNION_TAGS = {*PASS_TYPES, "Accelerator", "AzureMLDatastore", "str", "int", "float", "bool"}


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("literal"))


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
