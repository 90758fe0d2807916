"""Which Redis commands, keys and channels each Conveyor process uses: the evidence behind the ACL
roles in producers/tenancy/roles.py.

Starts an embedded Redis with one user per role, each allowed everything (``+@all ~* &*``), runs the
real processes, each logged in as its role's user (a worker serving whole jobs, Flower with its pages
read, the exporter scraped, both as `conveyor up` runs them, the SDK submitting as a tenant, the admin
CLI's calls), and records every command through ``MONITOR``, attributing each connection to its user
through ``CLIENT LIST`` (a script's own commands to its caller). Prints, per role, each command with
the key shapes (ids and hostnames folded) and channels it touched.

    python scripts/acl_discover.py [--out FILE.json]

Then check the roles themselves: tests/test_acl_roles.py runs the same processes with the least-
privilege users and asserts Redis's ``ACL LOG`` holds no refusal.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producers.local_redis import LocalRedis, free_port  # noqa: E402

ROLES = ("producer", "worker", "monitor", "admin")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HOST = re.compile(r"@[\w.-]+")
_HEX = re.compile(r"\b[0-9a-f]{32,64}\b")
_NUM = re.compile(r"\d{6,}")


def fold(key: str) -> str:
    return _NUM.sub("<n>", _HEX.sub("<hex>", _HOST.sub("@<host>", _UUID.sub("<uuid>", key))))


class Recorder:
    """MONITOR, with each command attributed to the user of its connection."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.users: dict[str, str] = {}
        self.seen: dict[str, dict[str, set[str]]] = {r: defaultdict(set) for r in ROLES}
        self._stop = threading.Event()
        self._pending: list[tuple[str, list[str]]] = []

    def _map_clients(self) -> None:
        while not self._stop.is_set():
            for entry in self.admin.client_list():
                self.users[str(entry["addr"])] = str(entry.get("user", "default"))
            time.sleep(0.05)

    def _monitor(self, url: str) -> None:
        conn = redis.Redis.from_url(url)
        with conn.monitor() as mon:
            for event in mon.listen():
                if self._stop.is_set():
                    break
                addr = f"{event.get('client_address')}:{event.get('client_port')}"
                words = str(event.get("command", "")).split(" ")
                self._pending.append((addr, words))

    def start(self, url: str) -> None:
        threading.Thread(target=self._map_clients, daemon=True).start()
        threading.Thread(target=self._monitor, args=(url,), daemon=True).start()

    def settle(self) -> None:
        scripting = None  # a script's own commands follow its EVAL in MONITOR, checked as its caller's
        for addr, words in self._pending:
            user = self.users.get(addr)
            if addr.startswith("lua") or addr.endswith(":None"):
                user = scripting
            elif words and words[0].upper() in ("EVAL", "EVALSHA"):
                scripting = user
            if user not in self.seen or not words or not words[0]:
                continue
            cmd = words[0].upper()
            if cmd in ("EXEC", "MULTI"):
                self.seen[user][cmd].add("")
                continue
            args = [w.strip('"') for w in words[1:4]]
            self.seen[user][cmd].add(fold(" ".join(args))[:140])
        self._pending.clear()

    def stop(self) -> None:
        self._stop.set()


