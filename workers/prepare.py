"""`conveyor models prepare [NAME ...]`: put the default models into the store, from files on disk
(all of them, or the ones named: producers.models.preparing.PREPARED_MODELS lists them).

Idempotent: a model already in the store is left alone.
"""

from __future__ import annotations

import os
import sys

from shared.kinds.sentiment import DEFAULT_SENTIMENT_MODEL
from shared.model_store import ModelStore
from shared.settings import Settings

WHISPER_MODEL = "whisper-tiny.en"  # workers.whisper_convert.DEFAULT_MODEL_NAME, named without its import
BUILT_HERE = (WHISPER_MODEL, DEFAULT_SENTIMENT_MODEL)


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(BUILT_HERE)
    unknown = [n for n in names if n not in BUILT_HERE]
    if unknown:
        print(f"cannot prepare {', '.join(unknown)}: models prepare builds {', '.join(BUILT_HERE)}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
    store = ModelStore(Settings().models_path)
    if WHISPER_MODEL in names:
        from workers.whisper_convert import prepare_default_models

        for line in prepare_default_models(store):
            print(line, flush=True)
    if DEFAULT_SENTIMENT_MODEL in names:
        # sentiment-minilm: all-MiniLM-L6-v2 fine-tuned on the VADER paper's rated texts (~1-2 min on 2 cores).
        from workers.sentiment_model import prepare_sentiment

        for line in prepare_sentiment(store):
            print(line, flush=True)
    print(f"model store: {store.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
