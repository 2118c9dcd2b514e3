"""The local Prefect server `grove run` keeps for later runs, so that only the first run waits for one.

Without PREFECT_API_URL, Prefect starts a temporary server for each run and stops it at the end — about
ten seconds of every run on a small machine, cached or not. grove starts `prefect server start` once, in the
background, on the same database (PREFECT_HOME), records it in PREFECT_HOME/olive-grove-server.json, and
points each later run at it: every run is still a flow run with its task runs, in the database the UI
reads, and the UI is there to see them. `grove server status` shows it and `grove server stop` stops it;
OLIVE_GROVE_LOCAL_SERVER=temporary keeps Prefect's temporary server per run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from olive_grove.tasks.errors import UserError

DEFAULT_PORT = 4200  # Prefect's own default, where a user looks for the UI
STARTUP_TIMEOUT_S = 180  # a busy 2-core machine can take a minute to migrate and start
STOP_TIMEOUT_S = 15
MODES = ("keep", "temporary")


@dataclass
class LocalServer:
    """A server grove started: where its API answers, its process (group), its log."""

    url: str
    pid: int
    log: str
    started: float

    def __post_init__(self) -> None:
        """A record of another shape (edited, or written by something else) is no record of ours."""
        if not (isinstance(self.url, str) and isinstance(self.pid, int) and self.pid > 1
                and isinstance(self.started, (int, float))):  # fmt: skip
            raise TypeError("not a grove server record")
        try:
            self.port  # noqa: B018 - a url without a port is no record of ours
        except (IndexError, ValueError) as exc:
            raise ValueError(f"no port in {self.url!r}") from exc

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    def alive(self) -> bool:
        """Its process runs, and is a Prefect server (not another process that got its PID since)."""
        with contextlib.suppress(ChildProcessError):  # started by this process: reap it if it exited
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            command = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no /proc to ask
        return b"prefect" in command and b"server" in command and str(self.port).encode() in command

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def healthy(self) -> bool:
        return answers(self.url, timeout=2)


def answers(api_url: str, timeout: float) -> bool:
    """Whether a Prefect API answers its health check at `api_url`."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as answer:
            return answer.status == 200
    except (OSError, ValueError):  # ValueError: not a URL at all
        return False


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def configured_api_url() -> str | None:
    """The API a user configured (PREFECT_API_URL, in the environment or the active profile), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def mode() -> str:
    value = os.environ.get("OLIVE_GROVE_LOCAL_SERVER", "keep").strip().lower() or "keep"
    if value not in MODES:
        raise UserError("OLIVE_GROVE_LOCAL_SERVER", f"'{value}' is not a mode", f"one of {', '.join(MODES)}")
    return value


def _state_file(home: Path) -> Path:
    return home / "olive-grove-server.json"


def recorded(home: Path) -> LocalServer | None:
    """The server grove started, if it is still running."""
    try:
        server = LocalServer(**json.loads(_state_file(home).read_text()))
    except (OSError, ValueError, TypeError):  # no record, or not one grove wrote
        return None
    return server if server.alive() else None


@contextlib.contextmanager
def _only_one_starter(home: Path) -> Iterator[None]:
    """Runs that start together agree on one server: the first starts it, the others wait and reuse it."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        lock = open(home / "olive-grove-server.lock", "w")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        raise UserError("PREFECT_HOME", f"{home} cannot be written ({exc.strerror})",
                        "set PREFECT_HOME to a folder you can write") from None  # fmt: skip
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Starting:
    """A server being started (or found running); `ready()` waits until it answers."""

    def __init__(self, server: LocalServer, new: bool) -> None:
        self.server, self.new = server, new

    def ready(self) -> LocalServer:
        deadline = self.server.started + STARTUP_TIMEOUT_S  # a recorded server that never answered: not long
        while not self._answers():
            # Seen twice (a CI run, a prober): a server that answered a moment later was taken for stopped.
            # It counts as stopped only if it still does not answer a second later and is still not seen.
            if not self.server.alive() and not self._answers_soon():
                raise ServerFailed(f"the local Prefect server stopped while starting: see {self.server.log}")
            if time.time() > deadline:
                raise ServerFailed(f"the local Prefect server did not answer in {STARTUP_TIMEOUT_S} s: see "
                                   f"{self.server.log}")  # fmt: skip
            time.sleep(0.2)
        return self.server

    def _answers(self) -> bool:
        """A new server's own process must be alive too: another one that took the port would answer as well."""
        return self.server.healthy() and (not self.new or self.server.alive())

    def _answers_soon(self) -> bool:
        time.sleep(1)
        return self._answers() or self.server.alive()


