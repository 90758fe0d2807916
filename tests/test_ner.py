"""ner: the schema, the runner (real spaCy pipeline), character offsets into any Unicode text
(property test), and real jobs through a real worker."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.errors import JobFailed
from shared.jobs import MAX_CHARS_PER_JOB, MAX_TEXT_CHARS, MAX_TEXTS_PER_JOB
from shared.kinds import KINDS, parse_job
from shared.kinds.ner import NER_LABELS, NerJob, NerResult

# -- schema (no model) ---------------------------------------------------------------------------


def test_the_job_takes_texts_with_the_shared_limits_and_the_text_alias() -> None:
    assert NerJob.model_validate({"text": "Ada went to Paris."}).texts == ["Ada went to Paris."]
    assert NerJob(texts=["a\x00b"]).texts == ["a\x00b"]  # free text: NUL is allowed, as in classify
    with pytest.raises(ValidationError, match="at most 20000 characters"):
        NerJob(texts=["x" * (MAX_TEXT_CHARS + 1)])
    with pytest.raises(ValidationError, match="at most 512 items"):
        NerJob(texts=["x"] * (MAX_TEXTS_PER_JOB + 1))
    with pytest.raises(ValidationError, match="MAX_CHARS_PER_JOB"):
        NerJob(texts=["x" * MAX_TEXT_CHARS] * (MAX_CHARS_PER_JOB // MAX_TEXT_CHARS + 1))
    with pytest.raises(ValidationError, match="text 1 is blank"):
        NerJob(texts=["ok", "  \n"])
    with pytest.raises(ValidationError, match="not valid Unicode"):
        NerJob(texts=["bad \ud800 surrogate"])


def test_labels_are_case_insensitive_known_labels() -> None:
    assert NerJob(texts=["x"], labels=["person", " GPE ", "Person"]).labels == ["PERSON", "GPE"]
    with pytest.raises(ValidationError, match=r"unknown entity label.*'CITY'.*PERSON"):
        NerJob(texts=["x"], labels=["city"])
    with pytest.raises(ValidationError, match="at least 1 item"):
        NerJob(texts=["x"], labels=[])


def test_the_kind_is_registered_with_its_scoring_column_and_demo() -> None:
    spec = KINDS["ner"]
    assert spec.job is NerJob and spec.result is NerResult and spec.items == "texts" and spec.inference
    assert [(c.name, c.key, c.type) for c in spec.score_columns] == [("entities", "entities", "json")]
    assert spec.bulk_queue == "conveyor.bulk.ner" and spec.queue == "conveyor.ner" and spec.task == "conveyor.ner"
    assert isinstance(parse_job({"type": "ner", **spec.example}), NerJob)
    assert spec.demo is not None and NerJob.model_validate(spec.demo).texts


# -- the runner (real pipeline) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner() -> Any:
    from workers.runners.ner import NerRunner

    r = NerRunner()
    r.warm_up()
    return r


def _ents(out: Any) -> list[tuple[str, str]]:
    assert not isinstance(out, BaseException), out
    return [(e["text"], e["label"]) for e in out["entities"]]


@pytest.mark.slow
def test_obvious_entities_with_offsets(runner: Any) -> None:
    from workers.runners.ner import NerItem

    text = "Barack Obama was born in Hawaii in 1961 and worked for the University of Chicago."
    (out,) = runner.run_batch([NerItem(text)])
    got = {(e["text"], e["label"]) for e in out["entities"]}
    assert {("Barack Obama", "PERSON"), ("Hawaii", "GPE"), ("1961", "DATE")} <= got
    assert any(label == "ORG" and "University of Chicago" in t for t, label in got)
    for e in out["entities"]:
        assert text[e["start"] : e["end"]] == e["text"]
    assert set(runner.pipeline.labels) == set(NER_LABELS)
    assert runner.pipeline.nlp.pipe_names == ["ner"]  # the shared tok2vec, tagger, parser ... excluded


@pytest.mark.slow
def test_a_label_filter_keeps_only_those_labels(runner: Any) -> None:
    from workers.runners.ner import NerItem

    text = "Maria Santos paid $40 million for a hotel in Lisbon on Monday."
    (everything, people) = runner.run_batch([NerItem(text), NerItem(text, frozenset({"PERSON"}))])
    assert {label for _, label in _ents(everything)} >= {"PERSON", "MONEY", "GPE", "DATE"}
    assert _ents(people) == [("Maria Santos", "PERSON")]


@pytest.mark.slow
def test_a_batch_gives_each_text_what_it_gets_alone(runner: Any) -> None:
    from workers.runners.ner import NerItem

    texts = [
        "Kofi Mensah runs 45 shops across Ghana.",
        "nothing to see here",
        "Flights between Paris and Montreal resume on June 1.",
        "\x00\u200f\u05e9\u05dc\u05d5\u05dd Tokyo \U0001f600 2024",
    ] * 8
    together = runner.run_batch([NerItem(t) for t in texts])
    alone = [runner.run_batch([NerItem(t)])[0] for t in texts[:4]]
    assert together == alone * 8
    assert _ents(together[1]) == []


@pytest.mark.slow
def test_a_text_that_makes_spacy_raise_fails_alone(runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.runners.ner import NerItem

    nlp = runner.pipeline.nlp

    class Poisoned:
        pipe_names = nlp.pipe_names

        def pipe(self, texts: list[str], batch_size: int = 1) -> Any:
            for text in texts:
                yield self(text)

        def __call__(self, text: str) -> Any:
            if "poison" in text:
                raise ValueError("spaCy choked")
            return nlp(text)

    monkeypatch.setattr(runner.pipeline, "nlp", Poisoned())
    outs = runner.run_batch([NerItem("Ada lived in London."), NerItem("poison"), NerItem("Paris in May.")])
    assert isinstance(outs[1], ValueError)
    assert ("London", "GPE") in _ents(outs[0]) and ("Paris", "GPE") in _ents(outs[2])


# Texts that hold entities among combining marks, emoji (with joiners and skin tones), RTL
# scripts and marks, other scripts, controls and NUL: spaCy's offsets must still point into them.
_PIECES = [
    "Barack Obama", "Paris", "Google", "the University of Chicago", "$5 million", "12%", "June 3, 2021",
    "Microsoft", "Tokyo", "Angela Merkel", "London", "Monday", "three", "first",
    "e\u0301", "n\u0303o", "\u0915\u094d\u0937", "\U0001f469\u200d\U0001f4bb", "\U0001f44d\U0001f3fd",
    "\U0001f1eb\U0001f1f7", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u200f", "\u202e",
    "\u200b", "\ufeff", "\x00", "\t", "\n", "\u3000", "\u6771\u4eac", "\ud55c\uad6d", " ", " ", ".", ",", "'s", "-",
]  # fmt: skip
_ANY_CHAR = st.characters(codec="utf-8")  # any code point but surrogates (which are not text)
_TEXT = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(_ANY_CHAR, min_size=1, max_size=6)), min_size=1,
                 max_size=30).map("".join)  # fmt: skip


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXT, min_size=1, max_size=6))
def test_offsets_point_into_any_unicode_text(runner: Any, texts: list[str]) -> None:
    from workers.runners.ner import NerItem

    outs = runner.run_batch([NerItem(t) for t in texts])
    assert len(outs) == len(texts)
    for text, out in zip(texts, outs):
        assert not isinstance(out, BaseException), out
        end_of_last = 0
        for e in out["entities"]:
            assert 0 <= e["start"] < e["end"] <= len(text)
            assert text[e["start"] : e["end"]] == e["text"]
            assert e["label"] in NER_LABELS
            assert e["start"] >= end_of_last  # in order, never overlapping
            end_of_last = e["end"]


# -- through a real worker -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_through_the_worker_finds_the_entities(client: Any, worker: Any) -> None:
    text = "Brightwave Analytics opened an office in Lisbon on 3 March 2024 with $2.5 million from Northgate Capital."
    result = client.submit(NerJob(texts=[text, "Angela Merkel visited Paris in May."])).result(timeout=120)
    assert isinstance(result, NerResult)
    assert len(result.results) == 2
    first = {(e.text, e.label) for e in result.results[0].entities}
    assert {("Lisbon", "GPE"), ("3 March 2024", "DATE"), ("$2.5 million", "MONEY")} <= first
    assert {("Angela Merkel", "PERSON"), ("Paris", "GPE"), ("May", "DATE")} <= {
        (e.text, e.label) for e in result.results[1].entities
    }
    for t, entities in zip([text, "Angela Merkel visited Paris in May."], result.results):
        for e in entities.entities:
            assert t[e.start : e.end] == e.text
    assert result.meta.model.startswith("en_core_web_sm") and result.meta.batch_sizes


@pytest.mark.slow
def test_many_jobs_share_batches_and_hostile_ones_fail_alone(client: Any, worker: Any) -> None:
    people = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Kofi Annan"]
    jobs = [
        NerJob(texts=[f"{people[i % 4]} arrived in Berlin on Friday."], labels=["person", "gpe"]) for i in range(40)
    ]
    bad_payloads: list[tuple[Any, str]] = [
        ({"texts": ["x"], "labels": ["CITY"]}, "unknown entity label"),
        ({"texts": ["x" * (MAX_TEXT_CHARS + 1)]}, "at most 20000 characters"),
        ({"texts": "not a list"}, "Input should be a valid list"),
        ({"texts": ["   "]}, "text 0 is blank"),
        ({"texts": ["ok"], "k": 3}, "Extra inputs are not permitted"),
    ]
    bad = [client.app.send_task("conveyor.ner", args=[p], queue="conveyor.ner") for p, _ in bad_payloads]
    handles = client.submit_many(jobs)
    nul = client.submit(NerJob(texts=["\x00Grace Hopper\x00 flew to Tokyo."]))
    for async_result, (_, message) in zip(bad, bad_payloads):
        with pytest.raises(JobFailed) as failed:
            client.job(async_result.id).result(timeout=60)
        assert failed.value.error_type == "InvalidJob" and message in failed.value.message
    sizes: list[int] = []
    for i, handle in enumerate(handles):
        result = handle.result(timeout=120)
        assert [(e.text, e.label) for e in result.results[0].entities] == [(people[i % 4], "PERSON"), ("Berlin", "GPE")]
        sizes.extend(result.meta.batch_sizes)
    assert max(sizes) > 1, "no two jobs' texts shared a batch"
    entities = nul.result(timeout=60).results[0].entities
    assert ("Tokyo", "GPE") in {(e.text, e.label) for e in entities}
    assert worker.proc.poll() is None
