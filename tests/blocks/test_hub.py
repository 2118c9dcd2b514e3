"""The Hugging Face token lives in a Secret block and goes nowhere else: not into a parameter, a log line,
a cache key, a result or an output file. A run with a known fake token, then a scan of all of them."""

from __future__ import annotations

import os
from pathlib import Path

from grove_helpers import grove, tiny_run_config, write_project

from olive_grove.blocks.hub import HF_TOKEN_BLOCK, hf_token, load_hf_token, save_hf_token

FAKE_TOKEN = "hf_FAKEtokenFORolivegroveTESTS0123456789"


def files_under(root: Path):
    return [p for p in root.rglob("*") if p.is_file()]


def test_token_reaches_the_hub_client_and_nothing_else(tmp_path: Path, tiny_phi3: Path, monkeypatch, caplog):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    save_hf_token(FAKE_TOKEN)
    assert load_hf_token() == FAKE_TOKEN

    cfg = tiny_run_config(tiny_phi3)
    cfg["systems"]["local_system"]["hf_token"] = True
    config = write_project(tmp_path, cfg)
    result = grove("run", "--config", config)
    assert result.rc == 0, result.err[-3000:]
    logs = caplog.text + result.out + result.err
    assert f"Secret block '{HF_TOKEN_BLOCK}'" in logs
    assert "HF_TOKEN" not in os.environ  # handed to huggingface_hub for the run only

    leaks = [str(p) for p in files_under(tmp_path) if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == [], "cache, results or outputs hold the token"
    assert FAKE_TOKEN not in logs, "a log line holds the token"
    prefect_home = Path(os.environ["PREFECT_HOME"])
    db_leaks = [str(p) for p in files_under(prefect_home) if FAKE_TOKEN.encode() in p.read_bytes()]
    assert db_leaks == [], "Prefect's database (parameters, logs, artifacts, blocks) holds the token in clear"


def test_no_block_means_no_token(monkeypatch):
    assert load_hf_token("no-such-block") is None


def test_the_token_is_in_the_environment_only_inside_the_block(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "the-users-own")
    save_hf_token(FAKE_TOKEN)
    with hf_token() as found:
        assert found and os.environ["HF_TOKEN"] == FAKE_TOKEN
    assert os.environ["HF_TOKEN"] == "the-users-own"
