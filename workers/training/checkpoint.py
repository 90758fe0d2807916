"""One checkpoint per training directory, replaced atomically after every epoch.

The file holds tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code when it is read.
A checkpoint written for a different job (another data file, other settings) is ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE: Final = "checkpoint.pt"


def save(directory: Path, epoch: int, state: dict[str, Any], fingerprint: str) -> Path:
    """Write ``state`` as the checkpoint after ``epoch`` (epochs completed)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    with tmp.open("wb") as f:
        torch.save({"epoch": epoch, "fingerprint": fingerprint, "state": state}, f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not expose a file whose bytes are still in flight
    os.replace(tmp, target)
    return target


def latest(directory: Path, fingerprint: str | None = None) -> tuple[int, dict[str, Any]] | None:
    """(epochs completed, state) of the checkpoint in ``directory``; None if there is none that fits."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if fingerprint is not None and payload.get("fingerprint") != fingerprint:
        log.warning("ignoring %s: it was written for a different job or data file", path)
        return None
    return int(payload["epoch"]), payload["state"]


def clear(directory: Path) -> None:
    """Remove the checkpoint once its model is published: a finished job has nothing to resume."""
    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
