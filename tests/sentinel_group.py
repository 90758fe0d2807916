"""A real Redis Sentinel group for tests and benchmarks: a master, replicas and three sentinels,
each its own `redis-server` process (the binary the project already installs; a sentinel is
`redis-server sentinel.conf --sentinel`), on loopback, with passwords."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import redis

from producers.local_redis import find_redis_server, free_port, write_private
from shared.keyspace_events import KEYSPACE_EVENTS
from shared.supervisor import Child, ChildSpec, spawn

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000  # how long the master may be silent before the sentinels call it down
FAILOVER_TIMEOUT_MS = 5000


class SentinelGroup:
    def __init__(self, home: Path, password: str = "group-secret", sentinels: int = 3, replicas: int = 2) -> None:
        # Two replicas: after the master dies one is promoted and the other still confirms WAIT 1.
        self.home = home
        self.password = password
        self.ports = {"master": free_port(), **{f"replica-{i}": free_port() for i in range(replicas)}}
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.children: dict[str, Child] = {}

    # -- the URL Conveyor is given ----------------------------------------------------------------
    def url(self, db: int = 0) -> str:
        return ";".join(f"sentinel://:{self.password}@127.0.0.1:{p}/{db}" for p in self.sentinel_ports)

    def client(self, role: str) -> redis.Redis:
        return redis.Redis(port=self.ports[role], password=self.password, socket_timeout=5)

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=5, decode_responses=True)

    def master_port(self) -> int:
        _host, port = self.sentinel().execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return int(port)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SentinelGroup:
        self.home.mkdir(parents=True, exist_ok=True)
        self._server("master", None)
        for role in self.ports:
            if role != "master":
                self._server(role, self.ports["master"])
        for i, port in enumerate(self.sentinel_ports):
            conf = self.home / f"sentinel-{i}.conf"  # the sentinel rewrites its own config
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.home}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports['master']} 2\n"
                f"sentinel auth-pass {MASTER_NAME} {self.password}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._spawn(f"sentinel-{i}", [str(conf), "--sentinel"])
        self.wait_ready(timeout)
        return self

    def _server(self, role: str, master: int | None) -> None:
        data = self.home / role
        data.mkdir(exist_ok=True)
        config = {
            "port": str(self.ports[role]), "bind": "127.0.0.1", "requirepass": self.password,
            "masterauth": self.password, "dir": str(data), "save": '""', "appendonly": "yes",
            "notify-keyspace-events": KEYSPACE_EVENTS, "maxmemory-policy": "noeviction",
        }  # fmt: skip
        if master is not None:
            config["replicaof"] = f"127.0.0.1 {master}"
        conf = data / "redis.conf"
        write_private(conf, "".join(f"{k} {v}\n" for k, v in config.items()))
        self._spawn(role, [str(conf)])

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.home / f"{name}.log"
        self.children[name] = spawn(ChildSpec(name, [find_redis_server(), *args], log=log, stop_timeout=10))

    def wait_ready(self, timeout: float) -> None:
        """Until the replica is in sync and every sentinel knows the master, the replica and the others."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                replicas = [role for role in self.ports if role != "master"]
                synced = all(self.client(r).info("replication").get("master_link_status") == "up" for r in replicas)
                known = all(
                    len(s.execute_command("SENTINEL", "replicas", MASTER_NAME)) >= len(replicas)
                    and len(s.execute_command("SENTINEL", "sentinels", MASTER_NAME)) >= len(self.sentinel_ports) - 1
                    for s in (self.sentinel(i) for i in range(len(self.sentinel_ports)))
                )
                if synced and known:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sentinel group did not come up in {timeout:.0f}s (logs in {self.home})")
            time.sleep(0.2)

    def kill_master(self) -> int:
        """SIGKILL the current master (no chance to flush or hand over); the port it had."""
        port = self.master_port()
        role = next(r for r, p in self.ports.items() if p == port)
        os.kill(self.children[role].process.pid, signal.SIGKILL)
        return port

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> float:
        """Seconds until the sentinels name a new master and it answers as one."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                port = self.master_port()
                if port != old_port:
                    role = next(r for r, p in self.ports.items() if p == port)
                    info: Any = self.client(role).info("replication")
                    if info.get("role") == "master":
                        return time.monotonic() - started
            except (redis.RedisError, StopIteration):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"no failover within {timeout:.0f}s (logs in {self.home})")

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            try:
                child.stop(10)
            except Exception:  # already dead (the killed master)
                pass
