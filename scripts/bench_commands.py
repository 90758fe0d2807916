"""Redis commands per job on the fast path, counted by Redis itself (`INFO commandstats`, which
counts the commands a Lua script runs too): the ingest and result writer of this process
against a private Redis, with a runtime that answers at once, so only the path's own commands
are counted. Also what an idle worker costs Redis per second. `scripts/bench.py commands`
dispatches here.

    .venv/bin/python scripts/bench_commands.py [--n 2000] [--idle-s 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producers.local_redis import LocalRedis  # noqa: E402
from shared.jobs import JobBase  # noqa: E402
from shared.names import priority_lists  # noqa: E402
from workers.ingest import Ingest  # noqa: E402
from workers.task_events import TaskEvents  # noqa: E402


class InstantRuntime:
    """Answers every job at once: what is left is the path's own work."""

    def submit(
        self, jobs: Sequence[JobBase], done: Callable[[JobBase, Any], None], urgency: Any = None
    ) -> None:
        for job in jobs:
            done(job, {"job_id": job.id, "type": job.type, "results": [], "meta": {}})

    def cancel(self, job: JobBase) -> None:
        pass


def commandstats(r: redis.Redis) -> dict[str, int]:
    stats: Any = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def command_usec(r: redis.Redis) -> dict[str, float]:
    stats: Any = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}


def _redis_cpu(r: redis.Redis) -> float:
    info: Any = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="1-text classify jobs")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds of an idle ingest to count")
    parser.add_argument("--events", default="none", choices=["all", "failures", "none"])
    args = parser.parse_args(argv)
    server = LocalRedis(Path(tempfile.mkdtemp()), record_url=False)
    url = server.start()
    try:
        r = redis.Redis.from_url(url)
        app = Celery("bench", broker=url)
        for i in range(args.n):  # a pre-filled queue, as a stock Celery client fills it
            app.send_task("conveyor.classify", args=[{"texts": [f"text {i}"], "labels": ["a", "b"]}],
                          queue="conveyor.classify", priority=4)  # fmt: skip
        events = TaskEvents(app, "bench@host", args.events)
        ingest = Ingest(
            redis.Redis.from_url(url), InstantRuntime(), redis.Redis.from_url(url), events,  # type: ignore[arg-type]
            hostname="bench@host", queues=["conveyor.classify"], bulk_queues=[], prefetch_items=64,
            result_ttl_s=600, time_limit_s=600, max_retries=0, retry_backoff_s=0.1,
        )  # fmt: skip
        r.config_resetstat()
        redis_cpu = _redis_cpu(r)
        started, cpu = time.monotonic(), time.process_time()
        ingest.start()
        lists = priority_lists("conveyor.classify")
        while sum(int(r.llen(k)) for k in lists) or r.hlen("unacked") or ingest.held:
            time.sleep(0.01)
        drained, cpu = time.monotonic() - started, time.process_time() - cpu
        redis_cpu = _redis_cpu(r) - redis_cpu
        busy = commandstats(r)
        usec = command_usec(r)
        r.config_resetstat()
        time.sleep(args.idle_s)
        idle = commandstats(r)
        ingest.stop(timeout=5)
    finally:
        server.stop()
    ours = ("info", "config|resetstat", "config", "llen", "hlen")  # the counting loop's own
    total = sum(v for k, v in busy.items() if k not in ours)
    print(f"drained {args.n} jobs in {drained:.2f}s ({args.n / drained:.0f} jobs/s), "
          f"{cpu / args.n * 1000:.3f} ms of this process's CPU and {redis_cpu / args.n * 1000:.3f} ms of Redis's "
          "per job")
    print(f"Redis commands per job: {total / args.n:.2f}  (events: {args.events})")
    for name, calls in sorted(busy.items(), key=lambda kv: -kv[1]):
        if name not in ours:
            print(f"  {name:<16} {calls / args.n:6.2f} per job, {usec.get(name, 0) / args.n:7.2f} us of Redis per job")
    idle_total = sum(v for k, v in idle.items() if k not in ("info", "config|resetstat", "config"))
    print(f"idle ingest: {idle_total / args.idle_s:.0f} Redis commands/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
