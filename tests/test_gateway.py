"""The HTTP gateway end to end: a real uvicorn process (`python -m producers.gateway`) in front of
the session's Redis and real workers, driven by a real HTTP client (httpx)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import ROOT, SHARED_DATA, WorkerProcess, empty_db
from hypothesis import given, settings
from hypothesis import strategies as st

from producers.gateway.keys import KeyStore
from producers.gateway.webhooks import SIGNATURE_HEADER, verify
from producers.local_redis import free_port
from producers.tenancy.users import create_user, db_of, user_url
from shared.kinds import KINDS, TRAINING_TYPES
from shared.supervisor import ChildSpec, spawn
from shared.tenant_keys import quota_key

SECRET = "test-webhook-secret"
MAX_BODY_KB = 64
IDLE_DB = 9  # the cancel tests' database: no worker until the jobs are cancelled


class GatewayProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [sys.executable, "-m", "producers.gateway", "--port", str(self.port)]
        self.child = spawn(ChildSpec("gateway", argv, env=env, cwd=ROOT, log=log, stop_timeout=10))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.child.alive():
                pytest.fail("the gateway exited:\n" + log.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.child.stop()
        pytest.fail("the gateway did not answer:\n" + log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        self.child.stop(10)


def gateway_user(redis_url: str) -> str:
    """A Redis user with the ``gateway`` role (producers/tenancy/roles.py) and its URL: the tests'
    gateways run with least privilege, as under `conveyor up`."""
    admin = redis.Redis.from_url(redis_url)
    name = f"gateway-test-{time.time_ns()}"
    try:
        password = create_user(admin, name, "gateway", db=db_of(redis_url))
    finally:
        admin.close()
    return user_url(redis_url, name, password)


def gateway_env(base: dict[str, str], redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **base, "CONVEYOR_REDIS_URL": gateway_user(redis_url),
        "CONVEYOR_GATEWAY_WEBHOOK_HOSTS": "127.0.0.1", "CONVEYOR_GATEWAY_WEBHOOK_SECRET": SECRET,
        "CONVEYOR_GATEWAY_WEBHOOK_BACKOFF_S": "0.2", "CONVEYOR_GATEWAY_WEBHOOK_ATTEMPTS": "3",
        "CONVEYOR_GATEWAY_MAX_BODY_KB": str(MAX_BODY_KB), "CONVEYOR_GATEWAY_RATE_PER_S": "100000",
        "CONVEYOR_GATEWAY_RATE_BURST": "100000", "CONVEYOR_GATEWAY_MAX_CONNECTIONS": "2000", **extra,
    }  # fmt: skip


def enough_descriptors(needed: int = 4096) -> None:
    """A thousand connections at once need more file descriptors than a default soft limit of 1,024
    (this process's and the gateway's, which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard)
        )


@pytest.fixture(scope="module")
def gateway(conveyor_env: dict[str, str], redis_url: str, worker: Any, tmp_path_factory: Any) -> Iterator[str]:
    enough_descriptors()
    proc = GatewayProcess(gateway_env(conveyor_env, redis_url), tmp_path_factory.mktemp("gw") / "gateway.log")
    yield proc.url
    proc.stop()
    # Everything the gateway did was within its role: Redis logged no refusal of a gateway user.
    admin = redis.Redis.from_url(redis_url)
    refused = [e for e in admin.acl_log(128) if str(e.get("username", "")).startswith("gateway-test")]
    admin.close()
    assert not refused, refused


@pytest.fixture(scope="module")
def keys(redis_url: str) -> Iterator[KeyStore]:
    client = redis.Redis.from_url(redis_url)
    yield KeyStore(client)
    client.close()


def new_key(store: KeyStore, tenant: str, **kw: Any) -> str:
    return store.add(f"{tenant}-{time.time_ns()}", tenant, **kw)


