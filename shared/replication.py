"""Closing the gap asynchronous replication leaves at a failover, where the user asks for it.

Redis acknowledges a write before any replica has it; if the master dies then, a failover
promotes a replica without it: an acknowledged submit is lost (the job stays PENDING for good), or
a result vanishes until the job reruns. ``WAIT N T`` blocks until N replicas hold every write the
*same connection* made, but Conveyor's writes go out over kombu's and the writer's pooled
connections. The replication stream is in the master's order, so one marker write made after them,
then WAIT on that one connection (a two-command pipeline), covers everything written before it.
"""

from __future__ import annotations

from typing import Any

from shared.errors import NotReplicated

MARKER_KEY = "conveyor:replicated"


def wait_for_replicas(client: Any, replicas: int, timeout_ms: int) -> int:
    """Block until ``replicas`` replicas hold every write made before this call (at most
    ``timeout_ms``); the number that do. Never called inside a transaction or a Lua script."""
    pipe = client.pipeline(transaction=False)
    pipe.set(MARKER_KEY, b"1", px=60_000)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    return int(pipe.execute()[1])


def confirm_replicated(client: Any, replicas: int, timeout_ms: int, what: str) -> None:
    """``wait_for_replicas``, raising NotReplicated when fewer replicas than asked confirm in time."""
    if replicas <= 0:
        return
    got = wait_for_replicas(client, replicas, timeout_ms)
    if got < replicas:
        raise NotReplicated(
            f"{what} reached {got} of {replicas} replicas within {timeout_ms} ms (CONVEYOR_WAIT_REPLICAS): "
            "the master has it, but a failover now could lose it"
        )
