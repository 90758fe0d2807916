"""The producer SDK: submit jobs, follow them, get typed results. A light client: Celery
and pydantic only, tasks sent by name, never an import of torch or the workers.

    client = Client()
    handle = client.submit(ClassifyJob(texts=["..."], labels=["sports", "finance"]))
    result = handle.result(timeout=30)
    results = client.wait_all(client.submit_many(jobs), timeout=60)   # or client.as_completed(...)

``AsyncClient`` (producers.sdk.async_client) is the asyncio SDK; it is importable from here too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.result import AsyncResult
from pydantic import BaseModel

from producers.admission import QueueDepthGate
from producers.sdk import outcomes
from producers.sdk.outcomes import JobStatus
from producers.submit_claims import SubmitClaims
from producers.tenancy.gate import TenantGate
from shared.celery_config import celery_config, celery_priority
from shared.errors import JobFailed
from shared.jobs import JobBase
from shared.kinds import parse_job
from shared.names import CANCEL_KEY_PREFIX, JOB_ID_KEY_PREFIX, QUEUES, TASKS, priority_lists
from shared.redis_clients import reuse_redis_clients
from shared.redis_connect import redis_client
from shared.replication import confirm_replicated
from shared.settings import Settings
from shared.tenant_keys import claim_key
from shared.tenants import tenant_of

if TYPE_CHECKING:
    from producers.score.run import ScoreHandle

JobLike = JobBase | dict[str, Any]


class JobHandle:
    def __init__(self, client: Client, job_id: str, job_type: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.type = job_type
        self._async = AsyncResult(job_id, app=client.app)
        self._ready: outcomes.Meta | None = None  # the finished record, once wait_all/as_completed read it

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, type={self.type!r})"

    def status(self) -> JobStatus:
        """PENDING both for a queued job and for an id nobody submitted (Celery keeps no record
        of either): ``exists()`` tells them apart. One GET; a record that does not decode reads
        as a FAILURE (BadResult), never an exception here."""
        raw = self.client.redis.get(self.client.app.backend.get_key_for_task(self.id))
        return outcomes.status_from_meta(
            self.id, None if raw is None else outcomes.decode(self.client.app.backend, raw)
        )

    def exists(self) -> bool:
        return self.client.exists(self.id)

    def result_json(self, timeout: float | None = None) -> dict[str, Any]:
        """The raw result object; raises JobFailed (with the worker's error type and message)."""
        if self._ready is not None:
            return outcomes.result_json(self.id, str(self._ready.get("status")), self._ready.get("result"))
        value = self._async.get(timeout=timeout, propagate=False, interval=0.05)
        return outcomes.result_json(self.id, self._async.state, value)

    def result(self, timeout: float | None = None) -> BaseModel:
        """The typed result (ClassifyResult, TranscribeResult, ...)."""
        return outcomes.typed(self.result_json(timeout), self.type, self.id)

    def cancel(self) -> None:
        self.client.cancel(self.id)

    def forget(self) -> None:
        self._async.forget()


class Client:
    def __init__(
        self, redis_url: str | None = None, settings: Settings | None = None, tenant: str | None = None
    ) -> None:
        self.settings = settings or Settings()
        if redis_url:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        # A tenant's jobs carry its prefix, claims and quotas (producers/tenancy/gate.py).
        self.tenant = tenant or self.settings.tenant
        self._tenant = TenantGate(lambda: self.redis, self.tenant, self.settings) if self.tenant else None
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
        if self._tenant is not None:
            parsed = [self._tenant.stamp(job) for job in parsed]
        targets = [queue or QUEUES[job.type] for job in parsed]
        self._gate.admit(Counter(targets))  # QueueFull before anything is claimed or sent
        claims = SubmitClaims(self.redis, self.settings)
        earlier = claims.claim_all(parsed)  # IdempotencyConflict / DuplicateJob, nothing sent
        fresh = [job.id for job, existing in zip(parsed, earlier) if existing is None]
        if self._tenant is not None:
            try:  # QuotaExceeded, nothing sent; else each job's submit claim is written
                self._tenant.admit([job for job, existing in zip(parsed, earlier) if existing is None])
            except BaseException:
                claims.release()
                raise
        handles: list[JobHandle] = []
        sent: list[str] = []
        try:
            self._publish(parsed, targets, earlier, handles, sent)
        except BaseException:
            claims.release(keep=sent)  # a retry of the unsent jobs must not find their keys taken
            if self._tenant is not None:
                self._tenant.release([i for i in fresh if i not in set(sent)])
            raise
        if sent:  # NotReplicated: queued on the master, not yet on enough replicas (CONVEYOR_WAIT_REPLICAS)
            confirm_replicated(
                self.redis, self.settings.wait_replicas, self.settings.wait_timeout_ms, f"{len(sent)} jobs"
            )
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
                    declare=[],  # routed by the queue's name; declaring (SADD bindings) is the workers' part
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

        if self._tenant is not None:  # (its chunk ids are its own, and it reads the queues and unacked)
            raise ValueError(
                "bulk scoring finds lost chunks by reading the bulk queue and kombu's unacked hash, which a "
                f"tenant's Redis user may not: run it without CONVEYOR_TENANT, as the admin (tenant {self.tenant!r})"
            )
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

    def exists(self, job_id: str) -> bool:
        """Whether Conveyor knows the job: it has a record in the result backend (started, in
        progress or finished, while results are kept), or a submit through this SDK recorded it
        (``producers.submit_claims``; a tenant's submit claim too). A job another Celery client
        sent is known once a worker records its state. GETs only (a tenant's producer role grants
        them): the small submit records first, the result record only when neither is there."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(JOB_ID_KEY_PREFIX + job_id)
        pipe.get(claim_key(job_id))
        if any(pipe.execute()):
            return True
        return self.redis.get(self.app.backend.get_key_for_task(job_id)) is not None

    def wait_all(
        self, handles: Iterable[JobHandle], timeout: float | None = None, *, return_exceptions: bool = False
    ) -> list[BaseModel | JobFailed]:
        """Every handle's typed result, in order, once all are done; one subscriber connection for
        all (producers/sdk/waiting.py). A failed job raises its JobFailed (the first in order), or
        is returned in its place with ``return_exceptions``; TimeoutError names what is unfinished."""
        from producers.sdk.waiting import wait_all

        return wait_all(self, list(handles), timeout, return_exceptions)

    def as_completed(self, handles: Iterable[JobHandle], timeout: float | None = None) -> Iterator[JobHandle]:
        """The handles as their jobs finish (``handle.result()`` then answers at once); TimeoutError
        when ``timeout`` passes first."""
        from producers.sdk.waiting import as_completed

        return as_completed(self, list(handles), timeout)

    def cancel(self, job_id: str) -> None:
        """Revoke a queued job and flag a running one; long jobs check the flag and stop."""
        if self._tenant is not None and tenant_of(job_id) != self.tenant:
            raise ValueError(f"job {job_id!r} is not tenant {self.tenant!r}'s")
        self.redis.set(CANCEL_KEY_PREFIX + job_id, datetime.now(UTC).isoformat(), ex=self.settings.result_ttl_s)
        if self._tenant is None:  # a tenant's user may not broadcast to workers: the flag alone cancels
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
            ready = [name for name, qs in replies.items() if not queues or set(queues) <= {q["name"] for q in qs}]
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


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":  # lazy: the asyncio SDK imports this module
        from producers.sdk.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(name)
