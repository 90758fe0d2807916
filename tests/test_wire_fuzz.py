"""The whole wire path, fuzzed by property against a real Redis and real worker processes (an
inference worker and a training worker): hypothesis sends hostile messages of every job type,
through a stock Celery client (``send_task`` with arbitrary names, arguments, ids, queues and
priorities) and as raw list entries (real Celery messages with any field replaced or damaged,
or any bytes at all), each batch beside a good job. The properties:

- the worker processes are never restarted and never stop writing results: every good job succeeds;
- every hostile message ends: a FAILURE (or another final state) on its id where it has one, a
  dead letter where it has none; nothing is left on a queue list or unacknowledged, nothing loops;
- no file outside Conveyor's directories and the input roots is created, changed or removed
  (a canary tree beside CONVEYOR_HOME, which the hostile ids and paths aim at);
- the workers' memory stays bounded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import WorkerProcess
from e2e_helpers import celery_children
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.client import Client
from producers.local_redis import LocalRedis
from shared.names import DEAD_LETTER_KEY, TASKS, TRAINING_QUEUE, WORKER_INFERENCE_QUEUES, priority_list
from shared.wire_text import wire_bytes

pytestmark = pytest.mark.slow

QUEUES = (*WORKER_INFERENCE_QUEUES, TRAINING_QUEUE)
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}


class Stack:
    def __init__(self, root: Path, conveyor_env: dict[str, str], models: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.inputs = root / "inputs"
        self.canary = root / "canary"
        for d in (self.home, self.inputs, self.canary / "deep"):
            d.mkdir(parents=True, exist_ok=True)
        (self.canary / "keep.txt").write_text("canary")
        (self.canary / "deep" / "data.csv").write_text("user,item\n1,2\n")
        (self.inputs / "notes.txt").write_text("not audio, not a table")
        self.server = LocalRedis(root / "redis", record_url=False)
        self.url = self.server.start()
        self.env = dict(
            conveyor_env,
            CONVEYOR_REDIS_URL=self.url,
            CONVEYOR_HOME=str(self.home),
            CONVEYOR_MODEL_DIR=str(models),
            CONVEYOR_INPUT_ROOTS=str(self.inputs),
            CONVEYOR_VISIBILITY_TIMEOUT_S="30",
        )
        self.worker = WorkerProcess(self.env, root / "worker.log")
        self.sdk = Client(redis_url=self.url)
        try:
            self.sdk.wait_for_workers(180, ["conveyor.classify"])
            self.sdk.wait_for_workers(60, [TRAINING_QUEUE])
        except TimeoutError:
            self.worker.stop()
            pytest.fail("workers did not start:\n" + self.worker.tail())
        self.pids = sorted(celery_children(self.worker.proc.pid))
        self.r = redis.Redis.from_url(self.url)
        # No result backend: a stock client's backend cannot even subscribe to an id that is not
        # text; results are read straight from Redis, under the exact bytes of each id.
        self.app = Celery("fuzzer", broker=self.url)
        self.app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

    def close(self) -> None:
        self.sdk.close()
        self.worker.stop()
        self.server.stop()


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (directories too)."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, conveyor_env: dict[str, str], prepared_models: Path
) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("wire-fuzz"), conveyor_env, prepared_models)
    yield s
    s.close()


# -- strategies ---------------------------------------------------------------------------------
def hostile_ids(canary: Path) -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=40) | st.sampled_from(
        [
            "../../canary", "../../canary/deep", str(canary), str(canary / "deep"), "/", ".", "..",
            "a/../../../canary", "\\..\\..\\canary", "id with spaces", "id\x00nul", "\u202eevil", "e\u0301",
            "x" * 10_240, "\udcff\udcfe", "\ud800", "checkpoints", "../checkpoints/../../canary",
        ]
    )  # fmt: skip


leaf = st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=30)
json_value = st.recursive(
    leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=20
)


def hostile_jobs(canary: Path, inputs: Path) -> st.SearchStrategy[Any]:
    paths = st.sampled_from(
        [str(canary / "keep.txt"), str(canary / "deep" / "data.csv"), "../../canary/keep.txt",
         str(inputs / "notes.txt"), str(inputs), "/etc/passwd", "/dev/zero", "/proc/self/mem",
         str(inputs / ".." / "canary" / "keep.txt"), ""]
    ) | st.text(max_size=30)  # fmt: skip
    texts = st.lists(st.text(max_size=50), min_size=0, max_size=4)
    return st.one_of(
        st.fixed_dictionaries({"texts": texts, "labels": st.lists(st.text(max_size=10), max_size=3)}),
        st.fixed_dictionaries(
            {"type": st.just("classify"), "text": st.text(max_size=50), "model": st.text(max_size=20)}
        ),
        st.fixed_dictionaries({"audio_path": paths}),
        st.fixed_dictionaries({"audio_b64": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())}),
        st.fixed_dictionaries({"users": st.lists(st.text(max_size=10), max_size=3), "model": st.text(max_size=20),
                               "k": st.integers(-5, 5000)}),  # fmt: skip
        st.fixed_dictionaries({"interactions_path": paths, "output_name": hostile_ids(canary)}),
        st.fixed_dictionaries({"data_path": paths, "output_name": st.text(max_size=20),
                               "base_model": st.sampled_from(["../../canary", "all-MiniLM-L6-v2"])}),  # fmt: skip
        json_value,
    )


@st.composite
def sent_tasks(draw: st.DrawFn, canary: Path, inputs: Path) -> dict[str, Any]:
    """What a stock Celery client can send."""
    name = draw(st.sampled_from(sorted(set(TASKS.values()))) | st.text(max_size=20))
    args = draw(st.lists(hostile_jobs(canary, inputs), max_size=2))
    kwargs = draw(st.dictionaries(st.sampled_from(["job", "texts", "x", "\ud800"]), hostile_jobs(canary, inputs),
                                  max_size=2))  # fmt: skip
    task_id = draw(hostile_ids(canary)) + "-" + uuid.uuid4().hex[:8]
    return {
        "kind": "send_task", "name": name, "args": args, "kwargs": kwargs, "id": task_id,
        "queue": draw(st.sampled_from(QUEUES)), "priority": draw(st.integers(0, 9)),
    }  # fmt: skip


@st.composite
def raw_entries(draw: st.DrawFn, canary: Path, inputs: Path) -> dict[str, Any]:
    """A real Celery message with one part replaced or damaged, or any bytes at all."""
    return {
        "kind": "raw",
        "task": draw(sent_tasks(canary, inputs)),
        "mutation": draw(st.sampled_from(
            ["id", "id", "headers", "properties", "body", "content-type", "cut", "bytes", "byte", "none"])),
        "value": draw(json_value | hostile_ids(canary)),
        "bytes": draw(st.binary(max_size=80)),
        "at": draw(st.floats(0, 1)),
        "list_priority": draw(st.integers(0, 9)),
    }  # fmt: skip


def real_message(s: Stack, spec: dict[str, Any]) -> bytes:
    """The bytes a stock Celery client puts on the list for ``spec`` (sent to a scratch queue, taken back)."""
    s.app.send_task(spec["name"], args=spec["args"], kwargs=spec["kwargs"], task_id=spec["id"], queue="fuzz.scratch",
                    priority=spec["priority"])  # fmt: skip
    for step in range(10):
        raw: Any = s.r.rpop(priority_list("fuzz.scratch", step))
        if raw is not None:
            return bytes(raw)
    raise AssertionError("the scratch message was not found")


def mutate(raw: bytes, spec: dict[str, Any]) -> tuple[bytes, str | None]:
    """The damaged entry, and the id its client would wait on (None when the damage took it)."""
    message = json.loads(raw)
    job_id: str | None = message["headers"]["id"]
    kind, value = spec["mutation"], spec["value"]
    if kind == "id":
        message["headers"]["id"] = value
        job_id = value if isinstance(value, str) and value else None
    elif kind in ("headers", "properties", "body", "content-type"):
        message[kind] = value
        job_id = None if kind == "headers" else job_id
    elif kind == "cut":
        return raw[: int(len(raw) * spec["at"])], None
    elif kind == "bytes":
        return spec["bytes"], None
    elif kind == "byte":
        out = json.dumps(message).encode()
        at = int(len(out) * spec["at"])
        return out[:at] + b"\xff" + out[at:], None
    out = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return out, job_id


def result(s: Stack, key: bytes) -> dict[str, Any] | None:
    """The result stored under ``key``, the exact bytes of a job id."""
    raw: Any = s.r.get(b"celery-task-meta-" + key)
    return None if raw is None else dict(json.loads(raw))


def quiet(s: Stack) -> bool:
    """Nothing on any list, nothing unacknowledged (on the worker's queues and its private ones)."""
    direct = [k.decode() for k in s.r.keys("conveyor.direct.*")]  # type: ignore[union-attr]
    lists = [priority_list(q, p) for q in QUEUES for p in range(10)] + direct
    pipe = s.r.pipeline()
    for key in lists:
        pipe.llen(key)
    pipe.hlen("unacked")
    return sum(pipe.execute()) == 0


@settings(
    max_examples=int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
@given(data=st.data())
def test_hostile_messages_never_stop_the_worker_and_each_ends_visibly(stack: Stack, data: st.DataObject) -> None:
    s = stack
    batch = data.draw(
        st.lists(sent_tasks(s.canary, s.inputs) | raw_entries(s.canary, s.inputs), min_size=1, max_size=5)
    )
    dead_before = int(s.r.hlen(DEAD_LETTER_KEY))
    expected: list[bytes] = []  # result keys: each id's bytes as its message carried them
    no_id = 0
    for spec in batch:
        if spec["kind"] == "send_task":
            s.app.send_task(spec["name"], args=spec["args"], kwargs=spec["kwargs"], task_id=spec["id"],
                            queue=spec["queue"], priority=spec["priority"])  # fmt: skip
            expected.append(wire_bytes(spec["id"]))  # kombu's JSON escapes it; the worker reads it back
            continue
        entry, job_id = mutate(real_message(s, spec["task"]), spec)
        key = None if job_id is None else job_id.encode("utf-8", "surrogatepass")  # as mutate() wrote it
        if key is not None:  # an id reused from an earlier example must earn its result again
            s.r.delete(b"celery-task-meta-" + key)
        s.r.lpush(priority_list(spec["task"]["queue"], spec["list_priority"]), entry)
        if key is not None:
            expected.append(key)
        else:
            no_id += 1
    good = s.sdk.submit(ClassifyLike.job())
    good_key = good.id.encode()
    end = time.monotonic() + 90
    while time.monotonic() < end:
        done = all((m := result(s, i)) is not None and m["status"] in FINAL for i in expected)
        good_meta = result(s, good_key)
        if done and good_meta is not None and good_meta["status"] in FINAL and quiet(s):
            break
        time.sleep(0.1)
    missing = [i for i in expected if (m := result(s, i)) is None or m["status"] not in FINAL]
    assert not missing, f"left without a final state: {missing!r}\n{s.worker.tail(3000)}"
    good_meta = result(s, good_key)
    assert good_meta is not None and good_meta["status"] == "SUCCESS", (good_meta, s.worker.tail(3000))
    assert good_meta["result"]["results"][0]["labels"][0]["label"] == "sports"
    assert quiet(s), "messages left on a list or unacknowledged"
    # Every message without a readable id became a dead letter (those with one may be dead letters too).
    assert int(s.r.hlen(DEAD_LETTER_KEY)) - dead_before >= no_id
    assert sorted(celery_children(s.worker.proc.pid)) == s.pids, "a worker process was restarted"


class ClassifyLike:
    @staticmethod
    def job() -> Any:
        from shared.jobs import ClassifyJob

        return ClassifyJob(texts=["The striker scored twice and the team won the match."],
                           labels=["sports", "finance", "weather"])  # fmt: skip


def test_after_the_fuzz_no_file_outside_conveyor_changed_and_memory_is_bounded(stack: Stack) -> None:
    s = stack
    before = {
        str(s.canary): "dir", str(s.canary / "deep"): "dir",
        str(s.canary / "deep" / "data.csv"): hashlib.sha256(b"user,item\n1,2\n").hexdigest(),
        str(s.canary / "keep.txt"): hashlib.sha256(b"canary").hexdigest(),
    }  # fmt: skip
    assert tree(s.canary) | {str(s.canary): "dir"} == before
    # Nothing appeared beside the home, the inputs, the canary and the test's own files.
    assert sorted(p.name for p in s.root.iterdir()) == ["canary", "home", "inputs", "redis", "worker.log"]
    assert tree(s.inputs) == {str(s.inputs / "notes.txt"): hashlib.sha256(b"not audio, not a table").hexdigest()}
    for pid in s.pids:
        rss_kb = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS")).split()[1])  # fmt: skip
        assert rss_kb < 3 * 1024 * 1024, f"worker {pid} holds {rss_kb // 1024} MB"
    assert sorted(celery_children(s.worker.proc.pid)) == s.pids
