"""What an evaluator's step is given: its metrics' data with the files' fingerprints, the fingerprints of the
user scripts it runs, and for timings the hardware they come from — all part of the step's cache key."""

from __future__ import annotations

import platform
from pathlib import Path

from olive_grove.flows.config import RunConfig
from olive_grove.tasks.data import DatasetSettings, fingerprint_data
from olive_grove.tasks.evaluators import EvaluationSettings, Evaluator
from olive_grove.tasks.files import hash_file, hash_files, hash_value


def evaluation_settings(cfg: RunConfig, name: str, evaluator: Evaluator) -> EvaluationSettings:
    data, scripts, timed = {}, {}, False
    include_path = getattr(evaluator, "include_path", None)
    if include_path and Path(include_path).is_dir():
        scripts["include_path"] = source_fingerprint(Path(include_path), "*")  # lm-eval task YAMLs and their files
    for index, metric in enumerate(getattr(evaluator, "metrics", [])):
        if metric.data_config is not None:
            config = cfg.data_named(metric.data_config)
            data[str(index)] = DatasetSettings(data=config, files_fingerprint=fingerprint_data(config))
        script, script_dir = metric.user_config.user_script, metric.user_config.script_dir
        if script and Path(script).is_file():
            imported = source_fingerprint(Path(script_dir), "*.py") if script_dir and Path(script_dir).is_dir() else ""
            scripts[str(index)] = hash_value([hash_file(Path(script)), imported])  # by content: a moved project hits
        timed = timed or metric.type in ("latency", "throughput")
    return EvaluationSettings(name=name, evaluator=evaluator, data=data, scripts=scripts,
                              hardware=hardware() if timed else None)  # fmt: skip


def source_fingerprint(folder: Path, pattern: str) -> str:
    """The files under `folder` that match `pattern`, by content (Python's bytecode caches left out): what a
    user script imports from script_dir, or an lm-eval task folder."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob(pattern)
                   if p.is_file() and "__pycache__" not in p.parts)  # fmt: skip
    return hash_files(folder, names)


def hardware() -> str:
    """The GPU a Hugging Face model is timed on, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
