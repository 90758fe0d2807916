# One image for workers and Flower; producers need only `pip install .`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY producers producers
COPY workers workers
COPY scripts scripts
RUN pip install --no-cache-dir ".[worker,monitor]"
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CONVEYOR_HOME=/data CONVEYOR_MODEL_DIR=/data/models
RUN python scripts/prepare_models.py
CMD ["conveyor", "worker", "--devices", "auto"]
