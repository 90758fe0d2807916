"""Decode a transcription job's audio into what Whisper reads: float32 mono at 16 kHz.

soundfile (libsndfile, bundled in its wheel) decodes; torchaudio.load would need
torchcodec and FFmpeg. Every problem with the input becomes ``InvalidJob`` naming the
source, so a bad file fails its own job and never the batch it would have joined.

Every cost is bounded before it is paid, so a hostile or broken file costs its job and not
the worker's memory:

- a file's size is checked (``os.stat``) before it is opened (``CONVEYOR_MAX_AUDIO_FILE_MB``),
  and it is never read whole: libsndfile reads it from the descriptor as it decodes;
  inline ``audio_b64`` is capped by the job schema;
- the header's sample rate, channels, length and decoded size (frames x channels,
  ``CONVEYOR_MAX_AUDIO_SAMPLES``) are checked before any sample is decoded;
- samples are decoded in blocks, each mixed down to mono as it comes into one array
  preallocated from the header (never filled past it, trimmed if the file holds less): the
  peak is that mono array plus one block, never frames x channels x 4 bytes;
- the resampling kernel is bounded too: torchaudio's sinc kernel grows with the reduced
  ratio rate/16000, so a rate coprime with 16000 (44099 Hz) would cost gigabytes and minutes
  for a second of audio; such a rate is resampled as the nearest round rate instead (under
  0.7 % off above 8 kHz: a speed change no recogniser notices).
"""

from __future__ import annotations

import io
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.jobs import MAX_AUDIO_SECONDS, TranscribeJob
from shared.settings import Settings

SAMPLE_RATE: Final = 16_000
# libsndfile names; WAVEX and RF64 are WAV variants (multichannel, over 4 GB).
_ACCEPTED_FORMATS: Final = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG"})
# Below 1 kHz nothing of speech is left; 384 kHz is the highest rate audio hardware records.
MIN_SAMPLE_RATE: Final = 1_000
MAX_SAMPLE_RATE: Final = 384_000
MAX_CHANNELS: Final = 32
# Samples (frames x channels) decoded per block: 4 MB of float32 whatever the channel count.
BLOCK_SAMPLES: Final = 1 << 20
# Bounds on torchaudio's sinc resampling kernel: taps per output sample, and its elements.
_MAX_RESAMPLE_TAPS: Final = 1024
_MAX_RESAMPLE_KERNEL: Final = 1 << 20
_OPEN_FLAGS: Final = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC


def load_job_audio(job: TranscribeJob, settings: Settings | None = None) -> torch.Tensor:
    """The job's audio as a 1-D float32 tensor at 16 kHz."""
    settings = settings or Settings()
    if job.audio_path is not None:
        resolved = resolve_input(job.audio_path, settings, field="audio_path")
        return load_audio_file(resolved, job.audio_path, settings)
    assert job.audio_b64 is not None  # the schema requires exactly one source
    return decode_audio(job.audio_b64, "audio_b64", settings)


def load_audio_file(path: Path, named: str | None = None, settings: Settings | None = None) -> torch.Tensor:
    """Decode the file at ``path`` (already resolved, see ``resolve_input``); errors name the
    file as the job did (``named``), not as resolved.

    The size is checked before the file is opened; the descriptor opened is checked again
    (a file swapped after the first look is still a regular file within the limit), and
    libsndfile reads from it block by block, never the whole file into memory.
    """
    settings = settings or Settings()
    where = f"audio_path {named or path}"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InvalidJob(f"{where}: file not found") from None
    except OSError as exc:
        raise InvalidJob(f"{where}: cannot read ({exc.strerror or exc})") from exc
    _check_file(info, where, settings)
    try:
        # O_NONBLOCK: a FIFO put in the file's place does not hang the open (and fails the
        # check below); O_NOFOLLOW: nor does a symlink put there lead elsewhere.
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise InvalidJob(f"{where}: cannot read ({exc.strerror or exc})") from exc
    try:
        _check_file(os.fstat(fd), where, settings)
        return _decode(fd, where, settings)
    finally:
        os.close(fd)


def decode_audio(data: bytes, where: str, settings: Settings | None = None) -> torch.Tensor:
    """Decode WAV, FLAC or OGG bytes; ``where`` names the source in error messages."""
    if not data:
        raise InvalidJob(f"{where}: empty (0 bytes)")
    return _decode(io.BytesIO(data), where, settings or Settings())


def _check_file(info: os.stat_result, where: str, settings: Settings) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InvalidJob(f"{where}: not a regular file")
    if info.st_size == 0:
        raise InvalidJob(f"{where}: empty (0 bytes)")
    limit_mb = settings.max_audio_file_mb
    if info.st_size > limit_mb * 1024 * 1024:
        raise InvalidJob(
            f"{where}: {info.st_size / (1024 * 1024):.1f} MB, over the limit of {limit_mb} MB for an audio file "
            "(CONVEYOR_MAX_AUDIO_FILE_MB on the worker)"
        )


