"""Ids and names are data, never paths; text is text; a job is bounded.

Property tests (hypothesis): an id outside the safe alphabet is refused naming ``id``, and any
id at all maps to a checkpoint directory strictly under the checkpoint root; a job holding a
string that is not valid Unicode anywhere (values, keys, nested) is refused naming its path;
``remove_owned_dir`` never removes anything outside its root, whatever the path and symlinks.
Plus: NUL is refused in every naming field, the per-job character bound, the training input
file bound, and a redelivered training job that already published returns that version.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.errors import InvalidJob, describe_validation_error
from shared.jobs import (
    ID_PATTERN,
    MAX_CHARS_PER_JOB,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    ClassifyJob,
    FineTuneJob,
    RecommendJob,
    TrainJob,
    TranscribeJob,
)
from shared.kinds import parse_job
from shared.model_store import ModelStore
from shared.wire_text import MAX_NESTING, find_invalid_text
from workers.long_jobs import checkpoint_dir, run_long_job
from workers.training import checkpoint
from workers.training.data import read_interactions, read_labeled_texts

ID_CHARS = string.ascii_letters + string.digits + "._:@+=-"
HOSTILE_CHARS = ID_CHARS + "/\\ \t\n\x00\x7f~!#$%&*?'\"é日\u2028\ud800\udcff"
LABELS = ["x", "y"]

# st.text() leaves out lone surrogates (category Cs), and so does st.text(alphabet=one_of(...))
# (the alphabets are merged): draw characters one by one to get them back.
any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))


def any_text(min_size: int = 0, max_size: int = 30) -> st.SearchStrategy[str]:
    """Half the time plain text, half the time text where any character may be a lone surrogate."""
    return st.one_of(
        st.text(min_size=min_size, max_size=max_size),
        st.lists(any_char, min_size=min_size, max_size=max_size).map("".join),
    )


def is_safe_id(value: str) -> bool:
    """The id rule, written out without a regular expression: the reference for the schema."""
    return (
        1 <= len(value) <= MAX_ID_CHARS
        and value[0] in string.ascii_letters + string.digits
        and all(c in ID_CHARS for c in value)
        and ".." not in value
    )


def is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refusal(make: Any, data: dict[str, Any]) -> str | None:
    """describe_validation_error's message if ``make`` refuses ``data``, else None."""
    try:
        make(data)
    except ValidationError as exc:
        return describe_validation_error(exc)
    return None


def classify(**fields: Any) -> dict[str, Any]:
    return {"texts": ["a text"], "labels": LABELS, **fields}


ids = st.one_of(
    any_text(max_size=MAX_ID_CHARS + 20),  # anything, lone surrogates included
    st.text(alphabet=HOSTILE_CHARS, min_size=1, max_size=40),  # near misses
    st.from_regex(ID_PATTERN, fullmatch=True),  # mostly valid
    st.sampled_from(["../../x", "/etc", "a/../b", "a\\b", "..", "a..b", ".hidden", "-x", "x\n", "x\x00", "ø"]),
)


# -- ids -------------------------------------------------------------------------------------


@settings(max_examples=200, database=None)
@given(ids)
def test_an_id_outside_the_safe_alphabet_is_refused_naming_id(job_id: str) -> None:
    message = refusal(ClassifyJob.model_validate, classify(id=job_id))
    if is_safe_id(job_id):
        assert message is None, (job_id, message)
    else:
        assert message is not None and message.startswith("id: "), (job_id, message)


@settings(max_examples=200, database=None)
@given(ids)
def test_any_id_maps_to_a_checkpoint_dir_strictly_under_the_root(job_id: str) -> None:
    home = Path(tempfile.gettempdir()) / "conveyor-home-never-created"
    runtime: Any = SimpleNamespace(settings=SimpleNamespace(home=home))
    job = SimpleNamespace(id=job_id)  # even an id the schema would refuse
    path = checkpoint_dir(runtime, job)  # type: ignore[arg-type]
    root = home / "checkpoints"
    assert path.parent == root and len(path.name) == 64 and all(c in string.hexdigits for c in path.name)
    assert checkpoint.is_strictly_under(path, root)
    assert path == checkpoint_dir(runtime, job)  # type: ignore[arg-type]  # stable: a redelivery resumes


