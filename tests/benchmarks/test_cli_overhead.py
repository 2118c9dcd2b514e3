"""The CLI benchmark's smoke mode: a first run, validate and a cached run, and the JSON the README quotes.

No timing is asserted: the figures come from the benchmark run itself (README, "What a run costs").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import load_benchmark


@pytest.mark.slow
def test_smoke_runs_every_case_and_writes_its_json(tmp_path: Path, capsys):
    bench = load_benchmark("cli_overhead")
    bench.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")])
    data = json.loads((tmp_path / "results" / "cpu-cli-smoke.json").read_text())
    cases = {c["case"]: c for c in data["cases"]}
    assert set(cases) == {"first", "validate", "cached"}
    for case in cases.values():
        assert case["ours_s"] > 0 and case["olive_s"] is None and case["ratio"] is None
    assert "Olive not measured here" in data["note"]
    out = capsys.readouterr().out
    assert "| case | olive-grove s | Olive 0.13 s | ratio | target |" in out
    # Every run went through the server grove kept, and the benchmark stopped it.
    assert not (tmp_path / "work" / "home" / ".prefect" / "olive-grove-server.json").exists()
