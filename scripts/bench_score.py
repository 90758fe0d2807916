"""Bulk scoring benchmarks (`scripts/bench.py score ...` dispatches here), side by side on one
machine: a private Redis and a real Conveyor worker process, variants interleaved and repeated.

    .venv/bin/python scripts/bench_score.py throughput [--rounds 3] [--rows 5574]
    .venv/bin/python scripts/bench_score.py latency [--jobs 40]
    .venv/bin/python scripts/bench_score.py rss [--rows 1000000]
    .venv/bin/python scripts/bench_score.py all

throughput: rows/s of `Client.score("classify", ...)` over the SMS collection (the file itself:
TSV, no header, no quoting) against the raw runner's best batch throughput on the same texts
(`ClassifyRunner.run_batch` in this process, batch sizes swept first; the worker then runs with
the best one as CONVEYOR_MAX_BATCH_SIZE). Goal: score >= 0.9 x raw.

latency: p50 of single-text interactive classify jobs, one at a time, with idle workers and
while a bulk run keeps them busy. Goal: busy <= 2 x idle.

rss: peak resident memory of the `conveyor score recommend` CLI process on a generated file of
1,000,000 user ids, scored by a real worker on a tiny ALS model trained here. Goal: < 300 MB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMS = ROOT.parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection.tsv"

from producers.client import Client  # noqa: E402
from producers.local_redis import LocalRedis  # noqa: E402

LABELS = ["advertising or prize scam", "chat between friends"]
TEMPLATE = "This message is {}."


def sms_texts(rows: int) -> list[str]:
    with SMS.open(encoding="utf-8") as f:
        texts = [line.rstrip("\n").split("\t", 1)[1] for line in f]
    return texts[:rows]


@contextmanager
def stack(home: Path, batch_size: int, model_dir: Path | None = None) -> Iterator[Client]:
    """A private Redis and one inference worker process (CPU), as `conveyor up` would run them."""
    redis = LocalRedis(home)
    url = redis.start()
    env = dict(
        os.environ,
        CONVEYOR_REDIS_URL=url,
        CONVEYOR_HOME=str(home),
        CONVEYOR_MODEL_DIR=str(model_dir or home / "models"),
        CONVEYOR_MAX_BATCH_SIZE=str(batch_size),
        HF_HUB_OFFLINE="1",
    )
    os.environ.update({k: env[k] for k in ("CONVEYOR_REDIS_URL", "CONVEYOR_HOME", "CONVEYOR_MODEL_DIR",
                                           "CONVEYOR_MAX_BATCH_SIZE")})  # fmt: skip
    log = open(home / "worker.log", "ab")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.launch", "--devices", "cpu", "--only", "inference", "--loglevel", "warning",
         "--exit-with-parent"],
        env=env, stdout=log, stderr=log, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    client = Client()
    try:
        wait_ready(client)
        yield client
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        client.close()
        redis.stop()


def wait_ready(client: Client, timeout: float = 300.0) -> None:
    """Until one classify job comes back: the worker is up and its model loaded."""
    from shared.jobs import ClassifyJob

    client.submit(ClassifyJob(texts=["warm up"], labels=LABELS)).result(timeout=timeout)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- throughput -------------------------------------------------------------------------------
def raw_runner() -> Callable[[list[str], int], float]:
    """The worker's classify runner in this process: rows/s for given texts at a batch size."""
    from shared.model_store import ModelStore
    from workers.model_cache import ModelCache
    from workers.runners.classify import ClassifyItem, ClassifyRunner

    runner = ClassifyRunner(ModelStore(Path(tempfile.mkdtemp())), ModelCache(8 << 30))
    runner.warm_up()

    def run(texts: list[str], batch_size: int) -> float:
        items = [ClassifyItem(t, tuple(LABELS), None, None, TEMPLATE) for t in texts]  # run_batch tokenizes them
        started = time.perf_counter()
        for s in range(0, len(items), batch_size):
            runner.run_batch(items[s : s + batch_size])
        return len(items) / (time.perf_counter() - started)

    return run


