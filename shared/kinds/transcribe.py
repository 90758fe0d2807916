"""transcribe: speech from a file the worker reads, or inline bytes."""

from shared.jobs import TranscribeJob
from shared.kinds.spec import CliOption, KindSpec
from shared.results import TranscribeResult

KIND = KindSpec(
    name="transcribe",
    job=TranscribeJob,
    result=TranscribeResult,
    mode="inference",
    runner="workers.runners.transcribe:TranscribeKind",
    summary="Transcribe speech (WAV, FLAC or OGG).",
    scoring="producers.score.kinds:TranscribeScoring",
    cli={"audio_b64": CliOption(flag="--audio", file="base64")},
    cli_skip=("audio_path",),
    example={"audio_path": "/data/clip.wav"},
    order=1,
    evaluation="workers.evaluators.speech:TranscribeEvaluation",
    model_kinds=("whisper",),
)
