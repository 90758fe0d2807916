"""The shared process supervisor, with real processes and real signals: restarts with back-off,
a stop that escalates to SIGKILL, a whole process group stopped, and no orphans when the
supervising process itself is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shared.supervisor import Child, ChildSpec, Supervisor, spawn

PY = sys.executable


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0:
            return True
        time.sleep(0.05)
    return False


def test_a_child_that_dies_is_restarted_and_one_that_keeps_dying_backs_off(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    supervisor = Supervisor(backoff_s=0.3, max_backoff_s=5.0)
    # Exits at once every time: restarted at 0.3 s, then 0.6 s, 1.2 s ... apart.
    supervisor.start(ChildSpec("flaky", [PY, "-c", f"open({str(runs)!r}, 'a').write('x')"], restart=True))
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        assert supervisor.check() == []  # a restartable child never ends the run
        time.sleep(0.02)
    supervisor.stop()
    count = len(runs.read_text())
    assert 3 <= count <= 5, count  # 0 s, 0.3, 0.9, 2.1: back-off, not a spin (a spin: hundreds)


def test_a_child_that_may_not_restart_ends_the_run_with_its_code() -> None:
    supervisor = Supervisor()
    supervisor.start(ChildSpec("sleeper", [PY, "-c", "import time; time.sleep(30)"]))
    supervisor.start(ChildSpec("failing", [PY, "-c", "raise SystemExit(7)"]))
    started = time.monotonic()
    assert supervisor.run(poll_s=0.05) == 7
    assert time.monotonic() - started < 5
    assert not supervisor.child("sleeper").alive()


def test_stop_kills_a_child_that_ignores_sigterm_and_its_whole_group(tmp_path: Path) -> None:
    grandchild_pid = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        g = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        open({str(grandchild_pid)!r}, "w").write(str(g.pid))
        time.sleep(60)
    """)  # noqa: E501
    child = spawn(ChildSpec("stubborn", [PY, "-c", script], stop_timeout=0.5))
    while not grandchild_pid.exists() or not grandchild_pid.read_text():
        time.sleep(0.05)
    started = time.monotonic()
    child.stop()
    assert time.monotonic() - started < 3
    assert child.returncode == -signal.SIGKILL
    assert _gone(int(grandchild_pid.read_text()), within=3)


def test_children_die_with_a_supervisor_killed_by_sigkill(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent_script = textwrap.dedent(f"""
        import time
        from shared.supervisor import ChildSpec, Supervisor
        s = Supervisor()
        c = s.start(ChildSpec("sleeper", [{PY!r}, "-c", "import time; time.sleep(60)"]))
        open({str(pid_file)!r}, "w").write(str(c.pid))
        time.sleep(60)
    """)
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([PY, "-c", parent_script], cwd=root)
    while not pid_file.exists() or not pid_file.read_text():
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    parent.kill()  # SIGKILL: no handler runs, only the kernel's parent-death signal can help
    parent.wait()
    assert _gone(child_pid, within=5), "the child outlived its SIGKILLed supervisor"


def test_a_child_log_is_private(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    child = spawn(ChildSpec("echo", [PY, "-c", "print('hello')"], log=log))
    child.process.wait(10)
    child.stop()
    assert log.read_text().strip() == "hello"
    assert log.stat().st_mode & 0o777 == 0o600


def test_an_alive_but_unhealthy_child_is_stopped_and_restarted(tmp_path: Path) -> None:
    checked: list[int] = []

    def healthy(child: Child) -> bool:
        checked.append(child.pid)
        return child.restarts > 0  # the first run "stopped consuming"; its replacement is fine

    supervisor = Supervisor()
    first = supervisor.start(
        ChildSpec("stuck", [PY, "-c", "import time; time.sleep(60)"], restart=True, stop_timeout=2,
                  health=healthy, health_interval_s=0.1, health_grace_s=0.2)
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while supervisor.child("stuck").restarts == 0 and time.monotonic() < deadline:
        supervisor.check()
        time.sleep(0.05)
    replacement = supervisor.child("stuck")
    try:
        assert replacement.restarts == 1 and replacement.alive()
        assert first.returncode == -signal.SIGTERM  # stopped on purpose, not crashed
        time.sleep(0.5)
        supervisor.check()
        assert supervisor.child("stuck") is replacement  # healthy now: left alone
        assert checked[0] == first.pid and replacement.pid in checked
    finally:
        supervisor.stop()
