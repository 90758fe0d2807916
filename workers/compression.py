"""compress jobs: a compressed version NAME@N+1 of a model, with what it costs measured against
its parent on the same CPU, the same data and in the same run.

int8 (``workers.quantization``): the new version keeps the parent's files (hard links: a
version never changes, so they share the disk blocks; a copy across file systems) and says
``"quantization": "int8-dynamic"``; workers quantize its Linear layers when they load it. The
job measures, in its metadata: memory of the weights fp32 vs int8, load time, the number of
layers quantized, on ``eval_path`` (when given) both versions' metrics with the kind's own
evaluation, their difference and the agreement of their answers, and CPU latency at batch 1
and at each one's best batch, the two versions' calls interleaved.

What int8 applies to is the serving kind's: its ``Evaluation.int8_refusal`` (recommenders: no
Linear layers), and at least ``MIN_LINEAR_SHARE`` of the weights in Linear layers
(EfficientNet's are convolutions); otherwise the job fails before it builds anything.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Final

import torch

from shared.errors import InvalidJob
from shared.kinds.compress import CompressJob
from shared.model_store import JOB_ID_KEY, METADATA_FILE, RESULT_KEY, ModelStore, ModelVersion
from workers.evaluation import (
    Evaluation,
    Labelled,
    Ticker,
    build_evaluation,
    evaluation_for,
    evaluation_record,
    predict_all,
    read_data,
    record_evaluation,
)
from workers.quantization import METHODS, QUANTIZATION_KEY, linear_share, module_bytes, quantize_int8
from workers.training.loop import ProgressFn, StopFn, TrainingOutcome

MIN_LINEAR_SHARE: Final = 0.3  # below it int8 dynamic saves little: most weights are not Linear
MIN_RUNS: Final = 3  # latency: calls per version and batch size, at least
# Metadata that describes how the parent was made, not the compressed version.
_NOT_INHERITED: Final = frozenset(
    {JOB_ID_KEY, RESULT_KEY, "version", "size_bytes", "created_at", "evaluations", "metrics", "baseline", "builtin"}
)
SAMPLE_TEXTS: Final = (
    "The striker scored twice in the second half.",
    "Whisk the eggs with sugar until pale, then fold in the flour.",
    "The central bank raised interest rates by a quarter point.",
    "WINNER!! Claim your free prize now, text CLAIM to 80082",
    "Ok see you at home later tonight",
    "The new phone has a faster chip, a brighter screen and a battery that lasts two days.",
    "Worst customer service ever: three hours on hold and nobody answered.",
    "The meeting is moved to Tuesday at 3pm in the small conference room.",
)


def compress(
    job: CompressJob,
    store: ModelStore,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
    device: str = "cpu",
) -> TrainingOutcome:
    """The training worker's entry for compress jobs (a ``Trainer``; short: nothing to checkpoint)."""
    parent = store.resolve(job.model)  # an alias or @latest is pinned here
    method = METHODS[job.method]
    if parent.metadata.get(QUANTIZATION_KEY):
        raise InvalidJob(f"{parent.ref} is already compressed ({parent.metadata[QUANTIZATION_KEY]})")
    spec = evaluation_for(parent, job.evaluate_as)
    evaluation = build_evaluation(spec, store, "cpu")  # int8 dynamic runs on CPUs: everything is measured there
    refusal = type(evaluation).int8_refusal
    if refusal is not None:
        raise InvalidJob(f"--method {job.method} does not apply to {parent.ref} ({parent.kind}): {refusal}")
    ticker = Ticker(progress, should_stop, 1, phases=4)
    ticker(0)
    weights = _measure_weights(evaluation, parent)
    if weights["linear_share"] < MIN_LINEAR_SHARE:
        raise InvalidJob(
            f"--method {job.method} does not apply to {parent.ref}: int8 dynamic quantizes Linear layers, which hold"
            f" {weights['linear_share']:.0%} of its weights (the rest are convolutions or embeddings)"
        )
    data = read_data(evaluation, job.eval_path, job, "eval_path") if job.eval_path else None

    built = store.staging()
    try:
        _link_tree(parent.path, built)
        meta: dict[str, Any] = {k: v for k, v in parent.metadata.items() if k not in _NOT_INHERITED}
        meta.setdefault("kind", parent.kind)
        meta.update({QUANTIZATION_KEY: method, "method": job.method, "compressed_from": parent.ref, JOB_ID_KEY: job.id})
        _write_json(built / METADATA_FILE, meta)  # the loaders read it from the directory: built is served as int8
        child = ModelVersion(job.output_name, None, built, meta)
        comparison = _compare(evaluation, parent, child, data, ticker) if data is not None else None
        ticker.next_phase()
        sample = data if data is not None else _samples(evaluation)
        latency = _latency(evaluation, parent, child, sample, job.latency_seconds, ticker)
        record: dict[str, Any] = {
            "method": job.method,
            "quantization": method,
            "evaluated_as": spec.name,
            "weights": weights,
            "disk_bytes": sum(p.stat().st_size for p in built.rglob("*") if p.is_file()),
            "comparison": comparison,
            "latency": latency,
            "measured_on": f"cpu, {torch.get_num_threads()} threads",
        }
        metrics = _flat_metrics(record)
        meta.update(compression=record, metrics=comparison["compressed"] if comparison else {})
        if comparison is not None and data is not None:
            meta["evaluations"] = [evaluation_record(spec, data, comparison["compressed"], str(job.eval_path), job.id)]
        meta[RESULT_KEY] = {"metrics": metrics, "epochs_run": 0, "resumed_from_epoch": 0, "extra": record}
        version = store.publish(job.output_name, built, meta)  # one version per job id
    except BaseException:
        store.discard(built)
        raise
    if comparison is not None and data is not None and parent.version is not None:
        record_evaluation(
            store, parent, evaluation_record(spec, data, comparison["parent"], str(job.eval_path), job.id)
        )
    return TrainingOutcome(version=version, metrics=metrics, epochs_run=0, resumed_from_epoch=0, extra=record)


