"""The local Prefect server `grove run` keeps: started by the first run, reused by the next, seen and
stopped from the CLI; runs land in its database as flow runs with their task runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from grove_helpers import tiny_run_config, write_project

from olive_grove.flows import local_server


def _grove(*argv: str | Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PREFECT_HOME": str(home), **env}
    environ.pop("OLIVE_GROVE_LOCAL_SERVER", None)  # the default a user has
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "olive_grove.flows.cli", *map(str, argv)], env=environ,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _api(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture
def home(tmp_path: Path):
    home = tmp_path / "prefect-home"
    yield home
    _grove("server", "stop", home=home)  # never left running by a failed test


@pytest.mark.slow
def test_first_run_starts_the_server_the_next_reuses_and_stop_stops(tiny_phi3: Path, tmp_path: Path, home: Path):
    cfg = tiny_run_config(tiny_phi3, passes={"lora": {**tiny_run_config(tiny_phi3)["passes"]["lora"]}})
    config = write_project(tmp_path / "project", cfg)
    assert "no local Prefect server" in _grove("server", "status", home=home).stdout

    first = _grove("run", "--config", config, home=home)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "starting a local Prefect server for this and later runs" in first.stderr
    state = json.loads((home / "olive-grove-server.json").read_text())

    second = _grove("run", "--config", config, home=home)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "starting a local Prefect server" not in second.stderr
    assert "3 of 4 steps from cache" in second.stdout
    assert json.loads((home / "olive-grove-server.json").read_text())["pid"] == state["pid"]

    status = _grove("server", "status", home=home).stdout
    assert f"pid {state['pid']}, answering" in status and state["url"].removesuffix("/api") in status

    # Both runs are flow runs of `finetune` in the server's database, the second's steps from the cache.
    runs = _api(state["url"], "/flow_runs/filter", {"sort": "START_TIME_ASC"})
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    tasks = _api(state["url"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[1]["id"]]}}})
    assert sorted(t["name"] for t in tasks) == ["lora", "lora/dataset", "quality/base"]
    assert {t["state_name"] for t in tasks} == {"Cached"}

    stopped = _grove("server", "stop", home=home)
    assert "stopped the local Prefect server" in stopped.stdout
    assert not _alive(state["pid"]) and not (home / "olive-grove-server.json").exists()
    # The database stays: the next server shows the same runs.


def test_a_dead_servers_record_is_ignored(home: Path):
    home.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (home / "olive-grove-server.json").write_text(json.dumps(
        {"url": "http://127.0.0.1:1/api", "pid": int(dead.stdout), "log": "x", "started": 0}))  # fmt: skip
    assert "no local Prefect server" in _grove("server", "status", home=home).stdout
    assert "no local Prefect server was running" in _grove("server", "stop", home=home).stdout


def test_an_unknown_mode_is_one_line_before_any_work(tmp_path: Path, home: Path, tiny_phi3: Path):
    config = write_project(tmp_path / "project", tiny_run_config(tiny_phi3))
    done = _grove("run", "--config", config, home=home, OLIVE_GROVE_LOCAL_SERVER="forever")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: OLIVE_GROVE_LOCAL_SERVER: 'forever' is not a mode (one of keep, temporary)"
    assert not (tmp_path / "project" / "cache").exists() and not (home / "olive-grove-server.json").exists()


def test_a_configured_api_is_used_instead(home: Path):
    status = _grove("server", "status", home=home, PREFECT_API_URL="http://127.0.0.1:9/api").stdout
    assert "runs use PREFECT_API_URL=http://127.0.0.1:9/api, not the local server" in status


def test_terminal_runs_send_no_heartbeats_unless_configured(monkeypatch):
    from prefect.settings import get_current_settings

    from olive_grove.flows.local_server import terminal_run

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    with terminal_run():
        assert get_current_settings().flows.heartbeat_frequency is None
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")  # asked for: Prefect's setting is left as it is
    before = get_current_settings().flows.heartbeat_frequency
    with terminal_run():
        assert get_current_settings().flows.heartbeat_frequency == before is not None


@pytest.mark.parametrize("record", [{"pid": "1234"}, {"pid": None}, {"url": "http://127.0.0.1/api"}, {"started": "x"}])
def test_a_state_file_of_the_wrong_shape_is_ignored(home: Path, record: dict):
    home.mkdir(parents=True)
    state = {"url": "http://127.0.0.1:1/api", "pid": os.getpid(), "log": "x", "started": 0, **record}
    (home / "olive-grove-server.json").write_text(json.dumps(state))
    done = _grove("server", "status", home=home)
    assert done.returncode == 0 and "no local Prefect server" in done.stdout, done.stderr


def test_a_recorded_pid_that_is_no_server_of_ours_is_left_alone(home: Path):
    """A PID reused by another process (here one with 'prefect' in its command line) is neither waited for
    nor killed."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "prefect", "server"])
    try:
        home.mkdir(parents=True)
        (home / "olive-grove-server.json").write_text(json.dumps(
            {"url": "http://127.0.0.1:4311/api", "pid": other.pid, "log": "x", "started": 0}))  # fmt: skip
        assert "no local Prefect server was running" in _grove("server", "stop", home=home).stdout
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_an_api_url_that_does_not_answer_is_one_line(tmp_path: Path, home: Path, tiny_phi3: Path):
    config = write_project(tmp_path / "project", tiny_run_config(tiny_phi3))
    for argv in (["run", "--config", config], ["server"]):
        done = _grove(*argv, home=home, PREFECT_API_URL="http://127.0.0.1:9/api")
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip() == (
            "error: PREFECT_API_URL: no Prefect API answers at http://127.0.0.1:9/api "
            "(start that server, or unset PREFECT_API_URL to use grove's local one)"
        )


@pytest.mark.parametrize("pool", ["", "a/b", "../x"])
def test_a_pool_name_prefect_refuses_is_one_line(home: Path, pool: str):
    done = _grove("server", "--pool", pool, home=home)
    assert done.returncode == 2 and done.stderr.startswith(f"error: --pool: {pool!r} is not a work pool name")


def test_an_unwritable_prefect_home_is_one_line(tmp_path: Path, tiny_phi3: Path):
    home = tmp_path / "file-not-folder"
    home.write_text("")
    config = write_project(tmp_path / "project", tiny_run_config(tiny_phi3))
    done = _grove("run", "--config", config, home=home)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: PREFECT_HOME: {home} cannot be written")


def test_a_new_server_whose_process_died_is_not_taken_for_another_on_its_port(tmp_path: Path):
    """Two first runs in different homes can both find the preferred port free; the one whose server loses the
    bind must not report to the other's (which answers on that port) as if it were its own."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)  # the server that took the port
    threading.Thread(target=other.serve_forever, daemon=True).start()
    lost = subprocess.Popen([sys.executable, "-c", "pass"])  # our server's process, gone after a failed bind
    lost.wait()
    url = f"http://127.0.0.1:{other.server_address[1]}/api"
    try:
        server = local_server.LocalServer(url=url, pid=lost.pid, log=str(tmp_path / "log"), started=time.time())
        assert server.healthy()
        with pytest.raises(local_server.ServerFailed, match="stopped while starting"):
            local_server.Starting(server, new=True).ready()
    finally:
        other.shutdown()
