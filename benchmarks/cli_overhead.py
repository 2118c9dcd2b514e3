"""What a run costs from the command line: olive-grove and Olive 0.13 side by side on one tiny config.

Both tools run the same Olive config file (tiny random Phi-3, the tone dataset's first 64 rows, LoRA for 4
steps -> merge -> fp32 ONNX), each in its own copy of the project folder, alternating run by run; the
figure per case is the median wall time of the command, as a user sees it.

    python benchmarks/cli_overhead.py                       # 3 rounds; Olive from --olive (or OLIVE_BIN)
    python benchmarks/cli_overhead.py --smoke               # one round, no Olive: does it all still run?

Olive is run with CI=1 (its telemetry does not wait at exit). Without an Olive install its column is empty
and the table says so. Prints a table and writes benchmarks/results/cpu-cli.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TONE_ROWS = REPO / "examples" / "tone" / "dataset" / "dataset-classification.json"
ROWS = 64
CONFIG = {
    "input_model": {"type": "HfModel", "model_path": "tiny-phi3"},
    "systems": {
        "local_system": {
            "type": "LocalSystem",
            "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
        }
    },
    "data_configs": [
        {
            "name": "tone",
            "type": "HuggingfaceContainer",
            "load_dataset_config": {"data_name": "json", "data_files": "tone64.jsonl", "split": "train"},
            "pre_process_data_config": {
                "text_template": "### Text: {phrase}\n### The tone is:\n{tone}",
                "strategy": "join",
                "max_seq_len": 64,
            },
        }
    ],
    "passes": {
        "lora": {
            "type": "LoRA",
            "target_modules": ["qkv_proj", "o_proj"],
            "r": 16,
            "alpha": 32,
            "lora_dropout": 0.0,
            "torch_dtype": "float32",
            "train_data_config": "tone",
            "training_args": {
                "seed": 0,
                "data_seed": 42,
                "per_device_train_batch_size": 4,
                "learning_rate": 0.005,
                "max_steps": 4,
                "logging_steps": 2,
                "save_steps": 4,
            },
        },
        "merge": {"type": "MergeAdapterWeights"},
        "builder": {"type": "ModelBuilder", "precision": "fp32"},
    },
    "host": "local_system",
    "target": "local_system",
    "cache_dir": "cache",
    "output_dir": "outputs",
}
# Targets from the fast-start issue, checked in the table's last column.
TARGETS = {"validate": 2.0, "cached": 3.0, "cached-server": 3.0}


@dataclass
class Case:
    name: str
    what: str
    ours: list[float] = field(default_factory=list)
    olive: list[float] = field(default_factory=list)

    def row(self) -> dict:
        ours = statistics.median(self.ours) if self.ours else None
        olive = statistics.median(self.olive) if self.olive else None
        ratio = round(ours / olive, 2) if ours and olive else None
        target = TARGETS.get(self.name)
        met = None
        if target is not None and ours is not None:
            met = ours <= target
        elif self.name.startswith("fresh") and ratio is not None:
            met = ratio < 1
        return {"case": self.name, "what": self.what, "ours_s": _round(ours), "olive_s": _round(olive),
                "ratio": ratio, "target_met": met, "ours_runs": self.ours, "olive_runs": self.olive}  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class Project:
    """One tool's copy of the project: the config, the 64 rows, the tiny model; its own cache and outputs."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        lines = TONE_ROWS.read_text().splitlines()[:ROWS]
        (root / "tone64.jsonl").write_text("\n".join(lines) + "\n")
        (root / "config.json").write_text(json.dumps(CONFIG, indent=1))
        if not (root / "tiny-phi3").exists():
            shutil.copytree(model, root / "tiny-phi3")

    def clean(self) -> None:
        for name in ("cache", "outputs"):
            shutil.rmtree(self.root / name, ignore_errors=True)


