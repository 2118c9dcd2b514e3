"""The pipeline benchmark's CPU smoke mode: every step of the guide's run, each in its own process, measured
and written to the JSON. No timing or memory size is asserted: those are measured on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

from grove_helpers import load_benchmark


def test_tiny_pipeline_measures_every_step(tmp_path: Path, capsys):
    bench = load_benchmark("pipeline_gpu")
    bench.main(["--tiny", "--steps", "2", "--builder-alone", "--out", str(tmp_path / "results"),
                "--work", str(tmp_path / "work")])  # fmt: skip
    [written] = (tmp_path / "results").glob("tiny-*-pipeline.json")  # tiny-cpu-... here, tiny-h200-... on a GPU
    data = json.loads(written.read_text())
    steps = {row["step"]: row for row in data["steps"]}
    assert list(steps) == ["dataset", "lora", "merge", "int4-cuda", "int4-cuda-builder-alone", "int4-cpu",
                           "int4-cpu-builder-alone"]  # fmt: skip
    assert steps["int4-cpu"]["info"]["size_bytes"] == steps["int4-cpu-builder-alone"]["info"]["size_bytes"]
    for row in steps.values():
        assert row["seconds"] > 0 and row["host_peak_gib"] > 0
    assert steps["lora"]["info"]["steps"] == 2
    assert data["goal"]["met"] is None  # a tiny model says nothing of Phi-3-mini's build
    assert "| step | function | seconds | host peak GiB | GPU peak GiB |" in capsys.readouterr().out
