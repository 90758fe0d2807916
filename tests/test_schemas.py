"""Job schemas: limits with messages that name the field and the limit; JSON Schema export."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from shared.errors import describe_validation_error
from shared.jobs import (
    MAX_INLINE_AUDIO_BYTES,
    MAX_TEXT_CHARS,
    MAX_TEXTS_PER_JOB,
    ClassifyJob,
    RecommendJob,
    TranscribeJob,
)
from shared.kinds import JOB_MODELS, parse_job


def _message(exc_info: pytest.ExceptionInfo[ValidationError]) -> str:
    return describe_validation_error(exc_info.value)


def test_classify_accepts_text_shorthand_and_fills_the_envelope() -> None:
    job = ClassifyJob.model_validate({"text": "hello there", "labels": ["a", "b"]})
    assert job.texts == ["hello there"]
    assert job.type == "classify" and job.schema_version == 1 and job.id and job.submitted_at.tzinfo


def test_classify_limits_name_the_field_and_limit() -> None:
    with pytest.raises(ValidationError) as too_long:
        ClassifyJob(texts=["x" * (MAX_TEXT_CHARS + 1)], labels=["a", "b"])
    assert "texts.0" in _message(too_long) and str(MAX_TEXT_CHARS) in _message(too_long)
    with pytest.raises(ValidationError) as too_many:
        ClassifyJob(texts=["x"] * (MAX_TEXTS_PER_JOB + 1), labels=["a", "b"])
    assert "texts" in _message(too_many) and str(MAX_TEXTS_PER_JOB) in _message(too_many)
    with pytest.raises(ValidationError) as blank:
        ClassifyJob(texts=["fine", "   "], labels=["a", "b"])
    assert "text 1 is blank" in _message(blank)


def test_classify_needs_exactly_one_of_labels_or_model() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'labels'"):
        ClassifyJob(texts=["x"])
    with pytest.raises(ValidationError, match="exactly one of 'labels'"):
        ClassifyJob(texts=["x"], labels=["a", "b"], model="m")
    with pytest.raises(ValidationError, match="distinct"):
        ClassifyJob(texts=["x"], labels=["a", "a"])
    with pytest.raises(ValidationError, match="pattern"):
        ClassifyJob(texts=["x"], model="../etc/passwd")


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        ClassifyJob.model_validate({"texts": ["x"], "labels": ["a", "b"], "lables": ["typo"]})
    assert "lables" in _message(exc)


def test_transcribe_inline_audio_limit_and_one_source() -> None:
    big = base64.b64encode(b"\0" * (MAX_INLINE_AUDIO_BYTES + 1)).decode()
    with pytest.raises(ValidationError, match=f"over the limit of {MAX_INLINE_AUDIO_BYTES}"):
        TranscribeJob.model_validate({"audio_b64": big})
    with pytest.raises(ValidationError, match="exactly one of 'audio_path' or 'audio_b64'"):
        TranscribeJob()
    job = TranscribeJob.model_validate({"audio_b64": base64.b64encode(b"RIFF1234").decode()})
    assert job.audio_b64 == b"RIFF1234"


def test_recommend_coerces_numeric_ids_and_user_shorthand() -> None:
    job = RecommendJob.model_validate({"user": 42, "model": "recs", "candidates": [1, "b"]})
    assert job.users == ["42"] and job.candidates == ["1", "b"]


def test_parse_job_dispatches_on_type() -> None:
    job = parse_job({"type": "recommend", "users": ["u"], "model": "m@3"})
    assert isinstance(job, RecommendJob)
    with pytest.raises(ValidationError):
        parse_job({"type": "no-such-type"})


def test_jobs_round_trip_through_json() -> None:
    job = ClassifyJob(texts=["a b c"], labels=["x", "y"], priority=9, idempotency_key="k1")
    again = parse_job(json.loads(job.model_dump_json()))
    assert again == job


@pytest.mark.parametrize("job_type", list(JOB_MODELS))
def test_conveyor_schema_prints_json_schema(job_type: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "schema", job_type], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["properties"]["type"]["const"] == job_type
    assert {"id", "priority", "deadline", "idempotency_key", "schema_version"} <= set(schema["properties"])
