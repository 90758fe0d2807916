"""`conveyor submit` sends only what the user gave: the job a CLI command puts on the queue is
the job the SDK sends for the same arguments (the schema's defaults apply, ALS's among them).

Both are read back from a real Redis, as the message a worker would receive."""

from __future__ import annotations

import base64
import json
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from producers.cli import app
from producers.client import Client
from producers.local_redis import LocalRedis
from shared.jobs import ClassifyJob, FineTuneJob, JobBase, RecommendJob, TrainJob, TranscribeJob
from shared.names import QUEUES

VARYING = ("id", "submitted_at")  # generated per job


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(tmp_path_factory.mktemp("cli-redis"), record_url=False)
    yield server.start()
    server.stop()


@pytest.fixture
def files(tmp_path: Path, private_redis: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("CONVEYOR_REDIS_URL", private_redis)
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path))
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", str(tmp_path))
    interactions = tmp_path / "interactions.csv"
    interactions.write_text("user,item\nu1,i1\nu2,i2\n")
    labeled = tmp_path / "labeled.csv"
    labeled.write_text("text,label\ngood,pos\nbad,neg\n")
    audio = tmp_path / "tone.wav"
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(b"\x00\x01" * 1600)
    return {"interactions": interactions, "labeled": labeled, "audio": audio}


def _queued_job(url: str, job_type: str, job_id: str) -> dict[str, Any]:
    """The job a worker would get: the message's single argument, read back from Redis."""
    client = redis.Redis.from_url(url)
    for key in client.keys(QUEUES[job_type] + "*"):
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            if message["headers"]["id"] == job_id:
                args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                job: dict[str, Any] = args[0]
                return job
    raise AssertionError(f"job {job_id} is not on the {QUEUES[job_type]} queue")


def _via_cli(url: str, *argv: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["submit", *argv])
    assert result.exit_code == 0, result.output
    sent = json.loads(result.stdout)
    return _queued_job(url, sent["type"], sent["id"])


def _via_sdk(url: str, job: JobBase) -> dict[str, Any]:
    with Client() as client:
        handle = client.submit(job)
    return _queued_job(url, job.type, handle.id)


def _same(cli: dict[str, Any], sdk: dict[str, Any]) -> None:
    strip = lambda job: {k: v for k, v in job.items() if k not in VARYING}  # noqa: E731
    assert strip(cli) == strip(sdk)


CASES = [
    # (CLI arguments, the SDK's job) -- paths are filled in from the fixture
    (["train", "--interactions", "{interactions}", "--output", "m", "--model-type", "als"],
     lambda f: TrainJob(interactions_path=str(f["interactions"]), output_name="m", model_type="als")),
    (["train", "--interactions", "{interactions}", "--output", "m"],
     lambda f: TrainJob(interactions_path=str(f["interactions"]), output_name="m")),
    (["train", "--interactions", "{interactions}", "--output", "m", "--model-type", "als", "--regularization",
      "0.5", "--factors", "8", "--epochs", "2", "--seed", "3"],
     lambda f: TrainJob(interactions_path=str(f["interactions"]), output_name="m", model_type="als", regularization=0.5,
                        factors=8, epochs=2, seed=3)),
    (["fine-tune", "--data", "{labeled}", "--output", "c"],
     lambda f: FineTuneJob(data_path=str(f["labeled"]), output_name="c")),
    (["fine-tune", "--data", "{labeled}", "--output", "c", "--epochs", "1", "--max-length", "64"],
     lambda f: FineTuneJob(data_path=str(f["labeled"]), output_name="c", epochs=1, max_length=64)),
    (["classify", "--text", "snow tonight", "--labels", "weather,finance"],
     lambda f: ClassifyJob(texts=["snow tonight"], labels=["weather", "finance"])),
    (["classify", "--text", "a", "--text", "b", "--model", "clf@2", "--top-k", "1", "--priority", "9"],
     lambda f: ClassifyJob(texts=["a", "b"], model="clf@2", top_k=1, priority=9)),
    (["recommend", "--user", "u1", "--model", "rec"],
     lambda f: RecommendJob(users=["u1"], model="rec")),
    (["recommend", "--user", "u1", "--model", "rec", "--include-seen", "--k", "3"],
     lambda f: RecommendJob(users=["u1"], model="rec", exclude_seen=False, k=3)),
    (["transcribe", "--audio", "{audio}", "--no-inline"],
     lambda f: TranscribeJob(audio_path=str(f["audio"]))),
    (["transcribe", "--audio", "{audio}", "--timestamps", "--beam-size", "2"],
     lambda f: TranscribeJob.model_validate(
         {"audio_b64": base64.b64encode(f["audio"].read_bytes()).decode(), "timestamps": True, "beam_size": 2})),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "sdk_job"), CASES, ids=[" ".join(c[0][:1] + c[0][3:6]) for c in CASES])
def test_cli_sends_the_same_job_as_the_sdk(argv: list[str], sdk_job: Any, files: dict[str, Path]) -> None:
    url = Client().settings.broker_url()
    cli = _via_cli(url, *(a.format(**{k: str(v) for k, v in files.items()}) for a in argv))
    _same(cli, _via_sdk(url, sdk_job(files)))


def test_als_gets_its_own_regularization_default(files: dict[str, Path]) -> None:
    url = Client().settings.broker_url()
    als = _via_cli(url, "train", "--interactions", str(files["interactions"]), "--output", "m", "--model-type", "als")
    bpr = _via_cli(url, "train", "--interactions", str(files["interactions"]), "--output", "m")
    # The schema's documented defaults: 10 for ALS (the solver's lambda), 0.01 for BPR.
    assert als["regularization"] == 10.0
    assert bpr["regularization"] == 0.01
