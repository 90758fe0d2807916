"""`conveyor demo` on a fresh model store builds the built-in model a job needs before that job
(in the background from the start), and `conveyor up` names what is missing in one line. A real
worker on a Redis database of its own, the real `models prepare` child, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, WorkerProcess, empty_db

from producers.client import Client
from producers.models.preparing import PREPARED_MODELS, missing, missing_line
from shared.kinds import KINDS
from shared.model_store import ModelStore
from shared.settings import Settings

DB = 14


@pytest.fixture()
def url(redis_url: str) -> Iterator[str]:
    """Its own database: the session's workers (with a prepared store) never take these jobs."""
    yield from empty_db(redis_url, DB)


def test_the_prepared_models_are_what_models_prepare_builds_and_the_kinds_defaults() -> None:
    from workers import prepare, sentiment_model, whisper_convert

    assert tuple(PREPARED_MODELS) == prepare.BUILT_HERE
    assert set(PREPARED_MODELS) == {whisper_convert.DEFAULT_MODEL_NAME, sentiment_model.MODEL_NAME}
    for model, kind in PREPARED_MODELS.items():
        assert KINDS[kind].job.model_fields["model"].default == model


def test_up_names_every_missing_model_and_the_command_in_one_line(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, model_dir=tmp_path / "empty")
    line = missing_line(settings)
    assert line is not None and "\n" not in line
    assert "whisper-tiny.en (transcribe)" in line and "sentiment-minilm (sentiment)" in line
    assert "`conveyor models prepare`" in line
    assert missing(ModelStore(tmp_path / "empty"), {"classify", "transcribe"}) == ["whisper-tiny.en"]


@pytest.mark.slow  # loads real weights or trains
def test_demo_on_a_fresh_store_builds_whisper_before_its_transcribe_job(
    url: str, conveyor_env: dict[str, str], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    env = dict(conveyor_env, CONVEYOR_REDIS_URL=url, CONVEYOR_HOME=str(tmp_path / "home"),
               CONVEYOR_MODEL_DIR=str(models))  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log", ["--only", "inference"])
    client = Client(url)
    try:
        client.wait_for_workers(180, ["conveyor.transcribe"])
        assert missing(ModelStore(models)) == list(PREPARED_MODELS)  # a fresh store: nothing prepared
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "producers.cli", "demo", "--kind", "transcribe", "--timeout", "300"],
            env={k: v for k, v in env.items() if k != "CONVEYOR_DEBUG"}, cwd=ROOT,
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        took = time.monotonic() - start
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        lines = out.stdout.splitlines()
        building = next(i for i, line in enumerate(lines) if line.startswith("-- building whisper-tiny.en"))
        waiting = lines.index("-- transcribe: waiting for whisper-tiny.en to be built ...")
        job = next(i for i, line in enumerate(lines) if line.startswith("-- transcribe: job "))
        assert building < waiting < job, out.stdout
        assert '"type": "transcribe"' in lines[job + 1] and '"text": ' in lines[job + 1], out.stdout
        assert "sentiment" not in lines[building], "only what the kinds it runs need"
        assert missing(ModelStore(models)) == ["sentiment-minilm"]
        assert (Path(env["CONVEYOR_HOME"]) / "models-prepare.log").read_text().count("whisper-tiny.en@1") == 1
        assert took < 300
    finally:
        client.close()
        worker.stop()


def test_demo_refuses_an_unknown_kind_before_anything_runs(conveyor_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "demo", "--kind", "no-such-kind"],
        env=dict(os.environ, **conveyor_env), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "no demo job of type no-such-kind; one of " in out.stderr, out.stderr
