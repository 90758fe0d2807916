"""The Celery app Flower runs with (`celery -A producers.flower_app flower`), built from
Conveyor's own configuration: the result backend, so Flower's API reads results
(/api/task/result/ID), the priority steps, so its queue lengths count every priority list,
and Conveyor's queues, so its broker view lists them before any worker has reported in.

Its Redis URL comes from the environment (CONVEYOR_REDIS_URL or the recorded one), never
from the command line, where `ps` would show the password to every local user."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared.celery_config import celery_config
from shared.names import ALL_QUEUES
from shared.settings import Settings

# Current app: Flower reads results through AsyncResult(id) without naming an app.
app = Celery("conveyor-flower")
app.conf.update(celery_config(Settings()))
app.conf.task_queues = [Queue(name) for name in ALL_QUEUES]
