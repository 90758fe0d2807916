"""Redis ACL roles: what each kind of Conveyor process may do in Redis, and nothing more.

Each role is a list of commands, key patterns and channel patterns, found by running the real
processes against a real Redis (``scripts/acl_discover.py``: MONITOR, each connection attributed to
its user) and checked by running them again under these rules with an empty ``ACL LOG``
(tests/test_acl_roles.py). The README's "Access control" section says why each command is there.

- ``producer``: publish jobs (LPUSH onto the queue lists, by name: producers declare no bindings),
  read queue depths (LLEN), write its submit claims, idempotency keys, explicit-id claims and
  cancel flags, read and wait for its results (GET, SUBSCRIBE ``celery-task-meta-ID``), its quotas.
  Bound to a tenant, every one of those keys and channels carries the tenant's prefix. No KEYS,
  SCAN, FLUSH*, CONFIG, EVAL, no dead letters, no ``unacked``, no worker control channel.
- ``worker``: the ingest (its pop script, kombu's ``unacked`` bookkeeping, dead letters), the result
  writer, the lease keeper, metrics, the keyspace wake-up, and Celery's own worker (BRPOP on its
  direct queue, control replies, events, kombu's restore). No admin commands (CONFIG, FLUSH*, KEYS,
  DEBUG, SHUTDOWN, ACL, MONITOR, CLIENT KILL ...).
- ``monitor``: read-only figures (queue lengths, the dead-letter count, the workers' metric hashes,
  results for Flower's task pages) and Celery's event stream. It cannot send worker control
  commands: Redis cannot tell ``inspect`` from ``shutdown`` on the control channel.
- ``admin``: the operator's CLI (`conveyor dlq`, `cancel`, `status`, `models`, `users`): every
  Conveyor key and channel, with the data commands of the other roles, but none of Redis's
  ``@dangerous`` commands (FLUSH*, CONFIG, KEYS, DEBUG, SHUTDOWN, ACL ...). Creating users takes the
  server's own superuser login (the ``default`` user), which stays with `conveyor up`.
- ``gateway``: the HTTP gateway's producer: a producer for every tenant (API keys, not Redis,
  bind a request to its tenant) plus the gateway's own keys.

Redis 6.2 (the embedded server) has one key-pattern list per user, applied to every command the
user may run: a producer that may SET its claims may also SET on the shared queue lists it LPUSHes
to. Redis 7's selectors close that gap; ``acl_rules`` uses them when told the server is 7 or newer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from shared.names import ALL_QUEUES, CANCEL_KEY_PREFIX, IDEMPOTENCY_KEY_PREFIX, JOB_ID_KEY_PREFIX
from shared.tenant_keys import CLAIM_KEY_PREFIX, QUOTA_KEY_PREFIX, TENANTS_KEY
from shared.tenants import check_tenant

ROLE_NAMES: Final = ("producer", "worker", "monitor", "admin", "gateway")
RESULT_PREFIX: Final = "celery-task-meta-"
REPLICATED_MARKER: Final = "conveyor:replicated"  # producers SET it before WAIT (CONVEYOR_WAIT_REPLICAS)
GATEWAY_KEY_PREFIX: Final = "conveyor:gateway:"

# Every client: the handshake redis-py sends, and the database in the URL.
_CONNECTION = ("hello", "ping", "select", "client|setname", "client|getname", "client|id")
# What redis-py sends on connect and shrugs off when refused, in Redis versions that have them: Redis 7
# refuses a rule naming a subcommand it does not know (6.2 takes any), so ``create_user`` drops those
# its server lacks, and static configs (compose.yaml) leave them out.
NEWER_SUBCOMMANDS: Final = ("client|setinfo", "client|maint_notifications")
_TRANSACTIONS = ("multi", "exec", "discard", "watch", "unwatch")

_PRODUCER_COMMANDS = (
    *_CONNECTION,
    *_TRANSACTIONS,
    "lpush",  # publish (kombu's Redis transport: one list per queue and priority step)
    "llen",  # queue depths (CONVEYOR_MAX_QUEUE_DEPTH's gate, `Client.queue_depths`)
    "get",  # results, idempotency keys
    "set",  # claims (NX, EX), cancel flags, the replication marker, the per-second quota counter
    "getdel",  # taking back a claim (a string command: the role needs no DEL for that)
    "del",  # releasing an idempotency key or id claim whose job was not sent (WATCH ... DEL)
    "incrby",  # the tenant's submits this second
    "decrby",  # ... less a refused call's
    "hmget",  # the tenant's quotas
    "zadd",  # its queued jobs
    "zrem",
    "zcard",
    "zremrangebyscore",
    "subscribe",  # Celery's result backend waits on celery-task-meta-ID
    "unsubscribe",
    "publish",  # the task-sent event (Flower shows a job from the moment it is queued)
    "wait",  # CONVEYOR_WAIT_REPLICAS
)

_WORKER_COMMANDS = (
    *_CONNECTION,
    *_TRANSACTIONS,
    "lpush", "rpush", "rpop", "lpop", "brpop", "llen", "lindex", "lrange", "lrem",  # queues, kombu
    "get", "set", "setex", "mget", "del", "exists", "incr", "incrby", "expire", "getdel", "ttl",
    "hset", "hget", "hmget", "hdel", "hexists", "hgetall", "hincrby", "hincrbyfloat", "hlen", "hkeys",
    "zadd", "zrem", "zrange", "zrangebyscore", "zrevrangebyscore", "zcard", "zscore", "zremrangebyscore",
    "sadd", "srem", "smembers", "scard",  # kombu's bindings (direct queues, control, events)
    "publish", "subscribe", "unsubscribe", "psubscribe", "punsubscribe",  # events, results, control, wake-up
    "eval", "evalsha", "script|load", "script|exists",  # the pop script, kombu's restore and binding scripts
    "time", "wait",
)  # fmt: skip

_MONITOR_COMMANDS = (
    *_CONNECTION,
    "multi", "exec", "discard",  # pipelines in transactions (Flower's queue lengths, kombu's declares)
    "llen", "lindex", "get", "mget", "exists", "hget", "hgetall", "hlen", "hmget", "zcard", "zrange",
    "smembers",
    # Celery's event receiver: a fanout queue bound (SADD/SREM) to the events exchange, kombu's
    # binding-expiry scripts, and the event channel itself.
    "sadd", "srem", "zadd", "zrangebyscore", "evalsha", "eval", "script|load", "script|exists", "time",
    "psubscribe", "punsubscribe", "subscribe", "unsubscribe",
)  # fmt: skip


@dataclass(frozen=True)
class Rules:
    """One user's ACL: commands, key patterns, channel patterns (and Redis 7 selectors)."""

    commands: tuple[str, ...]
    keys: tuple[str, ...]
    channels: tuple[str, ...]
    selectors: tuple[str, ...] = field(default=())

    def acl_args(self, newer: Sequence[str] = NEWER_SUBCOMMANDS) -> list[str]:
        """The rules as ``ACL SETUSER`` arguments (after the user's name and password); ``newer``: the
        connection subcommands of NEWER_SUBCOMMANDS to grant too (none for a config any Redis reads)."""
        return [
            "resetkeys",
            "resetchannels",
            "-@all",
            *(c if c[0] in "+-" else f"+{c}" for c in (*self.commands, *newer)),
            *(f"~{k}" for k in self.keys),
            *(f"&{c}" for c in self.channels),
            *self.selectors,
        ]


