"""Data-parallel training launched by the training step: torchrun processes on CPU (gloo), the same
optimizer steps on the same samples as one process, so the adapters match."""

from __future__ import annotations

from pathlib import Path

import pytest
from grove_helpers import LLAMA_MODULES, TRAINING_ARGS, Recorder, dataset_artifact, model_artifact, step_files
from safetensors.torch import load_file

from olive_grove.tasks import data_parallel
from olive_grove.tasks.adapter_settings import LoRASettings
from olive_grove.tasks.adapters import train_adapter


def settings(processes: int | str, **args) -> LoRASettings:
    return LoRASettings.model_validate(
        {
            "train_data_config": "tone",
            "target_modules": LLAMA_MODULES,
            "r": 4,
            "alpha": 8,
            "lora_dropout": 0.0,
            "torch_dtype": "float32",
            "processes": processes,
            "micro_batch_size": None,
            "training_args": {**TRAINING_ARGS, "learning_rate": 0.01, "max_steps": 3,
                              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, **args},
        }
    )  # fmt: skip


def test_process_count_splits_the_effective_batch_evenly(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert data_parallel.process_count(settings(4)) == 4  # 2 x 2 samples per optimizer step
    assert data_parallel.process_count(settings(3)) == 2  # 3 does not divide 4
    assert data_parallel.process_count(settings("auto")) == 1  # no GPU: one process
    monkeypatch.setattr("torch.cuda.device_count", lambda: 3)
    assert data_parallel.process_count(settings("auto")) == 2  # 3 GPUs, but 4 samples split evenly over 2
    assert data_parallel.process_count(settings(8)) == 2  # never more processes than GPUs


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one(tiny_llama: Path, llama_dataset: Path, tmp_path: Path):
    report = Recorder()
    results = {}
    for processes in (1, 2):
        files = step_files(tmp_path / str(processes))
        info = train_adapter(settings(processes), files, report, model=model_artifact(tiny_llama),
                             dataset=dataset_artifact(llama_dataset))  # fmt: skip
        results[processes] = (info, load_file(files.out / "adapter_model.safetensors"))
    (one, weights_one), (two, weights_two) = results[1], results[2]
    assert two.processes == 2 and one.processes == 1
    assert two.steps == one.steps == 3
    assert two.micro_batch == [2, 1]  # each process takes half of every 4-sample batch
    assert (report.updates[-1].step, report.updates[-1].total) == (3, 3)  # process 0's progress reached the step
    assert any(line.startswith("data parallel: 2 processes") for line in report.lines)
    assert abs(two.eval_loss - one.eval_loss) < 1e-3
    assert (files.out / ".olive-grove-eval").is_dir()  # process 0 keeps the eval samples, as one process does
    for name, tensor in weights_one.items():
        assert (weights_two[name] - tensor).abs().max() < 1e-4, name
