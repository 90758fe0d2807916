"""A producer is a light client: importing it pulls in neither torch nor the workers."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import producers, shared
import producers.client, producers.cli, producers.demo, producers.stack, producers.local_redis
import shared.jobs, shared.results, shared.settings, shared.names, shared.model_store, shared.celery_config
heavy = [m for m in ("torch", "transformers", "torchaudio", "workers") if m in sys.modules]
print(",".join(heavy) or "light")
"""


def test_producers_and_shared_import_without_torch_or_workers() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "light"
