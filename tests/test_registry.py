"""The job-kind registry: every registered kind is reachable through every entrance derived from
it (names, the job union, results, the worker's dispatch, Celery's tasks, the runner, the CLI's
submit and schema, bulk scoring, the demo, metrics labels), so a forgotten table is a failing
test; and the five kinds that existed before it keep their wire contract byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from shared import kinds
from shared.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ALL = sorted(KINDS)


def test_the_five_kinds_before_the_registry_keep_their_names_and_schemas() -> None:
    contract = json.loads((FIXTURES / "release_contract.json").read_text())
    for name, task in contract["tasks"].items():
        assert kinds.TASKS[name] == task
    for name, queue in contract["queues"].items():
        assert kinds.QUEUES[name] == queue
    for name, queue in contract["bulk_queues"].items():
        assert kinds.BULK_QUEUES[name] == queue
    for name, schema in contract["job_schemas"].items():
        assert kinds.JOB_MODELS[name].model_json_schema() == schema, name
    for name, schema in contract["result_schemas"].items():
        assert kinds.RESULT_MODELS[name].model_json_schema() == schema, name


@pytest.mark.parametrize("name", ALL)
def test_every_kind_is_in_the_names_and_the_job_union(name: str) -> None:
    from shared import names

    spec = KINDS[name]
    assert names.TASKS[name] == spec.task and names.QUEUES[name] == spec.queue
    assert kinds.by_task(spec.task) is spec
    if spec.inference:
        assert spec.queue in names.INFERENCE_QUEUES and spec.queue in names.WORKER_INFERENCE_QUEUES
    else:
        assert spec.queue == names.TRAINING_QUEUE
    if spec.bulk_queue is not None:
        assert names.BULK_QUEUES[name] == spec.bulk_queue and spec.bulk_queue in names.WORKER_INFERENCE_QUEUES
    assert spec.queue in names.ALL_QUEUES
    assert spec.example, f"{name} declares no example job"
    job = kinds.parse_job({"type": name, **spec.example})
    assert type(job) is spec.job and job.type == name
    assert kinds.RESULT_MODELS[name] is spec.result


@pytest.mark.parametrize("name", ALL)
def test_every_kind_has_a_runner_its_worker_can_import(name: str) -> None:
    runner = kinds.import_path(KINDS[name].runner)
    if KINDS[name].inference:
        for attribute in ("job_type", "slow_prepare", "build_batcher", "prepare", "finish"):
            assert hasattr(runner, attribute), f"{KINDS[name].runner} lacks {attribute}"
        assert runner.job_type == name
    else:
        assert callable(runner)


@pytest.mark.parametrize("name", ALL)
def test_every_kind_is_a_celery_task_and_dispatched_by_the_ingest(name: str, conveyor_env: dict[str, str]) -> None:
    import workers.tasks  # noqa: F401 - registers the tasks, as the worker's include= does
    from shared.kinds import INFERENCE_TYPES, TRAINING_TYPES
    from workers.app import app
    from workers.ingest import Ingest, item_count, validate_job
    from workers.task_events import TaskEvents

    spec = KINDS[name]
    assert spec.task in app.tasks, f"no Celery task {spec.task}"
    client = redis.Redis.from_url(conveyor_env["CONVEYOR_REDIS_URL"])
    events = TaskEvents(app, "test@host", "none")
    ingest = Ingest(
        client, None, client, events, hostname="test@host",  # type: ignore[arg-type]
        queues=[spec.queue], bulk_queues=[], prefetch_items=8, result_ttl_s=60, time_limit_s=60, max_retries=0,
        retry_backoff_s=0.1, job_types=INFERENCE_TYPES if spec.inference else TRAINING_TYPES,
    )  # fmt: skip
    assert ingest._task_types[spec.task] == name
    job = validate_job(spec.job, dict(spec.example), "job-1")
    assert job.id == "job-1" and item_count(job) >= 1


@pytest.mark.parametrize("name", ALL)
def test_every_kind_has_a_submit_command_a_schema_and_a_demo(name: str, conveyor_env: dict[str, str]) -> None:
    spec = KINDS[name]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "producers.cli"]
    out = subprocess.run([*cli, "submit", name, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"submit {name}" in out.stdout
    out = subprocess.run([*cli, "schema", name], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == spec.job.model_json_schema()
    if spec.scoring is not None:
        out = subprocess.run([*cli, "score", name, "--help"], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        scoring = kinds.import_path(spec.scoring)
        assert scoring.job_type == name
    from producers.demo import demo_types

    assert name in demo_types(), f"the demo has no job of type {name}"


def test_last_releases_messages_are_served_unchanged(
    worker: Any, client: Any, conveyor_env: dict[str, str], prepared_models: Path
) -> None:
    """Raw list entries that the release before the registry wrote (its SDK and a stock Celery
    client), replayed as they were: each gets a final result on its id."""
    r = redis.Redis.from_url(conveyor_env["CONVEYOR_REDIS_URL"])
    entries = [json.loads(line) for line in (FIXTURES / "release_messages.jsonl").read_text().splitlines()]
    entries = [e for e in entries if KINDS[e["type"]].inference]  # the session's worker serves inference
    for e in entries:
        r.delete(f"celery-task-meta-{e['id']}", f"conveyor:job:{e['id']}", f"conveyor:deliveries:{e['id']}")
        r.lpush(e["list"], e["raw"].encode())
    from e2e_helpers import wait_for

    results = wait_for(r, [e["id"] for e in entries], timeout=120)
    for e in entries:
        meta = results[e["id"]]
        if e["type"] == "classify":
            assert meta["status"] == "SUCCESS", meta
            assert meta["result"]["results"][0]["labels"][0]["label"] in ("sports", "weather")
        else:  # a file or model the session does not have: the job's own clear error
            assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] in ("InvalidJob", "ModelNotFound"), meta
