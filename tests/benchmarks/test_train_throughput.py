"""The training benchmark's CPU smoke mode: it runs both trainers and writes the JSON the docs describe.

No timing is asserted: speed is measured on a GPU (docs/benchmarks.md), never in a unit test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from grove_helpers import load_benchmark


def test_tiny_benchmark_writes_its_table(tmp_path: Path, capsys):
    bench = load_benchmark("train_throughput")
    results = bench.main(["--tiny", "--steps", "3", "--warmup", "1", "--cases", "lora-2048,lora-short",
                          "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])  # fmt: skip
    assert [r.name for r in results] == ["lora-2048", "lora-short"]
    data = json.loads((tmp_path / "results" / "tiny-cpu-train-lora-2048-lora-short.json").read_text())  # its cases
    for case in data["cases"]:
        assert {"name", "ours_tok_s", "baseline_tok_s", "speedup", "mfu", "peak_gib", "baseline_peak_gib"} <= set(case)
        assert case["ours_tok_s"] > 0 and case["baseline_tok_s"] > 0
        assert case["peers"] == {"liger": {"error": "needs a CUDA GPU"}, "unsloth": {"error": "needs a CUDA GPU"}}
    assert "baseline tok/s" in capsys.readouterr().out


def test_set_changes_only_our_speed_settings():
    bench = load_benchmark("train_throughput")
    assert bench.setting("micro_batch_size=1") == ("micro_batch_size", 1)
    assert bench.setting("cuda_graphs=false") == ("cuda_graphs", False)
    with pytest.raises(argparse.ArgumentTypeError, match="micro_batch_size"):
        bench.setting("r=8")  # the adapter stays the baseline's
