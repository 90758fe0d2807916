"""sentiment: texts labeled positive, negative or neutral by a trained classifier.

The default model, ``sentiment-minilm``, is all-MiniLM-L6-v2 fine-tuned by Conveyor's own
fine-tune job on the VADER paper's human-rated texts (``conveyor models prepare`` builds it);
``model`` may name any sequence-classification model in the store instead.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, Field

from shared.jobs import ModelRef, TextsJob
from shared.kinds.spec import CliOption, KindSpec, ScoreColumn
from shared.results import JobMeta

DEFAULT_SENTIMENT_MODEL: Final = "sentiment-minilm"


class SentimentJob(TextsJob):
    """The sentiment of one or many texts."""

    type: Literal["sentiment"] = "sentiment"
    model: ModelRef = Field(
        default=DEFAULT_SENTIMENT_MODEL,
        description="A sequence-classification model in the store; its labels are the answers.",
    )


class TextSentiment(BaseModel):
    label: str = Field(description="The most probable label (positive, negative or neutral for the default model).")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] = Field(description="Every label's probability (they sum to 1), in the model's order.")


class SentimentResult(BaseModel):
    job_id: str
    type: str = "sentiment"
    results: list[TextSentiment] = Field(description="One per input text, in order.")
    meta: JobMeta


KIND = KindSpec(
    name="sentiment",
    job=SentimentJob,
    result=SentimentResult,
    mode="inference",
    runner="workers.runners.sentiment:SentimentKind",
    summary="Label texts positive, negative or neutral (sentiment-minilm, or a trained --model).",
    items="texts",
    score_columns=(
        ScoreColumn("label", "label", "string"),
        ScoreColumn("score", "score", "float"),
        ScoreColumn("scores", "scores", "json"),
    ),
    cli={"texts": CliOption(flag="--text")},
    example={"texts": ["What a wonderful day!", "The delivery was late and the box was crushed."]},
    demo={
        "texts": [
            "I love this phone, the battery lasts for days.",
            "Worst customer service ever.",
            "The meeting is scheduled for 3pm on Tuesday.",
        ]
    },
    order=10,
    evaluation="workers.evaluators.text:SentimentEvaluation",
)
