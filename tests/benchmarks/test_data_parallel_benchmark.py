"""The data-parallel benchmark's CPU smoke mode (two gloo processes): it runs and writes its JSON. No timing
is asserted; the scaling is measured on GPUs (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_data_parallel_benchmark_writes_its_table(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "data_parallel.py"), "--tiny", "--steps", "4", "--warmup", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| processes | micro-batch | tokens/s |" in out.stdout
    result = json.loads((tmp_path / "cpux2-data-parallel.json").read_text())
    assert result["one"]["processes"] == 1 and result["all"]["processes"] == 2
    assert result["all"]["micro_batch"] == [1, 2]  # each process takes half of every 4-sample batch
