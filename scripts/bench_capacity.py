"""Conveyor's capacity model, measured by Redis itself (INFO commandstats, stats, cpu): what one
job of each kind costs Redis (commands, bytes in and out, Redis CPU), split into the producer's
submit and the worker's side, for 1-item and many-item jobs; and the most jobs/s one Redis takes
from several producer processes and draining ingest processes (answering at once, so that Redis
and the Python around it, not a model, is the bound). `scripts/bench.py capacity` dispatches here.

    .venv/bin/python scripts/bench_capacity.py [--n 200] [--kinds classify sentiment ...] [--saturate 2 4]

Real workers (real models, CPU) serve the per-kind part, so results have their real sizes; the
models for sentiment and transcribe must be in the store (`conveyor models prepare`).
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producers.local_redis import LocalRedis  # noqa: E402
from shared.metrics_keys import FLUSHES_KEY  # noqa: E402

_OURS = ("info", "config|resetstat", "config|get", "config", "hlen")


def snapshot(r: redis.Redis) -> dict[str, float]:
    stats: Any = r.info("commandstats")
    info: Any = r.info()
    calls = sum(int(v["calls"]) for k, v in stats.items() if k.removeprefix("cmdstat_") not in _OURS)
    by_command = {k.removeprefix("cmdstat_"): float(v["calls"]) for k, v in stats.items()}
    return {
        **{"cmd:" + k: v for k, v in by_command.items() if k not in _OURS},
        "commands": float(calls),
        "in": float(info["total_net_input_bytes"]),
        "out": float(info["total_net_output_bytes"]),
        "cpu": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
    }


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in {*a, *b}}


def jobs_of(kind: str, items: int) -> dict[str, Any]:
    from producers.demo import demo_audio
    from shared.kinds import KINDS

    texts = [f"The weather in city {i} was sunny and the team won its match" for i in range(items)]
    if kind == "classify":
        return {"type": "classify", "texts": texts, "labels": ["sports", "weather", "finance"]}
    if kind in ("sentiment", "ner", "keywords"):
        return {"type": kind, "texts": texts}
    if kind == "transcribe":
        audio = demo_audio()
        assert audio is not None, "no demo audio (pip install moonshine-voice)"
        if items == 1:
            return {"type": "transcribe", "audio_b64": base64.b64encode(audio[1]).decode()}
        raise SystemExit("transcribe jobs hold one clip: use --items 1 for it")
    demo = dict(KINDS[kind].demo or {})
    field = KINDS[kind].items
    if field and isinstance(demo.get(field), list) and demo[field]:
        demo[field] = (demo[field] * items)[:items]
    return {"type": kind, **demo}


def per_kind(
    url: str, kinds: list[str], n: int, many: int
) -> list[tuple[str, int, dict[str, float], dict[str, float]]]:
    """For each kind and size: (kind, items, producer cost per job, worker cost per job)."""
    from producers.client import Client

    r = redis.Redis.from_url(url)
    client = Client(redis_url=url)
    rows = []
    for kind in kinds:
        for items in (1, many) if kind != "transcribe" else (1,):
            job = jobs_of(kind, items)
            count = n if items == 1 else max(20, n // 8)
            if kind == "transcribe":
                count = min(count, 20)
            client.submit(job).result(timeout=600)  # warm: the kind's model loaded
            # The producer alone: submits to a queue no worker serves (same payload, same path).
            r.config_resetstat()
            before = snapshot(r)
            for _ in range(count):
                client.submit(job, queue="conveyor.capacity-probe")
            producer = delta(before, snapshot(r))
            r.delete("conveyor.capacity-probe", *[f"conveyor.capacity-probe\x06\x16{p}" for p in range(10)])
            # Producer and worker: the same jobs, served.
            r.config_resetstat()
            before = snapshot(r)
            handles = [client.submit(job) for _ in range(count)]
            for h in handles:
                h.result_json(timeout=900)
            both = delta(before, snapshot(r))
            worker = {k: max(0.0, both[k] - producer.get(k, 0.0)) / count for k in both}
            rows.append((kind, items, {k: v / count for k, v in producer.items()}, worker))
            top = sorted(((k[4:], v) for k, v in worker.items() if k.startswith("cmd:")), key=lambda kv: -kv[1])[:6]
            print(f"  {kind:<15} {items:>3} items: producer {producer['commands'] / count:5.1f} cmds, "
                  f"worker {worker['commands']:6.1f} cmds ({', '.join(f'{k} {v:.1f}' for k, v in top)})",
                  flush=True)  # fmt: skip
    client.close()
    return rows


# -- saturation: several producer processes, several draining ingest processes -------------------
def _producer(url: str, seconds: float, out: Any) -> None:
    from producers.client import Client

    client = Client(redis_url=url)
    job = {"type": "classify", "texts": ["a short text to classify"], "labels": ["a", "b"]}
    end, sent = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        client.submit_many([job] * 16)
        sent += 16
    out.put(sent)


def _drainer(url: str, seconds: float, out: Any) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_commands import InstantRuntime
    from celery import Celery

    from workers.ingest import Ingest
    from workers.task_events import TaskEvents

    app = Celery("capacity", broker=url)
    ingest = Ingest(
        redis.Redis.from_url(url), InstantRuntime(), redis.Redis.from_url(url),  # type: ignore[arg-type]
        TaskEvents(app, f"drain{os.getpid()}@host", "none"), hostname=f"drain{os.getpid()}@host",
        queues=["conveyor.classify"], bulk_queues=[], prefetch_items=256, result_ttl_s=600, time_limit_s=600,
        max_retries=0, retry_backoff_s=0.1,
    )  # fmt: skip
    ingest.start()
    time.sleep(seconds)
    ingest.stop(timeout=5)
    out.put(0)


def saturate(url: str, procs: int, seconds: float) -> tuple[float, float]:
    """(jobs/s drained, Redis CPU % of a core) with ``procs`` producers and ``procs`` drainers."""
    r = redis.Redis.from_url(url)
    r.flushdb()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_drainer, args=(url, seconds + 4, out)) for _ in range(procs)]
    for p in workers:
        p.start()
    time.sleep(3.0)
    before, started = snapshot(r), time.monotonic()
    results0 = len(r.keys("celery-task-meta-*"))
    producers = [ctx.Process(target=_producer, args=(url, seconds, out)) for _ in range(procs)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    elapsed = time.monotonic() - started
    used = delta(before, snapshot(r))
    done = len(r.keys("celery-task-meta-*")) - results0
    for p in workers:
        p.join()
    return done / elapsed, used["cpu"] / elapsed * 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="1-item jobs per kind (many-item: n/8)")
    parser.add_argument("--many", type=int, default=32, help="items in a many-item job")
    parser.add_argument("--kinds", nargs="+", default=["classify", "sentiment", "ner", "keywords", "classify-image",
                                                       "transcribe"])  # fmt: skip
    parser.add_argument("--saturate", type=int, nargs="*", default=[1, 2], help="producer/drainer process counts")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--skip-kinds", action="store_true")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="conveyor-capacity-"))
    server = LocalRedis(home / "redis", record_url=False)
    url = server.start()
    try:
        if not args.skip_kinds:
            env = dict(os.environ, CONVEYOR_REDIS_URL=url, CONVEYOR_HOME=str(home), HF_HUB_OFFLINE="1",
                       OMP_WAIT_POLICY="PASSIVE")  # fmt: skip
            argv = [sys.executable, "-m", "workers.launch", "--devices", "cpu", "--only", "inference"]
            worker = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=open(home / "worker.log", "wb"),  # noqa: SIM115
                                      stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            r = redis.Redis.from_url(url)
            while int(r.hlen(FLUSHES_KEY)) < 1:
                time.sleep(0.5)
            print("per job, by kind (Redis's own counts):", flush=True)
            try:
                rows = per_kind(url, args.kinds, args.n, args.many)
            finally:
                os.killpg(worker.pid, 15)
                worker.wait(60)
            print()
            print("| kind | items | producer: commands, bytes in | worker: commands, bytes in, bytes out | "
                  "Redis CPU per job (both) |")  # fmt: skip
            print("|---|---|---|---|---|")
            for kind, items, prod, work in rows:
                print(f"| {kind} | {items} | {prod['commands']:.1f}, {prod['in']:.0f} B | {work['commands']:.1f}, "
                      f"{work['in']:.0f} B, {work['out'] + prod['out']:.0f} B | "
                      f"{(prod['cpu'] + work['cpu']) * 1e6:.0f} us |")  # fmt: skip
        for procs in args.saturate:
            rate, cpu = saturate(url, procs, args.seconds)
            print(f"saturation: {procs} producer + {procs} draining processes: {rate:,.0f} jobs/s, "
                  f"Redis at {cpu:.0f} % of a core", flush=True)  # fmt: skip
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
