"""Transcribe end to end: real worker process, real Whisper tiny.en converted by
`conveyor models prepare`, real LibriSpeech speech; a corrupt job fails alone."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest_transcribe import eval_transcribe, librispeech  # noqa: F401

from producers.client import Client
from shared.errors import JobFailed
from shared.jobs import TranscribeJob
from shared.results import TranscribeResult

pytestmark = pytest.mark.slow


def test_many_jobs_share_batches_and_a_corrupt_one_fails_alone(
    client: Client,
    worker: Any,
    prepared_models: Path,
    librispeech: list[dict[str, str]],  # noqa: F811
) -> None:
    clips = librispeech[:6]
    jobs = [
        # half by path (the worker reads the file), half inline
        TranscribeJob(audio_path=c["path"])
        if i % 2
        else TranscribeJob(audio_b64=base64.b64encode(Path(c["path"]).read_bytes()))
        for i, c in enumerate(clips)
    ]
    corrupt = TranscribeJob(audio_b64=base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk"))
    handles = client.submit_many(jobs[:3] + [corrupt] + jobs[3:])
    bad = handles.pop(3)
    with pytest.raises(JobFailed) as failed:
        bad.result(timeout=300)
    assert failed.value.error_type == "InvalidJob" and "audio_b64" in failed.value.message
    batch_sizes: list[int] = []
    errors = words = 0
    for clip, handle in zip(clips, handles):
        result = handle.result(timeout=600)
        assert isinstance(result, TranscribeResult)
        assert result.job_id == handle.id and result.meta.model == "whisper-tiny.en@1"
        score = eval_transcribe.score(clip["transcript"], result.text)
        errors, words = errors + score.errors, words + score.ref_words
        batch_sizes += result.meta.batch_sizes
    # tiny.en: 5.8 % WER over all 12 clips in scripts/eval_transcribe.py; a wrong pairing of
    # results to jobs would be near 100 %.
    assert errors / words <= 0.12
    assert max(batch_sizes) > 1, "no two jobs shared a generate call"


def test_cli_transcribes_a_file_with_timestamps(
    worker: Any,
    prepared_models: Path,
    librispeech: list[dict[str, str]],  # noqa: F811
) -> None:
    clip = librispeech[0]
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "submit", "transcribe", "--audio", clip["path"], "--timestamps",
         "--wait"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert eval_transcribe.score(clip["transcript"], result["text"]).wer <= 0.2
    assert result["segments"] and result["segments"][-1]["end"] <= result["duration_s"] + 0.5
