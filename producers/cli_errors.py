"""What the `conveyor` command says when the infrastructure fails: Redis unreachable, a refused
login, a URL that is not a Redis URL, a TLS handshake that fails, a server that does not answer.
One or two lines (what failed, what to check) and exit code 5, within a few seconds, instead
of a traceback; ``--debug`` or ``CONVEYOR_DEBUG=1`` shows the traceback as well. Job errors
(``JobFailed``, ``QueueFull``, ...) are the commands' own, already one line each.

Two parts, both applied to every command by ``ConveyorGroup`` (the root group of the CLI, so
sub-apps added later are covered too):

- a preflight: before a command that talks to Redis runs, one PING with a short timeout, so a
  down or silent server is named at once rather than after Celery's retries;
- a translation of whatever infrastructure exception a command still raises (Redis going away
  while it waits), by ``explain``.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import traceback
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from shared.redis_connect import redis_client
from shared.settings import Settings

INFRA_EXIT_CODE = 5
PREFLIGHT_TIMEOUT_S = 3.0  # connect, and again for the reply: a silent server is named within ~6 s
REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")
# Commands that never talk to Redis (`up` starts or checks its own; the model store is files): no
# preflight. Any other command, a sub-app's added later included, gets one.
NO_REDIS_COMMANDS = {
    ("schema",), ("up",), ("down",), ("worker",), ("exporter",),
    ("models",), ("models", "show"), ("models", "prepare"), ("models", "alias"), ("models", "aliases"),
    ("models", "remove"),
}  # fmt: skip
_HELP = {"--help", "-h"}
_CHECK_URL = "check CONVEYOR_REDIS_URL"


@dataclass(frozen=True)
class InfraProblem:
    """One infrastructure failure, in words: what failed, and what to check."""

    what: str
    check: str

    def lines(self) -> str:
        return f"error: {self.what}\n  {self.check}"


class InfraError(Exception):
    def __init__(self, problem: InfraProblem) -> None:
        super().__init__(problem.what)
        self.problem = problem


def redact(url: str) -> str:
    """The URL without its password (each part of a ``;``-joined Sentinel URL)."""
    out = []
    for part in url.split(";"):
        try:
            parts = urlsplit(part)
            if parts.password is None:
                out.append(part)
                continue
            user = parts.username or ""
            host = parts.hostname or ""
            netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
            out.append(urlunsplit(parts._replace(netloc=netloc)))
        except ValueError:  # not even a URL: show only its scheme
            out.append(part.split(":", 1)[0] + "://...")
    return ";".join(out)


def debug_enabled() -> bool:
    return os.environ.get("CONVEYOR_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _url(settings: Settings) -> str:
    try:
        return settings.broker_url()
    except RuntimeError as exc:  # nothing configured and no `conveyor up` running here
        raise InfraError(InfraProblem("no Redis to talk to", str(exc).removeprefix("no Redis configured: "))) from exc


def check_url(url: str) -> None:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        shown = f"{scheme}://" if scheme else redact(url)[:40]
        raise InfraError(
            InfraProblem(
                f"CONVEYOR_REDIS_URL is not a Redis URL ({shown})",
                "use redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS, unix:///path.sock or sentinel://",
            )
        )


def preflight(settings: Settings | None = None, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """PING the configured Redis; raise InfraError naming the problem if it does not answer."""
    try:
        settings = settings or Settings()
    except ValidationError as exc:
        raise InfraError(_setting_problem(exc)) from exc
    url = _url(settings)
    check_url(url)
    try:
        client = redis_client(settings, url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except (ValueError, TypeError) as exc:
        raise InfraError(InfraProblem(f"CONVEYOR_REDIS_URL cannot be read: {_first_line(exc)}", _CHECK_URL)) from exc
    try:
        client.ping()
    except Exception as exc:
        problem = explain(exc, url)
        if problem is None:
            raise
        raise InfraError(problem) from exc
    finally:
        client.close()


def explain(exc: BaseException, url: str | None = None) -> InfraProblem | None:
    """An infrastructure exception (or one that wraps one) in words; None for anything else."""
    import redis

    where = f"Redis at {redact(url)}" if url else "Redis"
    chain = _chain(exc)
    setting = next((c for c in chain if _is_settings_error(c)), None)
    if setting is not None:
        return _setting_problem(setting)
    if any(_is_job_timeout(c) for c in chain):
        return None  # a job that has no result in time: the command's own message
    for cause in chain:
        text = _first_line(cause)
        low = text.lower()
        if isinstance(cause, InfraError):
            return cause.problem
        if isinstance(cause, redis.AuthenticationError) or any(
            m in low for m in ("wrongpass", "noauth", "invalid password", "invalid username-password")
        ):
            return InfraProblem(
                f"{where} refused the login ({text})",
                "check the user and password in CONVEYOR_REDIS_URL (redis://USER:PASSWORD@HOST:PORT/DB)",
            )
        if isinstance(cause, ssl.SSLError) or (isinstance(cause, redis.ConnectionError) and "ssl" in low):
            return InfraProblem(
                f"TLS with {where} failed ({text})",
                "check that the server speaks TLS on that port, and ssl_ca_certs / ssl_certfile in the rediss:// URL",
            )
        timeout = isinstance(cause, redis.TimeoutError | socket.timeout | TimeoutError)
        if timeout and url and url.lower().startswith("rediss://") and "connecting" in low:
            return InfraProblem(
                f"the TLS handshake with {where} did not complete ({text})",
                "check that the server speaks TLS on that port (plain Redis wants redis://) and that it is reachable",
            )
        if timeout:
            return InfraProblem(
                f"{where} did not answer in time ({text or 'timed out'})",
                "check that CONVEYOR_REDIS_URL names Redis's host and port, and that it is reachable (firewall, VPN)",
            )
        if isinstance(cause, redis.BusyLoadingError):
            return InfraProblem(f"{where} is still loading its data", "try again in a moment")
        if type(cause).__name__ == "MasterNotFoundError":
            return InfraProblem(
                f"no sentinel knows the master ({text})",
                "check CONVEYOR_SENTINEL_MASTER, CONVEYOR_SENTINEL_PASSWORD and the sentinel:// hosts",
            )
        if isinstance(cause, redis.ConnectionError | ConnectionRefusedError | socket.gaierror) or _kombu_operational(
            cause
        ):
            return InfraProblem(
                f"cannot reach {where} ({_short_connection_error(text)})",
                "check that Redis runs (`conveyor up` starts the embedded one) and that CONVEYOR_REDIS_URL names it",
            )
        if isinstance(cause, KeyError) and "no such transport" in low:
            return InfraProblem(
                f"CONVEYOR_REDIS_URL is not a Redis URL ({text.strip(chr(39))})",
                "use redis://, rediss://, unix:// or sentinel://",
            )
        if type(cause).__name__ == "ImproperlyConfigured" or (
            isinstance(cause, ValueError) and "redis url must specify" in low
        ):
            return InfraProblem(f"CONVEYOR_REDIS_URL cannot be used: {text}", _CHECK_URL)
        if isinstance(cause, redis.ResponseError) and low.startswith(("misconf", "oom", "readonly", "noscript")):
            return InfraProblem(f"{where} refused a command ({text})", "check the server's log and its memory")
    return None


def _is_settings_error(exc: BaseException) -> bool:
    return isinstance(exc, ValidationError) and exc.title == Settings.__name__


def _setting_problem(exc: Any) -> InfraProblem:
    """A CONVEYOR_ variable that does not parse: name it (its value only when it is not a secret)."""
    first = exc.errors()[0]
    name = "CONVEYOR_" + "_".join(str(p) for p in first.get("loc", ())).upper()
    secret = any(w in name for w in ("PASSWORD", "URL", "KEY", "TOKEN"))
    value = "" if secret else f"={str(first.get('input'))[:60]!r}"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return InfraProblem(
        f"setting {name}{value} is not valid: {first.get('msg', 'invalid')}{more}",
        "fix or unset that environment variable (the README's settings table lists each one and its limits)",
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _short_connection_error(text: str) -> str:
    # redis-py: "Error 111 connecting to 127.0.0.1:6390. Connection refused." -> "connection refused"
    tail = text.rsplit(". ", 1)[-1].strip(" .")
    return tail.lower() if tail and len(tail) < 80 else text


def _kombu_operational(exc: BaseException) -> bool:
    return type(exc).__name__ == "OperationalError" and type(exc).__module__.startswith("kombu")


def _is_job_timeout(exc: BaseException) -> bool:
    # Celery's AsyncResult.get raises celery.exceptions.TimeoutError: the job's time, not Redis's.
    return type(exc).__name__ == "TimeoutError" and type(exc).__module__.startswith("celery")


def _needs_redis(group: TyperGroup, ctx: Any, args: list[str]) -> bool:
    """Whether the command these arguments name talks to Redis (help and usage never do)."""
    if not args or _HELP & set(args):
        return False
    cmd: Any = group
    rest = list(args)
    path: tuple[str, ...] = ()  # the command names: ("models", "compress")
    while isinstance(cmd, TyperGroup) and rest:
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return False  # a usage error follows
        cmd, path, rest = sub, (*path, rest[0]), rest[1:]
    if path in NO_REDIS_COMMANDS:
        return False
    return not isinstance(cmd, TyperGroup) or cmd.invoke_without_command


class ConveyorGroup(TyperGroup):
    """The CLI's root group: a Redis preflight before commands that need it, and every
    infrastructure failure printed in two lines (``--debug``: with the traceback)."""

    def invoke(self, ctx: Any) -> Any:
        debug = bool(ctx.params.get("debug")) or debug_enabled()
        try:
            if _needs_redis(self, ctx, [*ctx._protected_args, *ctx.args]):
                preflight()
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise
        except Exception as exc:
            url = _safe_url()
            problem = exc.problem if isinstance(exc, InfraError) else explain(exc, url)
            if problem is None:
                raise
            if debug:
                traceback.print_exception(exc, file=sys.stderr)
            typer.echo(problem.lines(), err=True)
            raise typer.Exit(INFRA_EXIT_CODE) from None


def _safe_url() -> str | None:
    try:
        return Settings().broker_url()
    except Exception:  # already explained by the preflight, or nothing configured
        return None
