"""`conveyor demo`: one job of every job type that a live worker serves, results printed.

The training demos use small data sets generated here (so the demo needs no download);
the transcription demo uses a real speech recording shipped in the moonshine-voice wheel.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from producers.client import Client
from producers.models import preparing
from shared.errors import ConveyorError
from shared.jobs import ClassifyJob, FineTuneJob, JobBase, RecommendJob, TrainJob, TranscribeJob
from shared.kinds import KINDS
from shared.kinds.evaluate import EvaluateJob
from shared.model_store import ModelStore
from shared.names import TASKS
from shared.settings import Settings

TOPICS = {
    "sports": [
        "The striker scored twice in the second half", "The team won the championship final",
        "Our goalkeeper saved a penalty in extra time", "The marathon runner set a new course record",
        "The coach praised the defence after the match", "She served three aces in the tennis final",
        "The club signed a new midfielder this summer", "Fans cheered as the home side equalised",
    ],
    "cooking": [
        "Simmer the tomato sauce for twenty minutes", "Whisk the eggs with sugar until pale",
        "Roast the vegetables with olive oil and garlic", "Knead the bread dough and let it rise",
        "Season the soup with salt and fresh pepper", "Bake the cake until a skewer comes out clean",
        "Fry the onions slowly until golden brown", "Chop the herbs and sprinkle them over the pasta",
    ],
}  # fmt: skip


def demo_finetune_data(path: Path, seed: int = 0) -> Path:
    """A small labeled set: each topic sentence with a few variations."""
    rng = random.Random(seed)
    suffixes = ["", " today", " again", " last night", " this week", " as usual"]
    rows = [(s + rng.choice(suffixes), label) for label, sents in TOPICS.items() for s in sents for _ in range(3)]
    rng.shuffle(rows)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def demo_interactions(path: Path, users: int = 60, items: int = 40, seed: int = 0) -> Path:
    """Implicit feedback with structure: two user groups that prefer two halves of the catalogue."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "weight", "timestamp"])
        t = 0
        for u in range(users):
            liked = range(items // 2) if u % 2 == 0 else range(items // 2, items)
            for item in rng.sample(list(liked), 8) + rng.sample(range(items), 2):
                t += 1
                writer.writerow([f"u{u}", f"i{item}", 1, t])
    return path


def demo_audio() -> tuple[str, bytes] | None:
    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "assets", "beckett.wav")
    return (path.name, path.read_bytes()) if path.exists() else None


def _steps(work: Path) -> list[tuple[str, Callable[[], JobBase | None]]]:
    """The demo's jobs in order: the five kinds' own (files made here, training before the
    jobs that use its models), then every other registered kind's ``KindSpec.demo`` job."""
    steps: list[tuple[str, Callable[[], JobBase | None]]] = [
        ("classify", lambda: ClassifyJob(
            texts=["The striker scored twice in the final minutes.", "The central bank raised interest rates.",
                   "The new phone has a faster chip and a better camera."],
            labels=["sports", "finance", "technology"])),
        ("transcribe", lambda: _transcribe_job()),
        ("fine-tune", lambda: FineTuneJob(
            data_path=str(demo_finetune_data(work / "topics.csv")), output_name="demo-topics",
            epochs=2, batch_size=8, learning_rate=1e-4, validation_split=0.25)),
        ("classify", lambda: ClassifyJob(
            texts=["Grill the fish with lemon and butter", "The referee showed a red card"],
            model="demo-topics@latest")),
        ("evaluate", lambda: EvaluateJob(model="demo-topics@latest", data_path=str(work / "topics.csv"))),
        ("train", lambda: TrainJob(
            interactions_path=str(demo_interactions(work / "interactions.csv")), output_name="demo-recommender",
            factors=16, epochs=15, model_type="bpr", learning_rate=0.05, batch_size=256)),
        ("recommend", lambda: RecommendJob(users=["u0", "u1", "someone-new"], k=5, model="demo-recommender")),
    ]  # fmt: skip
    covered = {name for name, _ in steps}
    for name, spec in KINDS.items():
        if name not in covered and spec.demo is not None:
            steps.append((name, partial(spec.job.model_validate, spec.demo)))
    return steps


def demo_types() -> set[str]:
    """Every job type the demo runs a job of."""
    return {name for name, _ in _steps(Path("/nonexistent"))}


def run_demo(client: Client, settings: Settings, timeout: float = 600.0, kinds: set[str] | None = None) -> int:
    """The demo's jobs (of ``kinds`` only, when given). Built-in models it needs and the store
    lacks are built in the background from the start (producers.models.preparing); a job that
    needs one waits for it."""
    work = settings.home / "inputs" / "demo"  # under the workers' default input roots
    work.mkdir(parents=True, exist_ok=True)
    print("waiting for workers ...", flush=True)
    client.wait_for_workers(300, ["conveyor.classify"])
    registered = _registered_tasks(client)
    steps = [(t, build) for t, build in _steps(work) if kinds is None or t in kinds]
    needed = preparing.missing(ModelStore(settings.models_path), {t for t, _ in steps if TASKS[t] in registered})
    building = preparing.Preparation(settings, needed) if needed else None
    if building is not None:
        print(f"-- building {', '.join(needed)} in the background (conveyor models prepare; log: {building.log_path})")
    failures = 0
    try:
        for job_type, build in steps:
            if TASKS[job_type] not in registered:
                print(f"-- {job_type}: skipped (no live worker serves it)")
                continue
            job = build()
            if job is None:
                print(f"-- {job_type}: skipped (no demo audio: pip install moonshine-voice)")
                continue
            model = getattr(job, "model", None)
            if building is not None and model in needed:
                print(f"-- {job_type}: waiting for {model} to be built ...", flush=True)
                problem = building.wait_for(str(model))
                if problem is not None:
                    print(f"   failed: {problem}")
                    failures += 1
                    continue
            print(f"-- {job_type}: job {job.id}")
            try:
                result = client.submit(job).result_json(timeout=timeout)
            except (ConveyorError, TimeoutError) as exc:
                print(f"   failed: {exc}")
                failures += 1
                continue
            print(json.dumps(_summary(result)))
    finally:
        if building is not None:
            building.close()
    return 1 if failures else 0


def _transcribe_job() -> TranscribeJob | None:
    audio = demo_audio()
    if audio is None:
        return None
    return TranscribeJob(audio_b64=base64.b64encode(audio[1]))


def _registered_tasks(client: Client) -> set[str]:
    replies = client.app.control.inspect(timeout=2.0).registered() or {}
    return {task.split()[0] for tasks in replies.values() for task in tasks}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result, made short enough to read: best label per text, item ids per user."""
    out = dict(result)
    kind = out.get("type")
    if kind == "classify":
        out["results"] = [
            {"label": r["labels"][0]["label"], "score": round(r["labels"][0]["score"], 3)} for r in out["results"]
        ]
    elif kind == "recommend":
        out["results"] = [
            {"user": r["user"], "items": [i["item"] for i in r["items"]], "fallback": r["fallback"]}
            for r in out["results"]
        ]
    if isinstance(out.get("meta"), dict):
        meta = out.pop("meta")
        out["ran"] = {k: meta[k] for k in ("worker", "model", "batch_sizes", "run_ms") if k in meta}
    out.pop("extra", None)
    return out
