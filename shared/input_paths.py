"""Input files a job names (``audio_path``, ``data_path``, ...) are read only under the
configured roots (``CONVEYOR_INPUT_ROOTS``).

The path is resolved first (symlinks and ``..``), then compared with the roots, and only a
path inside a root is ever looked at on disk: the error for a path outside the roots is the
same whether or not a file is there, so a job cannot probe the worker's file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.errors import InvalidJob
from shared.settings import Settings


def resolve_input(path: str | Path, settings: Settings | None = None, field: str = "path") -> Path:
    """The real path of ``path`` if it lies under an input root; else ``InvalidJob`` naming ``field``.

    The result has every symlink resolved: open it, not the job's string, so a link swapped
    after this check still cannot lead outside the roots through the part already resolved.
    """
    text = str(path)
    if not text or "\x00" in text:
        raise InvalidJob(f"{field}: not a valid path")
    if not os.path.isabs(text):
        raise InvalidJob(f"{field}: must be an absolute path")
    real = Path(os.path.realpath(text))
    roots = (settings or Settings()).allowed_input_roots()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise InvalidJob(
            f"{field}: {text} is outside the directories jobs may read (CONVEYOR_INPUT_ROOTS on the worker); "
            "put the file under one of them, or send its contents inline where the job type allows"
        )
    return real
