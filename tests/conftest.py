"""Shared fixtures: an isolated Prefect home, tiny random models built once, a trained adapter.

Prefect runs against its ephemeral API (a temporary local server, started once per session): measured on
the 2-core dev machine it is up ~2 s sooner than `prefect_test_harness`, and this session's PREFECT_HOME
is already a fresh temporary folder, so the harness's isolation adds nothing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from grove_helpers import LLAMA_MODULES, TONE_DATASET, TONE_TEMPLATE, TRAINING_ARGS, free_port, listening  # stdlib only

# Before anything imports prefect, transformers or datasets.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="grove-tests-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.pop("PREFECT_API_URL", None)  # never a real server
os.environ["PREFECT_SERVER_API_PORT"] = str(free_port())  # grove's own server: not the other worker's
os.environ["OLIVE_GROVE_LOCAL_SERVER"] = "temporary"  # grove run in-process: no server outliving the tests
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")  # datasets' arrow cache, not the user's
os.environ["XDG_CACHE_HOME"] = str(_SESSION_HOME / "cache")  # olive-grove's remembered answers, not the user's
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded, ever
os.environ["OLIVE_GROVE_DOWNLOADS"] = str(_SESSION_HOME / "olive-grove-downloads")  # copies of blobs and models
os.environ["OLIVE_GROVE_LOCAL_CACHE"] = str(_SESSION_HOME / "olive-grove-local")  # copies of shared caches
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # as grove sets it: transformers' "Loading weights" bars

import pytest  # noqa: E402
from prefect.logging.configuration import setup_logging  # noqa: E402

# Bind Prefect's console handler to the session's stderr now, not to one test's (soon closed) capsys buffer.
setup_logging()


def pytest_configure(config: pytest.Config) -> None:
    # transformers' own deprecation inside peft/Trainer internals: nothing a test here can act on.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow or end-to-end tests first: with `-n 2 --dist loadfile` each file goes to one worker in
    this order, so the long ones start early instead of leaving one worker busy at the end."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in heavy)  # a file moves whole: its module fixtures are made once


@pytest.fixture(scope="session", autouse=True)
def _quiet_prefect_at_exit():
    """Prefect stops its temporary server at interpreter exit, after pytest closed its capture streams."""
    yield
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)
                handler.setStream(sys.__stderr__)
                handler.console.file = sys.__stderr__


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """A tiny random Phi-3 with a BPE tokenizer trained on the shipped tone dataset; built once."""
    from olive_grove.flows.project import corpus_lines
    from olive_grove.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi3"), "phi3", corpus_lines([TONE_DATASET]))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from olive_grove.flows.project import corpus_lines
    from olive_grove.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", corpus_lines([TONE_DATASET]))


# ------------------------------------------------------------------------------ a trained adapter, once


@pytest.fixture(scope="session")
def llama_dataset(tiny_llama, tmp_path_factory) -> Path:
    """The tone dataset prepared for the tiny llama (join, 64 tokens) with a 10 % eval split."""
    from grove_helpers import Recorder, model_artifact, step_files

    from olive_grove.tasks.data import DatasetSettings, prepare_dataset

    root = tmp_path_factory.mktemp("llama-dataset")
    config = {
        "name": "tone",
        "load_dataset_config": {"data_name": "json", "data_files": str(TONE_DATASET)},
        "pre_process_data_config": {
            "text_cols": ["phrase", "tone"],
            "text_template": TONE_TEMPLATE,
            "max_seq_len": 64,
            "use_attention_mask": False,
            "pad_to_max_len": False,
        },
    }
    settings = DatasetSettings.model_validate({"data": config, "files_fingerprint": "", "eval_dataset_size": 0.1,
                                               "seed": 42})  # fmt: skip
    prepare_dataset(settings, step_files(root, root / "dataset"), Recorder(), model=model_artifact(tiny_llama))
    return root / "dataset"


@pytest.fixture(scope="session")
def llama_adapter(tiny_llama, llama_dataset, tmp_path_factory) -> dict[str, Any]:
    """A LoRA adapter trained for 2 steps on the tiny llama by the real training code (no Prefect)."""
    from grove_helpers import Recorder, dataset_artifact, model_artifact, step_files

    from olive_grove.tasks.adapter_settings import LoRASettings
    from olive_grove.tasks.adapters import train_adapter

    root = tmp_path_factory.mktemp("llama-adapter")
    settings = LoRASettings.model_validate(
        {
            "train_data_config": "tone",
            "target_modules": LLAMA_MODULES,
            "r": 4,
            "alpha": 8,
            "lora_dropout": 0.0,
            "torch_dtype": "float32",
            "training_args": {
                **TRAINING_ARGS,
                "learning_rate": 0.01,
                "max_steps": 2,
                "save_steps": 1,
                "save_total_limit": 3,
            },
        }
    )
    report = Recorder()
    files = step_files(root, root / "adapter")
    info = train_adapter(settings, files, report, model=model_artifact(tiny_llama),
                         dataset=dataset_artifact(llama_dataset))  # fmt: skip
    return {
        "settings": settings,
        "adapter": root / "adapter",
        "checkpoints": files.work / "checkpoints",
        "info": info,
        "report": report,
    }


@pytest.fixture
def redis_url(tmp_path):
    """Debian's redis-server on a loopback port, for this test only."""
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)  # fmt: skip
    assert listening(port, process, 30), "redis-server did not start"
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=30)
