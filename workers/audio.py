"""Decode a transcription job's audio into what Whisper reads: float32 mono at 16 kHz.

soundfile (libsndfile, bundled in its wheel) decodes; torchaudio.load would need
torchcodec and FFmpeg. Every problem with the input becomes ``InvalidJob`` naming the
source, so a bad file fails its own job and never the batch it would have joined.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Final

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.jobs import MAX_AUDIO_SECONDS, TranscribeJob

SAMPLE_RATE: Final = 16_000
# libsndfile names; WAVEX and RF64 are WAV variants (multichannel, over 4 GB).
_ACCEPTED_FORMATS: Final = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG"})


def load_job_audio(job: TranscribeJob) -> torch.Tensor:
    """The job's audio as a 1-D float32 tensor at 16 kHz."""
    if job.audio_path is not None:
        return load_audio_file(resolve_input(job.audio_path, field="audio_path"), job.audio_path)
    assert job.audio_b64 is not None  # the schema requires exactly one source
    return decode_audio(job.audio_b64, "audio_b64")


def load_audio_file(path: Path, named: str | None = None) -> torch.Tensor:
    """Read and decode ``path``; errors name the file as the job did (``named``), not as resolved."""
    where = f"audio_path {named or path}"
    if not path.exists():
        raise InvalidJob(f"{where}: file not found")
    if not path.is_file():
        raise InvalidJob(f"{where}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidJob(f"{where}: cannot read ({exc.strerror or exc})") from exc
    return decode_audio(data, where)


def decode_audio(data: bytes, where: str) -> torch.Tensor:
    """Decode WAV, FLAC or OGG bytes; ``where`` names the source in error messages."""
    if not data:
        raise InvalidJob(f"{where}: empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format not in _ACCEPTED_FORMATS:
                raise InvalidJob(f"{where}: unsupported format {f.format}; send WAV, FLAC or OGG")
            rate, frames = f.samplerate, f.frames
            if rate <= 0:
                raise InvalidJob(f"{where}: invalid sample rate {rate}")
            # Check the length before decoding, so an oversized file costs no memory.
            if frames / rate > MAX_AUDIO_SECONDS:
                raise InvalidJob(
                    f"{where}: {frames / rate:.1f} s of audio, over the limit of {MAX_AUDIO_SECONDS:.0f} s"
                )
            samples = f.read(dtype="float32", always_2d=True)
    except InvalidJob:
        raise
    except sf.LibsndfileError as exc:
        # str(exc) names the BytesIO it read from, memory address included; error_string is libsndfile's own.
        raise InvalidJob(f"{where}: not a readable WAV, FLAC or OGG file ({exc.error_string})") from exc
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidJob(f"{where}: not a readable WAV, FLAC or OGG file ({type(exc).__name__})") from exc
    if samples.shape[0] == 0:
        raise InvalidJob(f"{where}: the file holds no audio samples")
    if not np.isfinite(samples).all():
        raise InvalidJob(f"{where}: the audio contains NaN or infinite samples")
    mono = torch.from_numpy(samples).mean(dim=1)
    if rate != SAMPLE_RATE:
        mono = AF.resample(mono, orig_freq=rate, new_freq=SAMPLE_RATE)
    return mono.contiguous()
