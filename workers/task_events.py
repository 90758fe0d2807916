"""Celery task events for jobs that the bulk ingest runs, sent in bulk.

Flower and ``celery events`` build a task's history from ``task-received``,
``task-started`` and ``task-succeeded``/``task-failed`` events. The ingest records them as
jobs move and the result writer sends everything recorded since its last write as one
message whose body is a list of events (Celery's ``task.multi`` form, which its event
receiver, and so Flower, reads like single events). ``CONVEYOR_TASK_EVENTS`` chooses all
events, failures only, or none.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

from celery import Celery
from celery.utils.saferepr import saferepr

from shared.wire_text import printable

log = logging.getLogger(__name__)

# Celery's own bound for argsrepr/kwargsrepr; saferepr stops walking a structure at the limit,
# so a 10 MB job costs no more to describe than a small one.
REPR_CHARS = 1024

EventPolicy = Literal["all", "failures", "none"]


class TaskEvents:
    def __init__(self, app: Celery, hostname: str, policy: EventPolicy) -> None:
        self.app = app
        self.hostname = hostname
        self.policy = policy
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._connection: Any = None
        self._dispatcher: Any = None

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def _add(self, type_: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append((type_, fields))

    # -- recorded from any thread ------------------------------------------------------------
    def received(self, task_id: str, name: str, args: Any, kwargs: Any, retries: int, at: float) -> None:
        if self.policy != "all":
            return
        self._add(
            "task-received",
            {
                "uuid": task_id, "name": name, "args": _repr(args), "kwargs": _repr(kwargs),
                "root_id": task_id, "parent_id": None, "retries": retries, "eta": None, "expires": None,
                "timestamp": at,
            },
        )  # fmt: skip
        self._add("task-started", {"uuid": task_id, "timestamp": at})

    def succeeded(self, task_id: str, result: Any, runtime: float) -> None:
        if self.policy == "all":
            self._add("task-succeeded", {"uuid": task_id, "result": _repr(result), "runtime": runtime})

    def failed(self, task_id: str, exc: BaseException, name: str | None = None) -> None:
        if self.policy == "none":
            return
        fields: dict[str, Any] = {"uuid": task_id, "exception": _repr(exc), "traceback": None}
        if name and self.policy == "failures":  # no task-received came before: name the task here
            fields["name"] = name
        self._add("task-failed", fields)

    # -- sent by the result writer's thread ----------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            dispatcher = self._ensure()
            for type_, fields in pending:
                dispatcher.send(type_, **fields)
            dispatcher.flush()
        except Exception as exc:  # events are for watching; losing some must not stop results
            log.warning("could not send %d task events: %s", len(pending), exc)
            self.close()

    def _ensure(self) -> Any:
        if self._dispatcher is None:
            self._connection = self.app.connection_for_write()
            # Every task event is buffered and sent as one list per flush; the limit only
            # bounds one message.
            self._dispatcher = self.app.events.Dispatcher(
                self._connection, hostname=self.hostname, enabled=True, buffer_group={"task"}, buffer_limit=10_000
            )
        return self._dispatcher

    def close(self) -> None:
        dispatcher, connection = self._dispatcher, self._connection
        self._dispatcher = self._connection = None
        try:
            if dispatcher is not None:
                dispatcher.close()
            if connection is not None:
                connection.release()
        except Exception:
            pass


def _repr(value: Any) -> str:
    """A bounded repr that is valid text whatever the value holds."""
    try:
        return printable(saferepr(value, maxlen=REPR_CHARS), REPR_CHARS)
    except Exception:  # a value whose repr raises is still described
        return f"<{type(value).__name__}>"
