"""Settings from the environment, prefix ``CONVEYOR_``. Every field is documented; the
README's table is checked against this class by a test."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REDIS_URL_FILE = "redis.url"


def verified_tls_url(url: str) -> str:
    """A ``rediss://`` URL that names no ``ssl_cert_reqs`` gets ``ssl_cert_reqs=required``:
    without it kombu connects without checking the server's certificate (with a warning) and
    Celery's result backend refuses the URL. The CA is the system's unless the URL names one
    (``ssl_ca_certs=/path/ca.pem``); redis-py, kombu and Celery's backend all read these."""
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return url
    return urlunsplit(parts._replace(query="&".join(q for q in (parts.query, "ssl_cert_reqs=required") if q)))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="redis://, rediss:// or Sentinel (sentinel://:PASSWORD@h1:26379;sentinel://:PASSWORD@h2:26379) "
        "URL of the broker and result store. Unset: the embedded Redis that `conveyor up` starts (its URL is "
        "recorded under CONVEYOR_HOME).",
    )
    sentinel_master: str = Field(
        default="mymaster",
        min_length=1,
        description="With a sentinel:// URL: the name under which the sentinels monitor Conveyor's master.",
    )
    sentinel_password: str | None = Field(
        default=None,
        description="With a sentinel:// URL: the sentinels' own password (their requirepass), if they have one; "
        "the URL's password is the master's.",
    )
    wait_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description="After each submit and each batch of result writes, wait (Redis WAIT) until this many replicas "
        "hold them, so a failover loses neither. 0: Redis's asynchronous replication alone.",
    )
    wait_timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=60_000,
        description="Longest WAIT for CONVEYOR_WAIT_REPLICAS; a submit that reaches fewer replicas in time "
        "raises NotReplicated (the job may still run).",
    )
    home: Path = Field(
        default=Path.home() / ".conveyor",
        description="Where Conveyor keeps the embedded Redis's data, its URL, logs and Flower's login.",
    )
    model_dir: Path | None = Field(default=None, description="The model store. Unset: CONVEYOR_HOME/models.")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Most items in one forward pass.")
    max_wait_ms: float = Field(
        default=10.0, ge=0.0, le=10_000.0, description="Longest wait after a batch's first item before it runs."
    )
    token_budget: int = Field(
        default=8192,
        ge=1,
        description="Most padded tokens in one text batch (items x longest item); audio counts 30 s windows.",
    )
    worker_concurrency: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Task threads per worker process. 0: four times max_batch_size, so batches can fill.",
    )
    result_ttl_s: int = Field(default=86_400, ge=60, description="How long results stay in Redis (seconds).")
    visibility_timeout_s: int = Field(
        default=300,
        ge=5,
        description="Seconds after which a job held by a dead worker is redelivered. Live workers renew "
        "the lease of every job they hold, so long jobs are not redelivered while they run.",
    )
    idempotency_ttl_s: int = Field(
        default=86_400, ge=1, description="How long an idempotency key maps to its first job (seconds)."
    )
    model_cache_mb: int = Field(
        default=4096, ge=1, description="Memory bound of a worker's loaded-model cache (least recently used evicted)."
    )
    devices: str = Field(default="auto", description="Worker devices: auto, cpu, or GPU indices such as 0,1.")
    ingest: bool = Field(
        default=True,
        description="Inference workers take their jobs many at a time (bulk ingest); false: Celery's "
        "one-task-per-job path, for comparison.",
    )
    instances_per_device: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Inference worker processes per device (Triton's instance groups), each with its own "
        "batchers: for small models whose per-job Python, not the device, is the bound.",
    )
    worker_stall_s: float = Field(
        default=120.0,
        ge=5.0,
        description="An inference worker whose ingest loop has not turned for this long (alive but not "
        "consuming) is restarted by its supervisor.",
    )
    heartbeat_file: Path | None = Field(
        default=None,
        description="Set by `conveyor worker` for each inference process it starts: the file the process "
        "touches while its ingest loop turns, which the supervisor watches.",
    )
    wakeup: Literal["notify", "poll"] = Field(
        default="notify",
        description="How an idle worker learns of a new job: notify (it sleeps until Redis's keyspace "
        "notifications report a push to one of its queues, and looks once a second besides; where Redis "
        "sends none, it polls) or poll (it looks every CONVEYOR_IDLE_POLL_MS).",
    )
    idle_poll_ms: float = Field(
        default=5.0,
        ge=0.5,
        le=1000.0,
        description="When an idle worker polls (CONVEYOR_WAKEUP=poll, or a Redis without keyspace notifications): "
        "the longest wait between two looks at its queues, each three Redis commands; the most it adds to a "
        "lone job's latency.",
    )
    prefetch_items: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Most inference items (texts, users, audio files) a worker holds at once. 0: two batches "
        "(2 x max_batch_size), so an urgent job starts within a batch or two.",
    )
    task_events: Literal["all", "failures", "none"] = Field(
        default="all",
        description="Task events the inference fast path sends (in bulk) for Flower: all, failures, none.",
    )
    inference_time_limit_s: float = Field(
        default=600.0,
        gt=0,
        description="An inference job held longer than this is given up and redelivered: a hung batch "
        "never holds a job forever.",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Times an inference job may be taken from its queue (kombu's redeliveries after a worker "
        "died, and time-limit releases, included) before it is failed and dead-lettered instead of run again.",
    )
    drain_timeout_s: float = Field(
        default=10.0,
        ge=0.0,
        le=3600.0,
        description="On a stop, how long a worker lets the jobs it holds finish and be written before it puts "
        "the rest back at the head of their queues (the supervisor waits this plus 15 s before SIGKILL).",
    )
    max_memory_mb: int = Field(
        default=4096,
        ge=0,
        description="A worker process whose resident memory passes this finishes what it holds, takes nothing "
        "new and exits; its supervisor starts a fresh one (Celery's --max-memory-per-child idea). 0: no bound.",
    )
    max_retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of a job that failed transiently (out of memory, lost connection).",
    )
    retry_backoff_s: float = Field(
        default=0.5,
        ge=0.0,
        le=3600.0,
        description="Base of the exponential backoff (with full jitter) between retries, in seconds.",
    )
    device: str = Field(
        default="auto",
        description="The torch device of one worker process (cpu, cuda:0); set by `conveyor worker` for each "
        "process it starts. auto: cuda:0 where a GPU is visible, else cpu.",
    )
    flower_port: int = Field(default=5555, ge=1, le=65535, description="Port of Flower on 127.0.0.1.")
    flower_user: str = Field(default="conveyor", description="Flower's basic-auth user.")
    flower_password: str | None = Field(
        default=None, description="Flower's basic-auth password. Unset: generated once, kept in CONVEYOR_HOME."
    )
    flower_monitor_user: str = Field(
        default="monitor",
        description="Flower's read-only login (GET pages and API only); its password is generated once and kept in "
        "CONVEYOR_HOME/flower-monitor.password.",
    )
    flower_control: bool = Field(
        default=False,
        description="`conveyor up` runs Flower with the admin Redis user, so its admin login may revoke jobs, "
        "change pools and send tasks. false: Flower runs with the read-only monitor user and sends no control "
        "commands.",
    )
    redis_acl: bool = Field(
        default=True,
        description="`conveyor up` creates a least-privilege Redis user per process kind on its embedded Redis "
        "(worker, monitor, admin, gateway) and gives each process only its own. false: every process logs in as "
        "the server's superuser.",
    )
    metrics_port: int = Field(
        default=9809,
        ge=1,
        le=65535,
        description="Port of the Prometheus exporter (`conveyor exporter`, started by `conveyor up`).",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Address the exporter listens on. Set 0.0.0.0 for a Prometheus on another machine "
        "(keep the login on).",
    )
    metrics_auth: bool = Field(
        default=True,
        description="The exporter asks for Flower's login (basic auth). false: no login, for an exporter reachable "
        "only by a trusted Prometheus.",
    )
    metrics_flush_s: float = Field(
        default=1.0, gt=0.0, le=60.0, description="How often each worker adds its job counts to Redis (seconds)."
    )
    metrics_worker_timeout_s: float = Field(
        default=15.0,
        gt=0.0,
        description="A worker with no heartbeat for this long is reported down (celery_worker_up 0); "
        "workers beat every 2 s.",
    )
    metrics_generic_sent_hostname: bool = Field(
        default=False,
        description='Count task-sent events under hostname="generic" (celery-exporter\'s '
        "--generic-hostname-task-sent-metric), not each producer's host: one series per task for many producer hosts.",
    )
    metrics_forget_worker_s: float = Field(
        default=600.0,
        ge=0.0,
        description="How long a down worker stays listed with celery_worker_up 0 before its series is "
        "dropped (seconds).",
    )
    # -- the HTTP gateway (producers/gateway/) ------------------------------------------------
    gateway_port: int = Field(
        default=8780,
        ge=1,
        le=65535,
        description="Port of the HTTP gateway (`conveyor gateway`, started by `conveyor up`).",
    )
    gateway_address: str = Field(
        default="127.0.0.1",
        description="Address the HTTP gateway listens on. 0.0.0.0 opens it to other machines (put TLS in front).",
    )
    gateway_max_body_kb: int = Field(
        default=16_384,
        ge=1,
        le=1_048_576,
        description="Largest request body the gateway reads, in KiB (16 MiB: a job with inline audio or images); "
        "checked from Content-Length and again while reading, before anything is parsed (413).",
    )
    gateway_rate_per_s: float = Field(
        default=100.0,
        gt=0.0,
        le=1_000_000.0,
        description="Requests per second each API key may make (a token bucket; `conveyor keys add --rate-per-s` "
        "sets one key's own); more get 429 with Retry-After.",
    )
    gateway_rate_burst: int = Field(
        default=200,
        ge=1,
        le=1_000_000,
        description="Requests an API key may make at once above its rate (the bucket's size).",
    )
    gateway_max_wait_s: float = Field(
        default=60.0,
        gt=0.0,
        le=3600.0,
        description="Longest long poll (`GET /v1/jobs/ID/wait?timeout=`); a larger timeout is cut to this.",
    )
    gateway_max_connections: int = Field(
        default=1024,
        ge=1,
        le=100_000,
        description="Connections and requests the gateway serves at once; more are answered 503 at once.",
    )
    gateway_webhook_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts (host or host:port, comma-separated) a job's callback_url may name; a callback to any "
        "other host is refused at submit (422) and redirects are never followed. Empty: no webhooks.",
    )
    gateway_webhook_secret: str | None = Field(
        default=None,
        description="Key of the HMAC-SHA256 signature on each webhook (Conveyor-Signature header). Unset: generated "
        "once, kept in CONVEYOR_HOME/gateway-webhook.secret.",
    )
    gateway_webhook_attempts: int = Field(
        default=6,
        ge=1,
        le=100,
        description="Deliveries tried per webhook (a non-2xx answer, a redirect or no answer is retried with "
        "exponential backoff and jitter) before it is given up.",
    )
    gateway_webhook_backoff_s: float = Field(
        default=1.0,
        gt=0.0,
        le=3600.0,
        description="Base of the exponential backoff between webhook attempts (seconds).",
    )
    gateway_webhook_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=300.0,
        description="Longest wait for a webhook receiver to answer one attempt (seconds).",
    )
    gateway_max_webhooks: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Webhooks waiting for their jobs at once; a submit with a callback_url beyond it gets 503.",
    )
    input_roots: Annotated[list[Path], NoDecode] | None = Field(
        default=None,
        description="Directories jobs may read input files from (audio_path, data_path, ...), separated by "
        "':' (or a JSON list). Unset: CONVEYOR_HOME/inputs and the current directory of `conveyor up` "
        "(or of the worker).",
    )
    max_queue_depth: int = Field(
        default=100_000,
        ge=0,
        description="Jobs a queue may hold before submit refuses new ones with QueueFull. 0: unbounded.",
    )
    tenant: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="The tenant this producer submits for: the SDK and CLI give its jobs ids and idempotency keys "
        "prefixed 'TENANT:', write its submit claims and check its quotas (a Redis user bound to the tenant "
        "allows nothing else). Unset: no tenant.",
    )
    require_tenant: bool = Field(
        default=False,
        description="Workers refuse (dead-letter) every job whose id carries no tenant prefix, so a tenant's Redis "
        "user cannot send work outside its prefix, claims and quotas. false: untenanted jobs run as before.",
    )
    tenant_max_queued: int = Field(
        default=10_000,
        ge=1,
        description="Default quota: jobs a tenant may have submitted and not yet taken by a worker (`conveyor "
        "users quota` sets one tenant's own); more are refused with QuotaExceeded.",
    )
    tenant_max_jobs_per_s: int = Field(
        default=1_000,
        ge=1,
        description="Default quota: jobs a tenant may submit in one second (`conveyor users quota` sets one "
        "tenant's own); more are refused with QuotaExceeded and a retry_after_s.",
    )
    max_audio_file_mb: int = Field(
        default=200,
        ge=1,
        le=1_000_000,
        description="Largest audio file (audio_path) a transcription job may name, in MB; checked before the "
        "file is opened. Inline audio_b64 has the job schema's own limit.",
    )
    max_audio_samples: int = Field(
        default=200_000_000,
        ge=1,
        description="Most samples (frames x channels, from the header, before decoding) in one job's audio: "
        "an hour of 48 kHz mono or 16-24 kHz stereo; 800 MB were it decoded whole.",
    )
    max_input_file_mb: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Largest training data file (data_path, validation_path, interactions_path) a job may "
        "read, in MB; checked before the file is read, and the read stops there.",
    )

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines of every process `conveyor up` starts: text, or json (one JSON object per line: "
        "time, level, process, worker, event, job_id, kind, error_type, error, duration_s).",
    )
    log_dir: Path | None = Field(
        default=None,
        description="Where `conveyor up` and the worker launcher write one rotating log file per process. "
        "Unset: CONVEYOR_HOME/logs for `conveyor up`; standard error for a `conveyor worker` started alone.",
    )
    log_max_mb: int = Field(
        default=20, ge=1, le=10_000, description="Size (MB) at which a process's log file is rotated."
    )
    log_backups: int = Field(default=3, ge=0, le=100, description="Rotated log files kept per process.")
    debug: bool = Field(
        default=False,
        description="The CLI shows the traceback of an infrastructure failure (Redis down, refused login, bad "
        "URL, TLS, timeout) after its two-line message (also `conveyor --debug`).",
    )

    @field_validator("input_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        # PATH-style "a:b" from the environment, or a JSON list; blank means unset.
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @field_validator("gateway_webhook_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        # "a.example,b.example:8443" from the environment, or a JSON list; host names compare lower-case.
        if isinstance(value, str):
            text = value.strip()
            hosts = json.loads(text) if text.startswith("[") else text.split(",")
            return [str(h).strip().lower() for h in hosts if str(h).strip()]
        return value

    @cached_property
    def models_path(self) -> Path:
        return self.model_dir or self.home / "models"

    def broker_url(self) -> str:
        """The Redis URL to use: the configured one, or the embedded one recorded by `conveyor up`."""
        if self.redis_url:
            return verified_tls_url(self.redis_url)
        recorded = self.home / REDIS_URL_FILE
        if recorded.exists():
            return recorded.read_text().strip()
        raise RuntimeError(
            f"no Redis configured: set CONVEYOR_REDIS_URL, or run `conveyor up` to start the embedded one "
            f"(it records its URL in {recorded})"
        )

    def allowed_input_roots(self) -> list[Path]:
        """The input roots, absolute with symlinks resolved (so a resolved job path compares)."""
        roots = self.input_roots if self.input_roots is not None else [self.home / "inputs", Path.cwd()]
        return [Path(os.path.realpath(os.path.expanduser(root))) for root in roots]

    def input_roots_env(self) -> str:
        """CONVEYOR_INPUT_ROOTS as `conveyor up` hands it to its children: they keep its directory."""
        return os.pathsep.join(str(root) for root in self.allowed_input_roots())

    def concurrency(self) -> int:
        return self.worker_concurrency or 4 * self.max_batch_size

    def prefetch(self) -> int:
        return self.prefetch_items or 2 * self.max_batch_size


def get_settings() -> Settings:
    return Settings()
