"""A newcomer's first `augment run`: a brand-new PREFECT_HOME on a busy machine, and a Prefect API that is not there.

These run the real command in a subprocess with its own environment, as a user's shell would."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, descendants

TINY = str(ROOT / "configs" / "tiny.yaml")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no server, no profile of ours
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _run(tmp_path: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "run", TINY, "--output-dir", str(tmp_path / "out"),
           "--set", f"base.cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_first_run_on_a_new_prefect_home_completes_while_the_machine_is_busy(tmp_path):
    """Prefect's temporary server migrates a new database first (~18 s on a quiet 2-core machine): with Prefect's
    own 20 s limit the first run on a busy machine failed. One core is kept busy here for the whole run."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]  # another job on one of 2 cores
    try:
        done = _run(tmp_path, _env(PREFECT_HOME=str(tmp_path / "new-prefect-home")))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Timed out" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "dataset").is_dir() and (tmp_path / "new-prefect-home").is_dir()
    assert "View at http://127.0.0.1" not in done.stderr  # the temporary server has no UI and is gone after the run
    # standard error is a pipe here, as in a scheduler's log: each counted stage's progress is a log line, no bars
    for stage, unit in (("base pretraining", "step"), ("selection", "training"), ("fine-tuning", "step"),
                        ("generation", "sample"), ("evaluation", "training")):
        assert re.search(rf"{stage}: (\d+)/\1 {unit}s in \d+ s \(", done.stderr), (stage, done.stderr[-3000:])
    assert "\r" not in done.stderr and "it/s" not in done.stderr


