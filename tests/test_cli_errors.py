"""Infrastructure failures in a real terminal: the `conveyor` command run in a pty against a Redis
that was stopped, a wrong password, URLs that are not Redis's, a server that never answers and
TLS to a plain server. Each prints two lines, no traceback, exits 5, quickly; --debug and
CONVEYOR_DEBUG=1 add the traceback."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producers.cli_errors import INFRA_EXIT_CODE, explain, redact
from producers.local_redis import LocalRedis

ROOT = Path(__file__).resolve().parents[1]

# Commands of every sub-app that talk to Redis (a sub-app added later is covered by the same root group).
COMMANDS = [
    ["status"],
    ["status", "some-job"],
    ["result", "some-job", "--wait", "--timeout", "3"],
    ["cancel", "some-job"],
    ["submit", "classify", "--text", "Snow tonight.", "--labels", "weather,sports"],
    ["submit", "ner", "--text", "Ines moved to Lisbon."],
    ["dlq", "list"],
    ["demo", "--timeout", "3"],
]


def in_pty(args: list[str], env: dict[str, str], timeout: float = 30.0) -> tuple[int, str, float]:
    """Run the CLI with a terminal as stdin, stdout and stderr; return its exit code, what it
    wrote and the seconds it took."""
    master, slave = pty.openpty()
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = start + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    try:
        code = proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"`conveyor {' '.join(args)}` ran past {timeout:.0f}s")
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"), time.monotonic() - start


@pytest.fixture(scope="module")
def stopped_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of a real Redis that was running and is stopped now (its port is free)."""
    server = LocalRedis(tmp_path_factory.mktemp("stopped-redis"), record_url=False)
    url = server.start()
    assert redis.Redis.from_url(url).ping()
    server.stop()
    return url


@pytest.fixture(scope="module")
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    sock.close()