def _queue_keys() -> list[str]:
    # A queue's lists: its name (priority step 0) and name + "\x06\x16" + step (three bytes: '???').
    return [pattern for queue in ALL_QUEUES for pattern in (queue, queue + "???")]


def producer_rules(tenant: str | None, db: int = 0, selectors: bool = False) -> Rules:
    """A producer's rules; bound to ``tenant``, its keys and result channels carry ``TENANT:``."""
    own = f"{check_tenant(tenant)}:*" if tenant else "*"
    own_keys = [
        f"{RESULT_PREFIX}{own}",
        f"{IDEMPOTENCY_KEY_PREFIX}{own}",
        f"{JOB_ID_KEY_PREFIX}{own}",
        f"{CANCEL_KEY_PREFIX}{own}",
        REPLICATED_MARKER,
    ]
    if tenant:  # only a tenant's producer writes its claims and counts its quotas
        own_keys += [f"{CLAIM_KEY_PREFIX}{tenant}:*", f"{QUOTA_KEY_PREFIX}{tenant}", f"{QUOTA_KEY_PREFIX}{tenant}:*"]
    channels = [f"{RESULT_PREFIX}{own}", f"/{db}.celeryev/task.sent"]
    if not selectors:
        return Rules(_PRODUCER_COMMANDS, (*_queue_keys(), *own_keys), tuple(channels))
    # Redis 7: the queue lists only for LPUSH and LLEN, everything else only on the producer's own keys.
    queue_selector = "(" + " ".join(["+lpush", "+llen", *(f"~{k}" for k in _queue_keys())]) + ")"
    return Rules(_PRODUCER_COMMANDS, tuple(own_keys), tuple(channels), (queue_selector,))


