"""What an evaluator's step is given: its metrics' data with the files' fingerprints, the fingerprints of the
user scripts it runs, and for timings the hardware they come from — all part of the step's cache key."""

from __future__ import annotations

import platform
from pathlib import Path

from olive_grove.flows.config import RunConfig
from olive_grove.tasks.data import DatasetSettings, fingerprint_data
from olive_grove.tasks.evaluators import EvaluationSettings, Evaluator
from olive_grove.tasks.files import hash_file


def evaluation_settings(cfg: RunConfig, name: str, evaluator: Evaluator) -> EvaluationSettings:
    data, scripts, timed = {}, {}, False
    for index, metric in enumerate(getattr(evaluator, "metrics", [])):
        if metric.data_config is not None:
            config = cfg.data_named(metric.data_config)
            data[str(index)] = DatasetSettings(data=config, files_fingerprint=fingerprint_data(config))
        script = metric.user_config.user_script
        if script and Path(script).is_file():
            scripts[str(index)] = hash_file(Path(script))  # by content: a moved project keeps its hits
        timed = timed or metric.type in ("latency", "throughput")
    return EvaluationSettings(name=name, evaluator=evaluator, data=data, scripts=scripts,
                              hardware=hardware() if timed else None)  # fmt: skip


def hardware() -> str:
    """The GPU a Hugging Face model is timed on, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
