"""Fields that reach a batch are checked at the schema: label templates have one {} and no
other brace and are filled without str.format; ids, seeds, columns and languages are bounded."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from shared.errors import describe_validation_error
from shared.jobs import ClassifyJob, FineTuneJob, RecommendJob, TrainJob, TranscribeJob, apply_label_template


def refused(make: object, **fields: object) -> str:
    with pytest.raises(ValidationError) as err:
        make(**fields)  # type: ignore[operator]
    return describe_validation_error(err.value)


def classify(**fields: object) -> ClassifyJob:
    return ClassifyJob(texts=["a text"], labels=["x", "y"], **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("template", ["{}{x}", "{0}{}", "{{}}", "{} and {}", "no slot", "{ }", "{}}", "{{}"])
def test_hostile_templates_are_refused_naming_the_field(template: str) -> None:
    message = refused(classify, label_template=template)
    assert message.startswith("label_template: ")


@pytest.mark.parametrize(
    ("template", "label", "expected"),
    [
        ("This text is about {}.", "sports", "This text is about sports."),
        ("{}", "a {0} {name} {{ label }}", "a {0} {name} {{ label }}"),  # the label's braces stay as they are
        ("50% {} \\n", "x", "50% x \\n"),
    ],
)
def test_apply_label_template_fills_the_one_slot(template: str, label: str, expected: str) -> None:
    assert apply_label_template(classify(label_template=template).label_template, label) == expected


def test_apply_label_template_refuses_a_bad_template() -> None:
    with pytest.raises(ValueError, match="no brace besides"):
        apply_label_template("{}{x}", "label")


def test_ids_and_keys_carry_no_control_characters() -> None:
    assert refused(classify, id="a b").startswith("id: ")
    assert refused(classify, id="line\nbreak").startswith("id: ")
    assert refused(classify, id="x" * 201).startswith("id: ")
    assert refused(classify, idempotency_key="k\x00").startswith("idempotency_key: ")
    assert classify(id="order-17:v2", idempotency_key="an order, with spaces").id == "order-17:v2"


def test_numbers_are_finite_and_bounded() -> None:
    for value in (math.nan, math.inf, -1.0):
        assert refused(TrainJob, interactions_path="/d.csv", output_name="m", learning_rate=value).startswith(
            "learning_rate: "
        )
    assert refused(FineTuneJob, data_path="/d.csv", output_name="m", validation_split=math.nan).startswith(
        "validation_split: "
    )
    for seed in (-1, 2**32, 10**40):
        assert refused(TrainJob, interactions_path="/d.csv", output_name="m", seed=seed).startswith("seed: ")
        assert refused(FineTuneJob, data_path="/d.csv", output_name="m", seed=seed).startswith("seed: ")


def test_strings_that_reach_a_batch_are_bounded() -> None:
    assert refused(FineTuneJob, data_path="/d.csv", output_name="m", text_column="").startswith("text_column: ")
    assert refused(TranscribeJob, audio_path="/a\x00.wav").startswith("audio_path: ")
    assert refused(TranscribeJob, audio_path="/a.wav", language="en; rm -rf").startswith("language: ")
    assert TranscribeJob(audio_path="/a.wav", language="german").language == "german"
    assert refused(RecommendJob, users=["u"], model="m", candidates=["x" * 201]).startswith("candidates.0: ")
    assert refused(RecommendJob, users=["u"], model="m", candidates=[""]).startswith("candidates.0: ")
