"""The built wheel, installed as a user installs it, next to a project that has its own `tasks.py` and `flows/`.

The fresh venv gets olive-grove from the wheel (not editable) and borrows every dependency from the test
venv through a path file, so nothing is downloaded and the checkout is nowhere on its path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from grove_helpers import LLAMA_MODULES, REPO_ROOT, lora_pass, tiny_run_config, write_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # setuptools builds in the tree: build from a copy, leave the checkout clean
    shutil.copytree(
        REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "node_modules", "build", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root, source],
        check=True,
        capture_output=True,
    )
    [wheel] = root.glob("olive_grove-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())  # fmt: skip
    (site / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        check=True,
        capture_output=True,
    )
    return venv


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> Path:
    """A folder laid out like many users' own: Celery's `tasks.py`, a Prefect project's `flows/config.py`."""
    root = tmp_path_factory.mktemp("user-project")
    (root / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    (root / "flows").mkdir()
    (root / "flows" / "config.py").write_text("raise SystemExit('the user flows/config.py was imported')\n")
    (root / "blocks.py").write_text("raise SystemExit('the user blocks.py was imported')\n")
    return root


def run_in(project: Path, venv: Path, *argv: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return subprocess.run([str(a) for a in argv], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_the_wheel_installs_one_top_level_package(wheel_venv: Path):
    site = next((wheel_venv / "lib").glob("python*/site-packages"))
    top = sorted(p.name for p in site.iterdir() if p.name != "test-dependencies.pth")
    assert [n for n in top if not n.endswith(".dist-info")] == ["olive_grove"]
    assert {p.name for p in (site / "olive_grove").iterdir()} >= {"flows", "tasks", "blocks", "deployments"}
    assert (site / "olive_grove" / "flows" / "templates" / "olive-config.json").is_file()
    # What `grove server --with docker,k8s` registers, from the installed package.
    from olive_grove.flows.serve import GPU_DEPLOYMENTS

    assert (site / "olive_grove" / "deployments" / "prefect.yaml").is_file()
    for _, _, _, template in GPU_DEPLOYMENTS.values():
        assert (site / "olive_grove" / "deployments" / "work-pools" / template).is_file()


def test_grove_runs_from_a_project_with_its_own_tasks_and_flows(
    wheel_venv: Path, user_project: Path, tiny_llama: Path, tmp_path: Path
):
    """Console script, torchrun relaunch (two gloo processes), init and the deployment's entrypoint."""
    passes = {
        "lora": lora_pass(LLAMA_MODULES, processes=2, micro_batch_size=None),
        "merge": {"type": "MergeAdapterWeights"},
    }
    passes["lora"]["training_args"].update(max_steps=2, gradient_accumulation_steps=2)
    config = write_project(tmp_path, tiny_run_config(tiny_llama, passes))

    ran = run_in(user_project, wheel_venv, "grove", "run", "--config", config)
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads((tmp_path / "outputs" / "run" / "report.json").read_text())
    assert report["steps"][2]["info"]["processes"] == 2

    init = run_in(user_project, wheel_venv, "grove", "init", user_project / "new-project")
    assert init.returncode == 0, init.stderr
    assert (user_project / "new-project" / "fine-tuning" / "olive-config.json").is_file()

    entry = "olive_grove.flows.finetune.finetune"
    load = f"from prefect.flows import load_flow_from_entrypoint as load; print(load({entry!r}).name)"
    loaded = run_in(user_project, wheel_venv, "python", "-c", load)
    assert loaded.returncode == 0 and "finetune" in loaded.stdout, loaded.stderr[-2000:]
    where = run_in(user_project, wheel_venv, "python", "-c", "import olive_grove.flows.cli as m; print(m.__file__)")
    assert "site-packages/olive_grove/flows/cli.py" in where.stdout