def http(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def png_b64() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


# Light inputs for each kind a worker of this session runs, and what its result must show.
SPEECH = SHARED_DATA / "speech" / "clips" / "1089-134686-0000.flac"
INFERENCE_JOBS: dict[str, dict[str, Any]] = {
    "classify": {"texts": ["The striker scored twice in the final."], "labels": ["sports", "finance"]},
    "ner": {"texts": ["Ada Lovelace visited Paris in June 1843."]},
    "keywords": {"texts": ["Solar panels on the school roof cut its electricity bill by a third."], "k": 2},
    "classify-image": {"images": [{"b64": ""}], "top_k": 3},  # b64 filled in by the test
    "recommend": {"users": ["u1"], "model": "no-such-recommender", "k": 3},
    "sentiment": {"texts": ["What a wonderful day!"]},
    "transcribe": {"audio_path": str(SPEECH)},
}
NEEDS_PREPARED = {"sentiment", "transcribe"}  # models built by `conveyor models prepare`


def check_result(kind: str, view: dict[str, Any]) -> None:
    assert view["done"] is True, view
    if kind == "recommend":  # no recommender is trained in this session: the job's own clear error
        assert view["state"] == "FAILURE" and view["error"]["type"] == "ModelNotFound", view
        assert "no-such-recommender" in view["error"]["message"]
        return
    assert view["state"] == "SUCCESS", view
    result = view["result"]
    assert result["type"] == kind and result["job_id"] == view["id"]
    if kind == "transcribe":
        assert len(result["text"].split()) >= 3
        return
    assert len(result["results"]) == 1
    entry = result["results"][0]
    if kind == "classify":
        assert entry["labels"][0]["label"] == "sports"
    elif kind == "ner":
        assert {"text": "Paris", "label": "GPE"}.items() <= next(
            e for e in entry["entities"] if e["text"] == "Paris"
        ).items()
    elif kind == "keywords":
        assert 1 <= len(entry["keywords"]) <= 2
    elif kind == "classify-image":
        assert len(entry["labels"]) == 3 and entry["label"] == entry["labels"][0]["label"]
    elif kind == "sentiment":
        assert entry["label"] == "positive"


@pytest.mark.parametrize("kind", sorted(INFERENCE_JOBS))
def test_submit_wait_and_result_for_each_inference_kind(
    kind: str, gateway: str, keys: KeyStore, request: pytest.FixtureRequest
) -> None:
    if kind in NEEDS_PREPARED:
        request.getfixturevalue("prepared_models")
    body = dict(INFERENCE_JOBS[kind])
    if kind == "classify-image":
        body["images"] = [{"b64": png_b64()}]
    with http(gateway, new_key(keys, "acme")) as c:
        accepted = c.post(f"/v1/jobs/{kind}", json=body)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["id"].startswith("acme:") and job["type"] == kind
        assert job["status_url"] == f"/v1/jobs/{job['id']}" and job["wait_url"] == job["status_url"] + "/wait"
        view = c.get(job["wait_url"], params={"timeout": 120}).json()
        check_result(kind, view)
        assert c.get(job["status_url"]).json() == view  # the same answer without waiting


def test_every_registered_kind_has_a_route_a_schema_and_docs(gateway: str) -> None:
    schema = httpx.get(f"{gateway}/openapi.json").json()
    for name, spec in KINDS.items():
        body = schema["paths"][f"/v1/jobs/{name}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{spec.job.__name__}"}
        assert "texts" in json.dumps(schema["components"]["schemas"]["ClassifyJob"])
    assert httpx.get(f"{gateway}/docs").status_code == 200


def test_cancel_every_kind_before_a_worker_takes_it(
    conveyor_env: dict[str, str], redis_url: str, keys: KeyStore, tmp_path: Path
) -> None:
    """Every kind (training ones too) submitted with no worker on their queues, cancelled, then a
    worker starts: each job ends REVOKED (JobCancelled), none runs, none stays PENDING. One job's
    webhook, pending when its gateway is restarted, is delivered by the new one."""
    receiver = Receiver()
    for url in empty_db(redis_url, IDLE_DB):
        env = gateway_env(conveyor_env, url, CONVEYOR_GATEWAY_MAX_WAIT_S="1")
        proc = GatewayProcess(env, tmp_path / "gateway.log")
        store = KeyStore(redis.Redis.from_url(url))
        key = new_key(store, "acme")
        try:
            with http(proc.url, key) as c:
                ids = {}
                for name, spec in KINDS.items():
                    body = dict(INFERENCE_JOBS.get(name, spec.example))
                    if name == "classify-image":
                        body["images"] = [{"b64": png_b64()}]
                    hook = {"callback_url": receiver.url} if name == "classify" else {}
                    accepted = c.post(f"/v1/jobs/{name}", json=body, params=hook)
                    assert accepted.status_code == 202, (name, accepted.text)
                    ids[name] = accepted.json()["id"]
                # A long poll is bounded by CONVEYOR_GATEWAY_MAX_WAIT_S (1 s here) however long it asks.
                started = time.monotonic()
                pending = c.get(f"/v1/jobs/{ids['classify']}/wait", params={"timeout": 3600}).json()
                assert pending["state"] == "PENDING" and pending["done"] is False
                assert 0.9 <= time.monotonic() - started < 10
                for job_id in ids.values():
                    cancelled = c.delete(f"/v1/jobs/{job_id}")
                    assert cancelled.status_code == 202 and cancelled.json() == {"id": job_id, "cancelled": True}
            proc.stop()  # the classify job's callback waits in Redis, not in this process
            proc = GatewayProcess(env, tmp_path / "gateway-2.log")
            with http(proc.url, key) as c:
                worker = WorkerProcess(dict(conveyor_env, CONVEYOR_REDIS_URL=url), tmp_path / "worker.log")
                try:
                    for name, job_id in ids.items():
                        view = c.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 1}).json()
                        deadline = time.monotonic() + 240
                        while not view["done"] and time.monotonic() < deadline:
                            view = c.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 1}).json()
                        assert view["state"] == "REVOKED", (name, view, worker.tail())
                        assert view["error"]["type"] == "JobCancelled", (name, view)
                    receiver.wait(1)
                    delivered = json.loads(receiver.calls[0][1])
                    assert delivered["id"] == ids["classify"] and delivered["state"] == "REVOKED"
                    assert verify(SECRET, receiver.calls[0][0][SIGNATURE_HEADER], receiver.calls[0][1])
                finally:
                    worker.stop()
        finally:
            proc.stop()
            store.redis.close()
            receiver.close()
    assert set(TRAINING_TYPES) <= set(KINDS)


