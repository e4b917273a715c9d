"""The Prefect API an `augment run` talks to: the user's server (PREFECT_API_URL), or a temporary one of our own.

Prefect's own temporary ("ephemeral") server is started on the first API call and given 20 s
(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) to answer. On a new PREFECT_HOME it first migrates a new SQLite
database: 18 s on a quiet 2-core machine, more while another job runs, so a newcomer's very first run failed with a
40-line traceback. We start the same server process ourselves instead, as early as we can (while torch and the
pipeline import, on the other core), wait for it as long as it needs with a line every 15 s, fail at once with one
line if its process exits, and point Prefect at it through PREFECT_API_URL. Prefect then never starts its own.

Nothing here imports Prefect's server code: the server is a subprocess running the command Prefect itself runs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from augment import tempfiles
from augment.errors import UserError

# Long enough for a first start on a slow, busy machine; the user's own PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
# wins when set. The wait is never silent (a line every REPORT_EVERY seconds) and ends at once if the server dies.
STARTUP_ALLOWANCE = 600.0
REPORT_EVERY = 15.0
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
LOG_PREFIX = "augment-prefect-server-"  # the temporary server's log: <tmp>/augment-prefect-server-<pid>-<random>.log
HOW_TO_FIX = ("start a server yourself (`prefect server start`, in another terminal) and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api")


class ServerError(UserError, RuntimeError):
    """The Prefect API cannot be reached or started: a user-facing one-line error."""


def _health(api_url: str, timeout: float) -> bool:
    """True once the API answers at all (any HTTP status: Prefect Cloud's health needs a key, and answers 401)."""
    import httpx

    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except (httpx.TransportError, OSError):
        return False
    return True


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: the server gets SIGTERM when augment dies, even by SIGKILL, so no orphan keeps its port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class TemporaryServer:
    """Prefect's API server as a subprocess of this run, on a free local port; stopped when the process exits."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log: Path | None = None
        self.started = 0.0
        self.ready = False
        self._lock = threading.Lock()  # the watcher's restart and `stop` never interleave
        self._watched = False

    _running: "TemporaryServer | None" = None

    @classmethod
    def shared(cls, say: Callable[[str], None]) -> "TemporaryServer":
        """The server this process started for an earlier run, while it lives (runs in one process, as in tests or
        a notebook, share one, as Prefect's own temporary server does); else a new one, started."""
        server = cls._running
        if server is None or server.process is None or server.process.poll() is not None:
            server = cls._running = cls(say)
            server.start()
        server.say = say
        return server

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Launch the server process (returns at once; `wait` waits for it to answer)."""
        self.port = _free_port()
        self._launch()
        atexit.register(self.stop)

    def _launch(self) -> None:
        from prefect.settings import get_current_settings

        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               # as Prefect's own temporary server: no UI, ephemeral-mode services only
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        # a new private file (a predictable name could be a planted link); a killed run's old logs are swept
        fd, self.log = tempfiles.create(LOG_PREFIX, ".log")
        with open(fd, "wb") as log:
            # its own session: Ctrl-C in a terminal (SIGINT to the whole process group) stops augment, which then
            # stops the server; the server must not die first, or the interrupted run's last API calls retry for
            # minutes
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.started = time.monotonic()

    def keep_alive(self, allowance: float, every: float = 0.5) -> None:
        """Watch the server while the run uses it: one that dies (killed, out of memory) is started again on the
        same port and database, so the run's API calls, which Prefect retries for about a minute, reach it again
        instead of ending the run. A daemon thread; `stop` ends it."""
        if self._watched:
            return
        self._watched = True

        def watch() -> None:
            while True:
                time.sleep(every)
                with self._lock:
                    p = self.process
                    if p is None:
                        return
                    code = p.poll()
                    if code is None:
                        continue
                    self.say(f"Prefect's temporary API server stopped (exit code {code}); starting it again on "
                             f"port {self.port}")
                    with contextlib.suppress(OSError):
                        self.log.unlink()
                    self._launch()
                try:
                    self.wait(allowance)
                except ServerError as err:
                    self.say(str(err))
                    return

        threading.Thread(target=watch, daemon=True, name="augment-server-watch").start()

    def wait(self, allowance: float) -> None:
        """Block until the server answers; raise ServerError if its process exits or `allowance` seconds pass."""
        assert self.process is not None
        told = 0.0
        while True:
            waited = time.monotonic() - self.started
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"Prefect's temporary API server exited with code {code} before answering"
                                  f"{self._last_log_line()}. Fix: {HOW_TO_FIX}")
            if _health(self.api_url, timeout=2.0):
                self.ready = True
                return
            if waited > allowance:
                raise ServerError(f"Prefect's temporary API server did not answer within {allowance:.0f} s "
                                  f"({TIMEOUT_ENV} sets this limit). Fix: {HOW_TO_FIX}, or raise the limit")
            if waited - told >= REPORT_EVERY:
                told = waited
                self.say(f"waiting for Prefect's temporary API server ({waited:.0f} s; on a new PREFECT_HOME it "
                         "creates its database first)")
            time.sleep(0.1)

    def _last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, AttributeError):
            return ""
        if not lines:
            return ""
        # the exception that stopped it says more than uvicorn's closing "Application startup failed"
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
        return f" ({(errors or lines)[-1][:300]}; its log: {self.log})"

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after a short grace (SQLite keeps what it committed either way).
        Runs at interpreter exit, after Prefect's own exit hooks have sent their last logs and events."""
        with self._lock:
            p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.ready and self.log is not None:
            with contextlib.suppress(OSError):
                self.log.unlink()


class PrefectAPI:
    """Which API a run uses, decided before the heavy imports so that a temporary server starts beside them."""

    def __init__(self, say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        self.say = say
        self.user_url = str(settings.api.url) if settings.api.url else None
        self.server: TemporaryServer | None = None
        if self.user_url is None:
            if not settings.server.ephemeral.enabled:
                raise ServerError("PREFECT_API_URL is not set and Prefect's temporary server is turned off "
                                  f"(PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false). Fix: {HOW_TO_FIX}")
            self.server = TemporaryServer.shared(say)
        user_limit = os.environ.get(TIMEOUT_ENV) or (
            None if settings.server.ephemeral.startup_timeout_seconds == 20
            else settings.server.ephemeral.startup_timeout_seconds)
        try:
            self.allowance = float(user_limit) if user_limit else STARTUP_ALLOWANCE
        except ValueError:
            raise ServerError(f"{TIMEOUT_ENV}={user_limit!r} is not a number of seconds") from None

    @contextlib.contextmanager
    def active(self) -> Iterator[str]:
        """Wait until the API answers, then run the body with Prefect pointed at it (in this process, and in the
        worker processes it starts, through the environment)."""
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        if self.server is None:
            assert self.user_url is not None
            if not _health(self.user_url, timeout=10.0):
                raise ServerError(f"the Prefect server at PREFECT_API_URL={self.user_url} does not answer. Fix: start "
                                  "it (`prefect server start`), or unset PREFECT_API_URL and augment starts a "
                                  "temporary one")
            yield self.user_url
            return
        self.server.wait(self.allowance)
        self.server.keep_alive(self.allowance)
        url = self.server.api_url
        # no UI URL: the temporary server serves no UI and is gone after the run ("View at ..." would mislead)
        env = {"PREFECT_API_URL": url, "PREFECT_UI_URL": ""}
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with temporary_settings({PREFECT_API_URL: url, PREFECT_UI_URL: ""}):
                yield url
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