def bench_throughput(args: argparse.Namespace) -> dict[str, float]:
    texts = sms_texts(args.rows)
    raw = raw_runner()
    sample = texts[: min(len(texts), 1000)]
    raw(sample[:64], 32)  # warm
    sweep = {b: raw(sample, b) for b in args.sizes}
    for b, rate in sweep.items():
        print(f"  raw sweep on {len(sample)} texts: batch {b}: {rate:.1f} rows/s", flush=True)
    best = max(sweep, key=lambda b: sweep[b])
    print(f"  best raw batch size {best}; the worker runs with CONVEYOR_MAX_BATCH_SIZE={best}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        source, column = SMS, "f1"  # the file itself: label TAB text, no header, no quoting
        if len(texts) < 5574:
            source, column = home / "sms.tsv", "f0"
            source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        with stack(home, best) as client:
            cpu = CpuMeter()

            def score() -> float:
                out = home / "scored.parquet"
                cpu.start()
                started = time.perf_counter()
                handle = client.score("classify", source, out, column, header=False, quoting=False, labels=LABELS,
                                      label_template=TEMPLATE, overwrite=True, in_flight=args.in_flight)  # fmt: skip
                summary = handle.wait()
                elapsed = time.perf_counter() - started
                cpu.stop(len(texts))
                assert summary.rows == len(texts) and summary.errors == 0, summary
                return len(texts) / elapsed

            def raw_all() -> float:
                cpu.start()
                rate = raw(texts, best)
                cpu.stop(len(texts))
                return rate

            results: dict[str, list[float]] = {"raw": [], "score": []}
            for r in range(args.rounds):
                order = ["raw", "score"] if r % 2 == 0 else ["score", "raw"]
                for name in order:
                    rate = raw_all() if name == "raw" else score()
                    results[name].append(rate)
                    print(f"  round {r + 1}: {name}: {rate:.1f} rows/s; CPU ms per row: {cpu.last}", flush=True)
    med = {name: statistics.median(v) for name, v in results.items()}
    ratio = med["score"] / med["raw"]
    print(f"throughput on {len(texts)} SMS rows, medians of {args.rounds} rounds: raw batch {best} "
          f"{med['raw']:.1f} rows/s, conveyor score {med['score']:.1f} rows/s, score/raw = {ratio:.2f} "
          f"(goal >= 0.9)", flush=True)  # fmt: skip
    return {"raw_rows_per_s": med["raw"], "score_rows_per_s": med["score"], "ratio": ratio}


class CpuMeter:
    """CPU milliseconds per row of this process (the producer, or the raw runner), and of the
    worker and Redis (this process's children)."""

    def __init__(self) -> None:
        import psutil

        me = psutil.Process()
        self.procs = {"this process": me}
        for child in me.children(recursive=True):
            cmd = " ".join(child.cmdline())
            name = "redis" if "redis" in cmd else "worker" if "celery" in cmd or "workers" in cmd else None
            if name:
                self.procs[f"{name} {child.pid}"] = child
        self.last = ""

    def _times(self) -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in self.procs.items()}

    def start(self) -> None:
        self._before = self._times()

    def stop(self, rows: int) -> None:
        after = self._times()
        used = {name: (after[name] - self._before[name]) * 1000.0 / rows for name in after}
        self.last = ", ".join(f"{name} {ms:.2f}" for name, ms in used.items() if ms >= 0.005)


# -- interactive latency during a bulk run ----------------------------------------------------
def bench_latency(args: argparse.Namespace) -> dict[str, float]:
    from shared.jobs import ClassifyJob

    texts = sms_texts(5574)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        source = home / "sms.tsv"
        source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        with stack(home, args.batch_size) as client:

            def latencies(n: int) -> list[float]:
                out = []
                for i in range(n):
                    started = time.perf_counter()
                    client.submit(ClassifyJob(texts=[texts[(i * 37) % len(texts)]], labels=LABELS)).result(timeout=120)
                    out.append((time.perf_counter() - started) * 1000.0)
                    time.sleep(0.05)
                return out

            latencies(5)  # warm
            idle, busy = [], []
            for r in range(args.rounds):
                idle += latencies(args.jobs)
                handle = client.score("classify", source, home / f"bulk{r}.parquet", "f0", header=False,
                                      quoting=False, labels=LABELS, label_template=TEMPLATE,
                                      in_flight=args.in_flight)  # fmt: skip
                while handle.progress is None or handle.progress.done < 200:
                    time.sleep(0.05)
                busy += latencies(args.jobs)
                rate = handle.progress.rows_per_s if handle.progress else 0.0
                handle.stop()
                try:
                    handle.wait(timeout=60)
                except Exception:  # stopped on purpose
                    pass
                print(f"  round {r + 1}: idle p50 {percentile(idle, 0.5):.1f} ms, busy p50 "
                      f"{percentile(busy, 0.5):.1f} ms (bulk at {rate:.0f} rows/s)", flush=True)  # fmt: skip
                drain(client)
    p50_idle, p50_busy = percentile(idle, 0.5), percentile(busy, 0.5)

    def spread(values: list[float]) -> str:
        return (
            ", ".join(f"p{int(q * 100)} {percentile(values, q):.1f}" for q in (0.5, 0.9, 0.99))
            + f", max {max(values):.1f}"
        )

    print(f"interactive classify latency (ms): idle {spread(idle)}; during a bulk run {spread(busy)}; "
          f"busy/idle p50 = {p50_busy / p50_idle:.2f} (goal <= 2)", flush=True)  # fmt: skip
    return {"idle_p50_ms": p50_idle, "busy_p50_ms": p50_busy, "ratio": p50_busy / p50_idle}