def test_real_id_shapes_still_pass() -> None:
    import uuid

    for job_id in (
        str(uuid.uuid4()),
        uuid.uuid4().hex,
        "score-0123456789abcdef-0000007",
        "score-0123456789abcdef-0000007-r2",
        "order-17:v2",
        "user@example.com+retry=2",
        "a" * MAX_ID_CHARS,
    ):
        assert ClassifyJob.model_validate(classify(id=job_id)).id == job_id
    assert len(ClassifyJob.model_validate(classify()).id) == 32  # generated ids pass their own rule


def test_a_stock_celery_task_id_path_is_refused_by_the_worker_decoder() -> None:
    from workers.ingest import validate_job

    for task_id in ("../../somewhere", "/etc/cron.d", "a/../../b"):
        with pytest.raises(InvalidJob, match=r"invalid TrainJob: id: "):
            validate_job(TrainJob, {"interactions_path": "/d.csv", "output_name": "m"}, task_id)


# -- text is text ----------------------------------------------------------------------------

texts = st.lists(any_text(min_size=1, max_size=30), min_size=1, max_size=6)


@settings(max_examples=200, database=None)
@given(texts)
def test_a_job_holding_a_non_unicode_text_is_refused_naming_its_path(values: list[str]) -> None:
    message = refusal(ClassifyJob.model_validate, classify(texts=values))
    bad = [i for i, v in enumerate(values) if not is_unicode(v)]
    if bad:
        assert message is not None and "not valid Unicode" in message, message
        where = message.split(":", 1)[0]
        assert where in {f"texts.{i}" for i in bad}, message
        assert all(v not in message for v in values if not is_unicode(v))  # the text stays out
    else:
        assert message is None or "not valid Unicode" not in message


bad_strings = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    any_text(max_size=10),
    st.characters(categories=["Cs"]),
    any_text(max_size=10),
)
good_strings = st.text(min_size=1, max_size=20)  # no surrogates: see any_char


@st.composite
def job_with_one_bad_string(draw: st.DrawFn) -> tuple[str, dict[str, Any], tuple[str | int, ...]]:
    """(job type, job data, where the one non-Unicode string is)."""
    bad = draw(bad_strings)
    where = draw(st.sampled_from(["text", "label", "key", "nested", "user", "candidate", "path", "key_in_list"]))
    if where == "text":
        values = draw(st.lists(good_strings, min_size=1, max_size=5))
        i = draw(st.integers(0, len(values)))
        values.insert(i, bad)
        return "classify", classify(texts=values), ("texts", i)
    if where == "label":
        return "classify", classify(labels=["a", bad, "c"]), ("labels", 1)
    if where == "key":
        return "classify", {**classify(), bad: 1}, (ascii(bad[:64]),)
    if where == "nested":
        return "classify", classify(texts=[["deep", {"x": [bad]}]]), ("texts", 0, 1, "x", 0)
    if where == "key_in_list":
        return "classify", classify(texts=[{bad: "v"}]), ("texts", 0, ascii(bad[:64]))
    if where == "user":
        return "recommend", {"users": ["u1", bad], "model": "m"}, ("users", 1)
    if where == "candidate":
        return "recommend", {"users": ["u1"], "model": "m", "candidates": [bad]}, ("candidates", 0)
    return "train", {"interactions_path": "/data/" + bad, "output_name": "m"}, ("interactions_path",)


@settings(max_examples=200, database=None)
@given(job_with_one_bad_string())
def test_a_non_unicode_string_anywhere_is_refused_naming_its_path(case: Any) -> None:
    job_type, data, path = case
    with pytest.raises(ValidationError) as err:
        parse_job({"type": job_type, **data})
    (error,) = err.value.errors()
    assert error["type"] == "invalid_unicode"
    assert tuple(error["loc"]) == (job_type, *path)
    message = describe_validation_error(err.value)
    assert message.startswith(".".join(str(p) for p in (job_type, *path)) + ": ")
    assert "not valid Unicode" in message and is_unicode(message)  # the message itself encodes


