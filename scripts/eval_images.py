"""Top-1 and top-5 of classify-image on scikit-image's photographs, through the shipped decoder
and runner (workers.image_decode, workers.runners.classify_image); with --bench, images/s of
the runner against the raw model.

    .venv/bin/python scripts/eval_images.py [--json]
    .venv/bin/python scripts/eval_images.py --bench [--rounds 3] [--sizes 1,4,8,16,32]

The photographs ship in the scikit-image wheel (skimage/data; licences from its _fetchers.py:
chelsea and coffee CC0, camera CC0, rocket public domain (SpaceX), astronaut public domain
(NASA), motorcycle from the Middlebury stereo data set, horse CC0). ImageNet-1k has no class
for some subjects, so each photograph accepts the ImageNet classes that honestly name what it
shows, ImageNet-ReaL style (any object in view), and nothing looser:

  chelsea          a tabby cat                -> tabby, tiger cat, Egyptian cat (the three
                                                 domestic cat classes a tabby is labelled with)
  coffee           a cup of coffee, saucer    -> espresso, cup
  camera           a man filming on a tripod  -> tripod, reflex camera
  motorcycle_left  a motorcycle in a garage   -> moped, motor scooter (ImageNet-1k has no
  motorcycle_right   (same scene)                "motorcycle"; these are its nearest)
  rocket           a rocket on its pad        -> missile, projectile
  astronaut        an astronaut's portrait,   -> space shuttle (a model of one is in view;
                   holding her helmet            ImageNet-1k has no astronaut or spacesuit)

Reported apart, not scored (no photograph, or no honest class): horse (a black silhouette;
the only horse class is "sorrel", a colour), clock_motion (a motion-blurred clock face), coins,
hubble_deep_field.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ACCEPTED: Final[dict[str, frozenset[str]]] = {
    "chelsea.png": frozenset({"tabby", "tiger cat", "Egyptian cat"}),
    "coffee.png": frozenset({"espresso", "cup"}),
    "camera.png": frozenset({"tripod", "reflex camera"}),
    "motorcycle_left.png": frozenset({"moped", "motor scooter"}),
    "motorcycle_right.png": frozenset({"moped", "motor scooter"}),
    "rocket.jpg": frozenset({"missile", "projectile"}),
    "astronaut.png": frozenset({"space shuttle"}),
}
UNSCORED: Final = ("horse.png", "clock_motion.png", "coins.png", "hubble_deep_field.jpg")


@dataclass
class Row:
    image: str
    top5: list[tuple[str, float]]
    accepted: list[str] | None  # None: shown, not scored
    top1_hit: bool
    top5_hit: bool


def skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is not installed: pip install scikit-image (its data/ holds the photographs)")
    return Path(next(iter(spec.submodule_search_locations)), "data")


def _runner() -> Any:
    from shared.model_store import ModelStore
    from shared.settings import Settings
    from workers.model_cache import ModelCache
    from workers.runners.classify_image import ClassifyImageRunner

    return ClassifyImageRunner(ModelStore(Settings().models_path), ModelCache(1 << 30))


def evaluate(as_json: bool) -> dict[str, Any]:
    from shared.kinds.classify_image import ClassifyImageJob, ImageRef
    from workers.runners.classify_image import classify_images

    data = skimage_data()
    names = [*ACCEPTED, *UNSCORED]
    os.environ.setdefault("CONVEYOR_INPUT_ROOTS", str(data))  # the decoder reads only under input roots
    job = ClassifyImageJob(images=[ImageRef(path=str(data / n)) for n in names], top_k=5)
    (result,) = classify_images(_runner(), [job])
    if isinstance(result, Exception):
        raise SystemExit(f"classify-image failed: {result}")
    rows = []
    for name, entry in zip(names, result["results"]):
        top = [e["label"] for e in entry["labels"]]
        accepted = ACCEPTED.get(name)
        rows.append(
            Row(
                name,
                [(e["label"], e["score"]) for e in entry["labels"]],
                sorted(accepted) if accepted else None,
                accepted is not None and top[0] in accepted,
                accepted is not None and bool(accepted & set(top)),
            )
        )
    scored = [r for r in rows if r.accepted is not None]
    top1, top5 = sum(r.top1_hit for r in scored), sum(r.top5_hit for r in scored)
    summary = {"images": len(scored), "top1": top1 / len(scored), "top5": top5 / len(scored)}
    if as_json:
        print(json.dumps({"summary": summary, "rows": [asdict(r) for r in rows]}, indent=2))
        return summary
    for r in rows:
        mark = "  " if r.accepted is None else ("T1" if r.top1_hit else "T5" if r.top5_hit else "--")
        shown = ", ".join(f"{label} {score:.2f}" for label, score in r.top5)
        print(f"{mark} {r.image:22s} {shown}")
        if r.accepted is not None and not r.top1_hit:
            print(f"{'':26s}accepted: {', '.join(r.accepted)}")
    print(
        f"\ntop-1 {summary['top1']:.0%} ({top1}/{len(scored)}), top-5 {summary['top5']:.0%} ({top5}/{len(scored)}) "
        f"on the scored photographs; {len(UNSCORED)} more shown unscored"
    )
    return summary


def bench(rounds: int, sizes: list[int], seconds: float) -> None:
    """Images/s: the raw model (forward on a ready batch) vs the runner's run_batch (stack,
    forward, softmax, top-5, result dicts), each batch size, interleaved rounds; and the
    prepare step (decode + crop + resize + normalize) per image, which the worker runs in its
    prepare threads beside the model."""
    import torch

    from shared.kinds.classify_image import BUILTIN_IMAGE_MODEL
    from workers.image_decode import load_image_file
    from workers.runners.classify_image import ImageItem

    data = skimage_data()
    runner = _runner()
    runner.warm_up()
    model = runner.model(BUILTIN_IMAGE_MODEL).model
    photos = [load_image_file(data / n) for n in ACCEPTED]
    pixels = [photos[i % len(photos)] for i in range(max(sizes))]

    batches = {n: torch.stack(pixels[:n]).to(runner.device) for n in sizes}

    def raw(n: int) -> None:
        with torch.inference_mode():
            model(batches[n]).cpu()

    def through_runner(n: int) -> None:
        runner.run_batch([ImageItem(p, BUILTIN_IMAGE_MODEL, 5) for p in pixels[:n]])

    def prepare(n: int) -> None:
        for i in range(n):
            load_image_file(data / list(ACCEPTED)[i % len(ACCEPTED)])

    variants = {"raw model": raw, "runner": through_runner}
    results: dict[tuple[str, int], list[float]] = {}
    cpu_ms: dict[tuple[str, int], list[float]] = {}  # CPU time per image: steadier than wall time on a shared machine
    for r in range(rounds):
        order = list(variants.items()) if r % 2 == 0 else list(reversed(variants.items()))
        for size in sizes:
            for name, fn in order:
                fn(size)  # warm
                done, start, cpu = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - start < seconds:
                    fn(size)
                    done += size
                results.setdefault((name, size), []).append(done / (time.perf_counter() - start))
                cpu_ms.setdefault((name, size), []).append((time.process_time() - cpu) * 1000 / done)
    start = time.perf_counter()
    prepare(2 * len(ACCEPTED))
    prepare_rate = 2 * len(ACCEPTED) / (time.perf_counter() - start)
    print(
        f"images/s, medians of {rounds} interleaved rounds ({torch.get_num_threads()} torch threads, {runner.device})"
    )
    print(f"{'batch':>6} {'raw model':>10} {'runner':>10} {'ratio':>6}   CPU ms/image: raw, runner")

    def rate(name: str, size: int) -> float:
        return statistics.median(results[(name, size)])

    best = {name: max(sizes, key=partial(rate, name)) for name in variants}
    for size in sizes:
        raw_rate, run_rate = rate("raw model", size), rate("runner", size)
        raw_cpu, run_cpu = (statistics.median(cpu_ms[(n, size)]) for n in ("raw model", "runner"))
        print(
            f"{size:>6} {raw_rate:>10.1f} {run_rate:>10.1f} {run_rate / raw_rate:>6.2f}"
            f"   {raw_cpu:6.1f}, {run_cpu:6.1f}"
        )
    raw_best, run_best = rate("raw model", best["raw model"]), rate("runner", best["runner"])
    print(
        f"best: raw model {raw_best:.1f} (batch {best['raw model']}), runner {run_best:.1f} "
        f"(batch {best['runner']}): {run_best / raw_best:.2f} x"
    )
    print(f"prepare (decode, crop, resize, normalize), one thread: {prepare_rate:.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the rows and summary as JSON")
    parser.add_argument("--bench", action="store_true", help="images/s of the runner vs the raw model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,4,8,16,32", help="batch sizes for --bench")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement for --bench")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the workers run (workers/launch.py)
    if args.bench:
        bench(args.rounds, [int(s) for s in args.sizes.split(",")], args.seconds)
    else:
        evaluate(args.json)


if __name__ == "__main__":
    main()