def test_missing_wrong_and_revoked_keys_are_401(gateway: str, keys: KeyStore) -> None:
    body = INFERENCE_JOBS["ner"]
    for headers in ({}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer cvk_not-a-key"},
                    {"Authorization": "Bearer " + "x" * 5000}):  # fmt: skip
        r = httpx.post(f"{gateway}/v1/jobs/ner", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert "API key" in r.json()["detail"]
    assert httpx.get(f"{gateway}/v1/jobs/acme:x").status_code == 401
    name = f"revoked-{time.time_ns()}"
    key = keys.add(name, "acme")
    with http(gateway, key) as c:
        assert c.post("/v1/jobs/ner", json=body).status_code == 202
        assert keys.revoke(name)
        time.sleep(1.1)  # the gateway's key cache (producers/gateway/keys.py CACHE_S)
        assert c.post("/v1/jobs/ner", json=body).status_code == 401


def test_another_tenants_job_is_404_and_key_types_are_enforced(gateway: str, keys: KeyStore) -> None:
    with http(gateway, new_key(keys, "acme")) as a, http(gateway, new_key(keys, "beta", types=["ner"])) as b:
        job_id = a.post("/v1/jobs/ner", json=INFERENCE_JOBS["ner"]).json()["id"]
        for response in (b.get(f"/v1/jobs/{job_id}"), b.get(f"/v1/jobs/{job_id}/wait?timeout=0"),
                         b.delete(f"/v1/jobs/{job_id}")):  # fmt: skip
            assert response.status_code == 404 and "beta" in response.json()["detail"], response.text
        assert a.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 60}).json()["state"] == "SUCCESS"
        assert b.get("/v1/jobs/a..b").status_code == 404  # not a job id at all
        for response in (a.get("/v1/jobs/acme:never-submitted"), a.delete("/v1/jobs/acme:never-submitted"),
                         a.get("/v1/jobs/acme:never-submitted/wait?timeout=0.2")):  # fmt: skip
            assert response.status_code == 404 and "never-submitted" in response.json()["detail"], response.text
        refused = b.post("/v1/jobs/classify", json=INFERENCE_JOBS["classify"])
        assert refused.status_code == 403 and "ner" in refused.json()["detail"]
        own = b.post("/v1/jobs/ner", json=INFERENCE_JOBS["ner"])
        assert own.status_code == 202 and own.json()["id"].startswith("beta:")
        # An id the client chose must carry its own tenant's prefix.
        foreign = b.post("/v1/jobs/ner", json={**INFERENCE_JOBS["ner"], "id": "acme:mine"})
        assert foreign.status_code == 422 and "'beta'" in foreign.json()["detail"]
        chosen = b.post("/v1/jobs/ner", json={**INFERENCE_JOBS["ner"], "id": f"mine-{time.time_ns()}"})
        assert chosen.status_code == 202 and chosen.json()["id"].startswith("beta:mine-")
        unknown = b.post("/v1/jobs/no-such-kind", json={})
        assert unknown.status_code == 404 and "classify" in unknown.json()["detail"]


