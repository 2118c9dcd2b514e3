"""The one place that translates Olive's config forms (the guide's nested one, the current flat one) into ours.

Ours is Olive's flat form with the engine settings under `engine`. `Normalised.origins` maps our paths
back to where the user wrote them, so errors name the user's own JSON path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from olive_grove.tasks.errors import UserError

QLORA_ONLY_KEYS = ("double_quant", "quant_type", "compute_dtype")
UNQUANTIZED_ADAPTERS = {"LoRA", "DoRA", "LoHa", "LoKr"}
# TrainingArguments Olive lets a config set that olive-grove decides itself: accepted, and named once.
OLIVE_OWNED_TRAINING_ARGS = {
    "output_dir": "checkpoints go to the step's cache folder, outputs to engine.output_dir",
    "overwrite_output_dir": "a changed step trains in a folder of its own",
    "resume_from_checkpoint": "a step that stopped resumes from its last checkpoint by itself",
    "report_to": "progress goes to the Prefect run",
    "deepspeed": "several GPUs train data-parallel (the pass's processes setting)",
    "remove_unused_columns": "the dataset step keeps only the columns training reads",
}
# Olive's older names for keys that current Olive (and olive-grove) call otherwise.
RENAMED_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "corpus_strategy": "strategy", "source_max_len": "max_seq_len"}
LEGACY_TRAINING_ARGS = {
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "warmup_ratio": "warmup_steps",
}


@dataclass
class Normalised:
    config: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)  # our path prefix -> the user's path prefix
    notes: list[str] = field(default_factory=list)  # what was translated, for the log

    def user_path(self, path: str) -> str:
        for ours in sorted(self.origins, key=len, reverse=True):
            if path == ours or path.startswith(ours + ".") or path.startswith(ours + "["):
                return self.origins[ours] + path[len(ours) :]
        return path


def normalise(raw: dict[str, Any], engine_keys: set[str], pass_types: set[str]) -> Normalised:
    """Our form of `raw`: the flat form's top-level `engine_keys` (host, cache_dir, ...) move under `engine`,
    and pass types are spelt as `pass_types` spells them (Olive matches them without case)."""
    out = Normalised(copy.deepcopy(raw))
    cfg = out.config
    _lift_engine(cfg, engine_keys, out)
    if isinstance(cfg.get("input_model"), dict):
        _input_model(cfg["input_model"], out)
    for name, system in _entries(cfg.get("systems")):
        if isinstance(system, dict):
            _unwrap_config(system, f"systems.{name}", out)
    data_configs = cfg.get("data_configs")
    for i, data in enumerate(data_configs if isinstance(data_configs, list) else []):
        if isinstance(data, dict):
            for section in ("load_dataset_config", "pre_process_data_config"):
                _unwrap_params(data, section, f"data_configs[{i}].{section}", out)
            if isinstance(data.get("pre_process_data_config"), dict):
                _rename_keys(data["pre_process_data_config"], f"data_configs[{i}].pre_process_data_config", out)
            load = data.get("load_dataset_config")
            files = load.get("data_files") if isinstance(load, dict) else None
            if isinstance(files, dict) and "type" in files:
                _unwrap_config(files, f"data_configs[{i}].load_dataset_config.data_files", out)
    for name, pass_cfg in _entries(cfg.get("passes")):
        if isinstance(pass_cfg, dict):
            _unwrap_config(pass_cfg, f"passes.{name}", out, PASS_KEYS)
            _pass_type(pass_cfg, pass_types)
            _rename_keys(pass_cfg, f"passes.{name}", out)
            _training_args(pass_cfg, f"passes.{name}", out)
            _quant_keys_on_lora(pass_cfg, f"passes.{name}", out)
    return out


def _rename_keys(section: dict[str, Any], path: str, out: Normalised) -> None:
    for old, new in RENAMED_KEYS.items():
        if old in section and new in section:
            raise UserError(out.user_path(f"{path}.{old}"), f"is {new} by its older name, and {new} is set too",
                            "give one of them")  # fmt: skip
        if old in section:
            section[new] = section.pop(old)
            out.origins[f"{path}.{new}"] = out.user_path(f"{path}.{old}")


def _pass_type(pass_cfg: dict[str, Any], pass_types: set[str]) -> None:
    """`qlora`, `QLoRA` and `olive.passes.QLoRA` are one pass type to Olive."""
    written = pass_cfg.get("type")
    if isinstance(written, str):
        known = {name.lower(): name for name in pass_types}
        pass_cfg["type"] = known.get(written.rsplit(".", 1)[-1].lower(), written)


def _quant_keys_on_lora(pass_cfg: dict[str, Any], path: str, out: Normalised) -> None:
    """The guide sets QLoRA's `double_quant` on a LoRA pass too; Olive ignored it there, and so do we."""
    if not isinstance(pass_cfg.get("type"), str) or pass_cfg["type"] not in UNQUANTIZED_ADAPTERS:
        return
    for key in QLORA_ONLY_KEYS:
        if key in pass_cfg:
            pass_cfg.pop(key)
            out.notes.append(f"{path}.{key} has no effect on a LoRA pass (it is a QLoRA setting)")


def _entries(section: Any) -> list[tuple[str, Any]]:
    """A mapping's items; anything else is left for validation to report."""
    return list(section.items()) if isinstance(section, dict) else []


