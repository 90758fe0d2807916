"""Redis Sentinel: what CONVEYOR_WAIT_REPLICAS costs a submit and a result write, and how long a
producer is refused at a failover. A real group (tests/sentinel_group.py: a master, two replicas,
three sentinels on loopback); variants interleaved and repeated in one run. No worker is needed:
the submit path and the writer's WAIT are measured alone. `scripts/bench.py sentinel` dispatches here.

    .venv/bin/python scripts/bench_sentinel.py [--n 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sentinel_group import SentinelGroup  # noqa: E402

from producers.client import Client  # noqa: E402
from shared.redis_connect import redis_client  # noqa: E402
from shared.replication import wait_for_replicas  # noqa: E402
from shared.settings import Settings  # noqa: E402


def _ms(values: list[float]) -> str:
    values = sorted(values)
    return f"p50 {statistics.median(values) * 1000:6.3f} ms  p90 {values[int(len(values) * 0.9)] * 1000:6.3f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="submits (and writes) per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    group = SentinelGroup(Path(tempfile.mkdtemp(prefix="conveyor-sentinel-"))).start()
    try:
        url = group.url()
        clients = {
            n: Client(settings=Settings(redis_url=url, wait_replicas=n, home=Path(tempfile.mkdtemp()))) for n in (0, 1)
        }
        raw = redis_client(Settings(redis_url=url))
        submit: dict[int, list[float]] = {0: [], 1: []}
        write: dict[str, list[float]] = {"SET": [], "SET + WAIT 1": []}
        job = {"type": "classify", "texts": ["a text"], "labels": ["a", "b"]}
        for c in clients.values():  # connections made, scripts loaded
            c.submit(job)
        for _ in range(args.rounds):
            for n in (0, 1) if _ % 2 == 0 else (1, 0):
                for _i in range(args.n):
                    started = time.perf_counter()
                    clients[n].submit(job)
                    submit[n].append(time.perf_counter() - started)
            for _i in range(args.n):
                started = time.perf_counter()
                raw.set("conveyor:bench:write", b"x", ex=60)
                write["SET"].append(time.perf_counter() - started)
                started = time.perf_counter()
                wait_for_replicas(raw, 1, 1000)
                write["SET + WAIT 1"].append(time.perf_counter() - started)
        print(f"submit of a 1-text job through sentinel:// ({args.rounds} x {args.n}, interleaved):")
        for n, values in submit.items():
            print(f"  CONVEYOR_WAIT_REPLICAS={n}: {_ms(values)}")
        ratio = statistics.median(submit[1]) / statistics.median(submit[0])
        print(f"  WAIT 1 / none: {ratio:.2f}x the p50")
        print("the writer's extra round trip after a batch of results (marker SET + WAIT), vs one plain SET:")
        for name, values in write.items():
            print(f"  {name:<13} {_ms(values)}")

        # A failover as a producer sees it: from the master's death to the first submit that returns.
        old = group.kill_master()
        killed = time.monotonic()
        refused = 0
        while True:
            try:
                clients[0].submit(job)
                break
            except Exception:
                refused += 1
                time.sleep(0.05)
        outage = time.monotonic() - killed
        print(f"failover: the master SIGKILLed, submits refused for {outage:.1f}s ({refused} tries), "
              f"sentinels named the new master after {group.wait_failover(old):.1f}s more")  # fmt: skip
    finally:
        group.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
