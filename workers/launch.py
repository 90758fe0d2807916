"""Start Celery workers pinned to devices: one inference worker and one training worker per
GPU (or one of each on the CPU), supervised, restarted if one dies, stopped together.

CUDA_VISIBLE_DEVICES is set in each child's environment before it imports torch, so
``cuda:0`` in a child is the GPU it was given. This module itself never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from shared.log_format import configure_logging
from shared.names import TRAINING_QUEUE, WORKER_INFERENCE_QUEUES
from shared.settings import Settings
from shared.supervisor import ChildSpec, Supervisor

log = logging.getLogger("conveyor.launch")


def count_gpus() -> int:
    """GPUs visible to this process, without initialising CUDA here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def parse_devices(spec: str) -> list[str]:
    """'auto' -> every GPU, or cpu where there is none; 'cpu'; '0,1' -> those GPUs."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    if spec == "auto":
        n = count_gpus()
        return [str(i) for i in range(n)] if n else ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise ValueError(f"--devices takes auto, cpu or GPU indices such as 0,1; got {spec!r}")
    return devices


@dataclass
class WorkerSpec:
    node: str
    device: str  # "cpu" or a GPU index
    queues: tuple[str, ...]
    concurrency: int

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["CONVEYOR_DEVICE"] = "cpu"
        else:
            env["CUDA_VISIBLE_DEVICES"] = self.device
            env["CONVEYOR_DEVICE"] = "cuda:0"
        # Idle OpenMP threads yield instead of spinning: on a busy CPU, spinning threads of one
        # process slowed another's forward passes 2-3x (measured with Whisper on 2 cores).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("HF_HUB_OFFLINE", "1")  # models come from disk, never from a hub
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        return env

    def command(self, loglevel: str) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "-n", self.node, "-Q", ",".join(self.queues), "-c", str(self.concurrency),
            "-P", "threads", "-E", "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
            "-l", loglevel,
        ]  # fmt: skip


def plan(devices: list[str], settings: Settings, inference: bool = True, training: bool = True) -> list[WorkerSpec]:
    host = socket.gethostname()
    specs = []
    for device in devices:
        label = "cpu" if device == "cpu" else f"gpu{device}"
        if inference:
            for n in range(settings.instances_per_device):  # Triton's instance groups: several per device
                node = f"{label}@{host}" if n == 0 else f"{label}-{n + 1}@{host}"
                specs.append(WorkerSpec(node, device, WORKER_INFERENCE_QUEUES, settings.concurrency()))
        if training:
            # Long jobs one at a time per device, in their own process, so inference keeps flowing.
            specs.append(WorkerSpec(f"train-{label}@{host}", device, (TRAINING_QUEUE,), 1))
    return specs


# Seconds a Celery worker gets to stop warm beyond its own drain (CONVEYOR_DRAIN_TIMEOUT_S: held
# jobs finish, the rest go back to their queues) before SIGKILL: Celery's own shutdown and the
# last writes.
STOP_MARGIN_S = 15.0


def stop_timeout(settings: Settings) -> float:
    return settings.drain_timeout_s + STOP_MARGIN_S


def heartbeat_path(home: Path, node: str) -> Path:
    """Where an inference worker records that its ingest loop turns (``workers.app``): one file
    per node and supervisor, so two supervisors on one host never read each other's."""
    return home / "run" / f"{node}.{os.getpid()}.alive"


def heartbeat_fresh(path: Path, max_age_s: float, _child: object = None) -> bool:
    try:
        return time.time() - path.stat().st_mtime < max_age_s
    except FileNotFoundError:
        return False


def supervise(
    specs: list[WorkerSpec], loglevel: str = "info", exit_with_parent: bool = False, settings: Settings | None = None
) -> int:
    """Run one Celery worker per spec under the shared supervisor: each restarted if it dies
    (with back-off), all stopped together on SIGTERM or Ctrl-C, or when our parent dies."""
    settings = settings or Settings()
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    for spec in specs:
        log.info("starting %s on %s for %s", spec.node, spec.device, ",".join(spec.queues))
        # In our process group: a SIGKILL to the group (as the tests' hard kill does) takes the workers too.
        inference = TRAINING_QUEUE not in spec.queues
        beat = heartbeat_path(settings.home, spec.node)
        env = spec.env() | ({"CONVEYOR_HEARTBEAT_FILE": str(beat)} if inference else {})
        child = ChildSpec(
            spec.node, spec.command(loglevel), env=env, restart=True, stop_timeout=stop_timeout(settings),
            new_session=False,
            # Alive but not consuming (a wedged ingest loop): its heartbeat goes stale, and it is restarted.
            health=partial(heartbeat_fresh, beat, settings.worker_stall_s) if inference else None,
            # The grace covers start-up and the model's warm-up, before the first heartbeat.
            health_interval_s=min(5.0, settings.worker_stall_s), health_grace_s=max(30.0, 2 * settings.worker_stall_s),
            # Under `conveyor up` (CONVEYOR_LOG_DIR): one rotating file per worker process.
            log=settings.log_dir / f"{spec.node}.log" if settings.log_dir else None,
            log_max_bytes=settings.log_max_mb * 2**20, log_backups=settings.log_backups, log_format=settings.log_format,
        )  # fmt: skip
        supervisor.start(child)
    parent = os.getppid()

    def orphaned() -> bool:
        if exit_with_parent and os.getppid() != parent:  # our owner died: do not linger as orphans
            log.warning("parent process exited; stopping workers")
            return True
        return False

    return supervisor.run(poll_s=0.5, stop_when=orphaned)


def _ensure_keyspace_events(settings: Settings) -> None:
    """Once per `conveyor worker`: the keyspace notifications that let idle workers sleep."""
    from shared.keyspace_events import ensure_keyspace_events
    from shared.redis_connect import redis_client

    try:
        client = redis_client(settings, socket_timeout=5, socket_connect_timeout=5)
        log.info("%s", ensure_keyspace_events(client))
        client.close()
    except Exception as exc:  # Redis not up yet: the workers' own probe decides later
        log.info("keyspace notifications not checked (%s: %s)", type(exc).__name__, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor worker", description=__doc__)
    parser.add_argument("--devices", default=Settings().devices, help="auto, cpu, or GPU indices like 0,1")
    parser.add_argument(
        "--only", choices=["inference", "training"], help="serve only the inference queues or only the training queue"
    )
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the process that started us ends")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging("workers", logging.INFO, settings.log_format)
    settings.broker_url()  # fail early, with the message that says how to configure Redis
    if settings.wakeup == "notify":
        _ensure_keyspace_events(settings)
    only = args.only
    specs = plan(parse_devices(args.devices), settings, inference=only != "training", training=only != "inference")
    return supervise(specs, args.loglevel, args.exit_with_parent, settings)


if __name__ == "__main__":
    sys.exit(main())
