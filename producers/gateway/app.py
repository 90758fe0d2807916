"""The gateway's FastAPI application. One ``POST /v1/jobs/NAME`` route per job kind of the
registry (its request body is the kind's job schema, so /docs shows each), and the job's own
routes. Every request names an API key (``Authorization: Bearer KEY``); each step is checked
before the next costs anything: the key (401), its rate (429), its job types (403), the body's
size (413), the JSON and the schema (422), then the SDK's own refusals at submit (quota 429,
queue full 503, idempotency 409). Jobs are published by the SDK's ``Client``, one per tenant,
over the same queues as any producer; blocking Redis calls run in the thread pool, and a tenant's
submits that arrive together are published together (``publisher.py``)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from producers.client import AsyncClient, Client, JobHandle
from producers.gateway.body import read_bounded
from producers.gateway.keys import ApiKey, KeyStore
from producers.gateway.publisher import Publisher
from producers.gateway.ratelimit import RateLimiter
from producers.gateway.views import Accepted, Cancelled, JobView, Problem, job_view
from producers.gateway.webhooks import WebhookDispatcher, WebhookStore, check_callback_url
from shared.errors import (
    ConveyorError,
    DuplicateJob,
    IdempotencyConflict,
    JobFailed,
    QueueFull,
    QuotaExceeded,
    describe_validation_error,
)
from shared.jobs import MAX_ID_CHARS, JobBase, check_job_id
from shared.kinds import JOB_MODELS, KINDS, KindSpec
from shared.redis_connect import redis_client
from shared.settings import Settings
from shared.tenants import tenant_of

log = logging.getLogger("conveyor.gateway")

API_PREFIX = "/v1/jobs"
INLINE_PARSE_BYTES = 64 * 1024  # bodies up to this are validated on the event loop, larger ones in a thread
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": what}
    for code, what in {
        401: "No API key, or an unknown or revoked one",
        403: "The key may not submit this job type",
        404: "No such job for this key's tenant",
        409: "The idempotency key names another job's payload, or the id was submitted before",
        413: "The request body is too large",
        415: "The body is not application/json",
        422: "Bad JSON, or a job its schema refuses (the field is named)",
        429: "The key's rate or the tenant's quota is spent (Retry-After)",
        503: "The queue is full, or Redis is away (Retry-After)",
    }.items()
}

_bearer = HTTPBearer(auto_error=False, description="An API key from `conveyor keys add`.")


class Gateway:
    """What the routes share: settings, Redis, the key store, rate limits, the SDK clients."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_body = settings.gateway_max_body_kb * 1024
        self.redis = redis_client(settings, socket_timeout=10, health_check_interval=30)
        self.keys = KeyStore(self.redis)
        self.limiter = RateLimiter()
        self.webhooks = WebhookStore(self.redis, settings)
        self.publisher = Publisher(self.client)
        self._clients: dict[str, AsyncClient] = {}
        self._clients_lock = threading.Lock()

    def async_client(self, tenant: str) -> AsyncClient:
        """The SDK clients of one tenant (made once): they give the tenant's jobs their ``TENANT:``
        ids and idempotency keys, check its quotas and write its submit claims; the asyncio one
        waits for results on one pub/sub connection (a long poll holds no thread)."""
        with self._clients_lock:
            found = self._clients.get(tenant)
            if found is None:
                found = self._clients[tenant] = AsyncClient(settings=self.settings, tenant=tenant)
            return found

    def client(self, tenant: str) -> Client:
        return self.async_client(tenant).sync

    async def close(self) -> None:
        for c in list(self._clients.values()):
            await c.close()
        self.redis.close()

    # -- each request -----------------------------------------------------------------------
    async def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
        if credentials is None:
            raise HTTPException(401, "no API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
        hit, key = self.keys.cached(credentials.credentials)
        if not hit:
            key = await run_in_threadpool(self.keys.lookup, credentials.credentials)
        if key is None:
            raise HTTPException(401, "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
        rate = key.rate_per_s or self.settings.gateway_rate_per_s
        wait = self.limiter.take(key.name, rate, key.burst or self.settings.gateway_rate_burst)
        if wait > 0:
            raise HTTPException(
                429, f"API key {key.name!r} is over its rate of {rate:g} requests/s", _retry_after(wait)
            )
        return key

    def own_job(self, key: ApiKey, job_id: str) -> JobHandle:
        """The job's handle, if it is the key's tenant's; 404 alike for a foreign and a malformed id."""
        try:
            check_job_id(job_id)
        except ValueError:
            raise HTTPException(404, "no such job") from None
        if tenant_of(job_id) != key.tenant:
            raise HTTPException(404, f"no job {job_id!r} for tenant {key.tenant!r}")
        return JobHandle(self.client(key.tenant), job_id)

    async def known(self, key: ApiKey, view: JobView) -> JobView:
        """``view``, unless it is PENDING for an id Conveyor has no record of (never submitted, or
        its results expired): 404, as for another tenant's."""
        if view.state == "PENDING" and not await self.async_client(key.tenant).exists(view.id):
            raise HTTPException(404, f"no job {view.id!r} for tenant {key.tenant!r}")
        return view

    async def submit(self, spec: KindSpec, request: Request, key: ApiKey, callback_url: str | None) -> Accepted:
        if not key.may_submit(spec.name):
            raise HTTPException(403, f"API key {key.name!r} may submit {', '.join(key.types or ())}, not {spec.name}")
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HTTPException(415, f"send the job as application/json, not {content_type[:60]!r}")
        if callback_url is not None:
            try:
                check_callback_url(callback_url, self.settings.gateway_webhook_hosts)
            except ValueError as exc:
                raise _unprocessable(f"callback_url: {exc}") from None
            if self.webhooks.full():
                raise HTTPException(
                    503, "too many webhooks are waiting (CONVEYOR_GATEWAY_MAX_WEBHOOKS)", _retry_after(5)
                )
        raw = await read_bounded(request, self.max_body)
        if len(raw) <= INLINE_PARSE_BYTES:  # a small job validates in microseconds: no thread hop
            job = self._parse(spec, raw, key.tenant)
        else:
            job = await run_in_threadpool(self._parse, spec, raw, key.tenant)
        handle = await self._publish(key.tenant, job)
        if callback_url is not None:
            await run_in_threadpool(self.webhooks.add, handle.id, callback_url, key.tenant)
        status = f"{API_PREFIX}/{handle.id}"
        return Accepted(id=handle.id, type=spec.name, status_url=status, wait_url=f"{status}/wait")

    @staticmethod
    def _parse(spec: KindSpec, raw: bytes, tenant: str) -> JobBase:
        try:
            job = spec.job.model_validate_json(raw)
        except ValidationError as exc:
            raise _unprocessable(describe_validation_error(exc), exc) from None
        owner = tenant_of(job.id)
        if "id" in job.model_fields_set and owner is not None and owner != tenant:
            raise _unprocessable(f"id: {job.id!r} names tenant {owner!r}; this API key's tenant is {tenant!r}")
        return job  # the tenant's Client adds its prefix to the id and the idempotency key

    async def _publish(self, tenant: str, job: JobBase) -> JobHandle:
        try:
            return await self.publisher.submit(tenant, job)
        except (IdempotencyConflict, DuplicateJob) as exc:
            raise HTTPException(409, f"{type(exc).__name__}: {exc}") from None
        except QueueFull as exc:
            raise HTTPException(503, f"QueueFull: {exc}", _retry_after(1)) from None
        except QuotaExceeded as exc:
            raise HTTPException(429, f"QuotaExceeded: {exc}", _retry_after(exc.retry_after_s)) from None
        except ConveyorError as exc:
            if isinstance(exc, ValueError):  # InvalidJob: a check the schema alone cannot make
                raise _unprocessable(f"{type(exc).__name__}: {exc}") from None
            raise HTTPException(400, f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # the tenant's stamp: an id or key too long with its prefix
            raise _unprocessable(str(exc)) from None

    async def wait(self, key: ApiKey, handle: JobHandle, timeout: float) -> JobView:
        """The job's view once it is done, or after ``timeout`` (cut to CONVEYOR_GATEWAY_MAX_WAIT_S):
        the SDK's asyncio wait, a subscription to the job's result channel, no poll."""
        try:
            await (
                self.async_client(key.tenant).job(handle.id).result_json(min(timeout, self.settings.gateway_max_wait_s))
            )
        except (TimeoutError, JobFailed):  # not done yet, or done without success: the view says which
            pass
        return await self.known(key, await run_in_threadpool(job_view, handle))

    def view(self, tenant: str, job_id: str) -> JobView:
        return job_view(JobHandle(self.client(tenant), job_id))


async def _authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    gateway: Gateway = request.app.state.gateway
    return await gateway.authenticate(credentials)


# Parameter types of the routes (module level: FastAPI resolves the annotations here).
Key = Annotated[ApiKey, Depends(_authenticated)]
JobId = Annotated[str, Path(max_length=MAX_ID_CHARS, description="The job id (TENANT:<uuid>).")]
Callback = Annotated[
    str | None,
    Query(max_length=2048, description="POSTed the job's view once it is done (signed; allow-listed hosts)."),
]
WaitTimeout = Annotated[float, Query(ge=0, le=86_400, description="Seconds (cut to CONVEYOR_GATEWAY_MAX_WAIT_S).")]


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _unprocessable(detail: str, exc: ValidationError | None = None) -> HTTPException:
    errors = exc.errors(include_url=False, include_context=False, include_input=False) if exc else None
    return HTTPException(422, {"detail": detail, "errors": errors})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        dispatcher = WebhookDispatcher(gateway.webhooks, settings, gateway.view)
        task = asyncio.create_task(dispatcher.run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await gateway.close()

    app = FastAPI(
        title="Conveyor gateway",
        version="1",
        summary="Submit Conveyor jobs over HTTP, follow them, get their results.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway

    # OpenAPI: every job schema once under components, each kind's route referring to its own.
    refs, defs = models_json_schema(
        [(model, "validation") for model in JOB_MODELS.values()], ref_template="#/components/schemas/{model}"
    )

    def submit_route(spec: KindSpec) -> Callable[..., Coroutine[Any, Any, Accepted]]:
        async def submit(request: Request, key: Key, callback_url: Callback = None) -> Accepted:
            return await gateway.submit(spec, request, key, callback_url)

        return submit

    for name, spec in KINDS.items():
        app.add_api_route(
            f"{API_PREFIX}/{name}", submit_route(spec), methods=["POST"], status_code=202, response_model=Accepted,
            name=f"submit_{name.replace('-', '_')}", summary=spec.summary, tags=["submit"], responses=ERRORS,
            openapi_extra={"requestBody": {
                "required": True, "content": {"application/json": {"schema": refs[(spec.job, "validation")]}},
            }},
        )  # fmt: skip

    @app.post(f"{API_PREFIX}/{{job_type}}", include_in_schema=False)
    async def unknown_type(job_type: str, key: Key) -> None:
        raise HTTPException(404, f"unknown job type {job_type[:64]!r}; one of {', '.join(KINDS)}")

    @app.get(f"{API_PREFIX}/{{job_id}}", response_model=JobView, tags=["jobs"], responses=ERRORS)
    async def get_job(job_id: JobId, key: Key) -> JobView:
        """The job's state, and its result (or error) once it is done."""
        return await gateway.known(key, await run_in_threadpool(job_view, gateway.own_job(key, job_id)))

    @app.get(f"{API_PREFIX}/{{job_id}}/wait", response_model=JobView, tags=["jobs"], responses=ERRORS)
    async def wait_job(
        job_id: JobId,
        key: Key,
        timeout: WaitTimeout = 30.0,
    ) -> JobView:
        """Long poll: answers as soon as the job is done, or after ``timeout`` with its state (``done`` false)."""
        return await gateway.wait(key, gateway.own_job(key, job_id), timeout)

    @app.delete(f"{API_PREFIX}/{{job_id}}", status_code=202, response_model=Cancelled, tags=["jobs"], responses=ERRORS)
    async def cancel_job(job_id: JobId, key: Key) -> Cancelled:
        """Cancel: a queued job never runs (it ends REVOKED), a training job stops within seconds."""
        handle = gateway.own_job(key, job_id)
        if not await gateway.async_client(key.tenant).exists(job_id):
            raise HTTPException(404, f"no job {job_id!r} for tenant {key.tenant!r}")
        await run_in_threadpool(handle.cancel)
        return Cancelled(id=job_id)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        await run_in_threadpool(gateway.redis.ping)
        return {"ok": True}

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": describe_validation_error(exc), "errors": errors}, 422)

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def redis_away(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis error: %s", exc)
        return JSONResponse({"detail": "Redis is unreachable; try again"}, 503, headers=_retry_after(2))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the gateway's log"}, 500)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