def _measure_weights(evaluation: Evaluation, parent: ModelVersion) -> dict[str, Any]:
    started = time.perf_counter()
    fp32 = evaluation.module(parent)
    load_s = time.perf_counter() - started
    share = linear_share(fp32)
    fp32_bytes = module_bytes(fp32)
    layers = sum(isinstance(m, torch.nn.Linear) for m in fp32.modules())
    started = time.perf_counter()
    int8 = quantize_int8(fp32)
    quantize_s = time.perf_counter() - started
    return {
        "linear_share": round(share, 4),
        "layers_quantized": layers,
        "fp32_memory_bytes": fp32_bytes,
        "int8_memory_bytes": module_bytes(int8),
        "memory_ratio": round(module_bytes(int8) / fp32_bytes, 4) if fp32_bytes else None,
        "fp32_load_s": round(load_s, 3),
        "int8_load_s": round(load_s + quantize_s, 3),  # load-time quantization: what a worker pays per load
    }


def _compare(
    evaluation: Evaluation, parent: ModelVersion, child: ModelVersion, data: Labelled, ticker: Ticker
) -> dict[str, Any]:
    ticker.rows = len(data)
    ticker.next_phase()
    parent_predictions = predict_all(evaluation, parent, data, ticker)
    ticker.next_phase()
    child_predictions = predict_all(evaluation, child, data, ticker)
    before = evaluation.metrics(data, parent_predictions)
    after = evaluation.metrics(data, child_predictions)
    return {
        "data_sha256": data.sha256,
        "rows": len(data),
        "parent": before,
        "compressed": after,
        "delta": {k: after[k] - before[k] for k in before if k in after},
        "agreement": evaluation.agreement(parent_predictions, child_predictions),
    }