def worker_rules(db: int = 0) -> Rules:
    keys = (
        "conveyor.*",  # every queue's lists, the workers' direct queues
        "unacked", "unacked_index", "unacked_mutex", "unacked:*",  # kombu's delivery bookkeeping
        "_kombu.binding*",
        "*.celery.pidbox*",  # each worker's control queue, and replies to control commands (celery inspect)
        f"{RESULT_PREFIX}*",
        f"{CANCEL_KEY_PREFIX}*", "conveyor:deliveries:*", "conveyor:dlq", "conveyor:dlq:*",
        "conveyor:metrics:*", "conveyor:workers", "conveyor:wake-probe:*",
        f"{CLAIM_KEY_PREFIX}*", f"{QUOTA_KEY_PREFIX}*",  # tenants' claims (read), queued counts (ZREM)
    )  # fmt: skip
    channels = (
        f"/{db}.celery.pidbox",  # control commands (PSUBSCRIBE: the pattern itself)
        f"/{db}.celeryev/*",
        f"{RESULT_PREFIX}*",
        f"__keyspace@{db}__:*",  # the idle wake-up (workers/wakeup.py)
    )
    return Rules(_WORKER_COMMANDS, keys, channels)


def monitor_rules(db: int = 0) -> Rules:
    keys = (
        "conveyor.*",  # queue lengths and the oldest job's head (LLEN, LINDEX)
        "conveyor:dlq", "conveyor:metrics:*", "conveyor:workers",
        f"{RESULT_PREFIX}*",  # Flower's task pages and result API
        "_kombu.binding*",  # the event receiver's fanout binding
        "celeryev.*",  # ... and its own queue's lists (declared empty, never filled: events come by PUBLISH)
        "unacked_index",  # read by kombu's consumer (never restored from here: see monitor_process)
        TENANTS_KEY, f"{QUOTA_KEY_PREFIX}*",  # per-tenant metrics (producers/tenancy/metrics.py)
    )  # fmt: skip
    return Rules(_MONITOR_COMMANDS, keys, (f"/{db}.celeryev/*",))


def admin_rules() -> Rules:
    return Rules(("@all", "-@dangerous", "+info", "+client|list", *_CONNECTION), ("*",), ("*",))


def gateway_rules(db: int = 0) -> Rules:
    base = producer_rules(None, db)
    keys = (*base.keys, f"{CLAIM_KEY_PREFIX}*", f"{QUOTA_KEY_PREFIX}*", f"{GATEWAY_KEY_PREFIX}*")
    extra = ("hget", "hset", "hdel", "hgetall", "hkeys", "hvals", "hlen", "expire", "exists", "mget")
    return Rules((*base.commands, *extra), keys, base.channels)


def role_rules(role: str, tenant: str | None = None, db: int = 0, selectors: bool = False) -> Rules:
    if tenant and role != "producer":
        raise ValueError(f"only a producer is bound to a tenant, not a {role}")
    if role == "producer":
        return producer_rules(tenant, db, selectors)
    if role == "worker":
        return worker_rules(db)
    if role == "monitor":
        return monitor_rules(db)
    if role == "admin":
        return admin_rules()
    if role == "gateway":
        return gateway_rules(db)
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLE_NAMES)}")


def setuser_args(password: str, rules: Rules, newer: Sequence[str] = NEWER_SUBCOMMANDS) -> list[str]:
    """``ACL SETUSER NAME <these>``: a fresh user (reset), on, with one password and the rules."""
    return ["reset", "on", f">{password}", *rules.acl_args(newer)]


def acl_file_line(user: str, password: str, rules: Rules) -> str:
    """One line of a Redis ACL file, the same rules, for any Redis version."""
    return " ".join(["user", user, *setuser_args(password, rules, newer=())])


def user_names(rows: Sequence[str]) -> list[str]:
    return [row.split()[1] for row in rows if row.startswith("user ")]