def url_for(port: int, user: str, password: str, db: int = 0) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{port}/{db}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="acl-discover-"))
    server = LocalRedis(home, record_url=False)
    admin_url = server.start()
    admin = redis.Redis.from_url(admin_url)
    port = int(admin_url.rsplit(":", 1)[1].split("/")[0])
    for role in ROLES:
        admin.acl_setuser(role, enabled=True, passwords=[f"+{role}-pw"], commands=["+@all"], keys=["*"], channels=["*"])
    recorder = Recorder(admin)
    recorder.start(admin_url)
    time.sleep(0.3)
    env = dict(os.environ, CONVEYOR_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs: list[subprocess.Popen[bytes]] = []
    log = (home / "procs.log").open("wb")

    def spawn(role: str, argv: list[str], **extra: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env={**env, "CONVEYOR_REDIS_URL": url_for(port, role, f"{role}-pw"), **extra},
                             cwd=ROOT, stdout=log, stderr=log)  # fmt: skip
        procs.append(p)
        return p

    try:
        spawn("worker", [sys.executable, "-m", "workers.launch", "--devices", "cpu", "--exit-with-parent"])
        flower_port, metrics_port = free_port(), free_port()
        spawn("monitor", [sys.executable, "-m", "producers.flower_secure", "-A", "producers.flower_app", "flower",
                          f"--port={flower_port}", "--address=127.0.0.1", "--persistent=False"],
              FLOWER_BASIC_AUTH="mon:pw", CONVEYOR_FLOWER_WATCH_ONLY="1")  # fmt: skip
        spawn("monitor", [sys.executable, "-m", "producers.tenancy.monitor_process", "producers.exporter",
                          "--port", str(metrics_port)],
              CONVEYOR_METRICS_AUTH="false")  # fmt: skip
        from producers.client import Client
        from shared.jobs import ClassifyJob

        producer = Client(redis_url=url_for(port, "producer", "producer-pw"), tenant="acme")
        plain = Client(redis_url=url_for(port, "admin", "admin-pw"))
        plain.wait_for_workers(300, ["conveyor.classify"])
        time.sleep(5)
        job = ClassifyJob(texts=["the match ended two nil"], labels=["sports", "finance"], idempotency_key="k1")
        handle = producer.submit(job)
        print("result", handle.result_json(timeout=180)["type"], file=sys.stderr)
        producer.submit(job)  # the same key: the first job back
        explicit = producer.submit(ClassifyJob(id="acme:mine-1", texts=["x"], labels=["a", "b"]))
        explicit.result_json(timeout=60)
        later = producer.submit(ClassifyJob(texts=["y"], labels=["a", "b"], priority=1))
        producer.cancel(later.id)
        producer.queue_depths()
        handle.status()
        for page in ("", "tasks", "workers", "broker", "api/tasks", "api/workers", "api/queues/length",
                     f"api/task/result/{handle.id}", f"task/{handle.id}", "metrics"):  # fmt: skip
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{flower_port}/{page}")
                request.add_header("Authorization", "Basic " + base64.b64encode(b"mon:pw").decode())
                urllib.request.urlopen(request, timeout=10).read()
            except Exception as exc:
                print("flower", page, exc, file=sys.stderr)
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        from shared import dead_letters
        from shared.names import DEAD_LETTER_KEY

        plain.redis.lpush("conveyor.classify", b"not a celery message")  # dead-lettered at intake
        plain.submit(ClassifyJob(id="bad-tenant:no-claim", texts=["z"], labels=["a", "b"]))  # no claim: refused
        time.sleep(3)
        letters = dead_letters.list_letters(plain.redis, 10)  # what `conveyor dlq` does, as the admin
        print("dead letters", plain.redis.hlen(DEAD_LETTER_KEY), len(letters), file=sys.stderr)
        if letters:
            dead_letters.get(plain.redis, letters[0].id)
            dead_letters.requeue(plain.redis, letters[-1].id)
        time.sleep(2)
        dead_letters.count(plain.redis)
        dead_letters.purge(plain.redis)
        plain.cancel("some-other-job")
        cli_env = {**env, "CONVEYOR_REDIS_URL": url_for(port, "admin", "admin-pw")}
        for argv in (["dlq", "list"], ["dlq", "count"], ["status"], ["cancel", "some-job"], ["models"]):
            subprocess.run([sys.executable, "-m", "producers.cli", *argv], env=cli_env, cwd=ROOT,
                           capture_output=True, timeout=120, check=False)  # fmt: skip
        time.sleep(3)
        recorder.settle()
    finally:
        recorder.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        server.stop()
    report: dict[str, Any] = {
        role: {cmd: sorted(keys)[:12] for cmd, keys in sorted(cmds.items())} for role, cmds in recorder.seen.items()
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