def test_the_worker_decoder_names_the_path_as_invalid_job() -> None:
    from workers.ingest import validate_job

    with pytest.raises(InvalidJob) as err:
        validate_job(ClassifyJob, classify(texts=["ok", "ok", "ok", "bad \udcff bytes"]), "t1")
    assert str(err.value).startswith("invalid ClassifyJob: texts.3: not valid Unicode")
    assert "U+DCFF" in str(err.value) and is_unicode(str(err.value))


def test_nesting_is_bounded_and_cycles_end() -> None:
    deep: Any = "x"
    for _ in range(MAX_NESTING + 5):
        deep = [deep]
    message = refusal(ClassifyJob.model_validate, classify(texts=deep))
    assert message is not None and f"nested deeper than {MAX_NESTING}" in message
    cycle: list[Any] = []
    cycle.append(cycle)
    assert find_invalid_text({"texts": cycle}) is not None  # ends, at the depth bound


def test_the_unicode_check_is_cheap_on_the_largest_job() -> None:
    # The largest structure a job may bring: 512 texts of 20,000 characters (well past the
    # per-job bound, which the schema checks after this), non-ASCII and ASCII.
    wide = ["é日" * (MAX_TEXT_CHARS // 2)] * 512
    narrow = ["a" * MAX_TEXT_CHARS] * 512
    candidates = [f"item-{i}" for i in range(100_000)]
    for data in ({"texts": wide}, {"texts": narrow}, {"candidates": candidates}):
        started = time.perf_counter()
        assert find_invalid_text(data) is None
        assert time.perf_counter() - started < 0.5  # measured: ~4 ms, 0.01 ms and ~2 ms


# -- NUL and control characters in names; the per-job bound ----------------------------------

NUL_CASES: list[tuple[Any, dict[str, Any], str]] = [
    (ClassifyJob, classify(id="a\x00b"), "id"),
    (ClassifyJob, classify(idempotency_key="k\x00"), "idempotency_key"),
    (ClassifyJob, classify(idempotency_key="k\n"), "idempotency_key"),
    (ClassifyJob, classify(idempotency_key="k\u200b"), "idempotency_key"),  # zero-width: invisible
    (ClassifyJob, {"texts": ["t"], "model": "m\x00"}, "model"),
    (ClassifyJob, classify(labels=["a\x00", "b"]), "labels"),
    (ClassifyJob, classify(labels=["a\x1b[31m", "b"]), "labels"),
    (ClassifyJob, classify(label_template="{}\x00"), "label_template"),
    (TranscribeJob, {"audio_path": "/a\x00.wav"}, "audio_path"),
    (TranscribeJob, {"audio_path": "/a.wav", "language": "en\x00"}, "language"),
    (TranscribeJob, {"audio_path": "/a.wav", "model": "whisper\x00"}, "model"),
    (RecommendJob, {"users": ["u\x00"], "model": "m"}, "users.0"),
    (RecommendJob, {"users": ["u"], "model": "m", "candidates": ["c\x00"]}, "candidates.0"),
    (TrainJob, {"interactions_path": "/d\x00.csv", "output_name": "m"}, "interactions_path"),
    (TrainJob, {"interactions_path": "/d.csv", "output_name": "m\x00"}, "output_name"),
    (FineTuneJob, {"data_path": "/d.csv", "output_name": "m", "text_column": "t\x00"}, "text_column"),
    (FineTuneJob, {"data_path": "/d.csv", "output_name": "m", "label_column": "l\x00"}, "label_column"),
    (FineTuneJob, {"data_path": "/d.csv", "output_name": "m", "base_model": "b\x00"}, "base_model"),
    (FineTuneJob, {"data_path": "/d.csv", "output_name": "m", "validation_path": "/v\x00"}, "validation_path"),
]


@pytest.mark.parametrize(("model", "data", "field"), NUL_CASES)
def test_nul_and_control_characters_are_refused_in_names(model: Any, data: dict[str, Any], field: str) -> None:
    message = refusal(model.model_validate, data)
    assert message is not None and message.startswith(f"{field}: "), message


def test_free_texts_may_hold_nul_and_keys_may_hold_spaces() -> None:
    # Documented choice (shared/jobs.py): a text is never a key, path or name.
    assert ClassifyJob.model_validate(classify(texts=["a\x00b", "tab\tand\nnewline"])).texts[0] == "a\x00b"
    assert ClassifyJob.model_validate(classify(idempotency_key="Ünïcode order 7")).idempotency_key


def test_total_characters_per_classify_job_are_bounded() -> None:
    per = MAX_TEXT_CHARS
    fits = MAX_CHARS_PER_JOB // per
    assert ClassifyJob.model_validate(classify(texts=["x" * per] * fits))
    message = refusal(ClassifyJob.model_validate, classify(texts=["x" * per] * (fits + 1)))
    assert message is not None and message.startswith("texts: ")
    assert str(MAX_CHARS_PER_JOB) in message and "MAX_CHARS_PER_JOB" in message


# -- remove_owned_dir ------------------------------------------------------------------------

PARTS = ["..", ".", "a", "b", "inside-link", "outside-link", "outside", "loop", "missing", "file", ""]


def _tree(base: Path) -> tuple[Path, Path]:
    """base/root/{a/b/c, file, inside-link -> a, outside-link -> base/outside, loop -> loop};
    base/outside/canary. Returns (root, outside)."""
    root, outside = base / "root", base / "outside"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "data").write_text("x")
    (root / "file").write_text("f")
    outside.mkdir()
    (outside / "canary").write_text("alive")
    (outside / "a" / "b").mkdir(parents=True)
    os.symlink(root / "a", root / "inside-link")
    os.symlink(outside, root / "outside-link")
    os.symlink(root / "a" / "b" / "c" / "data", root / "a" / "b" / "c" / "data-link")
    os.symlink(outside, root / "a" / "b" / "c" / "out-link")  # inside a tree being removed
    os.symlink("loop", root / "loop")
    return root, outside


def _snapshot(path: Path, leave_out: Path | None = None) -> list[tuple[str, str]]:
    return sorted(
        (str(p.relative_to(path)), p.read_text() if p.is_file() and not p.is_symlink() else "")
        for p in path.rglob("*")
        if leave_out is None or not p.is_relative_to(leave_out)
    )


MAX_PARTS = 5
# The tree sits this deep in its sandbox, so that even MAX_PARTS ".." from the root (or from a
# link) stay inside the sandbox: were the helper ever broken, this test would delete its own
# sandbox, never /tmp or anything above it.
SANDBOX_DEPTH = MAX_PARTS + 2


@settings(max_examples=200, database=None, deadline=None)
@given(st.lists(st.sampled_from(PARTS), min_size=0, max_size=MAX_PARTS), st.booleans())
def test_remove_owned_dir_never_removes_outside_its_root(parts: list[str], absolute_outside: bool) -> None:
    sandbox = Path(os.path.realpath(tempfile.mkdtemp(prefix="owned-")))
    try:
        base = sandbox.joinpath(*(f"d{i}" for i in range(SANDBOX_DEPTH)))
        root, outside = _tree(base)
        before = _snapshot(sandbox, leave_out=root)
        target = outside / "a" if absolute_outside and not parts else root.joinpath(*parts)
        real = Path(os.path.realpath(target))
        assert real != sandbox and real.is_relative_to(sandbox), "the test must never aim outside its sandbox"
        strictly_inside = real != root and real.is_relative_to(root)
        removed = checkpoint.remove_owned_dir(target, root)
        assert _snapshot(sandbox, leave_out=root) == before  # nothing outside the root changed, ever
        assert root.is_dir()  # nor the root itself
        if not strictly_inside:
            assert not removed
        elif real.is_dir():
            assert removed and not real.exists()
    finally:
        shutil.rmtree(sandbox)


def test_remove_owned_dir_refuses_links_out_dotdot_and_the_root(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    assert not checkpoint.remove_owned_dir(root / "outside-link", root)
    assert not checkpoint.remove_owned_dir(root / "a" / ".." / ".." / "outside", root)
    assert not checkpoint.remove_owned_dir(root, root)
    assert not checkpoint.remove_owned_dir(root / "a" / "..", root)
    assert not checkpoint.remove_owned_dir(root / "file", root)  # not a directory
    assert (outside / "canary").read_text() == "alive" and (root / "file").exists()
    # Removing a tree that holds a link out removes the link, never what it points at.
    assert checkpoint.remove_owned_dir(root / "a", root)
    assert not (root / "a").exists() and (outside / "canary").read_text() == "alive"
    assert checkpoint.remove_owned_dir(root / "never-made", root)  # absent: nothing to do


# -- training input files are bounded before reading -----------------------------------------


def _interactions(path: Path, users: int = 6, items: int = 6) -> Path:
    rows = [f"u{u},i{(u + k) % items},1,{1000 + k}" for u in range(users) for k in range(3)]
    path.write_text("user,item,rating,timestamp\n" + "\n".join(rows) + "\n")
    return path


def test_an_input_file_over_the_limit_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = _interactions(tmp_path / "small.csv")
    assert read_interactions(small).rows == 18
    with pytest.raises(InvalidJob, match=r"^interactions_path: the file holds \d+ bytes, over the limit") as err:
        read_interactions(small, max_bytes=100)
    assert "CONVEYOR_MAX_INPUT_FILE_MB" in str(err.value)

    big = tmp_path / "big.csv"
    with big.open("w") as f:
        f.write("text,label\n")
        f.write("spam spam spam,a\nham ham ham,b\n" * 40_000)  # ~1.2 MB
    monkeypatch.setenv("CONVEYOR_MAX_INPUT_FILE_MB", "1")
    for field in ("data_path", "validation_path"):
        with pytest.raises(InvalidJob, match=rf"^{field}: .* over the limit of 1 MB \(CONVEYOR_MAX_INPUT_FILE_MB"):
            read_labeled_texts(big, field=field)


# -- a training job that already published is not trained again ------------------------------


def test_a_redelivered_training_job_returns_its_published_version_without_training(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    job = TrainJob(interactions_path="/not/read/at/all.csv", output_name="recs")
    recorded = {"metrics": {"recall@10": 0.25}, "epochs_run": 3, "resumed_from_epoch": 1, "extra": {"losses": [1.0]}}
    built = store.staging()
    (built / "weights").write_text("w")
    first = store.publish("recs", built, {"kind": "recommender", "job_id": job.id, "result": recorded})
    runtime: Any = SimpleNamespace(
        settings=SimpleNamespace(home=tmp_path / "home"), store=store, device="cpu"
    )  # no Redis, no data file: neither is reached
    leftover = checkpoint_dir(runtime, job)
    leftover.mkdir(parents=True)  # the dead worker's checkpoint directory
    result = run_long_job(None, job, runtime, "w@host")
    assert (result.model, result.version) == ("recs@1", first.version)
    assert result.metrics == recorded["metrics"] and result.epochs_run == 3 and result.resumed_from_epoch == 1
    assert result.extra == recorded["extra"] and result.job_id == job.id
    assert [v.version for v in store.versions("recs")] == [1]
    assert not leftover.exists()


def test_a_recommend_job_is_bounded_in_users_times_k() -> None:
    from shared.jobs import MAX_RECOMMENDATIONS_PER_JOB

    RecommendJob(users=["u"] * 1000, k=1000, model="m")  # exactly at the limit
    with pytest.raises(ValidationError) as err:
        RecommendJob(users=["u"] * 1001, k=1000, model="m")
    assert str(MAX_RECOMMENDATIONS_PER_JOB) in describe_validation_error(err.value)
