"""What idle workers cost Redis, and what the wake-up costs a lone job: real `conveyor worker`
processes against a private Redis, counted by Redis itself (`INFO commandstats`, which counts the
commands a Lua script runs too). Variants run side by side in one run, interleaved and repeated:
``CONVEYOR_WAKEUP=notify`` (keyspace notifications wake an idle worker) and ``poll`` (the pull loop
looks at its queues every CONVEYOR_IDLE_POLL_MS, the behaviour before the wake-up landed).
`scripts/bench.py idle` dispatches here.

    .venv/bin/python scripts/bench_idle.py [--workers 1 2] [--idle-s 5] [--rounds 2] [--lone 40]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_commands  # noqa: E402

from producers.local_redis import LocalRedis  # noqa: E402
from shared.metrics_keys import FLUSHES_KEY  # noqa: E402

# The counting loop's own commands, not the workers'.
_OURS = ("info", "config|resetstat", "config|get", "config")


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {name: calls for name, calls in bench_commands.commandstats(r).items() if name not in _OURS}


def start_workers(url: str, home: Path, n: int, wakeup: str, only: str) -> list[subprocess.Popen[bytes]]:
    """One `conveyor worker` with ``n`` inference processes on the CPU (distinct Celery node names)."""
    env = dict(os.environ, CONVEYOR_REDIS_URL=url, CONVEYOR_HOME=str(home), CONVEYOR_WAKEUP=wakeup,
               CONVEYOR_INSTANCES_PER_DEVICE=str(n), HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")  # fmt: skip
    conveyor = str(Path(sys.executable).with_name("conveyor"))
    log = open(home / f"workers-{wakeup}.log", "ab")  # noqa: SIM115 - the child keeps it
    cmd = [conveyor, "worker", "--only", only, "--devices", "cpu"]
    return [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]


def wait_serving(r: redis.Redis, n: int, timeout: float = 300.0) -> None:
    """Until ``n`` worker processes flush their metrics (their ingest loops run by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(r.hlen(FLUSHES_KEY)) >= n:
            return
        time.sleep(0.5)
    raise SystemExit(f"{n} workers did not come up in {timeout:.0f}s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        os.killpg(p.pid, 15)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)


def lone_latencies(url: str, n: int) -> list[float]:
    """One 1-text classify job at a time, each after an idle gap, end to end (submit to result)."""
    from producers.client import Client

    client = Client(redis_url=url)
    client.submit({"type": "classify", "texts": ["warm up"], "labels": ["a", "b"]}).result(timeout=300)
    out = []
    for i in range(n):
        time.sleep(random.uniform(0.2, 0.4))  # long enough for the worker to settle into idle
        started = time.perf_counter()
        client.submit({"type": "classify", "texts": [f"a lone text {i}"], "labels": ["a", "b"]}).result(timeout=60)
        out.append(time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="idle worker counts to measure")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds of idleness counted per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lone", type=int, default=40, help="lone jobs per variant per round (0: skip latency)")
    parser.add_argument("--variants", nargs="+", default=["poll", "notify"], choices=["poll", "notify"])
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="conveyor-idle-"))
    server = LocalRedis(home / "redis", record_url=False)
    url = server.start()
    r = redis.Redis.from_url(url)
    idle: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    breakdown: dict[tuple[str, int], dict[str, int]] = {}
    lone: dict[str, list[float]] = {v: [] for v in args.variants}
    try:
        for _ in range(args.rounds):
            for variant in random.sample(args.variants, len(args.variants)):
                for n in args.workers:
                    procs = start_workers(url, home, n, variant, "inference")
                    try:
                        wait_serving(r, n)
                        time.sleep(3.0)  # start-up writes settle
                        r.config_resetstat()
                        cpu0 = bench_commands._redis_cpu(r)
                        time.sleep(args.idle_s)
                        stats = commandstats(r)
                        used = bench_commands._redis_cpu(r) - cpu0
                        idle.setdefault((variant, n), []).append(sum(stats.values()) / args.idle_s / n)
                        cpu.setdefault((variant, n), []).append(used / args.idle_s / n * 100)
                        breakdown[(variant, n)] = stats
                        if args.lone and n == args.workers[0]:
                            lone[variant] += lone_latencies(url, args.lone)
                    finally:
                        stop(procs)
                        r.delete(FLUSHES_KEY)
    finally:
        server.stop()
    print("Redis commands/s and Redis CPU per idle inference worker (median of rounds):")
    for (variant, n), values in sorted(idle.items()):
        print(f"  {variant:<7} {n} worker(s): {statistics.median(values):9.1f} commands/s per worker, "
              f"{statistics.median(cpu[(variant, n)]):5.2f} % of a Redis core per worker")  # fmt: skip
        top = sorted(breakdown[(variant, n)].items(), key=lambda kv: -kv[1])[:6]
        print("      " + ", ".join(f"{k} {v / args.idle_s:.1f}/s" for k, v in top))
    if args.lone:
        print("lone 1-text classify job, submit to result (ms):")
        for variant, values in lone.items():
            values = sorted(values)
            print(f"  {variant:<7} p50 {statistics.median(values) * 1000:6.2f}  "
                  f"p90 {values[int(len(values) * 0.9)] * 1000:6.2f}  (n={len(values)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
