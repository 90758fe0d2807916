"""Redis users for the roles (producers/tenancy/roles.py): created with ``ACL SETUSER`` by the
server's superuser, saved to its ACL file where it has one, handed out as ``redis://`` URLs.

`conveyor up` creates one user per process kind (``conveyor-worker``, ``conveyor-monitor``,
``conveyor-admin``, ``conveyor-gateway``), with passwords kept in CONVEYOR_HOME (0600), and gives
each child only its own URL; `conveyor users add` creates more (a team's producer, bound to its
tenant).
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from producers.tenancy.roles import NEWER_SUBCOMMANDS, role_rules, setuser_args
from shared.settings import Settings

USERS_FILE: Final = "redis.users.json"  # the stack's own users: name -> password (0600)
STACK_USERS: Final = {
    "worker": "conveyor-worker",
    "monitor": "conveyor-monitor",
    "admin": "conveyor-admin",
    "gateway": "conveyor-gateway",
}
_UNKNOWN_RULE = re.compile(r"modifier '\+([a-z_|]+)': Unknown command")
USER_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def check_user_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= USER_NAME_CHARS or name == "default":
        raise ValueError(f"a user name is 1-64 of a-z, 0-9, '_', '-' and '.' (not 'default'), not {name!r}")
    return name


def server_major(client: redis.Redis) -> int:
    version = str(client.info("server").get("redis_version", "6"))
    return int(version.split(".")[0])


def db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def user_url(base_url: str, user: str, password: str) -> str:
    """``base_url`` (host, port, db, options) with ``user``'s login instead of its own."""
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def create_user(
    admin: redis.Redis,
    name: str,
    role: str,
    tenant: str | None = None,
    password: str | None = None,
    db: int = 0,
) -> str:
    """Create (or reset) ``name`` with ``role``'s rules; returns its password. Redis 7 and newer
    get the producer's selectors (the queue lists for LPUSH and LLEN alone)."""
    check_user_name(name)
    password = password or secrets.token_urlsafe(24)
    rules = role_rules(role, tenant, db, selectors=server_major(admin) >= 7)
    newer = list(NEWER_SUBCOMMANDS)
    while True:
        try:
            admin.execute_command("ACL", "SETUSER", name, *setuser_args(password, rules, newer))
            break
        except redis.ResponseError as exc:  # Redis 7 refuses a subcommand it does not have: drop it
            unknown = _UNKNOWN_RULE.search(str(exc))
            if unknown is None or unknown[1] not in newer:
                raise
            newer.remove(unknown[1])
    save(admin)
    return password


def remove_user(admin: redis.Redis, name: str) -> bool:
    removed = bool(admin.execute_command("ACL", "DELUSER", check_user_name(name)))
    save(admin)
    return removed


def save(admin: redis.Redis) -> bool:
    """``ACL SAVE`` where the server has an ACL file (the embedded one does); else the users last
    until the server restarts, and the operator keeps them in its own ACL file."""
    try:
        admin.execute_command("ACL", "SAVE")
    except redis.ResponseError:
        return False
    return True


def superuser_url(settings: Settings) -> str:
    """The login that may create users: the embedded server's own password where `conveyor up`
    runs it, else CONVEYOR_REDIS_URL (which must then be allowed ACL SETUSER)."""
    password_file = settings.home / "redis.password"
    recorded = settings.home / "redis.url"
    if not settings.redis_url and password_file.exists() and recorded.exists():
        return user_url(recorded.read_text().strip(), "default", password_file.read_text().strip())
    return settings.broker_url()


def stack_users(admin: redis.Redis, home: Path, base_url: str) -> dict[str, str]:
    """Create the stack's users (same passwords as last time, kept in ``home``); role -> URL."""
    from producers.local_redis import write_private

    path = home / USERS_FILE
    try:
        passwords: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        passwords = {}
    urls = {}
    db = db_of(base_url)
    for role, name in STACK_USERS.items():
        passwords[name] = create_user(admin, name, role, password=passwords.get(name), db=db)
        urls[role] = user_url(base_url, name, passwords[name])
    write_private(path, json.dumps(passwords))
    return urls
