"""transcribe: word error rate of Whisper's transcripts against reference texts.

The file has an audio column (a path, absolute or relative to the file, under the worker's
input roots) and a reference-text column. Clips are decoded, windowed and stitched as transcribe
jobs are (``workers.runners.transcribe``), greedy, English. Both sides are normalized with
Whisper's English normalizer before jiwer counts substitutions, deletions and insertions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jiwer
import torch
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.kinds.compress import EvaluationFields
from shared.model_store import ModelStore, ModelVersion
from shared.settings import Settings
from workers.audio import load_audio_file
from workers.evaluation import Labelled
from workers.model_cache import ModelCache
from workers.runners.transcribe import DecodeOptions, TranscribeRunner, split_windows, stitch
from workers.training.data import read_labeled_texts

_NORMALIZE = EnglishTextNormalizer({})


def normalize(text: str) -> str:
    return " ".join(_NORMALIZE(text).split())


class TranscribeEvaluation:
    default_columns: ClassVar[tuple[str, str]] = ("audio", "text")
    int8_refusal: ClassVar[str | None] = None
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 4)
    chunk_rows: ClassVar[int] = 2  # a clip may be up to an hour of audio

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.runner = TranscribeRunner(store, cache, device)

    def read(self, path: Path, input_column: str, label_column: str, max_rows: int, job: EvaluationFields) -> Labelled:
        data = read_labeled_texts(path, input_column, label_column, min_rows=1, field="data_path", min_classes=1)
        settings = Settings()
        clips: list[Path] = []
        for named in data.texts[:max_rows]:
            full = named if os.path.isabs(named) else str(path.parent / named)
            clips.append(resolve_input(full, settings, f"{input_column} {named[:200]!r}"))
        return Labelled(clips, data.labels[: len(clips)], data.sha256, (input_column, label_column))

    def predict(self, version: ModelVersion, data: Labelled) -> list[Any]:
        if version.kind not in ("whisper", "unknown"):
            raise InvalidJob(f"{version.ref} is a {version.kind!r} model, not Whisper")
        options = DecodeOptions(model=version.ref)
        per_clip = [split_windows(load_audio_file(clip, clip.name), options) for clip in data.inputs]
        windows = [w for clip in per_clip for w in clip]
        decoded: dict[int, Any] = {}
        # Windows whose options match share one generate call, as in a worker's batch (long
        # clips are decoded with timestamps, to stitch them).
        for timestamps in (False, True):
            group = [w for w in windows if w.options.timestamps is timestamps]
            if group:
                key = (version.path, None, 1, None, timestamps)
                decoded.update(zip(map(id, group), self.runner._decode_group(key, group)))
        return [stitch(clip, [decoded[id(w)] for w in clip])[0] for clip in per_clip]

    def metrics(self, data: Labelled, predictions: Sequence[Any]) -> dict[str, float]:
        refs = [normalize(r) for r in data.labels]
        hyps = [normalize(h) for h in predictions]
        words = sum(len(r.split()) for r in refs)
        if not words:
            raise InvalidJob("the reference texts hold no words")
        errors = 0
        for ref, hyp in zip(refs, hyps):
            if not ref:
                errors += len(hyp.split())
            elif not hyp:
                errors += len(ref.split())
            else:
                out = jiwer.process_words(ref, hyp)
                errors += out.substitutions + out.deletions + out.insertions
        return {"wer": errors / words, "reference_words": float(words)}

    def agreement(self, a: Sequence[Any], b: Sequence[Any]) -> float:
        return sum(normalize(x) == normalize(y) for x, y in zip(a, b)) / len(a) if a else 0.0

    def module(self, version: ModelVersion) -> Any:
        return WhisperForConditionalGeneration.from_pretrained(version.path, dtype=torch.float32)
