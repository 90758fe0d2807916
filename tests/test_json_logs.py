"""Logs a collector can read: `conveyor up` with CONVEYOR_LOG_FORMAT=json, real workers, jobs that
fail in every way a job can (a missing model, an expired deadline, invalid text, a pickle
message, an unknown task, a training job on bad data), a cancelled one and good ones. Every
line of every process's file parses as a JSON object, no ANSI codes or progress redraws, every
failed job's id appears in exactly one failure event with its reason, and no payload appears."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.local_redis import free_port
from shared.log_format import JsonFormatter, TextFormatter, clean, job_event, set_context
from shared.supervisor import ChildSpec, spawn

ROOT = Path(__file__).resolve().parents[1]
SECRET = "PAYLOAD-" + uuid.uuid4().hex  # in every job's input: must never reach a log
FAILURE_EVENTS = ("job_failed", "job_dead_lettered")


def _message(task: str, args: list[Any], job_id: str, content_type: str = "application/json") -> bytes:
    """A Celery protocol-2 message as kombu lays it in Redis (the way another client's would arrive)."""
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": job_id, "retries": 0},
        "properties": {"delivery_info": {"exchange": "", "routing_key": "conveyor.classify"}, "priority": 4,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }).encode()  # fmt: skip


def _final(r: redis.Redis, job_id: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = r.get(f"celery-task-meta-{job_id}")
        if raw is not None and json.loads(raw)["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return dict(json.loads(raw))
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} has no final state after {timeout:.0f}s")


@pytest.mark.slow
def test_json_logs_of_a_whole_stack_with_failures_of_every_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_HOME=str(home), CONVEYOR_MODEL_DIR=str(tmp_path / "models"), CONVEYOR_LOG_FORMAT="json",
        CONVEYOR_METRICS_PORT=str(free_port()), CONVEYOR_INPUT_ROOTS=str(tmp_path), HF_HUB_OFFLINE="1",
        CONVEYOR_MAX_RETRIES="0",
    )  # fmt: skip
    up = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "up", "--devices", "cpu", "--no-flower"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    failed: dict[str, str] = {}  # job id -> the error type its result names
    try:
        end = time.monotonic() + 120
        while not (home / "up.ready").exists() and time.monotonic() < end and up.poll() is None:
            time.sleep(0.3)
        assert (home / "up.ready").exists(), up.communicate()[0] if up.poll() is not None else "not ready"
        # This process reads the stack's recorded URL (restored after the test: later tests use the session's).
        monkeypatch.delenv("CONVEYOR_REDIS_URL", raising=False)
        from producers.client import Client

        monkeypatch.setenv("CONVEYOR_HOME", str(home))
        sdk = Client()
        r = sdk.redis
        sdk.wait_for_workers(120, ["conveyor.classify"])
        texts = [f"{SECRET} the striker scored"]
        good = sdk.app.send_task("conveyor.classify", args=[{"texts": texts, "labels": ["sports", "money"]}],
                                 queue="conveyor.classify")  # fmt: skip
        _final(r, good.id, 90)  # the worker is warm
        del good  # AsyncResults unsubscribe when collected: before the client closes, not at exit

        jobs = {
            "missing model": sdk.app.send_task(
                "conveyor.classify", args=[{"texts": texts, "model": "no-such-model"}], queue="conveyor.classify"),
            "expired": sdk.app.send_task(
                "conveyor.classify", args=[{"texts": texts, "labels": ["a", "b"]}], queue="conveyor.classify",
                expires=datetime.now(UTC) - timedelta(minutes=1)),
            "bad text": sdk.app.send_task(
                "conveyor.classify", args=[{"texts": [SECRET + " \ud800"], "labels": ["a", "b"]}],
                queue="conveyor.classify"),
            "invalid job": sdk.app.send_task(
                "conveyor.classify", args=[{"texts": texts, "labels": ["only-one"]}], queue="conveyor.classify"),
        }  # fmt: skip
        ids = {name: handle.id for name, handle in jobs.items()}
        del jobs
        ids["pickle"], ids["unknown task"] = f"pickle-{uuid.uuid4()}", f"unknown-{uuid.uuid4()}"
        r.lpush("conveyor.classify", _message("conveyor.classify", [{"texts": texts}], ids["pickle"],
                                              content_type="application/x-python-serialize"))  # fmt: skip
        r.lpush("conveyor.classify", _message("conveyor.no_such_task", [{"texts": texts}], ids["unknown task"]))
        bad_data = tmp_path / "interactions.csv"
        bad_data.write_text(f"colour,shape\n{SECRET},round\n")  # no user and item columns
        ids["training"] = str(sdk.app.send_task(
            "conveyor.train", args=[{"type": "train", "interactions_path": str(bad_data), "output_name": "never"}],
            queue="conveyor.training",
        ).id)  # fmt: skip
        for name, job_id in ids.items():
            meta = _final(r, job_id, 120)
            assert meta["status"] == "FAILURE", (name, meta)
            failed[job_id] = meta["result"]["exc_type"]
        time.sleep(2.5)  # the pumps write as lines come; let the last ones land
        sdk.close()
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=120)
    assert up.returncode == 0, out[-3000:]

    logs = home / "logs"
    files = sorted(p.name for p in logs.iterdir())
    host = next(n for n in files if n.startswith("cpu@")).removeprefix("cpu@").removesuffix(".log")
    assert {"up.log", "workers.log", "exporter.log", f"cpu@{host}.log", f"train-cpu@{host}.log"} <= set(files), files
    events: list[dict[str, Any]] = []
    for path in logs.iterdir():
        text = path.read_text()
        assert "\x1b" not in text and "\r" not in text, path  # no colours, no redrawn bars
        assert SECRET not in text, f"a job's payload reached {path}"
        for n, line in enumerate(text.splitlines()):
            record = json.loads(line)  # every line of every file
            assert isinstance(record, dict) and {"time", "level", "process", "event"} <= record.keys(), (path, n)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
            events.append(record)

    failures = [e for e in events if e["event"] in FAILURE_EVENTS]
    for job_id, exc_type in failed.items():
        mine = [e for e in failures if e.get("job_id") == job_id]
        assert len(mine) == 1, (job_id, exc_type, mine)
        assert mine[0]["error"] and mine[0].get("kind") in ("classify", "train", None), mine
        # A message refused at intake (unreadable, or a made-up task) may name no kind; a failed job always does.
        assert mine[0].get("kind") is not None or mine[0]["event"] == "job_dead_lettered" or job_id == ids[
            "unknown task"], json.dumps(mine)  # fmt: skip
        assert mine[0]["error_type"] == exc_type or mine[0]["event"] == "job_dead_lettered", (exc_type, mine)
        assert mine[0]["level"] in ("WARNING", "ERROR", "INFO") and mine[0]["worker"], mine
    assert {e["job_id"] for e in failures} <= set(failed), "a job that did not fail was logged as failed"
    worker_records = [e for e in events if e.get("worker") == f"cpu@{host}"]
    assert any(e["message"].endswith("ready.") for e in worker_records)
    model_missing = next(e for e in failures if e.get("job_id") == ids["missing model"])
    assert model_missing["error_type"] == "ModelNotFound" and model_missing["duration_s"] is not None


