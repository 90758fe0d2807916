"""Keyphrases, KeyBERT's way with cleaner candidates: spaCy's noun chunks (tagger and parser of
the small English pipeline, on the CPU) are the candidates, all-MiniLM-L6-v2 (classify's
embedder and tokenizer, the same loaded weights, on the worker's device) embeds texts and
candidates, candidates are ranked by cosine similarity to their text and picked by maximal
marginal relevance (MMR).

One item is one text. A batch: one ``nlp.pipe`` over its texts, one forward pass over the
texts (padded to the longest text), one forward pass over every candidate of every text
(padded to the longest phrase, a few tokens: far cheaper than mixing them with the texts),
then per text a small similarity matrix and MMR on the host.

A text is embedded from its first 256 tokens (what the embedder reads); its candidates come
from the whole text (at most ``MAX_CANDIDATES`` distinct ones, most frequent first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from shared.jobs import JobBase
from shared.kinds.keywords import DEFAULT_DIVERSITY, KeywordsJob
from shared.model_store import ModelStore
from workers import spacy_pipeline
from workers.batcher import Batcher, BatchPolicy
from workers.kinds import Prepared
from workers.model_cache import ModelCache
from workers.runners.classify import EMBEDDER, ClassifyRunner

Method = Literal["chunks", "pos"]

MAX_CANDIDATES = 256  # distinct candidates per text
MAX_PHRASE_WORDS = 4
PHRASES_PER_PASS = 2048  # the candidates' forward pass is cut in passes of this many rows (memory)
PIPE_BATCH_SIZE = 64

_HYPHENS = frozenset({"-", "\u2010", "\u2011", "\u2013", "/"})
_NOUNS = frozenset({"NOUN", "PROPN"})
_CONTENT_STOPS = frozenset({"first", "third", "last", "front", "back", "top", "bottom", "full", "empty", "serious"})
_MODIFIERS = frozenset({"ADJ", "NOUN", "PROPN"})
_EDGE_DROP = frozenset({"DET", "PRON", "PUNCT", "PART", "CCONJ", "ADP", "SYM", "NUM", "SPACE", "X", "INTJ"})


@dataclass(frozen=True, slots=True)
class KeywordsItem:
    text: str
    k: int = 5
    diversity: float = DEFAULT_DIVERSITY
    ids: tuple[int, ...] | None = None  # the embedder's token ids of the text, set in prepare


# -- candidates -----------------------------------------------------------------------------
def _stop(token: Any) -> bool:
    # spaCy's stop list holds content words too: nouns ("part", "side"; "US" and "IT", as it is
    # case-blind) and adjectives that name something ("first division", "top floor").
    return bool(token.is_stop) and token.pos_ not in _NOUNS and token.lower_ not in _CONTENT_STOPS


def _phrase(doc: Any, tokens: Sequence[Any]) -> str | None:
    """The tokens as they appear in the text, after trimming what cannot start or end a
    keyphrase (determiners, pronouns, stop words, punctuation, numbers; never half of a
    hyphenated word); None if nothing is left."""
    lo, hi = 0, len(tokens)
    while lo < hi and (tokens[lo].pos_ in _EDGE_DROP or _stop(tokens[lo]) or not tokens[lo].text.strip()):
        lo += 1
    while 0 < lo < hi and tokens[lo - 1].text in _HYPHENS and not tokens[lo - 1].whitespace_:
        lo += 1  # "two-year renovation" gives "renovation", never "year renovation"
        while lo < hi and not tokens[lo - 1].whitespace_:
            lo += 1
    while hi > lo and (tokens[hi - 1].pos_ not in _NOUNS or _stop(tokens[hi - 1])):
        hi -= 1
    if lo >= hi:
        return None
    first, last = tokens[lo], tokens[hi - 1]
    phrase: str = doc.text[first.idx : last.idx + len(last.text)]
    if len(phrase.split()) > MAX_PHRASE_WORDS or not any(ch.isalpha() for ch in phrase):
        return None
    return phrase


def _pieces(span: Sequence[Any]) -> list[list[Any]]:
    """A noun chunk cut at possessives: "the firm's new solar panels" -> "the firm", "new solar panels"."""
    pieces: list[list[Any]] = [[]]
    for token in span:
        if token.tag_ == "POS":
            pieces.append([])
        else:
            pieces[-1].append(token)
    return [p for p in pieces if p]


def chunk_candidates(doc: Any) -> list[str]:
    """Noun chunks (tagger and parser), trimmed, split at possessives, in order of appearance."""
    found: list[str] = []
    for chunk in doc.noun_chunks:
        for piece in _pieces(chunk):
            phrase = _phrase(doc, piece)
            if phrase is not None:
                found.append(phrase)
    return found


def pos_candidates(doc: Any) -> list[str]:
    """Maximal runs of adjectives and nouns ending in a noun (tagger only), at most
    ``MAX_PHRASE_WORDS`` words (a longer run gives its last ones), in order of appearance."""
    found: list[str] = []
    run: list[Any] = []
    for token in [*doc, None]:
        if token is not None and (token.pos_ in _MODIFIERS or (token.text == "-" and run)) and not _stop(token):
            run.append(token)
            continue
        while run:
            phrase = _phrase(doc, run)
            if phrase is not None or len(run) <= 1:
                if phrase is not None:
                    found.append(phrase)
                break
            run = run[1:]  # too long: drop words from the front
        run = []
    return found


def distinct(phrases: Sequence[str], limit: int = MAX_CANDIDATES) -> list[str]:
    """One surface form per case-folded phrase (its first), most frequent first, then by first
    appearance; at most ``limit``."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for phrase in phrases:
        key = " ".join(phrase.casefold().split())
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, phrase)
    keys = sorted(counts, key=lambda k: -counts[k])  # stable: ties keep their first appearance
    return [first[k] for k in keys[:limit]]