def test_a_temporary_server_that_cannot_start_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "home-is-a-file").write_text("")  # Prefect cannot create its database under it
    done = _run(tmp_path, _env(PREFECT_HOME=str(tmp_path / "home-is-a-file")), timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
    assert err[0].startswith("error: Prefect's temporary API server exited") and "prefect server start" in err[0]
    assert "unable to open database file" in err[0]  # the cause, from the server's own log
    assert not (tmp_path / "out").exists()


def test_a_prefect_api_url_that_does_not_answer_is_one_line_and_writes_nothing(tmp_path):
    done = _run(tmp_path, _env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL="http://127.0.0.1:9/api"),
                timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
    assert "PREFECT_API_URL=http://127.0.0.1:9/api does not answer" in err[0]
    assert not (tmp_path / "out").exists()


FAKE_SERVER = """
import http.server, sys, time
time.sleep(float(sys.argv[2]))  # a slow first start (Prefect's migrates a new database)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _fake(tmp_path: Path, code: str, *args: str):
    import time

    from flows.server import TemporaryServer, _free_port

    said: list[str] = []
    server = TemporaryServer(say=said.append)
    server.port = _free_port()
    server.log = tmp_path / "server.log"
    (tmp_path / "fake.py").write_text(code)
    server.process = subprocess.Popen([sys.executable, str(tmp_path / "fake.py"), str(server.port), *args])
    server.started = time.monotonic()
    return server, said


def test_the_wait_for_a_slow_server_says_so_and_ends_when_it_answers(tmp_path, monkeypatch):
    import flows.server

    monkeypatch.setattr(flows.server, "REPORT_EVERY", 1.0)
    server, said = _fake(tmp_path, FAKE_SERVER, "3")
    try:
        server.wait(allowance=60)
        assert server.ready and len(said) >= 2 and "waiting for Prefect's temporary API server" in said[0]
    finally:
        server.stop()
    assert server.process is None


def test_the_wait_ends_at_once_when_the_server_dies_and_at_the_allowance(tmp_path):
    import time

    import pytest

    from flows.server import ServerError

    server, _ = _fake(tmp_path, "import sys; print('ValueError: bad setting', file=sys.stderr); sys.exit(3)")
    server.log.write_text("ValueError: bad setting\nApplication startup failed. Exiting.\n")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="exited with code 3 .*ValueError: bad setting"):
        server.wait(allowance=600)
    assert time.monotonic() - t0 < 30
    server, _ = _fake(tmp_path, FAKE_SERVER, "60")  # answers only after a minute
    try:
        with pytest.raises(ServerError, match="did not answer within 1 s"):
            server.wait(allowance=1)
    finally:
        server.stop()


def test_the_startup_allowance_is_generous_unless_the_user_sets_one(monkeypatch):
    from flows import server

    monkeypatch.setattr(server.TemporaryServer, "shared", classmethod(lambda cls, say: None))  # start nothing
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(server.TIMEOUT_ENV, raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert server.PrefectAPI().allowance == server.STARTUP_ALLOWANCE > 20  # Prefect's own limit is 20 s
        monkeypatch.setenv(server.TIMEOUT_ENV, "45")
        assert server.PrefectAPI().allowance == 45


class _Recorded:
    """A Popen stand-in: records how the server would have been started, starts nothing."""

    calls: list = []

    def __init__(self, cmd, **kwargs):
        _Recorded.calls.append(kwargs)
        self.pid = 0

    def poll(self):
        return 0


def test_the_server_log_is_a_new_private_file_that_no_planted_link_redirects(tmp_path, monkeypatch):
    """Its old name (<tmp>/augment-prefect-server-<pid>.log, opened "wb") truncated whatever a planted link pointed
    at; a killed run's log is swept by the next run; the server gets its own session, so Ctrl-C in a terminal does
    not kill it before augment has stopped."""
    import tempfile

    import flows.server
    from flows.server import TemporaryServer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(flows.server.subprocess, "Popen", _Recorded)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / f"augment-prefect-server-{os.getpid()}.log").symlink_to(victim)
    stale = tmp_path / f"augment-prefect-server-{dead}-x1y2.log"
    stale.write_text("a killed run's log")
    server = TemporaryServer(say=lambda s: None)
    server.start()
    server.process = None  # nothing to stop
    assert victim.read_text() == "precious" and not stale.exists()
    assert server.log.parent == tmp_path and not server.log.is_symlink()
    assert server.log.name.startswith(f"augment-prefect-server-{os.getpid()}-")
    assert (server.log.stat().st_mode & 0o777) == 0o600
    assert _Recorded.calls[-1]["start_new_session"] is True


def test_a_server_that_goes_away_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    """A user's Prefect server that stops during a run ended in ~140 lines of connection tracebacks."""
    import httpx

    import flows.cli
    from flows.cli import main

    def gone(cfg, wait):
        try:
            raise httpx.ConnectError("All connection attempts failed")
        except httpx.ConnectError as err:
            raise RuntimeError("Failed to set task run state") from err

    monkeypatch.setattr(flows.cli, "_run_flow", gone)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    code = main(["run", TINY, "--output-dir", str(tmp_path / "out"), "--set", f"base.cache_dir={tmp_path / 'c'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: the Prefect API at http://127.0.0.1:9/api stopped answering") and \
        "ConnectError" in err[0] and "run the same command to resume" in err[0]


@pytest.mark.slow
def test_a_temporary_server_killed_mid_run_is_started_again_and_the_run_finishes(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "run", TINY, "--output-dir", str(out),
           "--set", f"base.cache_dir={tmp_path / 'cache'}", "--set", "lora.max_train_steps=300"]
    proc = subprocess.Popen(cmd, env=_env(PREFECT_HOME=str(tmp_path / "home")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "finetune").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before fine-tuning"
        time.sleep(0.5)
    servers = [p for p in descendants(proc.pid) if _is_server(p)]
    assert len(servers) == 1
    os.kill(servers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Prefect's temporary API server stopped (exit code -9); starting it again" in err
    assert (out / "dataset" / "README.md").exists()


def _is_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return "prefect.server.api.server:create_app" in f.read()
    except OSError:
        return False