def test_child_output_is_cleaned_wrapped_and_rotated(tmp_path: Path) -> None:
    """A real child's prints (colours, a carriage-return bar, a traceback) through OutputPump: JSON
    lines, no escapes, files bounded by rotation."""
    script = (
        "import sys\n"
        "for i in range(400):\n"
        "    print(f'\\x1b[31mline {i}\\x1b[0m ' + 'x' * 40)\n"
        "    sys.stdout.write(f'\\r{i}%|###   |\\r{i + 1}%|####  |\\n')\n"
        'print(\'{"event": "mine", "n": 1}\')\n'
        "raise SystemExit('bye')\n"
    )
    log = tmp_path / "logs" / "child.log"
    child = spawn(ChildSpec("child", [sys.executable, "-c", script], log=log, log_max_bytes=8_000, log_backups=2,
                            log_format="json"))  # fmt: skip
    assert child.process.wait(30) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "bye" not in log.read_text():
        time.sleep(0.05)
    rotated = sorted(log.parent.iterdir())
    assert [p.name for p in rotated] == ["child.log", "child.log.1", "child.log.2"]
    assert all(p.stat().st_size <= 8_000 + 600 for p in rotated) and oct(log.stat().st_mode)[-3:] == "600"
    lines = [json.loads(line) for p in reversed(rotated) for line in p.read_text().splitlines()]  # oldest first
    text = "".join(p.read_text() for p in rotated)
    assert "\x1b" not in text and "\r" not in text
    assert {"event": "mine", "n": 1} in lines  # a child's own JSON line stays as it is
    assert any(x.get("message") == "400%|####  |" for x in lines)  # a bar's last state, not its redraws
    assert lines[-1]["message"] == "bye" and lines[-1]["process"] == "child"