def _latency(
    evaluation: Evaluation,
    parent: ModelVersion,
    child: ModelVersion,
    data: Labelled | None,
    seconds: float,
    ticker: Ticker,
) -> dict[str, Any] | None:
    """Seconds per call at each batch size, parent and child calls interleaved (so both see the
    same machine load), ``seconds`` of CPU time in all; the median of each."""
    if data is None or seconds <= 0:
        return None
    sizes = [b for b in type(evaluation).batch_sizes if b <= len(data)] or [len(data)]
    budget = seconds / len(sizes)
    by_batch: dict[str, dict[str, float]] = {}
    for size in sizes:
        chunk = data.rows(0, size)
        evaluation.predict(parent, chunk)  # warm-up: loading, first-call allocations
        evaluation.predict(child, chunk)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        started = time.monotonic()
        # At least one pair; MIN_RUNS pairs unless that takes over three times the budget (long clips).
        while (
            not times["int8"]
            or (elapsed := time.monotonic() - started) < budget
            or (len(times["int8"]) < MIN_RUNS and elapsed < 3 * budget)
        ):
            ticker(0)
            for label, version in (("fp32", parent), ("int8", child)):
                t = time.perf_counter()
                evaluation.predict(version, chunk)
                times[label].append(time.perf_counter() - t)
        fp32_s, int8_s = statistics.median(times["fp32"]), statistics.median(times["int8"])
        by_batch[str(size)] = {
            "fp32_items_per_s": round(size / fp32_s, 2),
            "int8_items_per_s": round(size / int8_s, 2),
            "speedup": round(fp32_s / int8_s, 3),
            "runs": len(times["int8"]),
        }
    first = by_batch[str(sizes[0])]
    best_fp32 = max(by_batch, key=lambda b: by_batch[b]["fp32_items_per_s"])
    best_int8 = max(by_batch, key=lambda b: by_batch[b]["int8_items_per_s"])
    return {
        "batch_1": {"batch": sizes[0], "fp32_ms": round(1000 * sizes[0] / first["fp32_items_per_s"], 2),
                    "int8_ms": round(1000 * sizes[0] / first["int8_items_per_s"], 2), "speedup": first["speedup"]},
        "best_batch": {
            "fp32_batch": int(best_fp32), "fp32_items_per_s": by_batch[best_fp32]["fp32_items_per_s"],
            "int8_batch": int(best_int8), "int8_items_per_s": by_batch[best_int8]["int8_items_per_s"],
            "speedup": round(by_batch[best_int8]["int8_items_per_s"] / by_batch[best_fp32]["fp32_items_per_s"], 3),
        },
        "by_batch": by_batch,
    }  # fmt: skip


def _samples(evaluation: Evaluation) -> Labelled | None:
    """Inputs to time without an eval file: texts for text kinds; None (not timed) otherwise."""
    if type(evaluation).default_columns[0] != "text":
        return None
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(max(type(evaluation).batch_sizes))]
    labels = ["a", "b"] * (len(texts) // 2)
    return Labelled(texts, labels, "", ("text", "label"), ("a", "b"))


def _flat_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The result's ``metrics``: the headline numbers as floats."""
    out: dict[str, float] = {}
    weights = record["weights"]
    if weights.get("memory_ratio") is not None:
        out["memory_ratio"] = float(weights["memory_ratio"])
    comparison = record.get("comparison")
    if comparison:
        out["agreement"] = float(comparison["agreement"])
        out.update({k: float(v) for k, v in comparison["compressed"].items()})
        out.update({f"{k}_delta": float(v) for k, v in comparison["delta"].items()})
    latency = record.get("latency")
    if latency:
        out["speedup_batch_1"] = float(latency["batch_1"]["speedup"])
        out["speedup_best_batch"] = float(latency["best_batch"]["speedup"])
    return out


def _link_tree(source: Path, target: Path) -> None:
    """Every file of ``source`` but its metadata, hard-linked into ``target`` (copied where a
    link cannot be made: another file system)."""
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if (rel.name == METADATA_FILE and rel.parent == Path(".")) or any(p.startswith(".") for p in rel.parts):
            continue
        dest = target / rel
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
