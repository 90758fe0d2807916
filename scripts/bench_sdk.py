"""The SDK's waits, side by side, interleaved, repeated, against a private Redis whose records
Celery's own result backend writes:

- concurrent asyncio waits for N jobs that finish 1 s after the waits begin: the release's
  AsyncClient (``asyncio.to_thread`` over ``JobHandle.result``, the default thread pool) beside
  ``AsyncClient`` (redis.asyncio, one pub/sub listener): wall time until every wait is answered;
- N finished jobs collected by the sync client: ``handle.result()`` one after another beside
  ``Client.wait_all``: wall time and Redis commands (``INFO commandstats``) per job.

    .venv/bin/python scripts/bench_sdk.py [--rounds 3] [--n 12 200] [--collect 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producers.client import Client  # noqa: E402
from producers.local_redis import LocalRedis  # noqa: E402
from producers.sdk.async_client import AsyncClient  # noqa: E402
from shared.celery_config import celery_config  # noqa: E402
from shared.settings import Settings  # noqa: E402


def commands(r: redis.Redis) -> int:
    return sum(int(v["calls"]) for k, v in r.info("commandstats").items() if not k.endswith("_info"))


def finish_later(backend: Any, ids: list[str], after_s: float) -> threading.Thread:
    def write() -> None:
        time.sleep(after_s)
        for job_id in ids:
            backend.store_result(job_id, {"job_id": job_id, "type": "bench"}, "SUCCESS")

    thread = threading.Thread(target=write)
    thread.start()
    return thread


async def to_thread_waits(url: str, ids: list[str], timeout: float) -> None:
    client = Client(url)
    try:
        await asyncio.gather(*(asyncio.to_thread(client.job(i).result, timeout) for i in ids), return_exceptions=True)
    finally:
        client.close()


async def listener_waits(url: str, ids: list[str], timeout: float) -> None:
    async with AsyncClient(url) as client:
        await asyncio.gather(*(client.job(i).result(timeout=timeout) for i in ids), return_exceptions=True)


def concurrent(url: str, backend: Any, n: int, rounds: int) -> None:
    variants: dict[str, Callable[[str, list[str], float], Coroutine[Any, Any, None]]] = {
        "to_thread (release)": to_thread_waits,
        "AsyncClient (pub/sub)": listener_waits,
    }
    # (what the jobs do, when their records are written, the waits' timeout)
    cases = [("jobs done after 1 s", 1.0, 30.0), ("1 s waits, jobs not done", None, 1.0)]
    for case, done_after, timeout in cases:
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                ids = [str(uuid.uuid4()) for _ in range(n)]
                writer = finish_later(backend, ids, done_after) if done_after is not None else None
                start = time.monotonic()
                asyncio.run(run(url, ids, timeout))
                times[name].append(time.monotonic() - start)
                if writer is not None:
                    writer.join()
        for name, seconds in times.items():
            print(f"  {n:>4} concurrent waits, {case:<25} {name:<22}: {statistics.median(seconds):.2f} s")


def collect(url: str, backend: Any, r: redis.Redis, n: int, rounds: int) -> None:
    client = Client(url)
    results: dict[str, list[tuple[float, float]]] = {"result() in series": [], "wait_all": []}
    try:
        for _ in range(rounds):
            for name in results:
                ids = [str(uuid.uuid4()) for _ in range(n)]
                finish_later(backend, ids, 0.0).join()
                handles = [client.job(i) for i in ids]
                before, start = commands(r), time.monotonic()
                if name == "wait_all":
                    client.wait_all(handles, timeout=60)
                else:
                    for handle in handles:
                        handle.result(timeout=60)
                took = time.monotonic() - start
                results[name].append((took, (commands(r) - before - 1) / n))
    finally:
        client.close()
    for name, runs in results.items():
        took = statistics.median(t for t, _ in runs)
        per_job = statistics.median(c for _, c in runs)
        print(f"  {n} finished jobs, {name:<18}: {took:.3f} s, {per_job:.2f} Redis commands per job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, nargs="+", default=[12, 200])
    parser.add_argument("--collect", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        local = LocalRedis(Path(home), record_url=False)
        url = local.start()
        try:
            app = Celery("bench-writer", set_as_current=False)
            app.conf.update(celery_config(Settings(redis_url=url)))
            r = redis.Redis.from_url(url)
            for n in args.n:
                concurrent(url, app.backend, n, args.rounds)
            collect(url, app.backend, r, args.collect, args.rounds)
            r.close()
        finally:
            local.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
