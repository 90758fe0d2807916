"""Fine-tune a sequence classifier from a base model in the store, measure it, publish it.

The base (all-MiniLM-L6-v2 by default) is a bare encoder, so the classification head starts
fresh. Labels are the data's distinct labels, sorted; the published directory loads with
``AutoModelForSequenceClassification.from_pretrained`` and carries their names in id2label.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.jobs import FineTuneJob
from shared.model_store import RESULT_KEY, ModelStore
from shared.settings import Settings
from workers.training import checkpoint
from workers.training.data import LabeledTexts, read_labeled_texts
from workers.training.loop import Pacer, ProgressFn, StopFn, TrainingOutcome, job_fingerprint

WARMUP_FRACTION: Final = 0.1
EVAL_BATCH_SIZE: Final = 64


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: ``fraction`` of each class, at least one, in validation."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    label_array = np.asarray(labels)
    for label in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(label_array == label))
        if len(rows) < 2:
            raise InvalidJob("a label has 1 example: a validation split needs at least 2 of each label")
        n_valid = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
        valid.append(rows[:n_valid])
        train.append(rows[n_valid:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(valid))


def classification_metrics(predicted: np.ndarray, actual: np.ndarray, n_classes: int) -> dict[str, float]:
    f1s = []
    for c in range(n_classes):
        tp = float(np.sum((predicted == c) & (actual == c)))
        fp = float(np.sum((predicted == c) & (actual != c)))
        fn = float(np.sum((predicted != c) & (actual == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(predicted == actual)), "macro_f1": float(np.mean(f1s))}


def fine_tune(
    job: FineTuneJob,
    store: ModelStore,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
    device: str = "cpu",
) -> TrainingOutcome:
    data, train_rows, valid_texts, valid_labels = _datasets(job)
    classes = data.classes
    label_ids = {label: i for i, label in enumerate(classes)}
    unknown = sorted(set(valid_labels) - set(classes))
    if unknown:
        raise InvalidJob(f"validation_path has {len(unknown)} labels the training data lacks")

    base = store.resolve(job.base_model)
    dev = torch.device(device)
    torch.manual_seed(job.seed)  # the fresh head's initialization and dropout
    tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base.path),
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id=label_ids,
        ignore_mismatched_sizes=True,  # a base that is itself a classifier may have another label count
        dtype=torch.float32,
    ).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate)

    train_texts = [data.texts[i] for i in train_rows]
    train_targets = torch.tensor([label_ids[data.labels[i]] for i in train_rows])
    steps = math.ceil(len(train_texts) / job.batch_size)
    total_steps = steps * job.epochs
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    fingerprint = job_fingerprint(job, data.sha256)
    resumed = 0
    restored = checkpoint.latest(checkpoint_dir, fingerprint)
    if restored is not None:
        resumed, state = restored
        resumed = min(resumed, job.epochs)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    pacer = Pacer(progress, should_stop, job.epochs, steps)
    pacer.check()
    losses: list[float] = []
    epoch_seconds: list[float] = []
    for epoch in range(resumed + 1, job.epochs + 1):
        pacer.start_epoch()
        model.train()
        # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(job.seed * 1000 + epoch))
        epoch_loss = 0.0
        for step, start in enumerate(range(0, len(order), job.batch_size), start=1):
            idx = order[start : start + job.batch_size]
            global_step = (epoch - 1) * steps + step
            for group in optimizer.param_groups:
                group["lr"] = job.learning_rate * _lr_scale(global_step, warmup, total_steps)
            batch = tokenizer(
                [train_texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=job.max_length,
                return_tensors="pt",
            ).to(dev)
            loss = model(**batch, labels=train_targets[idx].to(dev)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            epoch_loss += float(loss.detach()) * len(idx)
            pacer.step(epoch, step, len(idx), epoch_loss / min(start + len(idx), len(order)))
        losses.append(epoch_loss / len(order))
        epoch_seconds.append(pacer.epoch_seconds())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
        checkpoint.save(checkpoint_dir, epoch, state, fingerprint)
        pacer.step(epoch, steps, 0, losses[-1], force=True)

    predicted = _predict(model, tokenizer, valid_texts, job.max_length, dev, pacer)
    actual = np.asarray([label_ids[label] for label in valid_labels])
    metrics = classification_metrics(predicted, actual, len(classes))
    majority = float(np.max(np.bincount(actual, minlength=len(classes)))) / len(actual)
    pacer.check()

    seconds = sum(epoch_seconds)
    result_metrics = {**metrics, "majority_accuracy": majority}
    extra: dict[str, Any] = {
        "losses": losses,
        "labels": classes,
        "train_rows": len(train_texts),
        "validation_rows": len(valid_texts),
        "seconds_per_epoch": seconds / len(epoch_seconds) if epoch_seconds else None,
        "samples_per_s": len(train_texts) * len(epoch_seconds) / seconds if seconds else None,
    }
    metadata: dict[str, Any] = {
        "kind": "text-classifier",
        "parent": base.ref,
        "labels": classes,
        "job_id": job.id,
        "data_sha256": data.sha256,
        "metrics": metrics,
        "baseline": {"name": "majority-class", "accuracy": majority},
        "epochs": job.epochs,
        "train_rows": len(train_texts),
        "validation_rows": len(valid_texts),
        "max_length": job.max_length,
        # What the job returns, so a redelivery of the job can return it again without training.
        RESULT_KEY: {
            "metrics": result_metrics,
            "epochs_run": len(epoch_seconds),
            "resumed_from_epoch": resumed,
            "extra": extra,
        },
    }

    def write(built: Path) -> None:
        model.save_pretrained(built)
        tokenizer.save_pretrained(built)

    version = store.build_and_publish(job.output_name, write, metadata)  # one version per job id
    checkpoint.clear(checkpoint_dir)
    return TrainingOutcome(
        version=version,
        metrics=result_metrics,
        epochs_run=len(epoch_seconds),
        resumed_from_epoch=resumed,
        extra=extra,
    )


def _datasets(job: FineTuneJob) -> tuple[LabeledTexts, np.ndarray, list[str], list[str]]:
    """The training data, its rows used for training, and the validation texts and labels."""
    settings = Settings()
    data = read_labeled_texts(resolve_input(job.data_path, settings, "data_path"), job.text_column, job.label_column)
    if job.validation_path is None:
        train_rows, valid_rows = stratified_split(data.labels, job.validation_split, job.seed)
        return data, train_rows, [data.texts[i] for i in valid_rows], [data.labels[i] for i in valid_rows]
    valid_path = resolve_input(job.validation_path, settings, "validation_path")
    valid = read_labeled_texts(
        valid_path, job.text_column, job.label_column, min_rows=1, field="validation_path", min_classes=1
    )
    return data, np.arange(len(data.texts)), valid.texts, valid.labels


def _lr_scale(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to zero: the usual schedule for fine-tuning BERT-style encoders."""
    if step <= warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _predict(
    model: Any, tokenizer: Any, texts: list[str], max_length: int, dev: torch.device, pacer: Pacer
) -> np.ndarray:
    model.eval()
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(texts), EVAL_BATCH_SIZE):
            pacer.check()
            batch = tokenizer(
                texts[start : start + EVAL_BATCH_SIZE],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(dev)
            out.append(model(**batch).logits.argmax(-1).cpu().numpy())
    return np.concatenate(out)
