"""Named entities with spaCy's small English pipeline, NER component alone (see
``workers.spacy_pipeline``). One item is one text; a batch of many jobs' texts goes through
one ``nlp.pipe``. spaCy runs on the CPU whatever the worker's device: the model is small and
its cost is Python and Cython per token, not arithmetic a GPU would speed up.

Offsets are spaCy's character offsets (Unicode code points), and spaCy's tokenizer never
changes the text, so ``text[start:end]`` is the entity's text for every text sent (checked per
text: a text whose ``Doc`` does not hold it exactly fails alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.jobs import JobBase
from shared.kinds.ner import NER_LABELS, NerJob
from shared.model_store import ModelStore
from workers import spacy_pipeline
from workers.batcher import Batcher, BatchPolicy
from workers.kinds import Prepared
from workers.model_cache import ModelCache

# Texts per nlp.pipe call inside a batch (spaCy's own minibatch), and the batch the runtime
# allows this kind (wider than the default 32: measured best at 64-128, scripts/eval_ner.py).
PIPE_BATCH_SIZE = 128
MIN_BATCH_SIZE = 128


@dataclass(frozen=True, slots=True)
class NerItem:
    text: str
    labels: frozenset[str] | None = None  # keep only these labels; None: all


class NerRunner:
    def __init__(self) -> None:
        self.pipeline = spacy_pipeline.load("ner")
        missing = set(NER_LABELS) - set(self.pipeline.labels)
        if missing:
            raise RuntimeError(f"the NER pipeline lacks the labels {sorted(missing)}")

    @property
    def model(self) -> str:
        return self.pipeline.name

    def warm_up(self) -> None:
        self.pipeline.pipe(["Ada Lovelace was born in London."])

    def run_batch(self, items: Sequence[NerItem]) -> list[dict[str, Any] | BaseException]:
        texts = [item.text for item in items]
        docs: list[Any | BaseException]
        try:
            docs = self.pipeline.pipe(texts, PIPE_BATCH_SIZE)
        except Exception:  # find the text that raised: the others keep their result
            docs = list(self.pipeline.pipe_each(texts))
        return [doc if isinstance(doc, BaseException) else entities(item, doc) for item, doc in zip(items, docs)]


def entities(item: NerItem, doc: Any) -> dict[str, Any] | BaseException:
    """One text's ``TextEntities`` as plain dicts."""
    if doc.text != item.text:  # never seen: spaCy keeps every character; a wrong offset is worse than an error
        return RuntimeError("the tokenizer changed the text; offsets would not point into it")
    keep = item.labels
    return {
        "entities": [
            {"text": ent.text, "label": ent.label_, "start": ent.start_char, "end": ent.end_char}
            for ent in doc.ents
            if keep is None or ent.label_ in keep
        ]
    }


class NerKind:
    """ner jobs: items are texts."""

    job_type = "ner"
    slow_prepare = False
    min_batch_size = MIN_BATCH_SIZE  # the runtime widens this kind's batches (no token budget)

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        # store, cache and device are the worker's; spaCy's pipeline is the process's, on the CPU.
        self.device = device
        self.runner = NerRunner()

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        self.runner.warm_up()
        return Batcher(self.runner.run_batch, policy, name="ner-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        for job in jobs:
            assert isinstance(job, NerJob)
            labels = frozenset(job.labels) if job.labels else None
            out.append(Prepared([NerItem(text, labels) for text in job.texts], self.runner.model))
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        return {"results": outputs}