def env_for(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return {**env, "CONVEYOR_REDIS_URL": url, "CONVEYOR_HOME": str(home), "TERM": "xterm", **extra}


def assert_two_lines(code: int, out: str, *needles: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == INFRA_EXIT_CODE, out
    assert "Traceback" not in out and len(lines) <= 2, out
    assert lines[0].startswith("error: "), out
    for needle in needles:
        assert needle in out, out


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_redis_stopped(args: list[str], stopped_url: str, tmp_path: Path) -> None:
    code, out, took = in_pty(args, env_for(stopped_url, tmp_path))
    assert_two_lines(code, out, "cannot reach Redis", "connection refused", "conveyor up")
    password = redis.connection.parse_url(stopped_url)["password"]
    assert password and password not in out  # the URL is shown without its password
    assert took < 5.0, took


def test_status_fails_fast(stopped_url: str, tmp_path: Path) -> None:
    """The issue's case: `conveyor status` with Redis down took 8.4 s and printed 200+ lines."""
    times = []
    for _ in range(3):
        code, out, took = in_pty(["status"], env_for(stopped_url, tmp_path))
        assert_two_lines(code, out, "cannot reach Redis")
        times.append(took)
    assert min(times) < 3.0, times


def test_wrong_password(redis_url: str, tmp_path: Path) -> None:
    wrong = redis_url.replace("://:", "://:not-the-password", 1)
    assert wrong != redis_url
    for args in (["status"], ["dlq", "list"], ["submit", "classify", "--text", "x", "--labels", "a,b"]):
        code, out, took = in_pty(args, env_for(wrong, tmp_path))
        assert_two_lines(code, out, "refused the login", "password")
        assert "not-the-password" not in out and took < 5.0


@pytest.mark.parametrize(
    "url, needle",
    [("http://127.0.0.1:8080/", "not a Redis URL (http://)"), ("amqp://guest@localhost//", "not a Redis URL (amqp://)"),
     ("localhost:6379", "not a Redis URL"), ("redis://127.0.0.1:notaport/0", "cannot be read")],
)  # fmt: skip
def test_bad_url(url: str, needle: str, tmp_path: Path) -> None:
    for args in (["status"], ["result", "x", "--wait", "--timeout", "3"], ["dlq", "list"]):
        code, out, took = in_pty(args, env_for(url, tmp_path))
        assert_two_lines(code, out, needle)
        assert took < 5.0


def test_silent_server_times_out(silent_url: str, tmp_path: Path) -> None:
    code, out, took = in_pty(["status"], env_for(silent_url, tmp_path))
    assert_two_lines(code, out, "did not answer in time")
    assert took < 10.0, took


def test_tls_to_a_plain_server(redis_url: str, tmp_path: Path) -> None:
    tls = redis_url.replace("redis://", "rediss://", 1)
    code, out, took = in_pty(["dlq", "list"], env_for(tls, tmp_path))
    assert_two_lines(code, out, "TLS")
    assert took < 10.0, took


def test_no_redis_configured(tmp_path: Path) -> None:
    env = env_for("", tmp_path)
    del env["CONVEYOR_REDIS_URL"]
    code, out, _ = in_pty(["status"], env)
    assert_two_lines(code, out, "no Redis to talk to", "conveyor up")


def test_debug_shows_the_traceback(stopped_url: str, tmp_path: Path) -> None:
    for args, extra in ((["--debug", "status"], {}), (["dlq", "list"], {"CONVEYOR_DEBUG": "1"})):
        code, out, _ = in_pty(args, env_for(stopped_url, tmp_path, **extra))
        assert code == INFRA_EXIT_CODE and "Traceback" in out and "cannot reach Redis" in out, out


def test_commands_without_redis_and_help_still_work(stopped_url: str, tmp_path: Path) -> None:
    env = env_for(stopped_url, tmp_path)
    for args in (["schema", "classify"], ["dlq", "list", "--help"], ["submit", "classify", "--help"], ["dlq"]):
        code, out, _ = in_pty(args, env)
        assert code in (0, 2) and "cannot reach Redis" not in out and "Traceback" not in out, (args, out)


def test_a_job_error_is_not_an_infrastructure_error(redis_url: str, tmp_path: Path) -> None:
    """With Redis up, job errors keep their own one-line messages and codes."""
    code, out, _ = in_pty(["submit", "classify", "--text", "x", "--labels", "only-one"], env_for(redis_url, tmp_path))
    assert code == 2 and "labels" in out and "Traceback" not in out, out
    code, out, _ = in_pty(["result", "never-submitted", "--wait", "--timeout", "1"], env_for(redis_url, tmp_path))
    assert code == 3 and "no result after" in out and "Traceback" not in out, out


def test_explain_reads_real_client_errors(stopped_url: str) -> None:
    """The translation of errors raised mid-command (after the preflight), on real exceptions."""
    with pytest.raises(redis.ConnectionError) as refused:
        redis.Redis.from_url(stopped_url, socket_connect_timeout=1).ping()
    problem = explain(refused.value, stopped_url)
    assert problem is not None and "cannot reach Redis" in problem.what
    assert explain(ValueError("a job's own problem")) is None
    assert explain(KeyError("No such transport: http")) is not None
    assert redact("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert "secret" not in redact("sentinel://:secret@a:26379;sentinel://:secret@b:26379")


def test_a_setting_that_does_not_parse(stopped_url: str, tmp_path: Path) -> None:
    for args in (["status"], ["up", "--devices", "cpu"], ["dlq", "list"]):
        code, out, took = in_pty(args, env_for(stopped_url, tmp_path, CONVEYOR_MAX_BATCH_SIZE="lots"))
        assert_two_lines(code, out, "CONVEYOR_MAX_BATCH_SIZE='lots' is not valid", "settings table")
        assert took < 5.0


def test_redis_lost_while_waiting(tmp_path: Path) -> None:
    """Past the preflight: Redis goes away while `result --wait` waits; the end names Redis, not the job."""
    import threading

    server = LocalRedis(tmp_path / "redis", record_url=False)
    url = server.start()
    threading.Timer(1.5, server.stop).start()
    code, out, took = in_pty(["result", "never-sent", "--wait", "--timeout", "4"], env_for(url, tmp_path))
    assert_two_lines(code, out, "cannot reach Redis")
    assert took < 12.0, took


def test_model_store_commands_need_no_redis_and_job_commands_do(stopped_url: str, tmp_path: Path) -> None:
    env = env_for(stopped_url, tmp_path, CONVEYOR_MODEL_DIR=str(tmp_path / "models"))
    code, out, _ = in_pty(["models"], env)
    assert code == 0 and "cannot reach Redis" not in out, out
    code, out, _ = in_pty(["models", "compress", "all-MiniLM-L6-v2"], env)
    assert_two_lines(code, out, "cannot reach Redis")
