"""Run a watching process (Flower, the exporter) under the read-only ``monitor`` Redis role.

The monitor role may read, not write queues or send worker control commands, and three habits of
Celery's event receiver would be refused (NOPERM) by it; each is switched off here, in this process:

- kombu's Redis transport has every consumer sweep ``unacked`` for messages whose worker died and put
  them back on their queues (``restore_visible``). A process that only watches holds no messages, and
  the workers already sweep.
- ``capture(wakeup=True)`` broadcasts ``heartbeat`` on the control channel; workers send one every
  2 s anyway.
- on close, kombu deletes the receiver's auto-delete queue's lists: they are never filled (events
  come by PUBLISH), so only its binding is removed.

    python -m producers.tenancy.monitor_process producers.exporter --port 9809
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

EVENT_QUEUE_PREFIX = "celeryev."
# producers/flower_secure.py's switches, set by `conveyor up` (producers/stack.py)
READ_ONLY_USERS_ENV = "CONVEYOR_FLOWER_READ_ONLY_USERS"  # logins (commas) refused all but GET and HEAD
WATCH_ONLY_ENV = "CONVEYOR_FLOWER_WATCH_ONLY"  # "1": Flower sends no worker control commands


def _nothing(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def watch_only() -> None:
    """This process watches: no ``unacked`` sweep, no wake-up broadcast, no list deletes (idempotent)."""
    from celery.events.receiver import EventReceiver
    from kombu.transport import redis as kombu_redis

    kombu_redis.QoS.restore_visible = _nothing  # type: ignore[method-assign]
    EventReceiver.wakeup_workers = _nothing
    delete = getattr(kombu_redis.Channel._delete, "_conveyor_original", kombu_redis.Channel._delete)

    def _delete(self: Any, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kw: Any) -> None:
        if not str(queue).startswith(EVENT_QUEUE_PREFIX):
            delete(self, queue, exchange, routing_key, pattern, *args, **kw)
            return
        self.auto_delete_queues.discard(queue)
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        with self.conn_or_acquire(client=kw.get("client")) as client:
            client.srem(self.keyprefix_queue % (exchange,), member)
            client.srem(self.keyprefix_binding_permanent % (exchange,), member)

    _delete._conveyor_original = delete  # type: ignore[attr-defined]
    kombu_redis.Channel._delete = _delete  # type: ignore[method-assign]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m producers.tenancy.monitor_process MODULE [ARGS...]")
    watch_only()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