def test_formatters_write_only_the_named_fields() -> None:
    set_context(process="worker", worker="cpu@test")
    logger = logging.getLogger("conveyor.test")
    record = logger.makeRecord("conveyor.test", logging.WARNING, __file__, 1, "%s", ("job x failed",), None,
                               extra={"event": "job_failed", "job_id": "x", "kind": "ner", "error_type": "InvalidJob",
                                      "error": "texts.0 is blank", "payload": SECRET})  # fmt: skip
    out = json.loads(JsonFormatter().format(record))
    assert out["event"] == "job_failed" and out["job_id"] == "x" and out["worker"] == "cpu@test"
    assert SECRET not in json.dumps(out)
    assert "job_id=x" in TextFormatter().format(record) and SECRET not in TextFormatter().format(record)
    # Celery's own task records: the id and error lifted out, the return value dropped.
    context = {"name": "conveyor.train", "id": "t1", "runtime": 0.5, "return_value": SECRET}
    success = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"  # celery.app.trace.LOG_SUCCESS
    celery = logging.getLogger("celery.app.trace").makeRecord(
        "celery.app.trace", logging.INFO, __file__, 1, success, (context,), None, extra={"data": context}
    )
    line = JsonFormatter().format(celery)
    assert SECRET not in line and json.loads(line)["event"] == "job_succeeded" and json.loads(line)["kind"] == "train"
    for exc, event in (("InvalidJob('no user column')", "job_failed"), ("JobCancelled('stopped')", "job_cancelled")):
        failure = {"name": "conveyor.fine_tune", "id": "t2", "exc": exc, "description": "raised expected",
                   "args": SECRET}  # fmt: skip
        record = logging.getLogger("celery.app.trace").makeRecord(
            "celery.app.trace", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] %(description)s: %(exc)s",
            (failure,), None, extra={"data": failure},
        )  # fmt: skip
        out = json.loads(JsonFormatter().format(record))
        assert out["event"] == event and out["kind"] == "fine-tune" and out["job_id"] == "t2", out
        assert out["error_type"] == exc.split("(")[0] and out["error"] == exc.split("'")[1] and SECRET not in str(out)
    assert clean("\x1b[1mbold\x1b[0m 10%\r20%") == "20%"
    captured: list[logging.LogRecord] = []
    grab = logging.Handler()
    grab.emit = captured.append  # type: ignore[method-assign,assignment]
    logger.addHandler(grab)
    try:
        job_event(logger, logging.WARNING, "job_failed", "job y failed", job_id="y", kind=None)
    finally:
        logger.removeHandler(grab)
    assert captured[0].event == "job_failed" and captured[0].job_id == "y"  # type: ignore[attr-defined]
    assert not hasattr(captured[0], "kind")  # unknown fields are left out, not written as null


def test_a_retry_and_an_outcome_are_one_record_each(
    caplog: pytest.LogCaptureFixture, conveyor_env: dict[str, str]
) -> None:
    """The worker's hooks (workers/app.py) on the ingest's own objects: a retry is one job_retried
    record, a job failed after its retries one job_failed record with the dead letter's reason."""
    from types import SimpleNamespace

    from workers import app as worker_app
    from workers.envelope import Envelope
    from workers.result_writer import Outcome

    caplog.set_level(logging.INFO, logger="workers.app")
    worker_app._on_retry(SimpleNamespace(id="job-r1", job_type="classify", attempts=2))
    env = Envelope("{}", id="job-r1", task="conveyor.classify", queue="conveyor.classify")
    failed = Outcome(env, "FAILURE", ConnectionError("lost the device"), 0.25, dead_letter="failed after 3 retries")
    worker_app._on_outcome(None, failed)
    worker_app._on_outcome(None, Outcome(env, "SUCCESS", {"results": [SECRET]}, 0.1))  # success: not logged here
    records = [r for r in caplog.records if getattr(r, "job_id", None) == "job-r1"]
    assert [r.event for r in records] == ["job_retried", "job_failed"], records  # type: ignore[attr-defined]
    retried, dead = records
    assert retried.retries == 2 and retried.kind == "classify"  # type: ignore[attr-defined]
    assert dead.error_type == "ConnectionError" and dead.reason == "failed after 3 retries"  # type: ignore[attr-defined]
    assert dead.kind == "classify" and dead.duration_s == 0.25  # type: ignore[attr-defined]
    assert SECRET not in caplog.text
