"""Tokenizing from many threads at once: the classify runner's encoder is shared by the
ingest thread and anything else that prepares jobs, so it must give every thread the same
ids a lone call gives, with mixed lengths in flight together (transformers' fast tokenizer,
which switches its padding state per call, fails this way with "Already borrowed")."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from shared.model_store import ModelStore

pytestmark = pytest.mark.slow


def test_the_encoder_gives_identical_ids_from_many_threads(tmp_path: Path) -> None:
    from workers.runners.classify import EMBED_MAX_TOKENS, TextEncoder

    encoder = TextEncoder(ModelStore(tmp_path).resolve("all-MiniLM-L6-v2").path)
    rng = random.Random(7)
    words = "the match bank rate rain oven striker market ☀ naïve 東京 emoji 🎉 tokenization".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 20, 150, 600]))) for _ in range(400)]
    expected = encoder.encode(texts)
    assert max(len(ids) for ids in expected) == EMBED_MAX_TOKENS  # long texts are truncated, short ones not padded
    assert min(len(ids) for ids in expected) <= 4
    errors: list[BaseException] = []
    mismatches: list[int] = []
    start = threading.Barrier(16)

    def hammer(seed: int) -> None:
        local = random.Random(seed)
        try:
            start.wait()
            for _ in range(40):
                picks = local.sample(range(len(texts)), local.choice([1, 7, 64]))
                got = encoder.encode([texts[i] for i in picks])
                mismatches.extend(i for i, ids in zip(picks, got) if ids != expected[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert not mismatches
