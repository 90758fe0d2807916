"""int8 against fp32, side by side, same data, same run: what `conveyor models compress --method int8`
costs and gains on this machine's CPU.

    .venv/bin/python scripts/eval_compression.py [--only minilm,sms,whisper] [--texts 5574] [--rounds 3]
        [--whisper-from DIR] [--json OUT]

minilm   all-MiniLM-L6-v2 zero-shot on the SMS Spam Collection's texts (../shared/data/sms_spam):
         agreement of the top labels (goal >= 0.99), each one's accuracy against the SMS labels,
         texts/s in-process at batch 1 and at the best batch, and through the queue (a real
         worker per store: one serving the built-in fp32 embedder, one serving all-MiniLM-L6-v2@1
         int8; jobs of 1 text one at a time, and 400 concurrent 1-text jobs the worker batches),
         interleaved over --rounds (goal >= 1.3x); memory of the weights.
sms      a classifier fine-tuned by Conveyor's own fine-tune job on SMS rows, then compressed
         by the compress job with its held-out rows as --eval: accuracy and macro-F1 of both
         (goal: a drop of at most 0.5 points), agreement, latency (the job's own record).
whisper  whisper-tiny.en compressed with the 12 LibriSpeech clips (../shared/data/speech) as
         --eval: WER of both and the latency (the job's own record). The model comes from
         --whisper-from (a version directory) or is built as `conveyor models prepare` does.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
SHARED_DATA = ROOT.parent / "shared" / "data"
SMS = SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv"
SPEECH = SHARED_DATA / "speech"
# Zero-shot labels for the SMS texts (the template is classify's default: "This text is about {}.").
ZERO_SHOT = {"ham": "a personal message", "spam": "an advertisement or a prize"}


def sms_rows() -> list[tuple[str, str]]:
    with SMS.open(newline="", encoding="utf-8") as f:
        return [(r[1], r[0]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) == 2]


def split_of(text: str) -> str:
    """held-out (30%) or train, by the text's hash: the same rows every run."""
    return "held-out" if hashlib.sha256(text.encode()).digest()[0] < 77 else "train"


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def noop(*_args: Any) -> None:
    return None