def drain(client: Client, timeout: float = 120.0) -> None:
    """Wait for the chunks a stopped run left queued, so the next idle round is idle."""
    from shared.names import BULK_QUEUES, priority_lists

    queue = BULK_QUEUES["classify"]
    names = priority_lists(queue)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        queued = sum(int(client.redis.llen(n)) for n in names) + int(client.redis.hlen("unacked"))
        if not queued:
            return
        time.sleep(0.2)


# -- peak CLI memory on a million rows --------------------------------------------------------
def bench_rss(args: argparse.Namespace) -> dict[str, float]:
    from shared.jobs import TrainJob
    from shared.model_store import ModelStore
    from workers.training.recommender import train_recommender

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        data = home / "interactions.csv"
        data.write_text("user,item\n" + "".join(f"u{u},i{(u * 7 + j) % 50}\n" for u in range(200) for j in range(6)))
        store = ModelStore(home / "models")
        os.environ["CONVEYOR_INPUT_ROOTS"] = str(home)  # the training file is read from here
        job = TrainJob(interactions_path=str(data), output_name="tiny", model_type="als", epochs=1)
        train_recommender(job, store, home / "ckpt", lambda p: None, lambda: False)
        users = home / "users.csv"
        with users.open("w") as f:
            f.write("row,user_id\n")
            f.writelines(f"{i},u{i % 400}\n" for i in range(args.million))  # half known, half fallback
        out = home / "recs.parquet"
        with stack(home, args.batch_size, store.root):
            env = dict(os.environ)
            started = time.perf_counter()
            peak_file = home / "peak.txt"
            env["BENCH_PEAK_FILE"] = str(peak_file)
            proc = subprocess.Popen(
                [sys.executable, "-c", PEAK_WRAPPER, "score", "recommend", str(users), "--model", "tiny", "--k", "5",
                 "--out", str(out), "--quiet"],
                env=env, cwd=ROOT, stderr=subprocess.PIPE,
            )  # fmt: skip
            samples: list[int] = []
            threading.Thread(target=_sample_rss, args=(proc.pid, samples), daemon=True).start()
            _, err_bytes = proc.communicate()
            elapsed = time.perf_counter() - started
            if proc.returncode != 0:
                raise SystemExit(f"conveyor score failed ({proc.returncode}): {err_bytes.decode()}")
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(out).metadata.num_rows
        peak_mb = int(peak_file.read_text()) / 1024  # VmHWM, kB
    print(f"peak RSS of `conveyor score recommend` on {rows:,} rows (k=5, tiny ALS model, real worker): "
          f"{peak_mb:.0f} MB (goal < 300 MB); {elapsed:.1f} s, {rows / elapsed:,.0f} rows/s; sampled RSS at "
          f"25/50/75%: {', '.join(f'{s / 2**20:.0f}' for s in _quartiles(samples))} MB", flush=True)  # fmt: skip
    return {"peak_rss_mb": peak_mb, "rows": rows, "rows_per_s": rows / elapsed}


# The CLI's own high-water mark (VmHWM), read as it exits. Not the rusage of a child: Linux keeps
# ru_maxrss across exec, so a child forked from this (model-holding) process would report our size.
PEAK_WRAPPER = """
import atexit, os, re, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(kb)
atexit.register(_peak)
sys.argv = ["conveyor", *sys.argv[1:]]
from producers.cli import main
main()
"""


def _sample_rss(pid: int, samples: list[int]) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        try:
            with open(f"/proc/{pid}/statm") as f:
                samples.append(int(f.read().split()[1]) * page)
        except (OSError, ValueError, IndexError):
            return
        time.sleep(0.5)


def _quartiles(samples: list[int]) -> list[int]:
    return [samples[int(q * (len(samples) - 1))] for q in (0.25, 0.5, 0.75)] if samples else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "latency", "rss", "all"], nargs="?", default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=5574, help="SMS rows for throughput")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64], help="raw batch sizes to sweep")
    parser.add_argument("--batch-size", type=int, default=32, help="CONVEYOR_MAX_BATCH_SIZE for latency and rss")
    parser.add_argument("--jobs", type=int, default=30, help="interactive jobs per latency round and state")
    parser.add_argument("--in-flight", type=int, default=None, help="chunks in flight (default: the job type's)")
    parser.add_argument("--million", type=int, default=1_000_000, help="rows for rss")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what in ("throughput", "all"):
        bench_throughput(args)
    if args.what in ("latency", "all"):
        bench_latency(args)
    if args.what in ("rss", "all"):
        bench_rss(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