def test_oversize_bodies_are_413_before_parsing(gateway: str, keys: KeyStore) -> None:
    limit = MAX_BODY_KB * 1024
    with http(gateway, new_key(keys, "acme")) as c:
        big = c.post("/v1/jobs/ner", content=b"{" + b" " * limit + b"}", headers={"content-type": "application/json"})
        assert big.status_code == 413 and "CONVEYOR_GATEWAY_MAX_BODY_KB" in big.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield b'{"texts": ["'
            for _ in range(limit // 4096 + 2):
                yield b"a" * 4096
            yield b'"]}'

        chunked = c.post("/v1/jobs/ner", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        # Just under the limit is read and judged on its content.
        fits = c.post("/v1/jobs/ner", json={"texts": ["a b " * 3750] * 4})  # 60,000 of 65,536 bytes
        assert fits.status_code == 202, fits.text


def test_a_key_over_its_rate_gets_429_with_retry_after(gateway: str, keys: KeyStore) -> None:
    with http(gateway, new_key(keys, "acme", rate_per_s=0.5, burst=2)) as c:
        codes = [c.get("/v1/jobs/acme:nothing").status_code for _ in range(3)]
        assert codes == [404, 404, 429]  # an id nobody submitted, twice; then the key's rate
        limited = c.get("/v1/jobs/acme:nothing")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "rate" in limited.json()["detail"]


def test_a_tenant_over_its_quota_gets_429_with_retry_after(gateway: str, keys: KeyStore) -> None:
    """The SDK's tenant quota (jobs a second, set as `conveyor users quota` does), refused at submit."""
    tenant = f"quota-{time.time_ns() % 10**9}"
    keys.redis.hset(quota_key(tenant), mapping={"max_jobs_per_s": 2})
    with http(gateway, new_key(keys, tenant)) as c:
        started = time.monotonic()
        answers = [c.post("/v1/jobs/ner", json=INFERENCE_JOBS["ner"]) for _ in range(10)]
        elapsed = time.monotonic() - started
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code == 429]
    assert len(accepted) + len(refused) == 10 and refused, [a.text for a in answers]
    if elapsed < 1.0:  # ten submits within one second span at most two: at most 2 x 2 pass
        assert len(accepted) <= 4
    assert all(int(r.headers["retry-after"]) >= 1 and "QuotaExceeded" in r.json()["detail"] for r in refused)
    assert tenant in refused[0].json()["detail"]


def test_bad_json_and_bad_jobs_are_422_naming_the_field(gateway: str, keys: KeyStore) -> None:
    with http(gateway, new_key(keys, "acme")) as c:
        bad = c.post("/v1/jobs/classify", content=b'{"texts": [', headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "Invalid JSON" in bad.json()["detail"]
        missing = c.post("/v1/jobs/classify", json={"labels": ["a", "b"]})
        assert missing.status_code == 422 and missing.json()["detail"].startswith("texts: Field required")
        assert missing.json()["errors"][0]["loc"] == ["texts"]
        extra = c.post("/v1/jobs/ner", json={"texts": ["x"], "colour": "red"})
        assert extra.status_code == 422 and "colour" in extra.json()["detail"]
        wrong_type = c.post("/v1/jobs/ner", json={"texts": ["x"], "type": "classify"})
        assert wrong_type.status_code == 422 and "type" in wrong_type.json()["detail"]
        timeout = c.get("/v1/jobs/acme:x/wait", params={"timeout": "soon"})
        assert timeout.status_code == 422 and "timeout" in timeout.json()["detail"]
        form = c.post("/v1/jobs/ner", content=b"texts=x", headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST, answers from a script (then 200)."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.answers = list(answers or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers.items()), body))
                code, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.calls) >= n, f"{len(self.calls)} of {n} webhook calls came"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_are_signed_retried_and_go_only_to_allowed_hosts(gateway: str, keys: KeyStore) -> None:
    flaky = Receiver([(500, {})])  # the first attempt fails, the second is taken
    elsewhere = Receiver()
    redirecting = Receiver([(307, {"Location": elsewhere.url})] * 5)
    try:
        with http(gateway, new_key(keys, "acme")) as c:
            job_id = c.post("/v1/jobs/ner", params={"callback_url": flaky.url}, json=INFERENCE_JOBS["ner"]).json()["id"]
            flaky.wait(2)
            (h1, _), (h2, b2) = flaky.calls[:2]
            assert h1["Conveyor-Attempt"] == "1" and h2["Conveyor-Attempt"] == "2" and h2["Conveyor-Job-Id"] == job_id
            assert verify(SECRET, h2[SIGNATURE_HEADER], b2) and not verify("another", h2[SIGNATURE_HEADER], b2)
            assert not verify(SECRET, h2[SIGNATURE_HEADER], b2 + b" ")
            delivered = json.loads(b2)
            assert delivered["id"] == job_id and delivered["state"] == "SUCCESS" and delivered["result"]["results"]
            assert delivered == c.get(f"/v1/jobs/{job_id}").json()
            # A redirect is never followed, even to an allowed host: each attempt fails, then it is given up.
            c.post("/v1/jobs/ner", params={"callback_url": redirecting.url}, json=INFERENCE_JOBS["ner"])
            redirecting.wait(3)
            time.sleep(1.5)
            assert len(redirecting.calls) == 3 and elsewhere.calls == []
            # Hosts that are not allow-listed are refused at submit, nothing queued.
            for url in ("http://localhost:1/hook", "http://10.0.0.1/x", "ftp://127.0.0.1/x", "http://u:p@127.0.0.1/x"):
                refused = c.post("/v1/jobs/ner", params={"callback_url": url}, json=INFERENCE_JOBS["ner"])
                assert refused.status_code == 422 and "callback_url" in refused.json()["detail"], (url, refused.text)
            assert len(flaky.calls) == 2
    finally:
        for r in (flaky, elsewhere, redirecting):
            r.close()


def test_a_thousand_concurrent_submits_lose_nothing(gateway: str, keys: KeyStore) -> None:
    key = new_key(keys, "acme")
    n = 1000

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(
            base_url=gateway, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=120
        ) as c:
            return list(
                await asyncio.gather(
                    *(c.post("/v1/jobs/ner", json={"texts": [f"Job {i} went to Paris."]}) for i in range(n))
                )
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [202] * n, {r.status_code for r in responses}
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == n
    r = redis.Redis.from_url(os.environ["CONVEYOR_REDIS_URL"])
    from e2e_helpers import wait_for

    metas = wait_for(r, ids, timeout=240)
    assert all(m["status"] == "SUCCESS" for m in metas.values())

    async def views() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            gate = asyncio.Semaphore(50)

            async def one(job_id: str) -> dict[str, Any]:
                async with gate:
                    return (await c.get(f"/v1/jobs/{job_id}")).json()

            return list(await asyncio.gather(*(one(i) for i in ids)))

    for i, view in enumerate(asyncio.run(views())):
        assert view["state"] == "SUCCESS", view
        assert "Paris" in [e["text"] for e in view["result"]["results"][0]["entities"]], view
        assert view["result"]["job_id"] == ids[i]


def test_one_refused_job_among_concurrent_submits_refuses_no_other(gateway: str, keys: KeyStore) -> None:
    """Concurrent submits are published together (producers/gateway/publisher.py); a conflict on
    one idempotency key is that request's 409 alone."""
    key, idem = new_key(keys, "acme"), f"idem-{time.time_ns()}"
    bodies: list[dict[str, Any]] = [{"texts": [f"text {i}"]} for i in range(30)]
    bodies[7] = {"texts": ["first"], "idempotency_key": idem}
    bodies[20] = {"texts": ["another payload"], "idempotency_key": idem}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            return list(await asyncio.gather(*(c.post("/v1/jobs/ner", json=b) for b in bodies)))

    answers = asyncio.run(run())
    codes = [a.status_code for a in answers]
    assert sorted(codes) == [202] * 29 + [409], codes
    conflict = answers[codes.index(409)]
    assert "IdempotencyConflict" in conflict.json()["detail"]
    assert len({a.json()["id"] for a in answers if a.status_code == 202}) == 29


def test_keys_cli_prints_a_key_once_lists_and_revokes(gateway: str, conveyor_env: dict[str, str]) -> None:
    name = f"cli-{time.time_ns()}"

    def conveyor(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "producers.cli", "keys", *args]
        return subprocess.run(cmd, env=conveyor_env, capture_output=True, text=True, timeout=120, check=False)

    added = conveyor("add", name, "--tenant", "acme", "--types", "ner,sentiment")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("cvk_") and len(key) > 40
    listed = conveyor("list")
    row = next(k for k in json.loads(listed.stdout) if k["name"] == name)
    assert row["tenant"] == "acme" and row["types"] == ["ner", "sentiment"] and key not in listed.stdout
    assert conveyor("add", name, "--tenant", "acme").returncode == 2  # a name is taken once
    assert conveyor("add", "other", "--tenant", "acme", "--types", "nope").returncode == 2
    with http(gateway, key) as c:
        assert c.post("/v1/jobs/ner", json=INFERENCE_JOBS["ner"]).status_code == 202
        assert conveyor("revoke", name).returncode == 0
        time.sleep(1.1)
        assert c.post("/v1/jobs/ner", json=INFERENCE_JOBS["ner"]).status_code == 401
    assert conveyor("revoke", name).returncode == 1


# -- hostile bodies: never a 5xx, always a clear 4xx (or a valid job, accepted) -------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from([*KINDS, "classify"]))
    choice = draw(st.integers(0, 4))
    if choice == 0:
        body = draw(st.binary(max_size=300))
    elif choice == 1:
        body = json.dumps(draw(json_values)).encode()
    elif choice == 2:  # the kind's own example with one field made hostile
        fields = dict(KINDS[kind].example)
        fields[draw(st.sampled_from([*fields, "id", "priority", "deadline", "idempotency_key", "x"]))] = draw(
            json_values
        )
        body = json.dumps(fields).encode()
    elif choice == 3:  # deep nesting
        depth = draw(st.integers(100, 5000))
        body = b'{"texts": ' + b"[" * depth + b"]" * depth + b"}"
    else:  # text with lone surrogates, NUL and the like, in a field
        text = draw(st.text(max_size=50))
        body = json.dumps({"texts": [text], "labels": [text, "b"]}).encode("utf-8", "surrogatepass")
    return kind, body


@pytest.fixture(scope="module")
def hostile_key(keys: KeyStore) -> str:
    return new_key(keys, "acme")


@settings(max_examples=150, deadline=None)
@given(case=hostile_bodies())
def test_hostile_bodies_never_get_a_5xx(gateway: str, hostile_key: str, case: tuple[str, bytes]) -> None:
    kind, body = case
    r = httpx.post(
        f"{gateway}/v1/jobs/{kind}", content=body, timeout=30,
        headers={"Authorization": f"Bearer {hostile_key}", "content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 202 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    detail = r.json().get("detail") if r.status_code != 202 else "accepted"
    assert isinstance(detail, str) and detail, r.text[:500]
