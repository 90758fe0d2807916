"""keywords: the top k keyphrases of each text (KeyBERT's idea: candidate noun phrases, ranked by
embedding similarity to the text, diversified by maximal marginal relevance)."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, Field

from shared.jobs import TextsJob
from shared.kinds.spec import CliOption, KindSpec, ScoreColumn
from shared.results import JobMeta

MAX_KEYWORDS: Final = 50
DEFAULT_DIVERSITY: Final = 0.3


class KeywordsJob(TextsJob):
    """The top k keyphrases of one or many texts."""

    type: Literal["keywords"] = "keywords"
    k: int = Field(default=5, ge=1, le=MAX_KEYWORDS, description=f"Keyphrases per text (1 to {MAX_KEYWORDS}).")
    diversity: float = Field(
        default=DEFAULT_DIVERSITY,
        ge=0.0,
        le=1.0,
        description="Maximal marginal relevance: 0 ranks by similarity to the text alone; towards 1 each pick"
        " also avoids phrases like those already picked.",
    )


class Keyphrase(BaseModel):
    phrase: str = Field(description="As it appears in the text (its first occurrence).")
    score: float = Field(description="Cosine similarity of the phrase's embedding to the text's (-1 to 1).")


class TextKeywords(BaseModel):
    keywords: list[Keyphrase] = Field(description="Best first (by score); at most k, fewer if the text has fewer.")


class KeywordsResult(BaseModel):
    job_id: str
    type: str = "keywords"
    results: list[TextKeywords] = Field(description="One per input text, in order.")
    meta: JobMeta


KIND = KindSpec(
    name="keywords",
    job=KeywordsJob,
    result=KeywordsResult,
    mode="inference",
    runner="workers.runners.keywords:KeywordsKind",
    summary="The top --k keyphrases of texts (noun phrases ranked by all-MiniLM-L6-v2 similarity, with MMR).",
    items="texts",
    score_columns=(ScoreColumn("keywords", "keywords", "json"),),
    cli={"texts": CliOption(flag="--text")},
    example={"texts": ["Solar panels on the school roof cut its electricity bill by a third."], "k": 3},
    demo={
        "texts": [
            "The city council approved a new bike lane network and more frequent electric buses to cut traffic"
            " congestion and air pollution in the old town.",
        ],
        "k": 4,
    },
    order=12,
)
