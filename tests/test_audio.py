"""Audio decoding for transcription jobs: formats, rates, channels, and every way input goes wrong."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import hypothesis
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given
from hypothesis import strategies as st

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


# -- bounded before it is read and decoded ------------------------------------------------------


def _wav_header(channels: int, rate: int, data_bytes: int, bits: int = 16) -> bytes:
    """A canonical PCM WAV header whose data chunk claims ``data_bytes``."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_bytes)
    )  # fmt: skip


def _sparse_wav(path: Path, channels: int, rate: int, size: int) -> None:
    """A WAV header followed by a hole: ``size`` bytes on paper, a few hundred on disk."""
    header = _wav_header(channels, rate, min(size - 44, 0xFFFF_FF00))  # over 4 GB the size field saturates
    with path.open("wb") as f:
        f.write(header)
        f.truncate(size)


@contextlib.contextmanager
def _never_opened() -> Iterator[None]:
    """Fails the test if the audio module opens or decodes anything."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the file was opened")

    with mock.patch.object(audio_module.os, "open", refuse), mock.patch.object(audio_module.sf, "SoundFile", refuse):
        yield


@pytest.mark.parametrize(
    ("size", "limit_mb"), [(5 * 1024**3, None), (3 * 1024 * 1024, "2")], ids=["5GB-default", "3MB-limit-2"]
)
def test_a_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, limit_mb: str | None
) -> None:
    if limit_mb is None:
        monkeypatch.delenv("CONVEYOR_MAX_AUDIO_FILE_MB", raising=False)
    else:
        monkeypatch.setenv("CONVEYOR_MAX_AUDIO_FILE_MB", limit_mb)
    path = tmp_path / "huge.wav"
    _sparse_wav(path, 2, 48_000, size)
    started = time.monotonic()
    with _never_opened(), pytest.raises(InvalidJob) as err:
        load_job_audio(TranscribeJob(audio_path=str(path)))
    assert time.monotonic() - started < 1.0
    message = str(err.value)
    assert message.startswith(f"audio_path {path}: ")
    assert f"over the limit of {limit_mb or 200} MB" in message and "CONVEYOR_MAX_AUDIO_FILE_MB" in message


def test_a_file_at_the_size_limit_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_tone(SAMPLE_RATE, 0.5), SAMPLE_RATE, "WAV", "PCM_16")
    monkeypatch.setenv("CONVEYOR_MAX_AUDIO_FILE_MB", "1")
    path = tmp_path / "clip.wav"
    path.write_bytes(data + b"\0" * (1024 * 1024 - len(data)))  # exactly 1 MB: trailing bytes after the data chunk
    assert load_job_audio(TranscribeJob(audio_path=str(path))).numel() == SAMPLE_RATE // 2


def test_a_fifo_is_not_a_regular_file_and_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with _never_opened(), pytest.raises(InvalidJob, match="not a regular file"):
        load_job_audio(TranscribeJob(audio_path=str(fifo)))


def test_a_header_claiming_too_many_samples_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 32 channels x 16 bits: 100 MB of sparse "data" is 1.6 million frames, 52 million samples.
    monkeypatch.setenv("CONVEYOR_MAX_AUDIO_SAMPLES", "10000000")
    path = tmp_path / "wide.wav"
    _sparse_wav(path, 32, 48_000, 100 * 1024 * 1024)

    def no_decoding(*_args: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(audio_module, "_read_mono", no_decoding)
    with pytest.raises(InvalidJob) as err:
        load_job_audio(TranscribeJob(audio_path=str(path)))
    assert "x 32 channels = " in str(err.value)
    assert "over the limit of 10000000 (CONVEYOR_MAX_AUDIO_SAMPLES" in str(err.value)


@pytest.mark.parametrize(
    ("channels", "rate", "message"),
    [(33, 16_000, "33 channels"), (1, 500, "invalid sample rate 500 Hz"), (1, 400_000, "invalid sample rate 400000")],
)
def test_header_limits_on_rate_and_channels(channels: int, rate: int, message: str) -> None:
    data = _wav_header(channels, rate, channels * 2 * 10) + b"\0" * (channels * 2 * 10)
    with pytest.raises(InvalidJob, match=f"audio_b64: {message}"):
        load_job_audio(_b64_job(data))


def test_multichannel_audio_is_mixed_down_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "BLOCK_SAMPLES", 6 * 1000)  # 1000 frames a block: 13 blocks, the last partial
    samples = np.random.default_rng(7).uniform(-1, 1, (12_345, 6)).astype(np.float32)

    out = load_job_audio(_b64_job(_encode(samples, SAMPLE_RATE, "WAV", "FLOAT")))

    assert out.dtype == torch.float32 and out.shape == (12_345,)
    np.testing.assert_allclose(out.numpy(), samples.mean(axis=1), rtol=0, atol=1e-6)


def test_nan_in_one_channel_of_a_later_block_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "BLOCK_SAMPLES", 2 * 100)
    samples = np.zeros((1000, 2), np.float32)
    samples[777, 1] = np.inf
    with pytest.raises(InvalidJob, match="NaN or infinite"):
        load_job_audio(_b64_job(_encode(samples, SAMPLE_RATE, "WAV", "FLOAT")))


class _LyingFile:
    """Stands for a SoundFile whose header claims ``frames`` but which holds ``actual``."""

    def __init__(self, frames: int, actual: int, channels: int) -> None:
        self.frames, self.channels, self._left = frames, channels, actual

    def read(self, out: np.ndarray) -> np.ndarray:
        got = min(len(out), self._left)
        out[:got] = 0.25
        self._left -= got
        return out[:got]


@pytest.mark.parametrize(("claimed", "actual"), [(10_000, 2_500), (2_500, 10_000), (5_000, 5_000)])
@pytest.mark.parametrize("channels", [1, 3])
def test_content_shorter_or_longer_than_the_header_never_overruns(
    monkeypatch: pytest.MonkeyPatch, claimed: int, actual: int, channels: int
) -> None:
    monkeypatch.setattr(audio_module, "BLOCK_SAMPLES", 3 * 1024)
    mono = audio_module._read_mono(_LyingFile(claimed, actual, channels), "audio_b64")
    assert mono.shape == (min(claimed, actual),) and bool((mono == 0.25).all())


def test_a_flac_claiming_more_frames_than_it_holds_is_an_invalid_job() -> None:
    data = bytearray(_encode(_tone(SAMPLE_RATE, 0.1), SAMPLE_RATE, "FLAC", "PCM_16"))
    streaminfo = int.from_bytes(data[18:26], "big")  # the low 36 bits: total samples
    data[18:26] = ((streaminfo & ~((1 << 36) - 1)) | 50_000_000).to_bytes(8, "big")
    with pytest.raises(InvalidJob, match="audio_b64: not a readable"):
        load_job_audio(_b64_job(bytes(data)))


def test_an_awkward_sample_rate_resamples_quickly() -> None:
    # 44099 Hz shares no factor with 16 kHz but 1: torchaudio's exact kernel would be 16000 x 44133
    # taps (gigabytes, a minute for 0.1 s of audio); it is resampled as 44.1 kHz instead.
    started = time.monotonic()
    out = load_job_audio(_b64_job(_encode(_tone(44_099, 1.0, freq=1000.0), 44_099, "WAV", "PCM_16")))
    assert time.monotonic() - started < 2.0
    assert out.numel() == pytest.approx(SAMPLE_RATE, rel=0.001)
    assert _peak_hz(out) == pytest.approx(1000, abs=3)


def test_resample_rates_keep_the_kernel_small_and_the_rate_close() -> None:
    for common in (8_000, 11_025, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 88_200, 96_000, 192_000, 384_000):
        assert audio_module.resample_rate(common) == common
    for rate in range(audio_module.MIN_SAMPLE_RATE, audio_module.MAX_SAMPLE_RATE + 1, 37):
        used = audio_module.resample_rate(rate)
        taps, kernel = audio_module._resample_cost(used)
        assert taps <= 1024 and kernel <= 1 << 20, rate
        assert abs(used - rate) / rate <= (0.007 if rate >= 8_000 else 0.05), rate


# -- property: whatever comes in, a finite 1-D float32 tensor or InvalidJob -----------------------

_SUBTYPES = ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"]


def _check_decoded(out: torch.Tensor) -> None:
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() == 1
    assert out.numel() > 0 and bool(torch.isfinite(out).all())


@hypothesis.settings(max_examples=100, database=None, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_fail_as_invalid_job(data: bytes) -> None:
    try:
        out = audio_module.decode_audio(data, "audio_b64")
    except InvalidJob:
        return
    _check_decoded(out)


@hypothesis.settings(max_examples=100, database=None, deadline=None)
@given(
    rate=st.one_of(st.sampled_from([8_000, 16_000, 44_100, 48_000]), st.integers(1, 500_000)),
    channels=st.integers(1, 40),
    frames=st.integers(0, 300),
    subtype=st.sampled_from(_SUBTYPES),
    values=st.lists(st.floats(width=32), min_size=1, max_size=64),
    cut=st.one_of(st.none(), st.integers(0, 2_000)),
    flips=st.lists(st.tuples(st.integers(0, 2_000), st.integers(0, 255)), max_size=4),
)
def test_arbitrary_small_wavs_decode_or_fail_as_invalid_job(
    rate: int,
    channels: int,
    frames: int,
    subtype: str,
    values: list[float],
    cut: int | None,
    flips: list[tuple[int, int]],
) -> None:
    pattern = np.array(values, dtype=np.float32)
    if subtype in ("ULAW", "ALAW"):  # libsndfile's own encoder crashes on values outside [-1, 1] (a write bug)
        pattern = np.clip(np.nan_to_num(pattern), -1.0, 1.0)
    samples = np.resize(pattern, frames * channels).reshape(frames, channels)
    buf = io.BytesIO()
    try:
        sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    except (sf.LibsndfileError, ValueError, RuntimeError, TypeError):
        hypothesis.assume(False)  # libsndfile will not write these parameters
    data = bytearray(buf.getvalue())
    for at, byte in flips:  # a damaged header or payload
        if at < len(data):
            data[at] = byte
    if cut is not None:
        del data[cut:]
    try:
        out = audio_module.decode_audio(bytes(data), "audio_b64")
    except InvalidJob:
        return
    _check_decoded(out)


@hypothesis.settings(max_examples=100, database=None, deadline=None)
@given(
    tag=st.sampled_from([1, 2, 3, 6, 7, 0x11, 0xFFFE, 0]),
    channels=st.integers(0, 70_000),
    rate=st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([16_000, 44_099, 384_000, 384_001])),
    bits=st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64, 65_535]),
    claimed=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=2048),
)
def test_hand_made_wav_headers_decode_or_fail_as_invalid_job(
    tag: int, channels: int, rate: int, bits: int, claimed: int, payload: bytes
) -> None:
    block = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", tag, channels & 0xFFFF, rate, (rate * block) & 0xFFFF_FFFF, block, bits)
    data = (
        b"RIFF" + struct.pack("<I", (36 + len(payload)) & 0xFFFF_FFFF) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", claimed) + payload
    )  # fmt: skip
    try:
        out = audio_module.decode_audio(data, "audio_b64")
    except InvalidJob:
        return
    _check_decoded(out)
