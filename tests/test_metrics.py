"""The worker-side recorder (workers/metrics.py) against a real Redis, read back through the
real exporter over HTTP: two recorders, a known workload, exact values."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from producers.exporter import Exporter
from producers.queue_stats import submitted_at
from shared.settings import Settings
from workers.metrics import WorkerMetrics

PASSWORD = "metrics-test-pw"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def db_url(redis_url: str, db: int) -> str:
    """The test Redis, another database: no worker of the other tests consumes there."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def scrape(url: str, login: tuple[str, str] | None = ("conveyor", PASSWORD)) -> Samples:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def status_of(url: str, login: tuple[str, str] | None) -> int:
    try:
        scrape(url, login)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def exporter_settings(url: str, home: Path, **extra: object) -> Settings:
    return Settings(redis_url=url, home=home, flower_password=PASSWORD, **extra)  # type: ignore[arg-type]


@pytest.fixture
def metrics_db(redis_url: str) -> Iterator[tuple[str, redis.Redis]]:
    url = db_url(redis_url, 11)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


@pytest.fixture
def exporter(metrics_db: tuple[str, redis.Redis], tmp_path: Path) -> Iterator[Exporter]:
    exp = Exporter(exporter_settings(metrics_db[0], tmp_path), port=0).start()
    yield exp
    exp.stop()


def test_two_recorders_add_up_exactly_in_the_exporter(metrics_db: tuple[str, redis.Redis], exporter: Exporter) -> None:
    _, client = metrics_db
    a = WorkerMetrics(client, "cpu@a", flush_every_s=0.05).start()
    b = WorkerMetrics(client, "cpu@b", flush_every_s=0.05).start()
    for size in (1, 1, 1, 17, 17, 2000):
        a.batch("classify", size)
    for _ in range(5):
        a.job("classify", "SUCCESS", 0.02, 0.3)
    for _ in range(2):
        a.job("classify", "FAILURE", None, 1.5)
    a.retried("classify")
    a.batch_failed("classify")
    a.dead_lettered("conveyor.classify")
    for _ in range(4):
        b.batch("classify", 32)
    b.batch("recommend", 100)
    for _ in range(3):
        b.job("classify", "SUCCESS", 4.0, 0.01)
    b.job("recommend", "REVOKED", 0.5, 0.0)
    b.dead_lettered("conveyor.classify")
    b.dead_lettered("conveyor.classify")
    a.stop()
    b.stop()

    s = scrape(exporter.url)
    assert value(s, "conveyor_jobs_total", job_type="classify", state="SUCCESS") == 8
    assert value(s, "conveyor_jobs_total", job_type="classify", state="FAILURE") == 2
    assert value(s, "conveyor_jobs_total", job_type="recommend", state="REVOKED") == 1
    assert value(s, "conveyor_jobs_total", job_type="recommend", state="SUCCESS") is None

    batch = {le: value(s, "conveyor_batch_size_bucket", job_type="classify", le=le) for le in
             ("1.0", "2.0", "16.0", "32.0", "1024.0", "+Inf")}  # fmt: skip
    assert batch == {"1.0": 3, "2.0": 3, "16.0": 3, "32.0": 9, "1024.0": 9, "+Inf": 10}
    assert value(s, "conveyor_batch_size_count", job_type="classify") == 10
    assert value(s, "conveyor_batch_size_sum", job_type="classify") == 3 + 34 + 2000 + 4 * 32
    assert value(s, "conveyor_batch_size_bucket", job_type="recommend", le="64.0") == 0
    assert value(s, "conveyor_batch_size_bucket", job_type="recommend", le="128.0") == 1

    # Queue wait: 5 x 0.02 s and 3 x 4 s (the 2 failures had no known wait).
    assert value(s, "conveyor_job_queue_wait_seconds_bucket", job_type="classify", le="0.025") == 5
    assert value(s, "conveyor_job_queue_wait_seconds_bucket", job_type="classify", le="2.5") == 5
    assert value(s, "conveyor_job_queue_wait_seconds_bucket", job_type="classify", le="5.0") == 8
    assert value(s, "conveyor_job_queue_wait_seconds_count", job_type="classify") == 8
    assert value(s, "conveyor_job_queue_wait_seconds_sum", job_type="classify") == pytest.approx(12.1)
    assert value(s, "conveyor_job_run_seconds_count", job_type="classify") == 10
    assert value(s, "conveyor_job_run_seconds_bucket", job_type="classify", le="0.01") == 3
    assert value(s, "conveyor_job_run_seconds_bucket", job_type="classify", le="1.0") == 8
    assert value(s, "conveyor_job_run_seconds_sum", job_type="classify") == pytest.approx(4.53)

    assert value(s, "conveyor_batch_failures_total", job_type="classify") == 1
    assert value(s, "conveyor_job_retries_total", job_type="classify") == 1
    assert value(s, "conveyor_dead_letter_total", queue_name="conveyor.classify") == 3
    for worker in ("cpu@a", "cpu@b"):
        assert value(s, "conveyor_worker_metrics_flushed_timestamp_seconds", hostname=worker)
    assert value(s, "conveyor_redis_up") == 1


