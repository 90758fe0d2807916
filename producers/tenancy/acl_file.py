"""The embedded Redis's ACL file (``redis/users.acl`` under CONVEYOR_HOME, 0600): the users
`conveyor up` and `conveyor users add` create survive a restart of the server.

With an ``aclfile`` Redis ignores ``requirepass``, and a file without a ``default`` line leaves the
default user without a password. So the file always starts with the default user, holding the
server's own password (as its SHA-256, never in clear); ``ACL SAVE`` keeps it so afterwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ACL_FILE = "users.acl"


def default_user_line(password: str) -> str:
    return f"user default on #{hashlib.sha256(password.encode()).hexdigest()} ~* &* +@all"


def write_acl_file(path: Path, password: str) -> None:
    """The default user's line (with ``password``), then every other user the file already holds."""
    from producers.local_redis import write_private

    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("user default ")]
    write_private(path, "\n".join([default_user_line(password), *kept]) + "\n")
