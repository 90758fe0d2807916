"""Flower shows a training job's progress while it runs: a real Flower process (Conveyor's
flower_app), a real training worker, a real training job; Flower's own API is asked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ROOT, WorkerProcess, ml100k

from producers.client import Client
from shared.jobs import TrainJob
from shared.results import Progress, TrainingResult
from workers.long_jobs import PROGRESS_EVENT_EVERY_S, ProgressReporter, progress_line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def flower(conveyor_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "producers.flower_app", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        env=dict(conveyor_env, FLOWER_UNAUTHENTICATED_API="true"), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:  # listening, and so subscribed to events, before the job is sent
            try:
                get(url, "/api/workers")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, (tmp_path / "flower.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow  # loads real weights or trains
def test_flower_shows_a_running_training_jobs_epoch_step_loss_and_eta(
    flower: str, client: Client, conveyor_env: dict[str, str], conveyor_home: Path
) -> None:
    trainer = WorkerProcess(conveyor_env, conveyor_home / "flower-train-worker.log", ["--only", "training"])
    try:
        client.wait_for_workers(180, ["conveyor.training"])
        job = TrainJob(interactions_path=str(ml100k()), output_name="flower-progress", model_type="bpr",
                       factors=16, epochs=12, batch_size=1024, learning_rate=0.01)  # fmt: skip
        handle = client.submit(job)
        seen: dict[str, Any] = {}
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                info = get(flower, f"/api/task/info/{job.id}")
            except urllib.error.HTTPError:  # not seen by Flower yet
                info = {}
            if info.get("state") == "PROGRESS" and "epoch" in str(info.get("result")):
                seen = info
                break
            assert not handle.status().done, f"the job ended before Flower showed progress: {info}"
            time.sleep(0.3)
        # PROGRESS, not SUCCESS, in Flower: shown while the job ran (task-succeeded replaces it)
        assert seen, "Flower never showed the job's progress"
        shown = seen["result"]
        assert all(part in shown for part in ("epoch ", "/12", "step ", "items/s", "ETA ")), shown
        assert seen["name"] == "conveyor.train" and seen["worker"]
        result = handle.result(timeout=600)
        assert isinstance(result, TrainingResult) and result.epochs_run == 12
        end = time.monotonic() + 30
        while get(flower, f"/api/task/info/{job.id}").get("state") != "SUCCESS":  # the final event still wins
            assert time.monotonic() < end
            time.sleep(0.3)
    finally:
        trainer.stop()


def test_progress_events_are_bounded_in_rate_but_every_report_reaches_the_backend() -> None:
    """One piece alone: a burst of reports (short epochs each force one) is one event."""
    states: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    task = SimpleNamespace(
        request=SimpleNamespace(id="job-1"),
        app=SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=True)),
        update_state=lambda state, meta: states.append(meta),
        send_event=lambda type_, retry, **fields: events.append({"type": type_, **fields}),
    )
    report = ProgressReporter(task)
    for epoch in range(1, 51):
        report(Progress(epoch=epoch, epochs=50, step=10, steps=10, loss=0.5, items_per_s=1000.0, eta_s=3725.0))
    assert len(states) == 50 and len(events) == 1
    assert events[0]["type"] == "task-progress" and events[0]["progress"]["epoch"] == 1
    assert events[0]["result"] == "epoch 1/50, step 10/10, loss 0.5000, 1,000 items/s, ETA 1:02:05"
    time.sleep(PROGRESS_EVENT_EVERY_S)
    report(Progress(epoch=51, epochs=51, step=1, steps=10))
    assert len(events) == 2 and events[1]["result"] == "epoch 51/51, step 1/10"
    assert progress_line(Progress(epoch=1, epochs=1, step=0, steps=1, eta_s=0.4)).endswith("ETA 0:00:00")
