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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from shared.names import TRAINING_QUEUE, WORKER_INFERENCE_QUEUES
from shared.settings import Settings

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
            specs.append(WorkerSpec(f"{label}@{host}", device, WORKER_INFERENCE_QUEUES, settings.concurrency()))
        if training:
            # Long jobs one at a time per device, in their own process, so inference keeps flowing.
            specs.append(WorkerSpec(f"train-{label}@{host}", device, (TRAINING_QUEUE,), 1))
    return specs


class Supervisor:
    def __init__(self, specs: list[WorkerSpec], loglevel: str = "info", exit_with_parent: bool = False) -> None:
        self.specs = specs
        self.exit_with_parent = exit_with_parent
        self.loglevel = loglevel
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def _start(self, spec: WorkerSpec) -> None:
        log.info("starting %s on %s for %s", spec.node, spec.device, ",".join(spec.queues))
        self.children[spec.node] = subprocess.Popen(spec.command(self.loglevel), env=spec.env())

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for spec in self.specs:
            self._start(spec)
        restarts: dict[str, float] = {}
        parent = os.getppid()
        while not self.stopping:
            time.sleep(0.5)
            if self.exit_with_parent and os.getppid() != parent:  # our owner died: do not linger as orphans
                log.warning("parent process exited; stopping workers")
                break
            for spec in self.specs:
                child = self.children[spec.node]
                if child.poll() is not None and not self.stopping:
                    # Back off so a worker that cannot start does not spin.
                    if time.monotonic() - restarts.get(spec.node, 0.0) < 5.0:
                        continue
                    log.warning("%s exited with %s; restarting", spec.node, child.returncode)
                    restarts[spec.node] = time.monotonic()
                    self._start(spec)
        return self.shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def shutdown(self, timeout: float = 30.0) -> int:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # warm shutdown: running jobs finish or go back
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor worker", description=__doc__)
    parser.add_argument("--devices", default=Settings().devices, help="auto, cpu, or GPU indices like 0,1")
    parser.add_argument(
        "--only", choices=["inference", "training"], help="serve only the inference queues or only the training queue"
    )
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the process that started us ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    settings.broker_url()  # fail early, with the message that says how to configure Redis
    only = args.only
    specs = plan(parse_devices(args.devices), settings, inference=only != "training", training=only != "inference")
    return Supervisor(specs, args.loglevel, args.exit_with_parent).run()


if __name__ == "__main__":
    sys.exit(main())