class ServerFailed(Exception):
    """The background server could not be started; a run goes on with Prefect's temporary one."""


def start(home: Path) -> Starting:
    """The running server, or a new one starting in the background (it outlives this process)."""
    with _only_one_starter(home):
        server = recorded(home)
        if server is not None:
            return Starting(server, new=False)
        port = _free_port()
        log = home / "olive-grove-server.log"
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED",
                                                                               "false")}  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"  # else the UI asks port 4200, whatever --port is
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C in the run's terminal does not reach it
            )  # fmt: skip
        server = LocalServer(url=f"http://127.0.0.1:{port}/api", pid=process.pid, log=str(log), started=time.time())
        _state_file(home).write_text(json.dumps(asdict(server)))
        return Starting(server, new=True)


def stop(home: Path) -> LocalServer | None:
    """Stop the server grove started; returns it, or None when none was running."""
    with _only_one_starter(home):
        server = recorded(home)
        if server is not None:
            try:
                os.killpg(server.pid, signal.SIGTERM)
            except PermissionError:
                raise UserError(str(_state_file(home)), f"names process {server.pid}, which is not yours",
                                "remove the file if that is no Prefect server of yours") from None  # fmt: skip
            except ProcessLookupError:
                pass
        _state_file(home).unlink(missing_ok=True)
    if server is None:
        return None
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    return server


def _free_port() -> int:
    """The port `prefect server start` would take (PREFECT_SERVER_API_PORT, else 4200) if free, else any."""
    preferred = os.environ.get("PREFECT_SERVER_API_PORT", "")
    for port in (int(preferred) if preferred.isdigit() else DEFAULT_PORT, 0):
        with socket.socket() as probe:
            # As the server binds: a port just freed (TIME_WAIT) is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise ServerFailed("no free port on 127.0.0.1")


def for_run(note) -> Starting | None:
    """Start (or find) the kept server for a run, unless the user configured an API or asked for none.

    Called before the run's checks, so a server that must start boots while they run.
    """
    url = configured_api_url()
    if url:
        check_answers(url)
        return None
    if mode() == "temporary":
        return None
    try:
        starting = start(prefect_home())
    except (OSError, ServerFailed) as exc:
        note(f"no local Prefect server ({exc}): this run uses a temporary one")
        return None
    if starting.new:  # said now: a run that stops early (a config mistake, Ctrl-C) leaves it running too
        note(f"starting a local Prefect server for this and later runs; its UI: {starting.server.ui} "
             "(grove server stop stops it)")  # fmt: skip
    return starting


def check_answers(url: str) -> None:
    """A configured API must answer: else every Prefect call would fail, with a traceback, after retries."""
    if answers(url, timeout=5):
        return
    raise UserError(
        "PREFECT_API_URL",
        f"no Prefect API answers at {url}",
        "start that server, or unset PREFECT_API_URL to use grove's local one",
    )


@contextlib.contextmanager
def serving(starting: Starting | None, note) -> Iterator[None]:
    """Point the Prefect client at the kept server for the run inside, once it answers."""
    if starting is None:
        yield
        return
    try:
        server = starting.ready()
    except ServerFailed as exc:
        note(f"{exc}: this run uses a temporary server")
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.url}):
        yield


HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def terminal_run() -> Iterator[None]:
    """A run in the user's terminal sends no flow-run heartbeats, unless the user configured them.

    Heartbeats feed Prefect's zombie-run automation for runs nobody watches (a worker's); a terminal run's
    crash is seen where it happens. Prefect's heartbeat thread sleeps in 1 s steps and is joined at the
    end of every run: about 0.6 s of a 3 s cached re-run. Deployed runs keep Prefect's default.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.settings.profiles import load_current_profile

    profile = {setting.name for setting in load_current_profile().settings}
    if any(name in os.environ or name in profile for name in HEARTBEAT_SETTINGS):
        yield
        return
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