# -- minilm zero-shot --------------------------------------------------------------------------
def minilm(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shared.kinds.compress import CompressJob
    from shared.model_store import ModelStore
    from workers.compression import compress
    from workers.evaluators.text import LABEL_TEMPLATE, ClassifyEvaluation
    from workers.model_cache import ModelCache
    from workers.quantization import module_bytes
    from workers.runners.classify import ClassifyItem

    fp32_store = ModelStore(work / "fp32-store")  # the built-in only
    int8_store = ModelStore(work / "int8-store")
    job = CompressJob(model="all-MiniLM-L6-v2", latency_seconds=0)
    made = compress(job, int8_store, work / "ckpt", noop, lambda: False)
    fp32_version, int8_version = fp32_store.resolve("all-MiniLM-L6-v2"), made.version
    rows = sms_rows()[: args.texts]
    texts = [t for t, _ in rows]
    truth = [ZERO_SHOT[label] for _, label in rows]
    from workers.evaluation import Labelled

    data = Labelled(texts, truth, "", ("text", "label"), tuple(sorted(ZERO_SHOT.values())))
    evaluation = ClassifyEvaluation(fp32_store, ModelCache(8 << 30), "cpu")
    predictions: dict[str, list[str]] = {"fp32": [], "int8": []}
    margins: list[float] = []  # fp32's similarity gap between the two labels: how close each call is
    started = time.perf_counter()
    for start in range(0, len(data), 64):  # alternating chunks: both see the same machine
        chunk = data.rows(start, start + 64)
        for label, version in (("fp32", fp32_version), ("int8", int8_version)):
            runner = evaluation._runner(version)
            items = [ClassifyItem(t, data.classes, None, None, LABEL_TEMPLATE) for t in chunk.inputs]
            for ranked in runner.run_batch(runner.encode(items)):
                assert not isinstance(ranked, BaseException)
                predictions[label].append(ranked["labels"][0]["label"])
                if label == "fp32":
                    margins.append(ranked["labels"][0]["similarity"] - ranked["labels"][1]["similarity"])
    quality: dict[str, Any] = {
        "texts": len(texts),
        "agreement": evaluation.agreement(predictions["fp32"], predictions["int8"]),
        "fp32": evaluation.metrics(data, predictions["fp32"]),
        "int8": evaluation.metrics(data, predictions["int8"]),
        "seconds": round(time.perf_counter() - started, 1),
        "fp32_margin_quantiles": {q: round(statistics.quantiles(margins, n=100)[q - 1], 4) for q in (5, 10, 25, 50)},
        "agreement_by_fp32_margin": {},
    }
    for floor in (0.0, 0.01, 0.02, 0.05, 0.1):
        kept = [i for i, m in enumerate(margins) if m >= floor]
        same = sum(predictions["fp32"][i] == predictions["int8"][i] for i in kept)
        quality["agreement_by_fp32_margin"][f">={floor}"] = {
            "texts": len(kept),
            "agreement": round(same / len(kept), 4),
        }
    print(f"minilm zero-shot on {len(texts)} SMS texts: agreement {quality['agreement']:.4f}; accuracy fp32"
          f" {quality['fp32']['accuracy']:.4f}, int8 {quality['int8']['accuracy']:.4f}", flush=True)  # fmt: skip
    print(f"  fp32 margin quantiles {quality['fp32_margin_quantiles']};"
          f" agreement by margin {json.dumps(quality['agreement_by_fp32_margin'])}", flush=True)  # fmt: skip

    # In-process texts/s: each batch size, fp32 and int8 calls interleaved, --rounds medians.
    in_process: dict[str, dict[str, float]] = {}
    for size in (1, 8, 32, 64):
        chunk = data.rows(0, size)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for version in (fp32_version, int8_version):
            evaluation.predict(version, chunk)
        repeats = max(3, 48 // size) * args.rounds
        for _ in range(repeats):
            for label, version in (("fp32", fp32_version), ("int8", int8_version)):
                offset = (len(times[label]) * size) % max(1, len(data) - size)
                t = time.perf_counter()
                evaluation.predict(version, data.rows(offset, offset + size))
                times[label].append(time.perf_counter() - t)
        in_process[str(size)] = {k: round(size / statistics.median(v), 2) for k, v in times.items()}
        print(f"  in-process batch {size}: fp32 {in_process[str(size)]['fp32']} texts/s,"
              f" int8 {in_process[str(size)]['int8']} texts/s", flush=True)  # fmt: skip
    fp32_module = evaluation.module(fp32_version)
    memory = {
        "fp32_bytes": module_bytes(fp32_module),
        "int8_bytes": made.extra["weights"]["int8_memory_bytes"],
        "load_s": {"fp32": made.extra["weights"]["fp32_load_s"], "int8": made.extra["weights"]["int8_load_s"]},
    }
    out: dict[str, Any] = {"quality": quality, "in_process_texts_per_s": in_process, "memory": memory,
                           "threads": torch.get_num_threads()}  # fmt: skip
    if not args.no_queue:
        out["queue_texts_per_s"] = minilm_queue(work, fp32_store, int8_store, texts, args)
    return out


def minilm_queue(
    work: Path, fp32_store: Any, int8_store: Any, texts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Two real workers, one per store, each with its own Redis; their runs interleaved."""
    from bench import Stack, concurrent_submit, finish

    from shared.jobs import ClassifyJob

    labels = list(ZERO_SHOT.values())
    stacks = {
        label: Stack(work / f"home-{label}", 64, plain=False, devices="cpu",
                     extra_env={"CONVEYOR_MODEL_DIR": str(store.root)})
        for label, store in (("fp32", fp32_store), ("int8", int8_store))
    }  # fmt: skip
    try:
        for stack in stacks.values():  # warm-up: the model loaded, the label vectors cached
            stack.client.submit(ClassifyJob(texts=texts[:64], labels=labels)).result(timeout=300)
        results: dict[str, dict[str, list[float]]] = {k: {"one at a time": [], "400 concurrent": []} for k in stacks}
        for _ in range(args.rounds):
            for label, stack in stacks.items():
                started = time.perf_counter()
                for text in texts[:60]:
                    stack.client.submit(ClassifyJob(texts=[text], labels=labels)).result(timeout=120)
                results[label]["one at a time"].append(60 / (time.perf_counter() - started))
                client = stack.client

                def one(i: int, client: Any = client) -> Any:
                    return client.submit(ClassifyJob(texts=[texts[i]], labels=labels))._async

                sent = concurrent_submit(400, 8, one)
                run = finish(sent, lambda h: h.get(timeout=600), lambda v: 1)
                results[label]["400 concurrent"].append(run.items_per_s)
        out = {label: {k: round(statistics.median(v), 2) for k, v in r.items()} for label, r in results.items()}
        for mode in ("one at a time", "400 concurrent"):
            print(f"  through the queue, {mode}: fp32 {out['fp32'][mode]} texts/s, int8 {out['int8'][mode]} texts/s"
                  f" ({out['int8'][mode] / out['fp32'][mode]:.2f}x)", flush=True)  # fmt: skip
        return out
    finally:
        for stack in stacks.values():
            stack.close()


# -- fine-tuned SMS classifier ------------------------------------------------------------------
def sms(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from shared.jobs import FineTuneJob
    from shared.kinds.compress import CompressJob
    from shared.model_store import ModelStore
    from workers.compression import compress
    from workers.training.finetune import fine_tune

    rows = sms_rows()
    train = [r for r in rows if split_of(r[0]) == "train"]
    held = [r for r in rows if split_of(r[0]) == "held-out"]
    # Training rows: every spam and as many ham, capped (the fine-tune must fit a few CPU minutes).
    spam = [r for r in train if r[1] == "spam"][: args.train_per_class]
    ham = [r for r in train if r[1] == "ham"][: args.train_per_class]
    store = ModelStore(work / "sms-store")
    data = write_csv(work / "sms-train.csv", spam + ham)
    evaluation = write_csv(work / "sms-held-out.csv", held)
    started = time.perf_counter()
    job = FineTuneJob(data_path=str(data), output_name="sms-filter", epochs=1, batch_size=16, learning_rate=1e-4,
                      max_length=64, validation_split=0.1)  # fmt: skip
    tuned = fine_tune(job, store, work / "ckpt-sms", noop, lambda: False)
    seconds = time.perf_counter() - started
    print(f"sms: fine-tuned {tuned.version.ref} on {len(spam) + len(ham)} rows in {seconds:.0f} s", flush=True)
    made = compress(
        CompressJob(model=tuned.version.ref, eval_path=str(evaluation), max_rows=len(held), latency_seconds=20),
        store, work / "ckpt", noop, lambda: False,
    )  # fmt: skip
    comparison = made.extra["comparison"]
    before, after = comparison["parent"], comparison["compressed"]
    print(f"  held-out {comparison['rows']} rows: accuracy fp32 {before['accuracy']:.4f} int8 {after['accuracy']:.4f};"
          f" macro-F1 fp32 {before['macro_f1']:.4f} int8 {after['macro_f1']:.4f};"
          f" agreement {comparison['agreement']:.4f}", flush=True)  # fmt: skip
    latency = made.extra["latency"]
    print(f"  latency: {json.dumps(latency['batch_1'])} best {json.dumps(latency['best_batch'])}", flush=True)
    return {"train_rows": len(spam) + len(ham), "record": made.extra}


# -- whisper ------------------------------------------------------------------------------------
def whisper(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from shared.kinds.compress import CompressJob
    from shared.model_store import ModelStore
    from workers.compression import compress

    store = ModelStore(work / "whisper-store")
    if args.whisper_from:
        built = store.staging()
        for path in Path(args.whisper_from).iterdir():
            if path.is_file() and path.name != "conveyor.json":
                shutil.copy2(path, built / path.name)
        source = store.publish("whisper-tiny.en", built, {"kind": "whisper", "source": str(args.whisper_from)})
    else:
        from workers.whisper_convert import prepare_default_models

        prepare_default_models(store)
        source = store.resolve("whisper-tiny.en")
    made = compress(
        CompressJob(model=source.ref, eval_path=str(SPEECH / "transcripts.tsv"), input_column="file",
                    label_column="transcript", latency_seconds=30),
        store, work / "ckpt", noop, lambda: False,
    )  # fmt: skip
    comparison = made.extra["comparison"]
    print(f"whisper-tiny.en on {comparison['rows']} LibriSpeech clips: WER fp32 {comparison['parent']['wer']:.4f},"
          f" int8 {comparison['compressed']['wer']:.4f}; identical transcripts {comparison['agreement']:.2f}",
          flush=True)  # fmt: skip
    print(f"  latency: {json.dumps(made.extra['latency'])}")
    return {"record": made.extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="minilm,sms,whisper")
    parser.add_argument("--texts", type=int, default=5574, help="SMS texts for the zero-shot agreement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--no-queue", action="store_true", help="minilm: skip the through-the-queue runs")
    parser.add_argument("--whisper-from", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not SMS.exists():
        raise SystemExit(f"{SMS} is missing")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="conveyor-eval-compression-") as tmp:
        work = Path(tmp)
        os.environ["CONVEYOR_INPUT_ROOTS"] = os.pathsep.join([str(work), str(SHARED_DATA)])
        for name in args.only.split(","):
            results[name] = {"minilm": minilm, "sms": sms, "whisper": whisper}[name](work, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
