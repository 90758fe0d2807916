"""Whisper transcription: windowing and stitching (no model), then the converted tiny.en on real speech."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest_transcribe import eval_transcribe, librispeech, transcribe_runner, whisper_store  # noqa: F401

from shared.errors import InvalidJob, ModelNotFound
from shared.jobs import TranscribeJob
from shared.model_store import ModelStore
from shared.results import Segment
from workers.audio import SAMPLE_RATE, load_job_audio
from workers.runners.transcribe import (
    DecodeOptions,
    TranscribeRunner,
    WindowOutput,
    split_windows,
    stitch,
    transcribe_jobs,
)

OPTIONS = DecodeOptions(model="whisper-tiny.en")

# Bounds from scripts/eval_transcribe.py on this checkpoint (greedy, CPU float32). Measured:
# 5.8 % over the 12 LibriSpeech clips (11 errors in 190 words; two are British spellings,
# FAVOURS/favors, COUNSELLED/counseled), 8.6 % on the 4 held-out test-clean clips (5 in 58
# words; OpenAI report 5.6 % for tiny.en on all of test-clean) and 3.7 % on the 72 s joined
# clip (7 in 190, every one also made on the clips alone, so none from the seams). The
# bounds leave room for 3-4 more errors (another CPU's arithmetic can flip a word), not more.
MAX_WER_LIBRISPEECH = 0.08
MAX_WER_TEST_CLEAN = 0.15
MAX_WER_LONG = 0.06


# -- windows and stitching, no model ----------------------------------------------------------------
def _silence(seconds: float) -> torch.Tensor:
    return torch.zeros(int(seconds * SAMPLE_RATE))


def test_short_audio_is_one_window_with_its_options() -> None:
    (window,) = split_windows(_silence(30.0), OPTIONS)
    assert (window.offset, window.duration, window.options) == (0.0, 30.0, OPTIONS)


def test_long_audio_becomes_evenly_spaced_overlapping_windows_with_timestamps() -> None:
    windows = split_windows(_silence(71.82), OPTIONS)
    assert [w.offset for w in windows] == pytest.approx([0.0, 13.94, 27.88, 41.82])
    assert all(w.duration == 30.0 for w in windows)
    assert all(w.options.timestamps for w in windows)  # seams are stitched by time
    assert all(b.offset <= a.end - 10.0 for a, b in zip(windows, windows[1:]))
    assert windows[-1].end == pytest.approx(71.82)


def _output(*segments: tuple[float, float, str]) -> WindowOutput:
    segs = [Segment(start=s, end=e, text=t) for s, e, t in segments]
    return WindowOutput(" ".join(s.text for s in segs), segs, "en")


def _words(first: int, last: int) -> str:
    return " ".join(f"w{i}" for i in range(first, last + 1))


def test_stitch_keeps_each_overlapping_word_once() -> None:
    # 50 s of speech, one word a second (word i spans [i, i+1]); windows [0, 30] and [20, 50].
    windows = split_windows(_silence(50.0), OPTIONS)
    left = _output((0, 10, _words(0, 9)), (10, 20, _words(10, 19)), (20, 30, _words(20, 28) + " garbled"))
    right = _output((20, 22, "noise w21"), (22, 30, _words(22, 29)), (30, 40, _words(30, 39)), (40, 50, _words(40, 49)))

    text, segments = stitch(windows, [left, right])

    assert text == _words(0, 49)
    assert " ".join(s.text for s in segments) == text
    assert segments[0] == Segment(start=0, end=10, text=_words(0, 9))  # whole segments keep their times
    assert segments[-1] == Segment(start=40, end=50, text=_words(40, 49))
    assert all(a.start <= b.start for a, b in zip(segments, segments[1:]))


def test_stitch_cuts_at_the_seam_when_the_windows_share_no_words() -> None:
    windows = split_windows(_silence(50.0), OPTIONS)  # seam at 25 s
    left = _output((0, 20, "alpha beta"), (20, 30, "gamma delta"))
    right = _output((20, 30, "one two"), (30, 50, "three four"))

    text, _ = stitch(windows, [left, right])

    assert text == "alpha beta gamma two three four"


def test_single_window_passes_through() -> None:
    windows = split_windows(_silence(5.0), OPTIONS)
    out = WindowOutput("Hello there.", None, "en")
    assert stitch(windows, [out]) == ("Hello there.", [])


# -- the converted model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_conversion_builds_tiny_en_and_is_idempotent(whisper_store: ModelStore) -> None:  # noqa: F811
    from workers.whisper_convert import prepare_default_models

    version = whisper_store.resolve("whisper-tiny.en")
    assert version.ref == "whisper-tiny.en@1" and version.kind == "whisper"
    assert prepare_default_models(whisper_store) == ["whisper-tiny.en@1: already in the store"]
    assert [v.ref for v in whisper_store.versions("whisper-tiny.en")] == ["whisper-tiny.en@1"]

    config = json.loads((version.path / "config.json").read_text())
    assert (config["vocab_size"], config["d_model"], config["encoder_layers"], config["decoder_layers"]) == (
        51864,
        384,
        4,
        4,
    )
    assert config["encoder_attention_heads"] == config["decoder_attention_heads"] == 6
    generation = json.loads((version.path / "generation_config.json").read_text())
    assert generation["no_timestamps_token_id"] == 50362 and generation["decoder_start_token_id"] == 50257
    assert generation["is_multilingual"] is False and len(generation["alignment_heads"]) == 8

    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(version.path)
    assert len(tokenizer) == 51864  # every id the model can emit has a token
    assert tokenizer.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50363, 51863]
    assert (version.path / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def librispeech_results(
    transcribe_runner: TranscribeRunner,  # noqa: F811
    librispeech: list[dict[str, str]],  # noqa: F811
) -> list[dict[str, Any] | Exception]:
    """All 12 clips in one batch, with a corrupt inline file and a missing file among them."""
    jobs = [TranscribeJob(audio_path=row["path"]) for row in librispeech]
    jobs.insert(3, TranscribeJob(audio_b64=base64.b64encode(b"RIFF....WAVEfmt not really a wav file")))
    jobs.insert(7, TranscribeJob(audio_path="/nonexistent/clip.flac"))
    return transcribe_jobs(transcribe_runner, jobs)


def _corpus_wer(pairs: list[tuple[str, str]]) -> float:
    scores = [eval_transcribe.score(ref, hyp) for ref, hyp in pairs]
    return sum(s.errors for s in scores) / sum(s.ref_words for s in scores)


@pytest.mark.slow
def test_librispeech_wer(librispeech_results: list[Any], librispeech: list[dict[str, str]]) -> None:  # noqa: F811
    good = [r for r in librispeech_results if not isinstance(r, Exception)]
    assert len(good) == len(librispeech)
    pairs = [(row["transcript"], out["text"]) for row, out in zip(librispeech, good)]
    held_out = [pair for pair, row in zip(pairs, librispeech) if row["subset"] == "test-clean"]
    assert _corpus_wer(pairs) <= MAX_WER_LIBRISPEECH
    assert _corpus_wer(held_out) <= MAX_WER_TEST_CLEAN
    assert all(out["language"] == "en" and out["segments"] is None for out in good)


@pytest.mark.slow
def test_bad_inputs_fail_alone_in_a_shared_batch(librispeech_results: list[Any]) -> None:
    errors = {i: r for i, r in enumerate(librispeech_results) if isinstance(r, Exception)}
    assert sorted(errors) == [3, 7]
    assert isinstance(errors[3], InvalidJob) and "audio_b64: not a readable" in str(errors[3])
    assert isinstance(errors[7], InvalidJob) and "outside the directories jobs may read" in str(errors[7])


@pytest.mark.slow
def test_run_batch_returns_an_exception_per_bad_window(
    transcribe_runner: TranscribeRunner,  # noqa: F811
    librispeech: list[dict[str, str]],  # noqa: F811
) -> None:
    audio = load_job_audio(TranscribeJob(audio_path=librispeech[2]["path"]))  # "HE COULD WAIT NO LONGER"
    good = split_windows(audio, OPTIONS)[0]
    unknown_model = split_windows(audio, DecodeOptions(model="no-such-model"))[0]
    french = split_windows(audio, DecodeOptions(model="whisper-tiny.en", language="fr"))[0]
    beam = split_windows(audio, DecodeOptions(model="whisper-tiny.en", beam_size=3, max_new_tokens=20))[0]

    results = transcribe_runner.run_batch([good, unknown_model, french, beam, good])

    assert isinstance(results[1], ModelNotFound)
    assert isinstance(results[2], InvalidJob) and "English-only" in str(results[2])
    for ok in (results[0], results[3], results[4]):
        assert isinstance(ok, WindowOutput)
        assert eval_transcribe.normalize(ok.text) == "he could wait no longer"


@pytest.mark.slow
def test_long_clip_is_stitched_without_lost_or_doubled_words(
    transcribe_runner: TranscribeRunner,  # noqa: F811
    librispeech: list[dict[str, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    # The first 8 clips make 48.8 s: windows [0, 30] and [18.8, 48.8], the seam (24.4 s) mid-sentence.
    path, reference = eval_transcribe.join_librispeech(librispeech[:8], tmp_path / "joined.flac")
    job = TranscribeJob(audio_path=str(path), timestamps=True)

    (out,) = transcribe_jobs(transcribe_runner, [job])

    assert not isinstance(out, Exception)
    assert out["duration_s"] == pytest.approx(48.8, abs=0.1)
    score = eval_transcribe.score(reference, out["text"])
    assert score.wer <= MAX_WER_LONG
    # A doubled seam shows as repeated word triples, a lost one as a run of deletions.
    ref_words, hyp_words = eval_transcribe.normalize(reference).split(), eval_transcribe.normalize(out["text"]).split()
    ref_triples = Counter(zip(ref_words, ref_words[1:], ref_words[2:]))
    hyp_triples = Counter(zip(hyp_words, hyp_words[1:], hyp_words[2:]))
    assert not [t for t, n in hyp_triples.items() if n > max(ref_triples[t], 1)]
    assert score.deletions <= 2
    segments = out["segments"]
    assert segments and " ".join(s["text"] for s in segments) == out["text"]  # JSON-ready, as a result carries them
    assert all(0 <= s["start"] <= s["end"] <= out["duration_s"] for s in segments)
    assert all(a["start"] <= b["start"] for a, b in zip(segments, segments[1:]))
