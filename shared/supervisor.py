"""One process supervisor for every place that runs Conveyor's processes: `conveyor up`
(Redis, workers, Flower), the worker launcher (one Celery worker per device), the tests and
the benchmarks. Standard library only.

Each child runs in its own session (unless its spec says otherwise), so a terminal's Ctrl-C
reaches only the supervisor, which then stops the children in reverse start order: SIGTERM to
the child's whole process group, SIGKILL after a grace period. On Linux each child also gets the parent-death signal
(SIGTERM when the supervising process dies, even by SIGKILL), so a hard-killed supervisor
leaves no orphans behind. A child marked ``restart`` is started again when it exits, with an
exponential back-off so a child that cannot start does not spin.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

log = logging.getLogger("conveyor.supervisor")

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


_PRCTL = _libc_prctl()


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def open_private_log(path: Path) -> IO[bytes]:
    """Open a log for appending, readable by its owner only (logs can hold job payloads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


@dataclass
class ChildSpec:
    """What to run, and how to treat it."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    log: Path | None = None  # stdout and stderr appended here (mode 0600); None: inherited
    # > 0: ``log`` is a rotating file of this many bytes (shared/log_format.OutputPump: a pipe read
    # by a thread here, ANSI codes and progress redraws removed, JSON lines in the json format).
    log_max_bytes: int = 0
    log_backups: int = 3
    log_format: str | None = None  # text or json; None: CONVEYOR_LOG_FORMAT
    restart: bool = False
    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL
    umask: int = -1  # e.g. 0o077: files the child creates are private to its owner; -1 inherits
    die_with_parent: bool = True
    # Its own session and process group (stopped as a group, deaf to the terminal's Ctrl-C); False
    # keeps it in ours, so a SIGKILL to our group (the tests' hard kill) reaches it too.
    new_session: bool = True
    # Stopped only once every other child has stopped (a broker the others still talk to as they stop).
    stop_last: bool = False
    # Liveness beyond "the process exists": called every ``health_interval_s`` once the child has
    # run ``health_grace_s``. False (e.g. a worker that stopped consuming while its queues hold
    # work) stops the child, SIGTERM then SIGKILL, and a ``restart`` child starts again.
    health: Callable[[Child], bool] | None = None
    health_interval_s: float = 10.0
    health_grace_s: float = 60.0


@dataclass
class Child:
    """A running (or exited) child process and its restart record."""

    spec: ChildSpec
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    next_start: float = 0.0  # monotonic time before which a restart waits (back-off)
    _log_file: IO[bytes] | None = None
    _terminated: bool = False
    _health_checked: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        """Signal the child's whole process group where it leads one, so its own children hear it too."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.spec.new_session:
                os.killpg(self.process.pid, signum)
            elif self.process.returncode is None:
                self.process.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM to the group, once: Celery reads a second SIGTERM as 'stop now'."""
        if self.alive() and not self._terminated:
            self._terminated = True
            self.signal_group(signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default: the spec's), then SIGKILL. Returns the exit code."""
        wait_s = self.spec.stop_timeout if timeout is None else timeout
        self.terminate()
        try:
            self.process.wait(max(0.0, wait_s))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.spec.name, wait_s)
        self.kill()  # the child if it is still there, and whatever it left in its group
        return self.process.returncode

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def spawn(spec: ChildSpec) -> Child:
    """Start one child as its spec says (own session, private umask, parent-death signal)."""
    pumped = spec.log is not None and spec.log_max_bytes > 0
    out = open_private_log(spec.log) if spec.log is not None and not pumped else None
    read_end, write_end = os.pipe() if pumped else (-1, -1)
    parent = os.getpid()
    try:
        process = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=write_end if pumped else out,
            stderr=subprocess.STDOUT if pumped or out is not None else None,
            start_new_session=spec.new_session,
            umask=spec.umask,
            preexec_fn=(lambda: _die_with_parent(parent)) if spec.die_with_parent else None,
        )
    except BaseException:
        if pumped:
            os.close(read_end)
        raise
    finally:
        if pumped:
            os.close(write_end)  # the child holds it now; EOF when it (and its children) exit
    if pumped:
        from shared.log_format import OutputPump, log_format

        assert spec.log is not None
        fmt = log_format(spec.log_format or (spec.env or os.environ).get("CONVEYOR_LOG_FORMAT"))
        OutputPump(read_end, spec.log, spec.name, fmt, spec.log_max_bytes, spec.log_backups).start()
    log.debug("started %s (pid %d)", spec.name, process.pid)
    return Child(spec, process, _log_file=out)


