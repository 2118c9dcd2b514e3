"""The training benchmark's CPU smoke mode: it runs both trainers and writes the JSON the docs describe.

No timing is asserted: speed is measured on a GPU (docs/benchmarks.md), never in a unit test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_writes_its_table(tmp_path: Path, capsys):
    bench = load_benchmark()
    results = bench.main(["--tiny", "--steps", "3", "--warmup", "1", "--cases", "lora-2048,lora-short",
                          "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])  # fmt: skip
    assert [r.name for r in results] == ["lora-2048", "lora-short"]
    data = json.loads((tmp_path / "results" / "tiny-cpu-train.json").read_text())
    for case in data["cases"]:
        assert {"name", "ours_tok_s", "baseline_tok_s", "speedup", "mfu", "peak_gib", "baseline_peak_gib"} <= set(case)
        assert case["ours_tok_s"] > 0 and case["baseline_tok_s"] > 0
    assert "baseline tok/s" in capsys.readouterr().out


def test_set_changes_only_our_speed_settings():
    bench = load_benchmark()
    assert bench.setting("micro_batch_size=1") == ("micro_batch_size", 1)
    assert bench.setting("cuda_graphs=false") == ("cuda_graphs", False)
    with pytest.raises(argparse.ArgumentTypeError, match="micro_batch_size"):
        bench.setting("r=8")  # the adapter stays the baseline's
