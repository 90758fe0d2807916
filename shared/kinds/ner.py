"""ner: named entities in texts (spaCy's small English pipeline), with character offsets into
each text as it was sent.

The texts field, its limits and the ``text`` alias are ``shared.jobs.TextsJob``'s, shared
with every text kind. Free text: any valid Unicode, NUL included.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, Field, field_validator

from shared.jobs import TextsJob
from shared.kinds.spec import CliOption, KindSpec, ScoreColumn
from shared.results import JobMeta

# The OntoNotes 5 labels of en_core_web_sm 3.8 (the worker checks its pipeline has them all).
NER_LABELS: Final[tuple[str, ...]] = (
    "CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY", "NORP", "ORDINAL", "ORG",
    "PERCENT", "PERSON", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART",
)  # fmt: skip

class NerJob(TextsJob):
    """Named entities (people, organizations, places, dates, amounts, ...) in one or many texts."""

    type: Literal["ner"] = "ner"
    labels: list[Annotated[str, Field(min_length=1, max_length=32)]] | None = Field(
        default=None,
        min_length=1,
        max_length=len(NER_LABELS),
        description="Keep only entities with these labels (case-insensitive), of: " + ", ".join(NER_LABELS) + ".",
    )

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        cleaned = [label.strip().upper() for label in labels]
        unknown = [label for label in cleaned if label not in NER_LABELS]
        if unknown:
            shown = ", ".join(repr(label[:32]) for label in unknown[:5])
            raise ValueError(f"unknown entity label(s) {shown}; the labels are {', '.join(NER_LABELS)}")
        return list(dict.fromkeys(cleaned))


class Entity(BaseModel):
    text: str = Field(description="The entity as it appears: text[start:end] of the input text.")
    label: str = Field(description="OntoNotes label: PERSON, ORG, GPE, DATE, MONEY, ...")
    start: int = Field(description="Offset of its first character in the input text (Unicode code points).")
    end: int = Field(description="Offset just past its last character.")


class TextEntities(BaseModel):
    entities: list[Entity] = Field(description="In the order they appear.")


class NerResult(BaseModel):
    job_id: str
    type: str = "ner"
    results: list[TextEntities] = Field(description="One per input text, in order.")
    meta: JobMeta


KIND = KindSpec(
    name="ner",
    job=NerJob,
    result=NerResult,
    mode="inference",
    runner="workers.runners.ner:NerKind",
    summary="Named entities (PERSON, ORG, GPE, DATE, MONEY, ...) in texts, with character offsets.",
    items="texts",
    score_columns=(ScoreColumn("entities", "entities", "json"),),
    cli={"texts": CliOption(flag="--text"), "labels": CliOption(split=True)},
    example={"texts": ["Ada Lovelace visited Paris in June 1843."]},
    demo={
        "texts": [
            "Brightwave Analytics opened an office in Lisbon on 3 March 2024 with $2.5 million from Northgate Capital.",
            "Maria Santos, its chief executive, flew to Tokyo on Monday.",
        ]
    },
    order=11,
)
