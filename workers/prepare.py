"""`conveyor models prepare`: put the default models into the store, from files on disk.

Idempotent: a model already in the store is left alone.
"""

from __future__ import annotations

import os
import sys

from shared.model_store import ModelStore
from shared.settings import Settings


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
    from workers.whisper_convert import prepare_default_models

    store = ModelStore(Settings().models_path)
    for line in prepare_default_models(store):
        print(line)
    # sentiment-minilm: all-MiniLM-L6-v2 fine-tuned on the VADER paper's rated texts (~1-2 min on 2 cores).
    from workers.sentiment_model import prepare_sentiment

    for line in prepare_sentiment(store):
        print(line, flush=True)
    print(f"model store: {store.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
