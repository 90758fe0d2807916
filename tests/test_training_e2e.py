"""Long jobs end to end, with real training-queue workers: resume after kill -9, cancel,
progress, and a fine-tuned model served by classify at once under NAME@latest."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED_DATA, WorkerProcess, ml100k

from producers.client import Client
from shared.errors import JobFailed
from shared.jobs import ClassifyJob, FineTuneJob, RecommendJob, TrainJob
from shared.model_store import ModelStore
from shared.results import ClassifyResult, RecommendResult, TrainingResult

pytestmark = pytest.mark.slow

VISIBILITY_S = 8  # a killed worker's job comes back within this (plus one 5 s sweep)


def _sms_slice(path: Path, per_class: int) -> Path:
    source = SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv"
    if not source.exists():
        pytest.skip(f"{source} missing")
    rows: dict[str, list[str]] = {"ham": [], "spam": []}
    with source.open(newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) == 2 and len(rows[row[0]]) < per_class:
                rows[row[0]].append(row[1])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, texts in rows.items():
            writer.writerows((t, label) for t in texts)
    return path


@pytest.fixture()
def training_worker(conveyor_env: dict[str, str], conveyor_home: Path, client: Client) -> Iterator[Any]:
    """Start training-queue workers on demand; each is stopped (or was killed) at the end."""
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        env = dict(conveyor_env, CONVEYOR_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S))
        proc = WorkerProcess(env, conveyor_home / f"train-worker-{len(started)}.log", ["--only", "training"])
        started.append(proc)
        client.wait_for_workers(180, ["conveyor.training"])
        return proc

    yield start
    for proc in started:
        proc.stop()


def _wait_for_epoch(client: Client, job_id: str, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.job(job_id).status()
        if st.progress is not None and st.progress.epoch >= epoch:
            return
        assert st.state not in ("SUCCESS", "FAILURE"), f"job ended before epoch {epoch}: {st}"
        time.sleep(0.2)
    raise AssertionError(f"no progress past epoch {epoch} within {timeout}s")


def test_training_resumes_from_its_checkpoint_after_kill_9(client: Client, training_worker: Any, worker: Any) -> None:
    first = training_worker()
    job = TrainJob(interactions_path=str(ml100k()), output_name="resumed-recs", model_type="bpr",
                   factors=32, epochs=6, batch_size=1024, learning_rate=0.01)  # fmt: skip
    handle = client.submit(job)
    # Progress names the epoch running (reported every 2 s within it); once epoch 3 runs, the
    # checkpoints of epochs 1 and 2 are written (waiting for epoch 2 raced its checkpoint).
    _wait_for_epoch(client, job.id, 3)
    first.kill()  # SIGKILL: no ack, no warm shutdown
    training_worker()
    result = handle.result(timeout=600)
    assert isinstance(result, TrainingResult)
    assert result.resumed_from_epoch >= 2, result
    assert result.resumed_from_epoch + result.epochs_run == job.epochs
    assert result.model == "resumed-recs@1"
    assert client.queue_depths()["conveyor.training"] == 0  # leases held: nothing redelivered twice
    assert result.metrics["recall@10"] > 0

    # The trained model serves recommend jobs straight away, known and unknown users alike.
    recs = client.submit(RecommendJob(users=["1", "2", "nobody"], k=5, model="resumed-recs")).result(timeout=120)
    assert isinstance(recs, RecommendResult)
    assert [len(r.items) for r in recs.results] == [5, 5, 5]
    assert [r.fallback for r in recs.results] == [False, False, True]


def test_cancel_stops_training_within_seconds_and_registers_nothing(
    client: Client, training_worker: Any, model_dir: Path
) -> None:
    training_worker()
    job = TrainJob(interactions_path=str(ml100k()), output_name="cancelled-recs", epochs=200, batch_size=1024)
    handle = client.submit(job)
    _wait_for_epoch(client, job.id, 1)
    asked = time.monotonic()
    handle.cancel()
    with pytest.raises(JobFailed) as failed:
        handle.result(timeout=60)
    assert failed.value.error_type == "JobCancelled"
    assert time.monotonic() - asked < 15
    assert "cancelled-recs" not in ModelStore(model_dir).names()


def test_bad_training_data_fails_before_training_with_a_clear_error(
    client: Client, training_worker: Any, tmp_path: Path
) -> None:
    training_worker()
    one_class = tmp_path / "one-class.csv"
    one_class.write_text("text,label\n" + "".join(f"message {i},a\n" for i in range(20)))
    missing = tmp_path / "missing-column.csv"
    missing.write_text("body,label\n" + "".join(f"message {i},{'ab'[i % 2]}\n" for i in range(20)))
    cases = [
        (FineTuneJob(data_path=str(one_class), output_name="x"), "at least 2 classes"),
        (FineTuneJob(data_path=str(missing), output_name="x"), "text"),
        (FineTuneJob(data_path=str(tmp_path / "nope.csv"), output_name="x"), "nope.csv"),
        (TrainJob(interactions_path=str(missing), output_name="y"), "user"),
    ]
    handles = client.submit_many([job for job, _ in cases])
    for handle, (_, needle) in zip(handles, cases):
        with pytest.raises(JobFailed) as failed:
            handle.result(timeout=120)
        assert failed.value.error_type == "InvalidJob"
        assert needle in failed.value.message.lower() or needle in failed.value.message


def test_fine_tuned_model_is_served_by_classify_at_once_as_latest(
    client: Client, training_worker: Any, worker: Any, tmp_path: Path
) -> None:
    training_worker()
    data = _sms_slice(tmp_path / "sms.csv", per_class=120)
    # Settings measured to learn on a slice this small (batch 16 at lr 2e-4 learned nothing).
    settings: dict[str, Any] = {"batch_size": 8, "learning_rate": 1e-4, "max_length": 48}
    tuned = client.submit(
        FineTuneJob(data_path=str(data), output_name="sms-filter", epochs=1, **settings)
    ).result(timeout=900)
    assert isinstance(tuned, TrainingResult)
    assert tuned.model.startswith("sms-filter@")
    # It ran for many visibility timeouts; the worker's lease kept it from being redelivered.
    assert client.queue_depths()["conveyor.training"] == 0
    assert tuned.metrics["accuracy"] > 0.8 and "macro_f1" in tuned.metrics
    texts = ["WINNER!! Claim your free prize now, text CLAIM to 80082", "Ok see you at home later tonight"]
    served = client.submit(ClassifyJob(texts=texts, model="sms-filter@latest")).result(timeout=120)
    assert isinstance(served, ClassifyResult)
    assert served.meta.model == tuned.model
    assert [r.labels[0].label for r in served.results] == ["spam", "ham"]

    again = client.submit(
        FineTuneJob(data_path=str(data), output_name="sms-filter", epochs=1, seed=1, **settings)
    ).result(timeout=900)
    assert isinstance(again, TrainingResult) and again.version == tuned.version + 1
    newest = client.submit(ClassifyJob(texts=texts[:1], model="sms-filter")).result(timeout=120)
    assert isinstance(newest, ClassifyResult) and newest.meta.model == again.model  # no worker restart


# -- hostile ids and redelivery (no MovieLens needed: a small generated file) ------------------


def _small_interactions(path: Path, users: int = 40, items: int = 30, per_user: int = 8) -> Path:
    rows = [f"u{u},i{(u * 7 + k * 3) % items},1,{1000 + k}" for u in range(users) for k in range(per_user)]
    path.write_text("user,item,rating,timestamp\n" + "\n".join(rows) + "\n")
    return path


def _plain_celery(redis_url: str) -> Any:
    """A stock Celery client, as any producer outside this repository would have."""
    from celery import Celery

    app = Celery("plain-producer", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json", result_accept_content=["json"]
    )
    return app


def _tree_state(path: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(path)), p.read_text() if p.is_file() else "/") for p in path.rglob("*"))


def test_a_task_id_that_is_a_path_fails_naming_id_and_touches_nothing(
    training_worker: Any, redis_url: str, conveyor_home: Path, tmp_path: Path
) -> None:
    training_worker()
    # Where checkpoints/../../NAME and an absolute task id lead: outside CONVEYOR_HOME.
    canary = conveyor_home.parent / f"canary-{tmp_path.name}"
    (canary / "inside").mkdir(parents=True)
    (canary / "inside" / "keep.txt").write_text("must survive")
    before = _tree_state(canary)
    data = _small_interactions(tmp_path / "small.csv")
    job = {"interactions_path": str(data), "output_name": "hostile-recs", "model_type": "als", "factors": 8,
           "epochs": 2}  # fmt: skip  # a job that would train and finish, but for its id
    app = _plain_celery(redis_url)
    try:
        hostile = [f"../../{canary.name}", str(canary), f"ok/../../../{canary.name}"]
        sent = [app.send_task("conveyor.train", args=[job], task_id=t, queue="conveyor.training") for t in hostile]
        for r in sent:
            r.get(timeout=120, propagate=False)
            assert r.state == "FAILURE", (r.id, r.state, r.result)
            assert type(r.result).__name__ == "InvalidJob" and "id: " in str(r.result), r.result
    finally:
        app.close()
    assert _tree_state(canary) == before  # the directory outside CONVEYOR_HOME is untouched
    assert not (conveyor_home / "checkpoints").exists() or all(
        len(p.name) == 64 for p in (conveyor_home / "checkpoints").iterdir()
    )  # checkpoint directories are hashes, never an id


def test_a_training_job_redelivered_after_it_published_returns_that_version(
    client: Client, training_worker: Any, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    import redis

    training_worker()
    data = _small_interactions(tmp_path / "small.csv")
    job = TrainJob(interactions_path=str(data), output_name=f"once-{tmp_path.name}", model_type="als",
                   factors=8, epochs=2)  # fmt: skip
    first = client.submit(job).result(timeout=120)
    assert isinstance(first, TrainingResult) and first.version == 1

    # The worker died after publishing, before its result and ack: no result in Redis, and the
    # same message (same task id) delivered again. (A stock client sends it here; the SDK
    # refuses a reused id.) Celery never overwrites a SUCCESS, so the stored one goes first.
    r = redis.Redis.from_url(redis_url)
    r.delete(f"celery-task-meta-{job.id}")
    r.close()
    app = _plain_celery(redis_url)
    try:
        again = app.send_task(
            "conveyor.train", args=[job.model_dump(mode="json")], task_id=job.id, queue="conveyor.training"
        )
        second = TrainingResult.model_validate(again.get(timeout=120))
    finally:
        app.close()
    assert (second.model, second.version, second.job_id) == (first.model, first.version, job.id)
    # Not trained again: even the timing figures are the first run's, read back from the version.
    assert second.metrics == first.metrics and second.extra == first.extra and second.epochs_run == first.epochs_run
    assert [v.version for v in ModelStore(model_dir).versions(job.output_name)] == [1]  # no N+1, @latest unmoved
