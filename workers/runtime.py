"""Per-process worker state: the device, the model store and cache, and one batcher per
inference job type. Built once, after the worker has started (never at import time)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from shared.errors import JobExpired
from shared.jobs import ClassifyJob, JobBase, RecommendJob, TranscribeJob
from shared.model_store import ModelStore
from shared.results import ClassifyResult, JobMeta, RecommendResult, TranscribeResult
from shared.settings import Settings
from workers.batcher import Batched, Batcher, BatchPolicy
from workers.model_cache import ModelCache

log = logging.getLogger(__name__)

DEVICE_ENV = "CONVEYOR_DEVICE"  # set by the launcher per worker process: cpu or cuda:0


def pick_device() -> str:
    import torch

    wanted = os.environ.get(DEVICE_ENV, "auto")
    if wanted == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return wanted


class Runtime:
    def __init__(self, settings: Settings, device: str | None = None) -> None:
        self.settings = settings
        self.device = device or pick_device()
        self.store = ModelStore(settings.models_path)
        self.cache = ModelCache(settings.model_cache_mb * 1024 * 1024)
        self.policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            token_budget=settings.token_budget,
        )
        self._batchers: dict[str, Batcher[Any, Any]] = {}
        self._lock = threading.Lock()

    def batcher(self, job_type: str, build: Callable[[], Batcher[Any, Any]]) -> Batcher[Any, Any]:
        with self._lock:
            if job_type not in self._batchers:
                self._batchers[job_type] = build().start()
            return self._batchers[job_type]

    def stop(self) -> None:
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.stop()

    # -- classify ------------------------------------------------------------------------
    def classify_batcher(self) -> Batcher[Any, Any]:
        def build() -> Batcher[Any, Any]:
            from workers.runners.classify import ClassifyRunner

            runner = ClassifyRunner(self.store, self.cache, self.device)
            runner.warm_up()
            return Batcher(runner.run_batch, self.policy, cost=runner.cost, name="classify-batcher")

        return self.batcher("classify", build)

    def classify(self, job: ClassifyJob, worker: str) -> ClassifyResult:
        from workers.runners.classify import EMBEDDER, ClassifyItem

        started = time.monotonic()
        picked_at = datetime.now(UTC)
        check_deadline(job)
        model_ref = None
        if job.model is not None:
            model_ref = self.store.resolve(job.model).ref  # fail fast, and pin @latest for the whole job
        labels = tuple(job.labels) if job.labels else None
        batcher = self.classify_batcher()
        items = [ClassifyItem(t, labels, model_ref, job.top_k, job.label_template) for t in job.texts]
        futures = batcher.submit_many(items)
        outs = wait_all(futures)
        return ClassifyResult(
            job_id=job.id,
            results=[o.value for o in outs],
            meta=self.meta(job, worker, model_ref or EMBEDDER, outs, started, picked_at),
        )

    # -- transcribe ----------------------------------------------------------------------
    def transcribe_batcher(self) -> Batcher[Any, Any]:
        def build() -> Batcher[Any, Any]:
            from workers.runners.transcribe import TranscribeRunner

            runner = TranscribeRunner(self.store, self.cache, self.device)
            # Each item is one 30 s window: the batch size bounds the windows per generate call.
            return Batcher(runner.run_batch, self.policy, cost=runner.cost, name="transcribe-batcher")

        return self.batcher("transcribe", build)

    def transcribe(self, job: TranscribeJob, worker: str) -> TranscribeResult:
        from workers.audio import SAMPLE_RATE, load_job_audio
        from workers.runners.transcribe import DecodeOptions, split_windows, stitch

        started = time.monotonic()
        picked_at = datetime.now(UTC)
        check_deadline(job)
        version = self.store.resolve(job.model)  # fail fast on an unknown model, before decoding audio
        options = replace(DecodeOptions.from_job(job), model=version.ref)  # @latest pinned for every window
        audio = load_job_audio(job)  # decoding happens in this task thread, in parallel with the model
        windows = split_windows(audio, options)
        outs = wait_all(self.transcribe_batcher().submit_many(windows))
        text, segments = stitch(windows, [o.value for o in outs])
        return TranscribeResult(
            job_id=job.id,
            text=text,
            duration_s=round(audio.numel() / SAMPLE_RATE, 3),
            language=outs[0].value.language,
            segments=segments if job.timestamps else None,
            meta=self.meta(job, worker, version.ref, outs, started, picked_at),
        )

    # -- recommend -----------------------------------------------------------------------
    def recommend_batcher(self) -> Batcher[Any, Any]:
        def build() -> Batcher[Any, Any]:
            from workers.runners.recommend import RecommendRunner

            runner = RecommendRunner(self.store, self.cache, self.device)
            # Users from many jobs share one matrix product; the batch is wider than for text.
            policy = BatchPolicy(max(self.policy.max_batch_size, 512), self.policy.max_wait_s, None)
            return Batcher(runner.run_batch, policy, cost=runner.cost, name="recommend-batcher")

        return self.batcher("recommend", build)

    def recommend(self, job: RecommendJob, worker: str) -> RecommendResult:
        from workers.runners.recommend import RecommendItem

        started = time.monotonic()
        picked_at = datetime.now(UTC)
        check_deadline(job)
        ref = self.store.resolve(job.model).ref  # pin @latest for the whole job
        candidates = tuple(job.candidates) if job.candidates else None
        items = [RecommendItem(ref, user, job.k, job.exclude_seen, candidates) for user in job.users]
        outs = wait_all(self.recommend_batcher().submit_many(items))
        return RecommendResult(
            job_id=job.id,
            results=[o.value for o in outs],
            meta=self.meta(job, worker, ref, outs, started, picked_at),
        )

    def meta(
        self, job: JobBase, worker: str, model: str, outs: list[Batched[Any]], started: float, picked_at: datetime
    ) -> JobMeta:
        return JobMeta(
            worker=worker,
            device=self.device,
            model=model,
            batch_sizes=[o.batch_size for o in outs],
            queue_ms=round((picked_at - job.submitted_at).total_seconds() * 1000.0, 3),
            run_ms=round((time.monotonic() - started) * 1000.0, 3),
        )


def wait_all(futures: list[Future[Batched[Any]]]) -> list[Batched[Any]]:
    """Every item's output; the first failure (in item order) fails the job."""
    outs = []
    for future in futures:
        outs.append(future.result())
    return outs


def check_deadline(job: JobBase) -> None:
    if job.deadline is not None and datetime.now(UTC) > job.deadline:
        raise JobExpired(f"job {job.id} passed its deadline {job.deadline.isoformat()} before it ran")