def test_the_exporter_asks_for_the_login(exporter: Exporter) -> None:
    assert status_of(exporter.url, None) == 401
    assert status_of(exporter.url, ("conveyor", "wrong")) == 401
    assert status_of(exporter.url, ("conveyor", PASSWORD)) == 200
    assert exporter.address == "127.0.0.1"


def test_concurrent_calls_lose_nothing(metrics_db: tuple[str, redis.Redis]) -> None:
    _, client = metrics_db
    recorder = WorkerMetrics(client, "cpu@threads", flush_every_s=0.01).start()

    def work() -> None:
        for i in range(5000):
            recorder.batch("classify", 1 + i % 8)
            recorder.job("classify", "SUCCESS", 0.001, 0.002)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.stop()
    assert int(client.hget("conveyor:metrics:jobs", "classify|SUCCESS") or 0) == 20_000
    raw = client.hgetall("conveyor:metrics:hist:batch_size")
    hist = {(k.decode() if isinstance(k, bytes) else k): int(float(v)) for k, v in raw.items()}
    assert sum(v for k, v in hist.items() if not k.endswith("|sum")) == 20_000
    assert hist["classify|sum"] == 4 * sum(1 + i % 8 for i in range(5000))


def test_a_failed_flush_keeps_the_counts_for_the_next(metrics_db: tuple[str, redis.Redis]) -> None:
    _, client = metrics_db
    dead = redis.Redis(unix_socket_path="/nonexistent/redis.sock", retry=Retry(NoBackoff(), 0))
    recorder = WorkerMetrics(dead, "cpu@flaky")
    recorder.job("classify", "FAILURE", 0.1, 0.2)
    recorder.batch("classify", 3)
    assert recorder.flush() is False
    recorder.job("classify", "FAILURE", 0.1, 0.2)
    recorder.client = client
    assert recorder.flush() is True
    assert int(client.hget("conveyor:metrics:jobs", "classify|FAILURE") or 0) == 2
    assert int(client.hget("conveyor:metrics:hist:batch_size", "classify|4") or 0) == 1
    assert recorder.flush() is True  # nothing twice
    assert int(client.hget("conveyor:metrics:jobs", "classify|FAILURE") or 0) == 2


def test_bad_calls_say_what_is_wrong(metrics_db: tuple[str, redis.Redis]) -> None:
    recorder = WorkerMetrics(metrics_db[1], "cpu@x")
    with pytest.raises(ValueError, match=r"SUCCESS, FAILURE, REVOKED.*'DONE'"):
        recorder.job("classify", "DONE", 0.1, 0.1)
    with pytest.raises(ValueError, match="flush_every_s"):
        WorkerMetrics(metrics_db[1], "cpu@x", flush_every_s=0)


# -- reading the submission time of a queued message ----------------------------------------------
def _kombu_message(job: Mapping[str, object], extra_headers: Mapping[str, object] | None = None) -> bytes:
    body = base64.b64encode(json.dumps([[job], {}, {"callbacks": None}]).encode()).decode()
    message = {
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"task": "conveyor.classify", **(extra_headers or {})},
        "properties": {"body_encoding": "base64", "priority": 4},
    }  # fmt: skip
    return json.dumps(message).encode()


def test_submitted_at_from_whole_and_cut_messages_and_garbage() -> None:
    job = {"id": "j1", "type": "transcribe", "submitted_at": "2026-01-02T03:04:05Z", "audio_b64": "A" * 100_000}
    whole = _kombu_message(job)
    expected = 1767323045.0
    assert submitted_at(whole) == expected
    assert submitted_at(whole[:8192]) == expected  # what the Lua script returns for a big message
    assert submitted_at(_kombu_message({"id": "j2"}, {"submitted_at": 1700000000.5})) == 1700000000.5
    assert submitted_at(_kombu_message({"submitted_at": "2026-01-02T03:04:05"})) == expected  # naive: UTC
    for garbage in (b"", b"\xff\xfe", b"[1, 2]", b'{"body": 3}', b'{"body": "!!!"}', _kombu_message({"id": "x"}),
                    _kombu_message({"submitted_at": "yesterday"}), b'{"body": "W1t7InN1Ym1pd"'):  # fmt: skip
        assert submitted_at(garbage) is None, garbage


def test_queue_reading_without_lua_gives_the_same_numbers(metrics_db: tuple[str, redis.Redis]) -> None:
    from producers.queue_stats import read_queues

    _, client = metrics_db
    client.lpush("conveyor.classify", _kombu_message({"submitted_at": 1000.0}))
    client.lpush("conveyor.classify\x06\x164", _kombu_message({"submitted_at": 1500.0}), b"junk")

    class NoLua(redis.Redis):
        def eval(self, *args: object, **kwargs: object) -> object:
            raise redis.ResponseError("unknown command 'EVAL'")

    no_lua = NoLua(connection_pool=client.connection_pool)
    for reader in (client, no_lua):
        (stats,) = read_queues(reader, ["conveyor.classify"], now=2000.0)
        assert stats.by_priority[9] == 1 and stats.by_priority[5] == 2 and stats.length == 3
        assert stats.oldest_age_s == 1000.0
