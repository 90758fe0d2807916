"""Lease renewal against a real Redis, on kombu's own bookkeeping keys."""

from __future__ import annotations

import time
from typing import cast

import redis

from workers.leases import UNACKED_INDEX_KEY, LeaseKeeper


def test_renew_restamps_held_jobs_and_never_resurrects_acked_ones(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(UNACKED_INDEX_KEY)
    stale = time.time() - 3600
    client.zadd(UNACKED_INDEX_KEY, {"held-1": stale, "held-2": stale, "someone-elses": stale})
    keeper = LeaseKeeper(client, lambda: ["held-1", "held-2", "already-acked"], visibility_timeout_s=8)
    assert keeper.renew() == 2
    scores = dict(cast(list[tuple[bytes, float]], client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)))
    assert scores[b"held-1"] > time.time() - 5 and scores[b"held-2"] > time.time() - 5
    assert scores[b"someone-elses"] == stale  # another worker's job is left to its own lease
    assert b"already-acked" not in scores
    client.delete(UNACKED_INDEX_KEY)
