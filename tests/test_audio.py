"""Audio decoding for transcription jobs: formats, rates, channels, and every way input goes wrong."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import workers.audio as audio_module
from shared.errors import InvalidJob
from shared.jobs import TranscribeJob
from workers.audio import SAMPLE_RATE, load_job_audio


@pytest.fixture(autouse=True)
def _inputs_under_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", str(tmp_path))  # jobs read files only under the input roots


def _tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _peak_hz(samples: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(samples).abs()
    return float(spectrum.argmax()) * SAMPLE_RATE / samples.numel()


def _b64_job(data: bytes) -> TranscribeJob:
    return TranscribeJob(audio_b64=base64.b64encode(data))


def test_stereo_44k_wav_becomes_16k_mono(tmp_path: Path) -> None:
    left = _tone(44_100, 1.5)
    stereo = np.stack([left, 0.5 * left], axis=1)  # the mono mix is 0.75 x the left channel
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44_100, subtype="PCM_16")

    out = load_job_audio(TranscribeJob(audio_path=str(path)))

    assert out.dtype == torch.float32 and out.dim() == 1
    assert out.numel() == int(1.5 * SAMPLE_RATE)
    assert _peak_hz(out) == pytest.approx(440, abs=2)
    assert float(out.abs().max()) == pytest.approx(0.75 * 0.5, rel=0.03)


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"),
    [("FLAC", "PCM_16", 22_050), ("OGG", "VORBIS", 48_000), ("WAV", "FLOAT", 8_000), ("WAV", "PCM_16", 16_000)],
)
def test_formats_and_rates_decode_inline(fmt: str, subtype: str, rate: int) -> None:
    data = _encode(_tone(rate, 2.0, freq=1000.0), rate, fmt, subtype)

    out = load_job_audio(_b64_job(data))

    assert out.numel() == pytest.approx(2 * SAMPLE_RATE, abs=2)
    assert _peak_hz(out) == pytest.approx(1000, abs=2)


def test_16k_mono_passes_through_unchanged(tmp_path: Path) -> None:
    samples = _tone(SAMPLE_RATE, 0.5)
    path = tmp_path / "clip.wav"
    sf.write(path, samples, SAMPLE_RATE, subtype="FLOAT")

    out = load_job_audio(TranscribeJob(audio_path=str(path)))

    assert torch.equal(out, torch.from_numpy(samples))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not audio at all, just some text bytes" * 10, "audio_b64: not a readable WAV, FLAC or OGG file"),
        (_encode(_tone(16_000, 1.0), 16_000, "WAV", "PCM_16")[:30], "audio_b64: not a readable WAV, FLAC or OGG"),
        (_encode(np.zeros(0, np.float32), 16_000, "WAV", "PCM_16"), "audio_b64: the file holds no audio samples"),
        (_encode(_tone(16_000, 0.5), 16_000, "AIFF", "PCM_16"), "audio_b64: unsupported format AIFF"),
        (_encode(np.full(100, np.nan, np.float32), 16_000, "WAV", "FLOAT"), "NaN or infinite"),
    ],
    ids=["garbage", "truncated-header", "zero-samples", "aiff", "nan"],
)
def test_bad_inline_audio_is_an_invalid_job(data: bytes, message: str) -> None:
    with pytest.raises(InvalidJob, match=message):
        load_job_audio(_b64_job(data))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(InvalidJob, match=f"audio_path {missing}: file not found"):
        load_job_audio(TranscribeJob(audio_path=str(missing)))


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InvalidJob, match=r"empty \(0 bytes\)"):
        load_job_audio(TranscribeJob(audio_path=str(empty)))


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="not a regular file"):
        load_job_audio(TranscribeJob(audio_path=str(tmp_path)))


def test_corrupt_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.flac"
    path.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    with pytest.raises(InvalidJob, match=f"audio_path {path}: not a readable"):
        load_job_audio(TranscribeJob(audio_path=str(path)))


def test_corrupt_bytes_error_shows_no_memory_address() -> None:
    with pytest.raises(InvalidJob) as err:
        load_job_audio(_b64_job(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk"))
    assert "not a readable WAV" in str(err.value)
    assert " at 0x" not in str(err.value) and "BytesIO" not in str(err.value)


def test_file_outside_the_input_roots_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = tmp_path / "inputs"
    inside.mkdir()
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", str(inside))
    outside = tmp_path / "clip.wav"
    outside.write_bytes(_encode(_tone(SAMPLE_RATE, 0.2), SAMPLE_RATE, "WAV", "PCM_16"))
    (inside / "link.wav").symlink_to(outside)
    for path in (outside, inside / ".." / "clip.wav", inside / "link.wav", Path("/etc/passwd")):
        with pytest.raises(InvalidJob, match=r"audio_path: .* is outside the directories jobs may read"):
            load_job_audio(TranscribeJob(audio_path=str(path)))


def test_audio_over_the_length_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "MAX_AUDIO_SECONDS", 1.0)  # a real hour of audio would be slow to build
    data = _encode(_tone(8_000, 1.5), 8_000, "WAV", "PCM_16")
    with pytest.raises(InvalidJob, match=r"1\.5 s of audio, over the limit of 1 s"):
        load_job_audio(_b64_job(data))
