"""Crashes and company: `kill -9` mid-training resumes, a killed build leaves nothing that counts, and two
runs that need the same step compute it once. Real `grove run` processes, killed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from grove_helpers import lora_pass, read_report, step, tiny_run_config, tree, write_project
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PHI3 = ["o_proj", "qkv_proj"]


def start_grove(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "olive_grove.flows.cli", "run", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a kill reaches the whole run, like a lost machine
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)


def kill_hard(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(config: Path, log: Path) -> str:
    proc = start_grove(config, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def long_training(model: Path, **top) -> dict:
    args = {"max_steps": 60, "save_steps": 10, "save_total_limit": 3, "logging_steps": 10}
    lora = lora_pass(PHI3, eval_dataset_size=None)
    lora["training_args"].update(args)
    return tiny_run_config(model, {"lora": lora}, **top)


def adapter_weights(config: Path) -> dict[str, torch.Tensor]:
    out = config.parent / json.loads(config.read_text())["output_dir"]
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_killed_training_resumes_from_its_checkpoint(tmp_path: Path, tiny_phi3: Path):
    config = write_project(tmp_path / "killed", long_training(tiny_phi3))
    steps = config.parent / "cache" / "steps" / "train_adapter"
    proc = start_grove(config, tmp_path / "first.log")
    wait_for(lambda: any(steps.glob("*.work/checkpoints/checkpoint-20")), proc)
    kill_hard(proc)
    assert not any(p.name.startswith("train_adapter-") and p.is_dir() for p in steps.iterdir() if "." not in p.name)

    log = finish(config, tmp_path / "second.log")
    assert "resuming training from checkpoint-" in log
    report = read_report(config)
    assert step(report, "lora")["info"]["resumed_from"].startswith("checkpoint-")
    assert step(report, "lora")["info"]["steps"] == 60

    # Given the seed, the resumed adapter matches an uninterrupted run's.
    whole = write_project(tmp_path / "whole", long_training(tiny_phi3))
    finish(whole, tmp_path / "whole.log")
    resumed, uninterrupted = adapter_weights(config), adapter_weights(whole)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-3, atol=1e-4, msg=name)


def test_a_build_killed_midway_leaves_nothing_that_counts(tmp_path: Path, tiny_phi3: Path):
    passes = {
        "lora": lora_pass(PHI3),
        "merge": {"type": "MergeAdapterWeights"},
        "builder": {"type": "ModelBuilder", "precision": "int4"},
    }
    config = write_project(tmp_path, tiny_run_config(tiny_phi3, passes))
    builds = config.parent / "cache" / "steps" / "build_onnx_model"
    proc = start_grove(config, tmp_path / "first.log")
    wait_for(lambda: builds.is_dir() and any(builds.glob(".build_onnx_model-*.tmp-*")), proc)
    kill_hard(proc)
    assert not [p for p in builds.iterdir() if p.name.startswith("build_onnx_model-") and p.is_dir()]
    assert "onnx" not in tree(config.parent / "outputs" / "run")

    finish(config, tmp_path / "second.log")
    report = read_report(config)
    assert step(report, "lora")["cached"] and step(report, "merge")["cached"]
    assert not step(report, "builder")["cached"]
    assert (config.parent / "outputs" / "run" / "onnx" / "int4-cpu" / "genai_config.json").is_file()
    assert not list(builds.glob(".*tmp-*")), "the dead run's staging folder was cleared"


def test_two_runs_that_need_the_same_training_train_once(tmp_path: Path, tiny_phi3: Path):
    configs = []
    for name in ("a", "b"):
        cfg = long_training(tiny_phi3, cache_dir="../shared-cache", output_dir=f"outputs/{name}")
        configs.append(write_project(tmp_path / name, cfg))
    procs = [start_grove(c, tmp_path / f"{c.parent.name}.log") for c in configs]
    for proc, config in zip(procs, configs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{config.parent.name}.log").read_text()[-3000:]
    trained = [step(read_report(c), "lora")["cached"] for c in configs]
    assert sorted(trained) == [False, True], "one run trains, the other waits and reuses it"
