"""The HTTP gateway's cost at submit, beside the SDK's: the same tenant's jobs (stamp, quota and
claim in one round trip, then the publish) through ``Client(tenant=T).submit`` in this process and
through ``POST /v1/jobs/classify`` on a real gateway process (uvicorn), against one private Redis.
Variants are interleaved in every round; each round empties the queue first, so every variant
sees the same depth. No worker runs: only the submit path is measured. `scripts/bench.py gateway`
dispatches here.

    .venv/bin/python scripts/bench_gateway.py [--n 500] [--rounds 3] [--producers 4]

- one at a time: per-submit latency, p50 and p99 (the gateway's added latency is the difference);
- concurrent: jobs/s of ``--producers`` processes submitting at once, each one after another
  (SDK: a Client each, straight to Redis; gateway: an httpx client each, all through one gateway
  process). Separate processes, so the load generator's own Python does not share a GIL with
  what it measures (the machine's cores it does share).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producers.client import Client  # noqa: E402
from producers.gateway.keys import KeyStore  # noqa: E402
from producers.local_redis import LocalRedis, free_port  # noqa: E402
from shared.names import QUEUES, priority_lists  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.tenant_keys import queued_key  # noqa: E402

TENANT = "bench"
JOB = {"texts": ["The striker scored twice in the final."], "labels": ["sports", "finance"]}
# The tenant's default quotas would refuse a benchmark's rate: lifted for both variants alike.
LIFTED = {"CONVEYOR_TENANT_MAX_JOBS_PER_S": "10000000", "CONVEYOR_TENANT_MAX_QUEUED": "10000000"}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _empty(r: redis.Redis) -> None:
    r.delete(*priority_lists(QUEUES["classify"]), queued_key(TENANT))


def sdk_serial(client: Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        client.submit(dict(JOB, type="classify"))
        out.append(time.perf_counter() - t)
    return out


def gateway_serial(http: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = http.post("/v1/jobs/classify", json=JOB)
        out.append(time.perf_counter() - t)
        if r.status_code != 202:
            raise RuntimeError(f"gateway answered {r.status_code}: {r.text}")
    return out


def _producer(kind: str, target: str, key: str, n: int, ready: Any, go: Any, out: Any) -> None:
    """One producer process: ``n`` submits one after another, once every producer is ready."""
    if kind == "sdk":
        client = Client(settings=Settings(redis_url=target), tenant=TENANT)
        client.submit(dict(JOB, type="classify"))  # connected and warm before the clock starts

        def submit() -> None:
            client.submit(dict(JOB, type="classify"))
    else:
        http = httpx.Client(base_url=target, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        http.get("/healthz")

        def submit() -> None:
            if http.post("/v1/jobs/classify", json=JOB).status_code != 202:
                raise RuntimeError("the gateway refused a job")

    ready.put(1)
    go.wait()
    t0, cpu0 = time.time(), time.process_time()
    for _ in range(n):
        submit()
    out.put((t0, time.time(), time.process_time() - cpu0))


@dataclass
class Concurrent:
    jobs_per_s: float
    producer_cpu_ms: float  # per job, in the producer processes (SDK, or HTTP client)
    gateway_cpu_ms: float  # per job, in the gateway process (0 for the SDK)


def concurrent(kind: str, target: str, key: str, n: int, producers: int, gateway: int | None = None) -> Concurrent:
    """``producers`` processes submitting at once (``n`` in all): jobs/s from the first start to
    the last end, and CPU per job of the producers and of the gateway (its process, by psutil)."""
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_producer, args=(kind, target, key, n // producers, ready, go, out))
        for _ in range(producers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    served = psutil.Process(gateway) if gateway is not None else None
    before = sum(served.cpu_times()[:2]) if served else 0.0
    go.set()
    spans = [out.get(timeout=600) for _ in procs]
    after = sum(served.cpu_times()[:2]) if served else 0.0
    for p in procs:
        p.join(30)
    total = (n // producers) * producers
    wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    return Concurrent(total / wall, 1000 * sum(c for _, _, c in spans) / total, 1000 * (after - before) / total)


def start_gateway(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producers.gateway", "--port", str(port)], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the gateway did not answer; see {log}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="submits per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--producers", type=int, default=4, help="producer processes of the concurrent variants")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        server = LocalRedis(Path(home))
        url = server.start()
        env = {**os.environ, **LIFTED, "CONVEYOR_REDIS_URL": url, "CONVEYOR_HOME": home}
        env.update(CONVEYOR_GATEWAY_RATE_PER_S="1000000", CONVEYOR_GATEWAY_RATE_BURST="1000000")
        os.environ.update(LIFTED)
        r = redis.Redis.from_url(url)
        key = KeyStore(r).add("bench", TENANT)
        gateway, gateway_url = start_gateway(env, Path(home) / "gateway.log")
        client = Client(settings=Settings(redis_url=url, home=Path(home)), tenant=TENANT)
        http = httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        variants: dict[str, Callable[[], object]] = {
            "sdk serial": lambda: sdk_serial(client, args.n),
            "gateway serial": lambda: gateway_serial(http, args.n),
            "sdk concurrent": lambda: concurrent("sdk", url, key, args.n, args.producers),
            "gateway concurrent": lambda: concurrent("gateway", gateway_url, key, args.n, args.producers, gateway.pid),
        }
        results: dict[str, list[object]] = {name: [] for name in variants}
        try:
            sdk_serial(client, 50), gateway_serial(http, 50)  # warm both paths (connections, imports)
            for round_no in range(args.rounds):
                order = list(variants) if round_no % 2 == 0 else list(reversed(variants))
                for name in order:
                    _empty(r)
                    results[name].append(variants[name]())
                print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            http.close()
            client.close()
            gateway.terminate()
            gateway.wait(10)
            r.close()
            server.stop()
    report(results, args)
    return 0


def report(results: dict[str, list[object]], args: argparse.Namespace) -> None:
    def serial(name: str, q: float) -> float:
        runs: list[list[float]] = results[name]  # type: ignore[assignment]
        return statistics.median(percentile(run, q) * 1000 for run in runs)

    def conc(name: str, field: str) -> float:
        runs: list[Concurrent] = results[name]  # type: ignore[assignment]
        return statistics.median(getattr(run, field) for run in runs)

    print(f"\nsubmit path, {args.n} classify jobs per variant, medians of {args.rounds} interleaved rounds")
    print(f"| variant | p50 ms, one at a time | p99 ms | jobs/s, {args.producers} producer processes "
          "| producer CPU ms/job | gateway CPU ms/job |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for who in ("sdk", "gateway"):
        print(f"| {who} | {serial(f'{who} serial', 0.5):.2f} | {serial(f'{who} serial', 0.99):.2f} "
              f"| {conc(f'{who} concurrent', 'jobs_per_s'):.0f} | {conc(f'{who} concurrent', 'producer_cpu_ms'):.2f} "
              f"| {conc(f'{who} concurrent', 'gateway_cpu_ms'):.2f} |")  # fmt: skip
    gateway_cpu = conc("gateway concurrent", "gateway_cpu_ms")
    print(
        f"gateway adds {serial('gateway serial', 0.5) - serial('sdk serial', 0.5):.2f} ms at p50, "
        f"{serial('gateway serial', 0.99) - serial('sdk serial', 0.99):.2f} ms at p99; concurrent throughput "
        f"{conc('gateway concurrent', 'jobs_per_s') / conc('sdk concurrent', 'jobs_per_s'):.2f} x the SDK's; "
        f"one gateway process tops out near {1000 / gateway_cpu:.0f} jobs/s per core it gets"
    )


if __name__ == "__main__":
    sys.exit(main())