def _lift_engine(cfg: dict[str, Any], engine_keys: set[str], out: Normalised) -> None:
    if not isinstance(cfg.get("engine", {}), dict):
        return  # validation reports the wrong type
    engine = cfg.setdefault("engine", {})
    for key in sorted(engine_keys & cfg.keys()):
        if key in engine:
            raise UserError(key, f"is given both at the top level and as engine.{key}", "give it once")
        engine[key] = cfg.pop(key)
        out.origins[f"engine.{key}"] = key
    for key in ("host", "target"):  # Olive lets the engine name a system or describe it in place
        if isinstance(engine.get(key), dict) and isinstance(cfg.setdefault("systems", {}), dict):
            name = f"{key}_system" if f"{key}_system" not in cfg["systems"] else f"engine_{key}"
            cfg["systems"][name], engine[key] = engine[key], name
            out.origins[f"systems.{name}"] = out.origins.get(f"engine.{key}", f"engine.{key}")


# What Olive's nested form puts beside a pass's `config` (its RunPassConfig).
PASS_KEYS = frozenset({"type", "config", "host", "evaluator", "clean_run_cache", "output_name"})


def _unwrap_config(section: dict[str, Any], path: str, out: Normalised, beside=frozenset({"type", "config"})) -> None:
    """`{"type": T, "config": {...}}` (nested form) becomes `{"type": T, ...}`; `beside` is what else the
    nested form has next to `config`."""
    inner = section.get("config")
    if isinstance(inner, dict) and set(section) <= beside:
        section.pop("config")
        section.update(inner)
        for key in inner:
            out.origins[f"{path}.{key}"] = f"{path}.config.{key}"


def _unwrap_params(data: dict[str, Any], section: str, path: str, out: Normalised) -> None:
    value = data.get(section)
    if isinstance(value, dict) and isinstance(value.get("params"), dict) and set(value) == {"params"}:
        data[section] = value["params"]
        out.origins[path] = f"{path}.params"


def _input_model(model: dict[str, Any], out: Normalised) -> None:
    _unwrap_config(model, "input_model", out)
    if isinstance(model.get("model_path"), dict):
        _unwrap_config(model["model_path"], "input_model.model_path", out)
    hf_config = model.pop("hf_config", None)
    if not isinstance(hf_config, dict):
        if hf_config is not None:
            model["hf_config"] = hf_config  # let validation report the wrong type
        elif model.get("type") == "PyTorchModel" and isinstance(model.get("model_path"), str):
            model["type"] = "HfModel"  # Olive's older examples name a Hugging Face model this way
            out.notes.append("input_model.type PyTorchModel with a Hugging Face model_path is read as HfModel")
        return
    origin = out.origins.get("input_model.hf_config", "input_model.hf_config")
    if "model_name" in hf_config:
        name = hf_config.pop("model_name")
        if "model_path" in model:
            out.notes.append(f"{origin}.model_name is the hub id of input_model.model_path; the path is used")
        else:
            model["model_path"] = name
            out.origins["input_model.model_path"] = f"{origin}.model_name"
    if "task" in hf_config:
        model.setdefault("task", hf_config.pop("task"))
        out.origins["input_model.task"] = f"{origin}.task"
    for key in ("from_pretrained_args", "model_loading_args"):
        if isinstance(hf_config.get(key), dict):
            model.setdefault("load_kwargs", {}).update(hf_config.pop(key))
            out.origins["input_model.load_kwargs"] = f"{origin}.{key}"
    for key, value in hf_config.items():  # anything left is reported by validation, at its own path
        model[f"hf_config.{key}"] = value
        out.origins[f"input_model.hf_config.{key}"] = f"{origin}.{key}"
    if model.get("type") == "PyTorchModel":
        model["type"] = "HfModel"
        out.notes.append("input_model.type PyTorchModel with hf_config is read as HfModel")


def _training_args(pass_cfg: dict[str, Any], path: str, out: Normalised) -> None:
    args = pass_cfg.get("training_args")
    if not isinstance(args, dict):
        return
    ratio = args.get("warmup_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and not 0 <= ratio < 1:
        raise UserError(out.user_path(f"{path}.training_args.warmup_ratio"), f"must be at least 0 and below 1 "
                        f"(got {ratio})", "a fraction of the training steps")  # fmt: skip
    for old, new in LEGACY_TRAINING_ARGS.items():
        if old in args:
            if new in args:
                raise UserError(out.user_path(f"{path}.training_args.{old}"), f"is given beside {new}, its name "
                                "in this transformers", f"give one of {old} and {new}")  # fmt: skip
            args[new] = args.pop(old)
            out.notes.append(f"{path}.training_args.{old} is read as {new}")
    for key, why in OLIVE_OWNED_TRAINING_ARGS.items():
        if key in args:
            args.pop(key)
            out.notes.append(f"{path}.training_args.{key} has no effect in olive-grove: {why}")
    if "group_by_length" in args:  # transformers 5 replaced the flag with a sampling strategy
        if args.pop("group_by_length"):
            args["train_sampling_strategy"] = "group_by_length"
        out.notes.append(f"{path}.training_args.group_by_length is read as train_sampling_strategy")
