"""The pipeline benchmark's CPU smoke mode: every step of the guide's run, each in its own process, measured
and written to the JSON. No timing or memory size is asserted: those are measured on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import Recorder, load_benchmark, model_artifact, step_files


@pytest.mark.slow
def test_tiny_pipeline_measures_every_step(tmp_path: Path, capsys):
    bench = load_benchmark("pipeline_gpu")
    bench.main(["--tiny", "--steps", "2", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    [written] = (tmp_path / "results").glob("tiny-*-pipeline.json")  # tiny-cpu-... here, tiny-h200-... on a GPU
    data = json.loads(written.read_text())
    steps = {row["step"]: row for row in data["steps"]}
    assert list(steps) == ["dataset", "lora", "merge", "int4-cuda", "int4-cpu"]
    for row in steps.values():
        assert row["seconds"] > 0 and row["host_peak_gib"] > 0
    assert steps["lora"]["info"]["steps"] == 2
    assert data["goal"]["met"] is None  # a tiny model says nothing of Phi-3-mini's build
    assert "| step | function | seconds | host peak GiB | GPU peak GiB |" in capsys.readouterr().out


def test_the_builder_alone_builds_what_the_step_builds(tiny_phi3: Path, tmp_path: Path):
    """--builder-alone's row: the same build, without the scratch file (its host peak is the comparison)."""
    from olive_grove.tasks.onnx_build import ModelBuilderSettings, build_onnx_model

    bench = load_benchmark("pipeline_gpu")
    outs = []
    for name, build in (("step", build_onnx_model), ("alone", bench.builder_alone)):
        files = step_files(tmp_path / name, tmp_path / name / "out")
        build(ModelBuilderSettings(), files, Recorder(), model=model_artifact(tiny_phi3))
        outs.append((files.out / "model.onnx.data").read_bytes())
        assert not (tmp_path / name / "work" / "float-weights").exists()
    assert outs[0] == outs[1]