class Supervisor:
    """Children started together, restarted when they die (those marked ``restart``), stopped
    together in reverse order. Use from the main thread: the parent-death signal follows the
    thread that started a child."""

    def __init__(self, backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        self.children: list[Child] = []
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stopping = threading.Event()
        self._signals = 0
        self.on_restart: Callable[[Child], None] | None = None  # called after a child was restarted

    def start(self, spec: ChildSpec) -> Child:
        child = spawn(spec)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        for child in self.children:
            if child.spec.name == name:
                return child
        raise KeyError(name)

    def check(self) -> list[Child]:
        """Restart children that exited and may restart; return those that exited for good."""
        finished = []
        now = time.monotonic()
        for i, child in enumerate(self.children):
            if self.stopping.is_set():
                break
            if child.alive():
                self._check_health(child, now)
                continue
            if not child.spec.restart:
                finished.append(child)
                continue
            if child.next_start == 0.0:
                # A child that ran a while starts again at once; one that keeps dying waits longer.
                ran = now - child.started_at
                delay = 0.0 if ran > self.max_backoff_s else min(self.max_backoff_s, self.backoff_s * 2**child.restarts)
                child.next_start = now + delay
                log.warning(
                    "%s exited with %s; restarting%s",
                    child.spec.name, child.returncode, f" in {delay:.0f}s" if delay else "",
                )  # fmt: skip
            if now < child.next_start:
                continue
            child._close_log()
            fresh = spawn(child.spec)
            fresh.restarts = child.restarts + 1
            self.children[i] = fresh
            if self.on_restart is not None:
                self.on_restart(fresh)
        return finished

    def _check_health(self, child: Child, now: float) -> None:
        spec = child.spec
        if spec.health is None or now - child.started_at < spec.health_grace_s:
            return
        if now - child._health_checked < spec.health_interval_s:
            return
        child._health_checked = now
        try:
            healthy = spec.health(child)
        except Exception:  # a broken check must not take a working child down
            log.exception("health check of %s failed", spec.name)
            return
        if not healthy:
            log.warning("%s is running but unhealthy; stopping it%s", spec.name, " to restart it" * spec.restart)
            child.stop()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM ask for a stop; a second one makes the stop immediate (SIGKILL)."""

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            self._signals += 1
            self.stopping.set()
            if self._signals > 1:
                for child in self.children:
                    child.signal_group(signal.SIGKILL)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def run(self, poll_s: float = 0.2, stop_when: Callable[[], bool] | None = None) -> int:
        """Supervise until a signal, ``stop_when()``, or a child that may not restart exits;
        then stop everything. Returns 0, or the exit code of the child that ended the run."""
        code = 0
        while not self.stopping.is_set():
            for child in self.check():
                log.warning("%s exited with %s", child.spec.name, child.returncode)
                code = child.returncode or 1
                self.stopping.set()
            if stop_when is not None and stop_when():
                self.stopping.set()
            self.stopping.wait(poll_s)
        self.stop()
        return code

    def stop(self, timeout: float | None = None) -> None:
        """Stop every child: SIGTERM to all (the last started first), then wait for each within one
        shared grace period (``timeout``, or each spec's) and SIGKILL what is left. Children marked
        ``stop_last`` get their SIGTERM only after the others have stopped."""
        self.stopping.set()
        for last in (False, True):
            group = [child for child in reversed(self.children) if child.spec.stop_last == last]
            for child in group:
                child.terminate()
            start = time.monotonic()
            for child in group:
                grace = child.spec.stop_timeout if timeout is None else timeout
                child.stop(grace - (time.monotonic() - start))
