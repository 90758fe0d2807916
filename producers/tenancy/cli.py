"""`conveyor users`: Redis users with least privilege (producers/tenancy/roles.py), and tenants' quotas.

conveyor users add team-a --role producer --tenant team-a   # prints the user's redis:// URL once
conveyor users quota team-a --max-queued 500 --max-jobs-per-s 50
"""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn

import redis
import typer

from producers.tenancy.roles import ROLE_NAMES, role_rules
from producers.tenancy.users import create_user, db_of, remove_user, save, superuser_url, user_url
from shared.redis_connect import redis_client
from shared.settings import Settings
from shared.tenant_keys import TENANTS_KEY, queued_key, quota_key
from shared.tenants import check_tenant

users_app = typer.Typer(help="Redis users with least privilege (roles), and tenants' quotas.", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _superuser() -> tuple[redis.Redis, str]:
    settings = Settings()
    try:
        url = superuser_url(settings)
    except RuntimeError as exc:
        _fail(str(exc))
    return redis_client(settings, url, socket_timeout=10), url


@users_app.command("add")
def users_add(
    name: str,
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLE_NAMES)}.")],
    tenant: Annotated[
        str | None, typer.Option(help="A producer's tenant: its job ids and keys start 'TENANT:'.")
    ] = None,
) -> None:
    """Create (or reset, with a new password) a Redis user; prints its URL once."""
    client, url = _superuser()
    try:
        if tenant is not None:
            check_tenant(tenant)
        password = create_user(client, name, role, tenant, db=db_of(url))
        if tenant:
            client.sadd(TENANTS_KEY, tenant)  # the bounded label values of per-tenant metrics
    except ValueError as exc:
        _fail(str(exc), 2)
    except redis.RedisError as exc:
        _fail(f"could not create the user ({type(exc).__name__}: {exc}); it takes a login allowed ACL SETUSER")
    out: dict[str, Any] = {"user": name, "role": role, "tenant": tenant, "redis_url": user_url(url, name, password)}
    if not save(client):  # no ACL file: the user lasts until that Redis restarts
        out["note"] = "this Redis has no ACL file: add `conveyor users rules` to its configuration to keep the user"
    if tenant:
        out["env"] = f"CONVEYOR_REDIS_URL='{out['redis_url']}' CONVEYOR_TENANT={tenant}"
    _print(out)


@users_app.command("remove")
def users_remove(name: str) -> None:
    """Delete a Redis user; its connections are closed by Redis."""
    client, _ = _superuser()
    try:
        _print({"user": name, "removed": remove_user(client, name)})
    except ValueError as exc:
        _fail(str(exc), 2)


@users_app.command("list")
def users_list() -> None:
    """Every Redis user with its rules (passwords appear only as hashes)."""
    client, _ = _superuser()
    rows = [str(r) for r in client.execute_command("ACL", "LIST")]
    _print([{"user": r.split()[1], "rules": " ".join(w for w in r.split()[2:] if not w.startswith("#"))} for r in rows])


@users_app.command("rules")
def users_rules(
    role: str, tenant: Annotated[str | None, typer.Option()] = None, db: Annotated[int, typer.Option()] = 0
) -> None:
    """The ACL rules a role gets (for an ACL file of a Redis that Conveyor does not run)."""
    try:
        _print(role_rules(role, tenant, db).acl_args(newer=()))
    except ValueError as exc:
        _fail(str(exc), 2)


@users_app.command("quota")
def users_quota(
    tenant: str,
    max_queued: Annotated[int | None, typer.Option(min=1, help="Jobs submitted and not yet taken by a worker.")] = None,
    max_jobs_per_s: Annotated[int | None, typer.Option(min=1, help="Jobs submitted in one second.")] = None,
    reset_queued: Annotated[
        bool, typer.Option(help="Forget the tenant's queued count (after its queue was purged by hand).")
    ] = False,
) -> None:
    """Set (or, with no option, show) a tenant's quotas; unset ones take the CONVEYOR_TENANT_* defaults."""
    try:
        key = quota_key(check_tenant(tenant))
    except ValueError as exc:
        _fail(str(exc), 2)
    client, _ = _superuser()
    client.sadd(TENANTS_KEY, tenant)
    if reset_queued:
        client.delete(queued_key(tenant))
    for field, value in (("max_queued", max_queued), ("max_jobs_per_s", max_jobs_per_s)):
        if value is not None:
            client.hset(key, field, value)
    settings = Settings()
    held = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in client.hgetall(key).items()}
    _print({
        "tenant": tenant,
        "queued": int(client.zcard(queued_key(tenant))),
        "max_queued": held.get("max_queued", settings.tenant_max_queued),
        "max_jobs_per_s": held.get("max_jobs_per_s", settings.tenant_max_jobs_per_s),
    })  # fmt: skip
