"""Result schemas: what a worker writes back for each job type (as JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class JobMeta(BaseModel):
    """How the job ran: where, and in which batches (one batch size per batched forward pass)."""

    worker: str = Field(description="Celery node name, e.g. gpu0@host or cpu@host.")
    device: str = Field(description="torch device the model ran on.")
    model: str = Field(description="Model that served the job, with its version where it has one.")
    batch_sizes: list[int] = Field(default_factory=list, description="Size of each batch this job's items rode in.")
    queue_ms: float | None = Field(default=None, description="From submitted_at to the worker picking the job up.")
    run_ms: float = Field(description="From pick-up to result.")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="Probability over the candidate labels (sums to 1 per text).")
    similarity: float | None = Field(default=None, description="Cosine similarity (zero-shot only).")


class TextClassification(BaseModel):
    labels: list[LabelScore] = Field(description="Ranked, best first.")


class ClassifyResult(BaseModel):
    job_id: str
    type: str = "classify"
    results: list[TextClassification] = Field(description="One per input text, in order.")
    meta: JobMeta


class Segment(BaseModel):
    start: float
    end: float
    text: str


class TranscribeResult(BaseModel):
    job_id: str
    type: str = "transcribe"
    text: str
    duration_s: float
    language: str | None = None
    segments: list[Segment] | None = None
    meta: JobMeta


class ScoredItem(BaseModel):
    item: str
    score: float


class UserRecommendations(BaseModel):
    user: str
    items: list[ScoredItem]
    fallback: bool = Field(default=False, description="True when the user was unknown: popular items instead.")


class RecommendResult(BaseModel):
    job_id: str
    type: str = "recommend"
    results: list[UserRecommendations]
    meta: JobMeta


class TrainingResult(BaseModel):
    """Result of train and fine-tune jobs: the registered version and its metrics."""

    job_id: str
    type: str
    model: str = Field(description="NAME@N of the registered version.")
    version: int
    metrics: dict[str, float]
    epochs_run: int
    resumed_from_epoch: int = Field(default=0, description="Epochs restored from a checkpoint (0: started fresh).")
    extra: dict[str, Any] = Field(default_factory=dict)
    meta: JobMeta


class Progress(BaseModel):
    """The PROGRESS state of a long job, as shown by Flower and ``conveyor status ID``."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    items_per_s: float | None = None
    eta_s: float | None = None
