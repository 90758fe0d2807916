"""Redis Sentinel for real: a master, two replicas and three sentinels (tests/sentinel_group.py);
`conveyor up` (workers, Flower, the exporter) and a producer configured with the sentinel:// URL
and CONVEYOR_WAIT_REPLICAS=1; jobs of every kind under load; the master SIGKILLed mid-load.
Every job whose submit returned finishes SUCCESS within the stated bound, none runs twice in
effect (one model version per training job, nothing dead-lettered or left unacked), and the
producer, workers, Flower and the exporter carry on with no restart."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ROOT
from e2e_helpers import LABELS, TOPICAL
from sentinel_group import DOWN_AFTER_MS, SentinelGroup

from producers.client import Client, JobHandle
from producers.demo import demo_audio, demo_finetune_data, demo_interactions
from producers.local_redis import free_port
from producers.stack import flower_login, read_state
from shared.errors import ConveyorError
from shared.jobs import ClassifyJob, FineTuneJob, JobBase, RecommendJob, TrainJob, TranscribeJob
from shared.kinds import KINDS
from shared.model_store import ModelStore
from shared.names import DEAD_LETTER_KEY
from shared.settings import Settings

pytestmark = pytest.mark.slow

VISIBILITY_S = 10
# A job whose submit returned is done within: the failover (sentinels' down-after plus the vote,
# ~2-3 s here), then a visibility timeout for jobs held by the old master's connections, then
# the work itself on a loaded 2-core machine (Whisper and two training jobs included).
BOUND_S = 240.0


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path_factory.mktemp("sentinel-group")).start()
    yield g
    g.stop()


def _model_dir(prepared: Path, into: Path) -> Path:
    """The built-in models, linked: the training jobs here publish into a store of their own."""
    into.mkdir()
    for entry in prepared.iterdir():
        (into / entry.name).symlink_to(entry)
    return into


def _inference_jobs() -> list[Callable[[int], JobBase]]:
    """One builder per inference kind (from its demo where the registry has one)."""
    audio = demo_audio()
    builders: list[Callable[[int], JobBase]] = [
        lambda n: ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS),
    ]
    if audio is not None:
        builders.append(lambda n: TranscribeJob(audio_b64=base64.b64encode(audio[1])))
    for name, spec in KINDS.items():
        if spec.mode == "inference" and spec.demo is not None and name not in ("classify", "transcribe"):
            builders.append(partial(_from_demo, spec.job, spec.demo))
    return builders


def _from_demo(job: type[JobBase], demo: dict[str, object], _n: int) -> JobBase:
    return job.model_validate(demo)


def test_jobs_of_every_kind_survive_a_master_killed_mid_load(
    group: SentinelGroup,
    prepared_models: Path,
    conveyor_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    work = home / "inputs"
    work.mkdir(parents=True)
    env = dict(
        conveyor_env, CONVEYOR_REDIS_URL=group.url(), CONVEYOR_HOME=str(home),
        CONVEYOR_MODEL_DIR=str(_model_dir(prepared_models, tmp_path / "models")),
        CONVEYOR_WAIT_REPLICAS="1", CONVEYOR_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        CONVEYOR_INPUT_ROOTS=str(work), CONVEYOR_FLOWER_PORT=str(free_port()),
        CONVEYOR_METRICS_PORT=str(free_port()), CONVEYOR_GATEWAY_PORT=str(free_port()),
    )  # fmt: skip
    for key, value in env.items():
        if key.startswith("CONVEYOR_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    up = subprocess.run([sys.executable, "-m", "producers.cli", "up", "--detach", "--devices", "cpu"], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    state = read_state(settings)
    assert state is not None and state.flower_url and state.metrics_url
    client = Client(settings=settings)
    try:
        client.wait_for_workers(300, ["conveyor.classify"])
        client.wait_for_workers(300, ["conveyor.training"])
        returned: dict[str, str] = {}  # job id -> kind, for every submit that returned
        training = [
            TrainJob(interactions_path=str(demo_interactions(work / "interactions.csv")), output_name="ha-recommender",
                     factors=16, epochs=15, model_type="bpr", learning_rate=0.05, batch_size=256),
            FineTuneJob(data_path=str(demo_finetune_data(work / "topics.csv")), output_name="ha-topics",
                        epochs=2, batch_size=8, learning_rate=1e-4, validation_split=0.25),
        ]  # fmt: skip
        for job in training:
            returned[client.submit(job).id] = job.type

        builders, refused, stop = _inference_jobs(), [0], threading.Event()

        def load() -> None:  # one producer thread, a job of the next kind every 50 ms
            n = 0
            while not stop.is_set():
                job = builders[n % len(builders)](n)
                n += 1
                try:
                    returned[client.submit(job).id] = job.type
                except (ConveyorError, redis.RedisError, OSError):  # the master is gone: not returned
                    refused[0] += 1
                    time.sleep(0.2)
                time.sleep(0.05)

        producer = threading.Thread(target=load)
        producer.start()
        time.sleep(4.0)
        old = group.kill_master()
        failover_s = group.wait_failover(old)
        time.sleep(6.0)
        stop.set()
        producer.join(60)
        kinds = set(returned.values())
        assert {"classify", "sentiment", "ner", "keywords", "classify-image", "train", "fine-tune"} <= kinds, kinds

        # The training jobs' models, served after the failover.
        handles = [JobHandle(client, i, kind) for i, kind in returned.items() if kind in ("train", "fine-tune")]
        for handle in handles:
            handle.result(timeout=BOUND_S)
        after = [RecommendJob(users=["u0", "u1"], k=3, model="ha-recommender"),
                 ClassifyJob(texts=["The referee showed a red card"], model="ha-topics@latest")]  # fmt: skip
        for job in after:
            returned[client.submit(job).id] = job.type

        started = time.monotonic()
        for job_id, kind in returned.items():
            left = max(1.0, BOUND_S - (time.monotonic() - started))
            result = JobHandle(client, job_id, kind).result_json(timeout=left)
            assert result["type"] == kind
        assert time.monotonic() - started < BOUND_S

        # None ran twice in effect: one version per training job, nothing dead-lettered or held.
        store = ModelStore(settings.models_path)
        assert [v.version for v in store.versions("ha-recommender")] == [1]
        assert [v.version for v in store.versions("ha-topics")] == [1]
        master = group.client(next(r for r, p in group.ports.items() if p == group.master_port()))
        assert master.hlen(DEAD_LETTER_KEY) == 0
        deadline = time.monotonic() + 30
        while master.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert master.hlen("unacked") == 0

        # Flower and the exporter followed the master, with no restart.
        marker = client.submit(ClassifyJob(texts=["after the failover"], labels=LABELS))
        marker.result(timeout=120)
        user, password = flower_login(settings)
        deadline, seen = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            reply = httpx.get(f"{state.flower_url}api/task/info/{marker.id}", auth=(user, password), timeout=10)
            seen = reply.status_code, reply.text[:300]
            if reply.status_code == 200 and json.loads(reply.text).get("state") == "SUCCESS":
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"Flower never showed the job sent after the failover: {seen}")
        assert _classify_jobs_counted(state.metrics_url, user, password) >= 1
        print(f"failover {failover_s:.1f}s (down-after {DOWN_AFTER_MS} ms), {len(returned)} jobs returned, "
              f"{refused[0]} submits refused while no master answered")  # fmt: skip
    finally:
        client.close()
        subprocess.run([sys.executable, "-m", "producers.cli", "down"], env=env, cwd=ROOT, timeout=120, check=False)


def _classify_jobs_counted(metrics_url: str, user: str, password: str) -> float:
    """The exporter's count of successful classify jobs, read from the new master."""
    text = httpx.get(metrics_url, auth=(user, password), timeout=20).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("conveyor_jobs_total{") and 'job_type="classify"' in line and 'state="SUCCESS"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
