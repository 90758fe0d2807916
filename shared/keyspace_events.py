"""Redis keyspace notifications for list pushes: what wakes an idle worker (workers/wakeup.py).

A worker subscribes to ``__keyspace@DB__:LIST`` for each list it serves; Redis publishes there
only when ``notify-keyspace-events`` holds ``K`` (keyspace channels) and ``l`` (list commands)
or ``A`` (every class). The embedded Redis is configured with them; for another Redis,
`conveyor worker` tries ``CONFIG SET`` once and, where that is refused, its workers fall back to
polling (CONVEYOR_IDLE_POLL_MS) and say so in one log line.
"""

from __future__ import annotations

from typing import Any

KEYSPACE_EVENTS = "Kl"
NOTIFY_SETTING = "notify-keyspace-events"


def missing_flags(current: str) -> str:
    """The flags ``current`` lacks for list pushes to reach keyspace channels ('' if none)."""
    missing = "" if "K" in current else "K"
    if "l" not in current and "A" not in current:
        missing += "l"
    return missing


def ensure_keyspace_events(client: Any) -> str:
    """Turn the list pushes' keyspace notifications on where they are off; one line saying what
    was found or done. Never raises: a Redis that refuses CONFIG only makes workers poll."""
    try:
        current = str(_decode(client.config_get(NOTIFY_SETTING).get(NOTIFY_SETTING, "")))
    except Exception as exc:  # CONFIG refused (ACL, managed Redis): the workers' probe decides
        return f"could not read {NOTIFY_SETTING} ({type(exc).__name__}: {exc}); workers will probe for it"
    missing = missing_flags(current)
    if not missing:
        return f"{NOTIFY_SETTING} is {current!r}: idle workers wait for pushes"
    try:
        client.config_set(NOTIFY_SETTING, current + missing)
    except Exception as exc:
        return (
            f"{NOTIFY_SETTING} is {current!r} and CONFIG SET was refused ({type(exc).__name__}); idle workers "
            f"will poll. To let them sleep, set `{NOTIFY_SETTING} {current + missing}` in that Redis's config"
        )
    return f"{NOTIFY_SETTING} was {current!r}, set to {current + missing!r}: idle workers wait for pushes"


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