# -- ranking ----------------------------------------------------------------------------------
def mmr(doc_sims: np.ndarray, pair_sims: np.ndarray, k: int, diversity: float) -> list[int]:
    """Indices of ``k`` candidates by maximal marginal relevance: each pick maximizes
    ``(1 - diversity) * sim(candidate, text) - diversity * max sim(candidate, picked)``."""
    n = len(doc_sims)
    if n == 0:
        return []
    if diversity <= 0.0:
        return [int(i) for i in np.argsort(-doc_sims, kind="stable")[:k]]
    picked = [int(np.argmax(doc_sims))]
    closest = pair_sims[picked[0]].copy()  # each candidate's highest similarity to a picked one
    chosen = np.zeros(n, dtype=bool)
    chosen[picked[0]] = True
    while len(picked) < min(k, n):
        score = (1.0 - diversity) * doc_sims - diversity * closest
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        chosen[best] = True
        np.maximum(closest, pair_sims[best], out=closest)
    return picked


class KeywordsRunner:
    def __init__(self, store: ModelStore, cache: ModelCache, device: str = "cpu", method: Method = "chunks") -> None:
        self.embedder = ClassifyRunner(store, cache, device)  # classify's tokenizer and (cached) weights
        self.encoder = self.embedder.encoder
        self.method: Method = method
        self.pipeline = spacy_pipeline.load("chunks" if method == "chunks" else "tags")
        self._candidates = chunk_candidates if method == "chunks" else pos_candidates

    @property
    def model(self) -> str:
        return f"{self.pipeline.name}+{EMBEDDER}"

    def warm_up(self) -> None:
        self.embedder.warm_up()
        self.run_batch([KeywordsItem("Warm-up text about solar panels.", 1)])

    def encode(self, items: Sequence[KeywordsItem]) -> list[KeywordsItem]:
        """The items with their texts' token ids, all texts in one tokenizer call."""
        ids = self.encoder.encode([item.text for item in items])
        return [KeywordsItem(item.text, item.k, item.diversity, i) for item, i in zip(items, ids)]

    @staticmethod
    def cost(item: KeywordsItem) -> int:
        return len(item.ids) if item.ids is not None else len(item.text) // 4 + 2

    def candidates(self, docs: Sequence[Any]) -> list[list[str]]:
        return [distinct(self._candidates(doc)) for doc in docs]

    def run_batch(self, items: Sequence[KeywordsItem]) -> list[dict[str, Any] | BaseException]:
        texts = [item.text for item in items]
        docs: list[Any | BaseException]
        try:
            docs = self.pipeline.pipe(texts, PIPE_BATCH_SIZE)
        except Exception:  # find the text that raised: the others keep their result
            docs = list(self.pipeline.pipe_each(texts))
        outs: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(items)
        live = [n for n, doc in enumerate(docs) if not isinstance(doc, BaseException)]
        for n, doc in enumerate(docs):
            if isinstance(doc, BaseException):
                outs[n] = doc
        if not live:
            return outs
        phrases = self.candidates([docs[n] for n in live])
        for n, ps in zip(live, phrases):
            if not ps:
                outs[n] = {"keywords": []}
        rows = [(n, ps) for n, ps in zip(live, phrases) if ps]  # texts with a candidate: the rest are done
        if not rows:
            return outs
        missing = [n for n, _ in rows if items[n].ids is None]  # items built without ``encode``
        ids_of = dict(zip(missing, self.encoder.encode([items[n].text for n in missing]))) if missing else {}
        text_ids = [items[n].ids or ids_of[n] for n, _ in rows]
        flat = [p for _, ps in rows for p in ps]
        with torch.inference_mode():
            text_vectors = self.embedder._embed_ids(text_ids)  # one forward pass for the texts
            phrase_vectors = self._embed_phrases(flat)  # one for every candidate of the batch
            # Per text: similarities to the text and among its candidates, one transfer for all.
            doc_parts, pair_parts, at = [], [], 0
            for row, (_, ps) in enumerate(rows):
                block = phrase_vectors[at : at + len(ps)]
                at += len(ps)
                doc_parts.append(block @ text_vectors[row])
                pair_parts.append((block @ block.T).flatten())
            host = torch.cat([*doc_parts, *pair_parts]).cpu().numpy().astype(np.float64)
        doc_sims: list[np.ndarray] = []
        at = 0
        for _, ps in rows:
            doc_sims.append(host[at : at + len(ps)])
            at += len(ps)
        for row, (n, ps) in enumerate(rows):
            size = len(ps)
            pair = host[at : at + size * size].reshape(size, size)
            at += size * size
            sims = doc_sims[row]
            picked = sorted(mmr(sims, pair, items[n].k, items[n].diversity), key=lambda i: -sims[i])
            outs[n] = {"keywords": [{"phrase": ps[i], "score": round(float(sims[i]), 6)} for i in picked]}
        return outs

    def _embed_phrases(self, phrases: Sequence[str]) -> torch.Tensor:
        ids = self.encoder.encode(phrases)
        parts = [
            self.embedder._embed_ids(ids[at : at + PHRASES_PER_PASS]) for at in range(0, len(ids), PHRASES_PER_PASS)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class KeywordsKind:
    """keywords jobs: items are texts, tokenized for the embedder here, once."""

    job_type = "keywords"
    slow_prepare = False

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.runner = KeywordsRunner(store, cache, device)

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        self.runner.warm_up()
        return Batcher(self.runner.run_batch, policy, cost=self.runner.cost, name="keywords-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        items: list[KeywordsItem] = []
        for job in jobs:
            assert isinstance(job, KeywordsJob)
            items.extend(KeywordsItem(text, job.k, job.diversity) for text in job.texts)
        encoded = iter(self.runner.encode(items))  # every text of every job, in one tokenizer call
        for job in jobs:
            assert isinstance(job, KeywordsJob)
            out.append(Prepared([next(encoded) for _ in job.texts], self.runner.model))
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        return {"results": outputs}
