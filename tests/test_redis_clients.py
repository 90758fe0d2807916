"""kombu reuses one redis-py client per channel pool (shared/redis_clients.py), on a real Redis."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from shared.redis_clients import reuse_redis_clients


@pytest.fixture
def constructed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts redis.Redis constructions while the test runs."""
    count = [0]
    original = redis.Redis.__init__

    def counting(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        count[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    return count


def test_publish_and_ack_from_many_threads_share_one_client(redis_url: str, constructed: list[int]) -> None:
    reuse_redis_clients()
    queue = Queue("conveyor.test.reuse", Exchange("conveyor.test.reuse", type="direct"), routing_key="reuse")
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        queue(channel).purge()
        producer = conn.Producer(channel, serializer="json")
        before = constructed[0]

        def publish(offset: int) -> None:
            for i in range(50):
                producer.publish({"n": offset * 50 + i}, exchange=queue.exchange, routing_key="reuse")

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert constructed[0] - before <= 1  # kombu alone would build one per publish: 200

        got = set()
        for _ in range(200):
            message = queue(channel).get(no_ack=False)
            assert message is not None
            got.add(message.payload["n"])
            message.ack()
        assert got == set(range(200))  # nothing lost or doubled through the shared client
        assert queue(channel).get() is None
        assert constructed[0] - before <= 1

        # kombu drops its pool after a connection error; the next call must not use the old one.
        old_pool = channel.pool
        channel._pool = None
        with channel.conn_or_acquire() as client:
            assert client.connection_pool is channel.pool is not old_pool
            assert client.ping()
        queue(channel).delete()