def _decode(source: int | BinaryIO, where: str, settings: Settings) -> torch.Tensor:
    try:
        # closefd=False: the caller owns a descriptor it passed.
        with sf.SoundFile(source, closefd=False) as f:
            rate = _check_header(f, where, settings)
            mono = _read_mono(f, where)
    except InvalidJob:
        raise
    except sf.LibsndfileError as exc:
        # str(exc) names the BytesIO it read from, memory address included; error_string is libsndfile's own.
        raise InvalidJob(f"{where}: not a readable WAV, FLAC or OGG file ({exc.error_string})") from exc
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidJob(f"{where}: not a readable WAV, FLAC or OGG file ({type(exc).__name__})") from exc
    out = torch.from_numpy(mono)
    if rate != SAMPLE_RATE:
        out = AF.resample(out, orig_freq=resample_rate(rate), new_freq=SAMPLE_RATE)
        if not bool(torch.isfinite(out).all()):  # finite samples near float32's limit can overflow
            raise InvalidJob(f"{where}: the audio's samples are out of range")
    return out.contiguous()


def _check_header(f: sf.SoundFile, where: str, settings: Settings) -> int:
    """The sample rate, once the header's claims are within every limit; nothing decoded yet."""
    if f.format not in _ACCEPTED_FORMATS:
        raise InvalidJob(f"{where}: unsupported format {f.format}; send WAV, FLAC or OGG")
    rate, channels, frames = f.samplerate, f.channels, f.frames
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidJob(
            f"{where}: invalid sample rate {rate} Hz (accepted: {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz)"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidJob(f"{where}: {channels} channels (accepted: 1 to {MAX_CHANNELS})")
    if frames < 0:
        raise InvalidJob(f"{where}: invalid length of {frames} frames")
    if frames / rate > MAX_AUDIO_SECONDS:
        raise InvalidJob(f"{where}: {frames / rate:.1f} s of audio, over the limit of {MAX_AUDIO_SECONDS:.0f} s")
    limit = settings.max_audio_samples
    if frames * channels > limit:
        raise InvalidJob(
            f"{where}: {frames} frames x {channels} channels = {frames * channels} samples, over the limit of "
            f"{limit} (CONVEYOR_MAX_AUDIO_SAMPLES on the worker)"
        )
    return int(rate)


def _read_mono(f: sf.SoundFile, where: str) -> np.ndarray:
    """Decode block by block into one mono float32 array sized from the header.

    A file holding less than its header claims is trimmed to what it held; one holding more
    is read only as far as the header said (the array is never grown past the checked size).
    """
    channels, capacity = f.channels, f.frames
    mono = np.empty(capacity, dtype=np.float32)  # untouched pages cost nothing: a lying header is free
    block_frames = max(1, BLOCK_SAMPLES // channels)
    block = np.empty((block_frames, channels), dtype=np.float32) if channels > 1 else None
    filled = 0
    while filled < capacity:
        want = min(block_frames, capacity - filled)
        target = mono[filled : filled + want]
        got = len(f.read(out=target if block is None else block[:want]))
        if got == 0:
            break  # the file ended before its header said
        if block is not None:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN and overflow are caught just below
                np.mean(block[:got], axis=1, out=target[:got])
        # NaN or inf in any channel leaves its mark on the mix (inf - inf is NaN).
        if not np.isfinite(target[:got]).all():
            raise InvalidJob(f"{where}: the audio contains NaN or infinite samples")
        filled += got
    if filled == 0:
        raise InvalidJob(f"{where}: the file holds no audio samples")
    return mono[:filled] if filled < capacity else mono


def _resample_cost(rate: int) -> tuple[int, int]:
    """(taps per output sample, kernel elements) of torchaudio's sinc resampling from ``rate``
    to 16 kHz (lowpass_filter_width 6, rolloff 0.99: its defaults, as ``_decode`` calls it)."""
    gcd = math.gcd(rate, SAMPLE_RATE)
    orig, new = rate // gcd, SAMPLE_RATE // gcd
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    taps = 2 * width + orig
    return taps, new * taps


def resample_rate(rate: int) -> int:
    """The rate to resample ``rate`` audio from: itself where torchaudio's kernel stays small
    (every common rate: 8, 11.025, 22.05, 44.1, 48, 96, 192 kHz...), else the nearest multiple
    of 100 Hz, or of 1 kHz, whose kernel does (at most 0.7 % off above 8 kHz)."""
    for step in (1, 100, 1000):
        candidate = max(step, round(rate / step) * step)
        taps, kernel = _resample_cost(candidate)
        if taps <= _MAX_RESAMPLE_TAPS and kernel <= _MAX_RESAMPLE_KERNEL:
            return candidate
    return round(rate / SAMPLE_RATE) * SAMPLE_RATE or SAMPLE_RATE  # not reached for rates up to 384 kHz
