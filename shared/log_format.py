"""One logging setup for every process Conveyor runs (`conveyor up` and what it starts: the worker
launcher, each Celery worker, Flower, the exporter). Standard library only.

- ``CONVEYOR_LOG_FORMAT=text`` (default): ``TIME LEVEL PROCESS[PID] LOGGER: message key=value``.
- ``CONVEYOR_LOG_FORMAT=json``: one JSON object per line, for a log collector: ``time`` (UTC, ISO
  8601), ``level``, ``process``, ``pid``, ``worker``, ``logger``, ``event``, ``message``, and
  where known ``job_id``, ``kind``, ``queue``, ``error_type``, ``error``, ``duration_s``,
  ``traceback``. Never a job's payload: only the fields named here are written.

Job events carry ``event`` (``job_failed``, ``job_dead_lettered``, ``job_cancelled``,
``job_succeeded``); ``job_event`` writes one. Celery's own task records (``celery.app.trace``)
get the same fields from the context Celery attaches to them, and lose the return value.

Output that is not a log record (a child's prints, a crash's traceback, Flower's own lines) goes
through ``OutputPump`` into the child's file: ANSI codes and carriage-return progress redraws
removed, and in JSON mode wrapped as ``{"event": "output", "message": ...}``, so every line of
every file parses. Files rotate at ``CONVEYOR_LOG_MAX_MB`` with ``CONVEYOR_LOG_BACKUPS`` kept.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

LOG_FORMATS: Final = ("text", "json")
FORMAT_ENV: Final = "CONVEYOR_LOG_FORMAT"
MAX_MESSAGE_CHARS: Final = 4000
MAX_TRACEBACK_CHARS: Final = 16_000
# Fields a record may carry (``extra=``) that the formatters write; anything else stays out.
JOB_FIELDS: Final = ("event", "job_id", "kind", "queue", "error_type", "error", "duration_s", "retries", "reason")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTEXT: dict[str, str] = {"process": os.path.basename(sys.argv[0]) or "python", "worker": ""}


def clean(text: str) -> str:
    """No ANSI escapes, no carriage-return redraws (a progress bar's last state is kept)."""
    text = _ANSI.sub("", text)
    if "\r" in text:
        text = text.rstrip("\r").rsplit("\r", 1)[-1]
    return text


def log_format(value: str | None = None) -> str:
    fmt = (value or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    return fmt if fmt in LOG_FORMATS else "text"


def set_context(**values: str) -> None:
    """Process-wide fields of every record: ``process`` (its role), ``worker`` (Celery hostname)."""
    _CONTEXT.update({k: v for k, v in values.items() if v})


def _utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _celery_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The job fields of a Celery task record (celery.app.trace attaches its context as ``data``)."""
    data = getattr(record, "data", None)
    if not isinstance(data, Mapping) or "id" not in data:
        return {}
    name = str(data.get("name") or "")
    out: dict[str, Any] = {"job_id": str(data["id"]), "kind": name.removeprefix("conveyor.").replace("_", "-")}
    if "exc" in data:  # a failure: the exception's repr, e.g. "ModelNotFound('no model x')"
        exc = str(data["exc"])
        match = re.match(r"([A-Za-z_][\w.]*)\((.*)\)$", exc, re.S)
        error_type = match.group(1) if match else "Error"
        out.update(event="job_cancelled" if error_type == "JobCancelled" else "job_failed", error_type=error_type)
        out["error"] = (match.group(2) if match else exc).strip("'\"")
        record.msg, record.args = f"Task {name}[{data['id']}] {data.get('description') or 'failed'}", ()
    elif "runtime" in data:  # a success: keep the time, drop the return value
        out.update(event="job_succeeded", duration_s=round(float(data["runtime"]), 6))
        record.msg, record.args = f"Task {name}[{data['id']}] succeeded in {float(data['runtime']):.3f}s", ()
    return out


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out = {k: getattr(record, k) for k in JOB_FIELDS if getattr(record, k, None) is not None}
    if record.name.startswith("celery.app.trace"):
        out = {**_celery_fields(record), **out}
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        out: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "process": _CONTEXT["process"],
            "pid": record.process,
            "worker": _CONTEXT["worker"] or None,
            "logger": record.name,
            "event": fields.pop("event", "log"),
            "message": clean(record.getMessage())[:MAX_MESSAGE_CHARS],
            **fields,
        }
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            out.setdefault("error_type", type(exc).__name__)
            out.setdefault("error", clean(str(exc))[:MAX_MESSAGE_CHARS])
            out["traceback"] = clean(self.formatException(record.exc_info))[-MAX_TRACEBACK_CHARS:]
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        worker = f" {_CONTEXT['worker']}" if _CONTEXT["worker"] else ""
        line = (
            f"{_utc(record.created)} {record.levelname} {_CONTEXT['process']}[{record.process}]{worker} "
            f"{record.name}: {clean(record.getMessage())[:MAX_MESSAGE_CHARS]}" + (f" {extra}" if extra else "")
        )
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + clean(self.formatException(record.exc_info))[-MAX_TRACEBACK_CHARS:]
        return line


def formatter(fmt: str | None = None) -> logging.Formatter:
    return JsonFormatter() if log_format(fmt) == "json" else TextFormatter()


def configure_logging(
    process: str, level: int | str = logging.INFO, fmt: str | None = None, stream: IO[str] | None = None
) -> None:
    """Every record of this process to ``stream`` (standard error) in the chosen format; replaces
    whatever handlers the root logger had."""
    set_context(process=process)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def job_event(logger: logging.Logger, level: int, event: str, message: str, **fields: str | float | int | None) -> None:
    """One job's event as one record: ``job_event(log, WARNING, "job_failed", "...", job_id=..., kind=...)``."""
    logger.log(level, "%s", message, extra={"event": event, **{k: v for k, v in fields.items() if v is not None}})


class PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating log file created 0600 (logs may name job ids and errors)."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding="utf-8", errors="replace")


def rotating_file(path: Path, max_bytes: int, backups: int) -> PrivateRotatingFile:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = PrivateRotatingFile(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class OutputPump:
    """Reads a child's stdout and stderr (one pipe) line by line into its rotating file, cleaned;
    in JSON mode every line that is not already a JSON object is wrapped as one."""

    def __init__(self, fd: int, path: Path, process: str, fmt: str, max_bytes: int, backups: int) -> None:
        self.fd = fd
        self.process = process
        self.json = log_format(fmt) == "json"
        self.handler = rotating_file(path, max_bytes, backups)
        self.thread = threading.Thread(target=self._run, name=f"log-{process}", daemon=True)

    def start(self) -> OutputPump:
        self.thread.start()
        _PUMPS[:] = [p for p in _PUMPS if p.thread.is_alive()] + [self]
        return self

    def _run(self) -> None:
        try:
            with os.fdopen(self.fd, "rb", buffering=0) as pipe:
                pending = b""
                while chunk := pipe.read(65536):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self.write(line)
                    if len(pending) > MAX_TRACEBACK_CHARS:  # a line without an end (a bar redrawn with \r)
                        self.write(pending)
                        pending = b""
                if pending:
                    self.write(pending)
        finally:
            self.handler.close()

    def write(self, raw: bytes) -> None:
        """One line into the file; never raises (a pump that stopped reading would block its child
        on a full pipe): a line that cannot be written is dropped."""
        try:
            self._write(raw)
        except Exception:  # the child's progress matters more than one log line
            pass

    def _write(self, raw: bytes) -> None:
        text = clean(raw.decode("utf-8", "replace")).rstrip()
        if not text:
            return
        if self.json and not _is_json_object(text):
            text = json.dumps(
                {"time": _utc(time.time()), "level": "INFO", "process": self.process, "event": "output",
                 "message": text[:MAX_MESSAGE_CHARS]},
                ensure_ascii=False,
            )  # fmt: skip
        self.handler.emit(logging.makeLogRecord({"msg": text, "args": ()}))


_PUMPS: list[OutputPump] = []


def drain_pumps(timeout: float = 2.0) -> None:
    """Wait (up to ``timeout`` in all) for the pumps of children that have exited to write their
    last lines: a supervisor calls it after stopping its children, before it exits."""
    deadline = time.monotonic() + timeout
    for pump in list(_PUMPS):
        pump.thread.join(max(0.0, deadline - time.monotonic()))
        if not pump.thread.is_alive():
            _PUMPS.remove(pump)


def _is_json_object(text: str) -> bool:
    if not (text.startswith("{") and text.endswith("}")):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
