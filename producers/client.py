"""The producer SDK: submit jobs, follow them, get typed results. A light client: Celery
and pydantic only, tasks sent by name, never an import of torch or the workers.

    client = Client()
    handle = client.submit(ClassifyJob(texts=["..."], labels=["sports", "finance"]))
    result = handle.result(timeout=30)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.result import AsyncResult
from pydantic import BaseModel

from producers.admission import QueueDepthGate
from producers.submit_claims import SubmitClaims
from shared.celery_config import celery_config, celery_priority
from shared.errors import JobFailed
from shared.jobs import JobBase
from shared.kinds import RESULT_MODELS, parse_job
from shared.names import CANCEL_KEY_PREFIX, QUEUES, TASKS, priority_lists
from shared.redis_clients import reuse_redis_clients
from shared.redis_connect import redis_client
from shared.results import Progress
from shared.settings import Settings

if TYPE_CHECKING:
    from producers.score.run import ScoreHandle

JobLike = JobBase | dict[str, Any]


@dataclass(frozen=True)
class JobStatus:
    id: str
    state: str  # PENDING (queued or unknown), STARTED, PROGRESS, SUCCESS, FAILURE, REVOKED, RETRY
    progress: Progress | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE", "REVOKED")


class JobHandle:
    def __init__(self, client: Client, job_id: str, job_type: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.type = job_type
        self._async = AsyncResult(job_id, app=client.app)

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, type={self.type!r})"

    def status(self) -> JobStatus:
        state = self._async.state
        info = self._async.info
        progress = Progress.model_validate(info) if state == "PROGRESS" and isinstance(info, dict) else None
        error = f"{type(info).__name__}: {info}" if state in ("FAILURE", "REVOKED") and info is not None else None
        return JobStatus(self.id, state, progress, error)

    def result_json(self, timeout: float | None = None) -> dict[str, Any]:
        """The raw result object; raises JobFailed (with the worker's error type and message)."""
        value = self._async.get(timeout=timeout, propagate=False, interval=0.05)
        if self._async.state != "SUCCESS":
            raise JobFailed(self.id, type(value).__name__ if value is not None else self._async.state, str(value))
        if not isinstance(value, dict):
            raise JobFailed(self.id, "BadResult", f"expected a JSON object, got {value!r}")
        return value

    def result(self, timeout: float | None = None) -> BaseModel:
        """The typed result (ClassifyResult, TranscribeResult, ...)."""
        value = self.result_json(timeout)
        model = RESULT_MODELS.get(str(value.get("type", self.type)))
        return model.model_validate(value) if model else _Untyped.model_validate(value)

    def cancel(self) -> None:
        self.client.cancel(self.id)

    def forget(self) -> None:
        self._async.forget()


class _Untyped(BaseModel, extra="allow"):
    pass


class Client:
    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        if redis_url:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        reuse_redis_clients()
        self.app = Celery("conveyor-producer", set_as_current=False)
        self.app.conf.update(celery_config(self.settings))
        self._redis: redis.Redis | None = None
        self._gate = QueueDepthGate(lambda: self.redis, self.settings.max_queue_depth)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    # -- submitting ------------------------------------------------------------------------
    def submit(self, job: JobLike, queue: str | None = None) -> JobHandle:
        return self.submit_many([job], queue=queue)[0]

    def submit_many(self, jobs: Iterable[JobLike], queue: str | None = None) -> list[JobHandle]:
        """Validate every job first (a bad one raises before anything is sent), then publish
        them all over one connection. ``queue``: another queue than the job type's own (bulk
        scoring sends to shared.names.BULK_QUEUES)."""
        parsed = [job if isinstance(job, JobBase) else parse_job(job) for job in jobs]
        targets = [queue or QUEUES[job.type] for job in parsed]
        self._gate.admit(Counter(targets))  # QueueFull before anything is claimed or sent
        claims = SubmitClaims(self.redis, self.settings)
        earlier = claims.claim_all(parsed)  # IdempotencyConflict / DuplicateJob, nothing sent
        handles: list[JobHandle] = []
        sent: list[str] = []
        try:
            self._publish(parsed, targets, earlier, handles, sent)
        except BaseException:
            claims.release(keep=sent)  # a retry of the unsent jobs must not find their keys taken
            raise
        return handles

    def _publish(
        self,
        parsed: list[JobBase],
        targets: list[str],
        earlier: list[str | None],
        handles: list[JobHandle],
        sent: list[str],
    ) -> None:
        with self.app.producer_or_acquire() as producer:
            for job, target, existing in zip(parsed, targets, earlier):
                if existing is not None:
                    handles.append(JobHandle(self, existing, job.type))
                    continue
                self.app.send_task(
                    TASKS[job.type],
                    args=[job.model_dump(mode="json")],
                    task_id=job.id,
                    queue=target,
                    priority=celery_priority(job.priority),
                    expires=job.deadline,
                    producer=producer,
                )
                sent.append(job.id)
                self._gate.sent(target)
                handles.append(JobHandle(self, job.id, job.type))

    def score(
        self,
        job_type: str,
        input: str | Path,
        out: str | Path,
        column: str,
        *,
        keep: list[str] | None = None,
        header: bool = True,
        quoting: bool = True,
        chunk_size: int | None = None,
        in_flight: int | None = None,
        overwrite: bool = False,
        **options: Any,
    ) -> ScoreHandle:
        """Score every row of a CSV, TSV, JSONL or Parquet file into ``out`` (format by extension),
        in the background; resumes the run beside ``out`` if one was interrupted. ``options`` are
        the job type's: classify labels/model/top_k/label_template, transcribe model/language/
        beam_size, recommend model/k/exclude_seen. Bad input, a missing column or an unknown model
        raise here, before anything is queued."""
        from producers.score.kinds import scoring
        from producers.score.run import ScoreHandle, ScoreRequest, ScoreRun
        from producers.tabular import TextOptions
        from shared.kinds import KINDS

        scorable = [name for name, spec in KINDS.items() if spec.scorable]
        if job_type not in scorable:
            raise ValueError(f"cannot score {job_type!r} jobs; one of {', '.join(scorable)}")
        request = ScoreRequest(
            Path(input), Path(out), column, keep, TextOptions(header, quoting), chunk_size, in_flight, overwrite
        )
        run = ScoreRun(self, scoring(job_type)(**options), request)
        run.prepare()
        return ScoreHandle(run, Path(out)).start()

    # -- following -------------------------------------------------------------------------
    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    def cancel(self, job_id: str) -> None:
        """Revoke a queued job and flag a running one; long jobs check the flag and stop."""
        self.redis.set(CANCEL_KEY_PREFIX + job_id, datetime.now(UTC).isoformat(), ex=self.settings.result_ttl_s)
        self.app.control.revoke(job_id)

    def queue_depths(self) -> dict[str, int]:
        depths: dict[str, int] = {}
        for queue in sorted(set(QUEUES.values())):
            # Celery on Redis keeps one list per priority step: "queue", then "queue" + sep + step.
            names = priority_lists(queue)
            pipe = self.redis.pipeline()
            for name in names:
                pipe.llen(name)
            depths[queue] = sum(pipe.execute())
        return depths

    def workers(self, timeout: float = 1.0) -> dict[str, Any]:
        """Live workers, with their active job count and queues."""
        inspect = self.app.control.inspect(timeout=timeout)
        stats = inspect.stats() or {}
        active = inspect.active() or {}
        queues = inspect.active_queues() or {}
        return {
            name: {
                "active": len(active.get(name, [])),
                "queues": [q["name"] for q in queues.get(name, [])],
                "concurrency": stats[name].get("pool", {}).get("max-concurrency"),
            }
            for name in sorted(stats)
        }

    def wait_for_workers(self, timeout: float = 120.0, queues: Sequence[str] = ()) -> list[str]:
        """Block until a worker answers (serving ``queues`` where given)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
            ready = [
                name for name, qs in replies.items() if not queues or set(queues) <= {q["name"] for q in qs}
            ]
            if ready:
                return sorted(ready)
            time.sleep(0.5)
        raise TimeoutError(f"no worker answered within {timeout:.0f}s")

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio front of ``Client``: the same calls, awaited, off the event loop's thread."""

    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        self.sync = Client(redis_url, settings)

    async def submit(self, job: JobLike) -> JobHandle:
        return await asyncio.to_thread(self.sync.submit, job)

    async def submit_many(self, jobs: Iterable[JobLike]) -> list[JobHandle]:
        return await asyncio.to_thread(self.sync.submit_many, list(jobs))

    async def result(self, handle: JobHandle, timeout: float | None = None) -> BaseModel:
        return await asyncio.to_thread(handle.result, timeout)

    async def status(self, handle: JobHandle) -> JobStatus:
        return await asyncio.to_thread(handle.status)

    async def cancel(self, job_id: str) -> None:
        await asyncio.to_thread(self.sync.cancel, job_id)
