"""The training benchmark's CPU smoke mode: it runs both trainers and writes the JSON the docs describe.

No timing is asserted: speed is measured on a GPU (docs/benchmarks.md), never in a unit test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from grove_helpers import load_benchmark


def test_tiny_benchmark_writes_its_table(tmp_path: Path, capsys):
    bench = load_benchmark("train_throughput")
    results = bench.main(["--tiny", "--steps", "3", "--warmup", "1", "--cases", "lora-2048,lora-short",
                          "--profile", "1", "--out", str(tmp_path / "results"),
                          "--work", str(tmp_path / "work")])  # fmt: skip
    assert [r.name for r in results] == ["lora-2048", "lora-short"]
    written = tmp_path / "results" / "tiny-cpu-train-lora-2048-lora-short-steps-3-warmup-1-profiled.json"
    data = json.loads(written.read_text())
    for case in data["cases"]:
        assert {"name", "ours_tok_s", "baseline_tok_s", "speedup", "mfu", "peak_gib", "baseline_peak_gib"} <= set(case)
        assert case["ours_tok_s"] > 0 and case["baseline_tok_s"] > 0
        assert case["peers"] == {"liger": {"error": "needs a CUDA GPU"}, "unsloth": {"error": "needs a CUDA GPU"}}
        profile = case["profile"]  # on a CPU: operators' self time in the step after the timed ones
        assert profile["share"]["matmul"] > 0 and abs(sum(profile["share"].values()) - 1) < 0.01
        assert profile["busiest"] and profile["wall_ms"] > 0
    out = capsys.readouterr().out
    assert "baseline tok/s" in out and "lora-2048: where our step's time went" in out


def test_layer_ceiling_times_each_kernel_of_a_layer(tmp_path: Path, capsys):
    ceiling = load_benchmark("layer_ceiling").main(["--tiny", "--repeats", "2", "--out", str(tmp_path)])
    assert set(ceiling["linear_ms"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert isinstance(ceiling["attention_ms"]["math"], float)
    assert ceiling["attention_ms"]["cudnn"].startswith("unavailable")  # no CUDA here: said, not skipped silently
    assert ceiling["ceiling_tok_s"] > 0
    assert json.loads((tmp_path / "tiny-cpu-layer-ceiling-micro-4.json").read_text())["best_attention"]
    assert "ceiling:" in capsys.readouterr().out


def test_set_changes_only_our_speed_settings():
    bench = load_benchmark("train_throughput")
    assert bench.setting("micro_batch_size=1") == ("micro_batch_size", 1)
    assert bench.setting("cuda_graphs=false") == ("cuda_graphs", False)
    with pytest.raises(argparse.ArgumentTypeError, match="micro_batch_size"):
        bench.setting("r=8")  # the adapter stays the baseline's


def test_results_file_names_what_the_run_changed():
    bench = load_benchmark("train_throughput")
    parser = bench.make_parser()

    def name(*argv: str) -> str:
        return bench.variant_name(parser, parser.parse_args(list(argv)))

    assert name() == ""
    assert len({name("--peers="), name("--peers=liger"), name("--peers=unsloth"), name()}) == 4
    assert name("--peers=liger,liger") == name("--peers=liger")
    assert name("--train-arg", "output_dir=/tmp/x y") == "-output_dir-_tmp_x_y"  # a file name, not a path
    assert name("--cases", "lora-short", "--steps", "40", "--warmup", "10", "--set", "micro_batch_size=1") == (
        "-lora-short-steps-40-warmup-10-micro_batch_size-1"
    )


def test_a_peer_gets_the_command_line_it_parses():
    bench, peer_run = load_benchmark("train_throughput"), load_benchmark("peer_run")
    argv = bench.peer_arguments("unsloth", "qlora-2048", Path("/m"), {"per_device_train_batch_size": 4}, 15, 3,
                                Path("/out"), tiny=True)  # fmt: skip
    assert Path(argv[0]).name == "peer_run.py"
    args = peer_run.make_parser().parse_args(argv[1:])
    assert vars(args) == {"peer": "unsloth", "case": "qlora-2048", "model_dir": Path("/m"), "steps": 15, "warmup": 3,
                          "training_args": {"per_device_train_batch_size": 4}, "out": Path("/out/qlora-2048-unsloth"),
                          "tiny": True}  # fmt: skip


def test_a_module_is_put_back_as_it_was(monkeypatch):
    """What the benchmark does between cases, since Liger patches Phi-3's modeling module for the process."""
    from transformers.models.phi3 import modeling_phi3

    restore = load_benchmark("train_throughput").as_it_is_now(modeling_phi3.__name__)
    original = modeling_phi3.Phi3RMSNorm
    monkeypatch.setattr(modeling_phi3, "Phi3RMSNorm", torch.nn.LayerNorm)  # put back after the test in any case
    restore()
    assert modeling_phi3.Phi3RMSNorm is original


@pytest.mark.parametrize(("name", "argv", "expected"), [
    ("train_throughput", ["--profile", "-1"], "--profile: '-1': expected a whole number of at least 0"),
    ("train_throughput", ["--steps", "3", "--warmup", "3"], "--warmup 3 leaves no timed step of --steps 3"),
    ("layer_ceiling", ["--micro-batch", "0"], "--micro-batch: '0': expected a whole number of at least 1"),
    ("layer_ceiling", ["--repeats", "two"], "--repeats: 'two': expected a whole number of at least 1"),
    ("train_throughput", ["--cases", "lora-2048,nope"], "--cases: no case 'nope' (known: lora-2048,"),
    ("train_throughput", ["--set", "micro_batch_size=0"], "--set/--train-arg micro_batch_size:"),
    ("train_throughput", ["--train-arg", "dataloader_num_workers=1"], "dataloader_num_workers: set by the benchmark"),
    ("train_throughput", ["--out", "/etc/passwd"], "--out /etc/passwd: not a folder"),
    ("layer_ceiling", ["--out", "/etc/passwd"], "--out /etc/passwd: not a folder"),
])  # fmt: skip
def test_a_count_out_of_range_is_one_line(name: str, argv: list[str], expected: str, capsys):
    with pytest.raises(SystemExit) as exited:
        load_benchmark(name).main(argv)
    assert exited.value.code == 2 and expected in capsys.readouterr().err