class Tools:
    def __init__(self, work: Path, olive: Path | None, env: dict[str, str]) -> None:
        self.work, self.olive, self.env = work, olive, env
        self.grove = [sys.executable, "-m", "olive_grove.flows.cli"]

    def timed(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, env=env or self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed in {cwd} ({done.returncode}):\n{done.stderr[-3000:]}")
        return round(seconds, 2)

    def ours(self, project: Project, *args: str, env: dict[str, str] | None = None) -> float:
        return self.timed([*self.grove, *args, "--config", "config.json"], project.root, env)

    def theirs(self, project: Project) -> float:
        assert self.olive is not None
        return self.timed([str(self.olive), "run", "--config", "config.json"], project.root, {**self.env, "CI": "1"})

    def stop_server(self) -> None:
        subprocess.run([*self.grove, "server", "stop"], env=self.env, capture_output=True)


def measure(rounds: int, tools: Tools, ours: Project, theirs: Project, full: bool) -> list[Case]:
    """Every case, Olive's run beside ours; without `full` (the smoke mode) only first, validate, cached."""
    cases = {
        "validate-cold": Case("validate-cold", "grove validate, nothing remembered yet (imports the Trainer)"),
        "validate": Case("validate", "grove validate of a config checked once before"),
        "first": Case("first", "fresh run, first on this machine: no Prefect database or server, no memos"),
        "fresh": Case("fresh", "fresh run: empty cache, grove's local server already up"),
        "cached": Case("cached", "fully cached re-run, no server started by the user"),
        "cached-temporary": Case(
            "cached-temporary", "fully cached, Prefect's temporary server per run (OLIVE_GROVE_LOCAL_SERVER=temporary)"
        ),
    }
    memos = Path(tools.env["HOME"]) / ".cache" / "olive-grove"
    for _ in range(rounds):
        # First on this machine: grove starts its server and learns what is installed; Olive has no such cost.
        tools.stop_server()
        shutil.rmtree(memos, ignore_errors=True)
        shutil.rmtree(tools.env["PREFECT_HOME"], ignore_errors=True)  # a new machine has no Prefect database yet
        if full:
            cases["validate-cold"].ours.append(tools.ours(ours, "validate"))
            shutil.rmtree(memos, ignore_errors=True)
        ours.clean(), theirs.clean()
        cases["first"].ours.append(tools.ours(ours, "run"))
        if tools.olive:
            cases["first"].olive.append(tools.theirs(theirs))
        cases["validate"].ours.append(tools.ours(ours, "validate"))
        if full:
            ours.clean(), theirs.clean()
            if tools.olive:
                cases["fresh"].olive.append(tools.theirs(theirs))
            cases["fresh"].ours.append(tools.ours(ours, "run"))
        cases["cached"].ours.append(tools.ours(ours, "run"))
        if tools.olive:
            cases["cached"].olive.append(tools.theirs(theirs))
        if full:
            temporary = {**tools.env, "OLIVE_GROVE_LOCAL_SERVER": "temporary"}
            cases["cached-temporary"].ours.append(tools.ours(ours, "run", env=temporary))
    found = [case for case in cases.values() if case.ours]
    if full:
        found += measure_with_server(rounds, tools, ours, theirs)
    tools.stop_server()
    return found


def measure_with_server(rounds: int, tools: Tools, ours: Project, theirs: Project) -> list[Case]:
    """A Prefect server the user runs (PREFECT_API_URL): grove reports to it and starts none."""
    fresh = Case("fresh-server", "fresh run, PREFECT_API_URL set to a running server")
    cached = Case("cached-server", "fully cached, PREFECT_API_URL set to a running server")
    port = 4391
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=tools.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**tools.env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    try:
        _wait_for(f"http://127.0.0.1:{port}/api/health")
        for _ in range(rounds):
            ours.clean(), theirs.clean()
            fresh.ours.append(tools.ours(ours, "run", env=env))
            if tools.olive:
                fresh.olive.append(tools.theirs(theirs))
            cached.ours.append(tools.ours(ours, "run", env=env))
            if tools.olive:
                cached.olive.append(tools.theirs(theirs))
    finally:
        server.terminate()
        server.wait(30)
    return [fresh, cached]


def _wait_for(url: str, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no Prefect server at {url} after {timeout} s")


def table(rows: list[dict], olive_note: str) -> str:
    lines = ["| case | olive-grove s | Olive 0.13 s | ratio | target |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "met", False: "NOT met", None: ""}[r["target_met"]]
        cells = [r["case"], r["ours_s"], r["olive_s"] if r["olive_s"] is not None else "—", r["ratio"] or "—", met]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", *(f"- {r['case']}: {r['what']}" for r in rows)]
    if olive_note:
        lines.append(f"- {olive_note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one round of first, validate and cached; no Olive")
    parser.add_argument("--olive", type=Path, default=os.environ.get("OLIVE_BIN"), help="Olive 0.13's `olive`")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rounds = 1 if args.smoke else args.rounds
    olive = None if args.smoke else args.olive
    olive_note = "" if olive else "Olive not measured here (give --olive PATH to Olive 0.13's olive command)"

    work = args.work or Path(tempfile.mkdtemp(prefix="grove-cli-bench-"))
    home = work / "home"  # grove's memos and Prefect's database start empty, and nothing of the user's is touched
    env = {**os.environ, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    model = work / "tiny-phi3"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "olive_grove.flows.cli", "tiny-model", str(model), "--arch", "phi3"],
                       env=env, check=True, capture_output=True)  # fmt: skip
    tools = Tools(work, olive, env)
    ours, theirs = Project(work / "olive-grove", model), Project(work / "olive", model)
    cases = measure(rounds, tools, ours, theirs, full=not args.smoke)
    rows = [c.row() for c in cases]
    print(table(rows, olive_note))
    result = {
        "benchmark": "cli_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rounds": rounds,
        "olive": str(olive) if olive else None,
        "note": olive_note,
        "cases": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cpu-cli-smoke.json" if args.smoke else "cpu-cli.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
