"""One checkpoint per training directory, replaced atomically after every epoch.

The file holds tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code when it is read.
A checkpoint written for a different job (another data file, other settings) is ignored.

A job's directory is named by the SHA-256 of its id, never by the id itself: whatever a
sender puts in a task id, the directory is one fixed-length hex name under the checkpoint
root (stable, so a redelivered job finds its checkpoint). ``remove_owned_dir`` deletes only
what lies strictly under its root once symlinks and ``..`` are resolved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE: Final = "checkpoint.pt"


def directory_for(root: Path, job_id: str) -> Path:
    """The checkpoint directory of ``job_id`` under ``root``: ``root/<sha256(id) hex>``."""
    return Path(root) / hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()


def is_strictly_under(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies strictly inside ``root`` once both are resolved (symlinks, ``..``)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


def remove_owned_dir(path: str | os.PathLike[str], owner_root: str | os.PathLike[str]) -> bool:
    """Delete the directory ``path`` and its contents, but only if it lies strictly under
    ``owner_root`` once symlinks and ``..`` are resolved; anything else is refused (logged,
    False). True when it is gone (or was never there).

    The resolved path is removed relative to a descriptor of the resolved root, and
    ``shutil.rmtree`` follows no symlink inside the tree, nor one swapped in for the directory
    itself after the check (it refuses a symlink at the top), so the removal stays inside.
    """
    real_root = os.path.realpath(owner_root)
    real = os.path.realpath(path)
    if not is_strictly_under(real, real_root):
        log.warning("refusing to remove %s: it is not inside %s", path, owner_root)
        return False
    if not os.path.lexists(real):
        return True
    if not os.path.isdir(real):
        log.warning("refusing to remove %s: not a directory", path)
        return False
    relative = os.path.relpath(real, real_root)
    if shutil.rmtree.avoids_symlink_attacks:
        root_fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            shutil.rmtree(relative, ignore_errors=True, dir_fd=root_fd)
        finally:
            os.close(root_fd)
    else:  # pragma: no cover - platforms without the fd-based rmtree
        shutil.rmtree(real, ignore_errors=True)
    return not os.path.lexists(real)


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
