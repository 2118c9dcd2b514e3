"""Helpers shared by the test modules: run grove in-process, write tiny projects, read reports."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TONE_DATASET = REPO_ROOT / "examples" / "tone" / "dataset" / "dataset-classification.json"
SHARED_CONFIGS = (REPO_ROOT / ".." / "shared" / "olive-configs").resolve()
TONE_TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


def tone_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in TONE_DATASET.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- grove CLI


@dataclass
class GroveResult:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error: ")]

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]


def grove(*argv: str | Path) -> GroveResult:
    """Run `grove ARGS` in-process (the real entry point, olive_grove.flows.cli.main) and capture what it prints."""
    from olive_grove.flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return GroveResult(rc, out.getvalue(), err.getvalue(), time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ tiny projects

TRAINING_ARGS = {
    "seed": 0,
    "data_seed": 42,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 8,
    "learning_rate": 0.001,
    "max_steps": 3,
    "logging_steps": 1,
    "save_steps": 50,
}


def lora_pass(target_modules: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "type": "LoRA",
        "target_modules": target_modules,
        "r": 4,
        "alpha": 8,
        "lora_dropout": 0.0,
        "torch_dtype": "float32",
        "train_data_config": "tone_train",
        "eval_dataset_size": 0.05,
        "training_args": dict(TRAINING_ARGS),
        **extra,
    }


PHI3_MODULES = ["o_proj", "qkv_proj"]
LLAMA_MODULES = ["q_proj", "v_proj"]


def tiny_run_config(model: Path | str, passes: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """Olive's flat form, sized for a 2-core CPU: 64-token blocks, 3 steps of 2 samples."""
    if passes is None:
        passes = {
            "lora": lora_pass(PHI3_MODULES),
            "merge": {"type": "MergeAdapterWeights"},
            "builder": {"type": "ModelBuilder", "precision": "int4"},
        }
    cfg = {
        "input_model": {"type": "HfModel", "model_path": str(model)},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "data_configs": [
            {
                "name": "tone_train",
                "type": "HuggingfaceContainer",
                "load_dataset_config": {"data_name": "json", "data_files": "data/tone.json", "split": "train"},
                "pre_process_data_config": {
                    "text_cols": ["phrase", "tone"],
                    "text_template": TONE_TEMPLATE,
                    "strategy": "join",
                    "max_seq_len": 64,
                    "pad_to_max_len": False,
                    "use_attention_mask": False,
                },
            }
        ],
        "passes": copy.deepcopy(passes),
        "host": "local_system",
        "target": "local_system",
        "cache_dir": "cache",
        "output_dir": "outputs/run",
    }
    cfg.update(top)
    return cfg


def write_project(root: Path, cfg: dict[str, Any], name: str = "config.json") -> Path:
    """A project folder: the tone dataset under data/, the config beside it; returns the config path."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "tone.json").exists():
        shutil.copy(TONE_DATASET, root / "data" / "tone.json")
    path = root / name
    if name.endswith((".yaml", ".yml")):
        import yaml

        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    else:
        path.write_text(json.dumps(cfg, indent=2))
    return path


def read_report(cfg_path: Path) -> dict[str, Any]:
    cfg = json.loads(cfg_path.read_text())
    return json.loads((cfg_path.parent / cfg["output_dir"] / "report.json").read_text())


def step(report: dict[str, Any], label: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["step"] == label)


def tree(root: Path) -> list[str]:
    """Every file and folder under root, relative; [] when root does not exist."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------------ benchmarks


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is no package: each benchmark is a script)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- calling plain steps directly


class Recorder:
    """A step's reporter that keeps what the step said, for tests to read."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.updates: list[Any] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, update: Any) -> None:
        self.updates.append(update)


def model_artifact(path: Path, trust_remote_code: bool = False):
    from olive_grove.tasks.artifact import Artifact
    from olive_grove.tasks.models import ModelInfo

    info = ModelInfo(source="local", name=str(path), trust_remote_code=trust_remote_code)
    return Artifact(path=str(path), fingerprint=f"test:{path}", info=info)


def dataset_artifact(path: Path):
    """A dataset step's folder (train/, maybe eval/) as the step would hand it on."""
    from olive_grove.tasks.artifact import Artifact
    from olive_grove.tasks.data import DatasetInfo

    info = DatasetInfo(rows=0, samples={}, tokens=0, strategy="join", max_seq_len=0)
    return Artifact(path=str(path), fingerprint=f"test:{path}", info=info)


def step_files(root: Path, out: Path | None = None):
    """Where a plain step writes when a test calls it: `out` (made here), work/ and downloads/ under root."""
    from olive_grove.tasks.artifact import StepFiles

    out = out or root / "out"
    out.mkdir(parents=True, exist_ok=True)
    return StepFiles(out=out, work=root / "work", downloads=root / "downloads")


def free_port() -> int:
    """A loopback port nothing listens on, for a service a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_api(url: str, path: str, body: dict | None = None, method: str = "POST") -> Any:
    """One call to a Prefect server's REST API, retried on 503 as Prefect's own client does (SQLite busy
    while a worker and its runs write answers 503)."""
    data = json.dumps(body or {}).encode() if method == "POST" else None
    for attempt in range(6):
        request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 5:
                raise
            time.sleep(1 + attempt)


def listening(port: int, process, seconds: float) -> bool:
    """Whether `process` (a service a test started) listens on the loopback `port` within `seconds`; False as
    soon as it exits."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False
