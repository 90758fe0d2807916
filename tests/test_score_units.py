"""Bulk scoring, piece by piece: file formats, the resumable state, row checks, the result
feed, the lost-chunk search (on a real Redis) and the long-job progress bar."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from producers.client import JobStatus
from producers.progress import follow_long_job
from producers.score.broker import ChunkBroker
from producers.score.kinds import ClassifyScoring, RecommendScoring, TranscribeScoring
from producers.score.run import _ResultFeed
from producers.score.state import JOURNAL, Manifest, ResumeRefused, RunState, state_dir_for
from producers.tabular import TableReader, TabularError, TextOptions, file_format, open_writer, read_table
from shared.jobs import ClassifyJob
from shared.results import Progress
from shared.settings import Settings

TRICKY = ["plain", 'with "quotes", and a comma', "two\nlines", "tab\there", "ünïcödé 日本語 🎉", '"starts quoted"']


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_round_trips_tricky_text(tmp_path: Path, suffix: str) -> None:
    table = pa.table({"n": pa.array(range(len(TRICKY)), pa.int64()), "text": TRICKY})
    path = tmp_path / f"t{suffix}"
    writer = open_writer(path, table.schema)
    for batch in table.to_batches(max_chunksize=4):
        writer.write(batch)
    writer.close()
    back = read_table(path)
    assert back.column("text").to_pylist() == TRICKY
    expected_n: list[Any] = list(range(len(TRICKY)))
    if suffix in (".csv", ".tsv"):  # text formats read every column as text: no type guessed per block
        expected_n = [str(n) for n in expected_n]
    assert back.column("n").to_pylist() == expected_n


def test_headerless_unquoted_tsv_reads_quotes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "sms.tsv"
    path.write_text('ham\t"Pete can you ring me" later\nspam\tWIN a "prize"\n', encoding="utf-8")
    reader = TableReader(path, TextOptions(header=False, quoting=False))
    assert reader.schema.names == ["f0", "f1"]
    assert read_table(path, TextOptions(header=False, quoting=False)).column("f1").to_pylist() == [
        '"Pete can you ring me" later',
        'WIN a "prize"',
    ]


def test_unknown_or_missing_or_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TabularError, match=r"unknown file type '\.xlsx'"):
        file_format(tmp_path / "a.xlsx")
    with pytest.raises(TabularError, match="no such file"):
        TableReader(tmp_path / "missing.csv")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(TabularError, match="cannot read it as JSONL"):
        TableReader(broken).count_rows("text")


def test_large_csv_streams_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("id,text\n" + "".join(f"{i},row number {i} with some words\n" for i in range(60_000)))
    reader = TableReader(path)
    batches = list(reader.batches(["text"]))
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == 60_000
    assert reader.count_rows("text") == 60_000


def manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "job_type": "classify", "input_path": "/data/in.csv", "input_sha256": "a" * 64, "input_bytes": 100,
        "rows": 10, "column": "text", "chunk_size": 4, "options": {"labels": ["a", "b"]},
        "output_columns": ["text", "label", "error"],
    }  # fmt: skip
    fields.update(changes)
    return Manifest(**fields)


def test_journal_survives_a_torn_line_and_resume_checks_input_and_options(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    state = RunState.open(out, manifest())
    assert not state.resumed and state.manifest.chunks == 3 and state.manifest.chunk_rows(2) == 2
    assert state.record_sent(0) == f"score-{state.manifest.run_id}-0000000"
    state.record_done(0, {"label": ["a", "b", None, "a"], "error": ["", "", "text is blank", ""]}, 1)
    state.record_sent(1)
    state.close()
    with open(state_dir_for(out) / JOURNAL, "ab") as f:
        f.write(b'{"done":1,"rows":4,"err')  # a kill mid-write

    again = RunState.open(out, manifest(run_id="ignored"))
    assert again.resumed and again.manifest.run_id == state.manifest.run_id
    assert set(again.done) == {0} and again.sent == {0: 1, 1: 1}
    assert again.rows_done == 4 and again.errors == 1
    assert again.read_chunk(0)["label"] == ["a", "b", None, "a"]
    # A chunk sent again (Redis lost it) gets a new id: an explicit job id is accepted once.
    assert again.current_job_id(1).endswith("-0000001")
    assert again.record_sent(1).endswith("-0000001-r1")
    again.close()

    with pytest.raises(ResumeRefused, match="changed since the interrupted run"):
        RunState.open(out, manifest(input_sha256="b" * 64))
    with pytest.raises(ResumeRefused, match=r"labels was \['a', 'b'\], now \['a', 'c'\]"):
        RunState.open(out, manifest(options={"labels": ["a", "c"]}))
    with pytest.raises(ResumeRefused, match="chunk_size was 4, now 8"):
        RunState.open(out, manifest(chunk_size=8))


def test_result_feed_lines_chunks_up_with_batches_of_any_size(tmp_path: Path) -> None:
    state = RunState.open(tmp_path / "o.csv", manifest(rows=10, chunk_size=4))
    for chunk in (2, 0, 1):  # chunks finish out of order
        rows = state.manifest.chunk_rows(chunk)
        state.record_done(chunk, {"label": [f"r{chunk * 4 + i}" for i in range(rows)], "error": [""] * rows}, 0)
    feed = _ResultFeed(state)
    taken = [feed.take(n)["label"] for n in (3, 1, 5, 1)]
    assert [label for part in taken for label in part] == [f"r{i}" for i in range(10)]
    assert feed.exhausted


def test_rows_are_checked_before_they_reach_a_job() -> None:
    kind = ClassifyScoring(labels=["a", "b"])
    assert kind.check("fine") == ("fine", None)
    assert kind.check("  ") == (None, "text is blank")
    assert kind.check(None) == (None, "text is missing")
    assert kind.check("x" * 20_001)[1] == "text has 20001 characters, over the limit of 20000"
    job = kind.job("score-x-0000000", ["one", "two"])
    assert isinstance(job, ClassifyJob) and job.priority == 0 and job.texts == ["one", "two"]
    assert ClassifyJob.model_validate(job.model_dump(mode="json")).id == "score-x-0000000"
    assert kind.chunk_size(Settings(max_batch_size=32)) == 128
    assert kind.chunk_size(Settings(max_batch_size=1024)) == 512  # the schema's limit per job

    rec = RecommendScoring(model="tiny", k=3)
    assert rec.check(42) == ("42", None) and rec.check("u" * 201)[1] is not None
    cols = rec.columns({"results": [{"user": "42", "items": [{"item": "i1", "score": 0.5}], "fallback": True}]}, 1)
    assert json.loads(cols["items"][0]) == [{"item": "i1", "score": 0.5}] and cols["fallback"] == [True]
    assert TranscribeScoring().chunk_size(Settings()) == 1


def test_lost_chunks_are_told_from_queued_and_held_ones(conveyor_env: dict[str, str], tmp_path: Path) -> None:
    """On a real Redis: an id in the bulk queue or in kombu's unacked hash is waiting; others are not."""
    from producers.client import Client

    with Client() as client:
        broker = ChunkBroker(client, "classify")
        broker.queue = "conveyor.test.bulk-lost"  # no worker consumes it
        prefix = "score-feedbeef00000000-"
        kind = ClassifyScoring(labels=["a", "b"])
        broker.publish(kind.job(prefix + "0000000", ["queued"]))
        broker.publish(kind.job(prefix + "0000002-r1", ["queued again"]))
        client.redis.hset("unacked", "tag-x", json.dumps({"headers": {"id": prefix + "0000001"}}))
        try:
            assert broker.waiting(prefix) == {prefix + "0000000", prefix + "0000001", prefix + "0000002-r1"}
            assert broker.poll([prefix + "0000003"]) == []
        finally:
            client.redis.hdel("unacked", "tag-x")
            client.redis.delete(broker.queue, *[f"{broker.queue}\x06\x16{p}" for p in range(1, 10)])
        assert broker.waiting(prefix) == set()


class FakeHandle:
    """A train job's statuses as a worker would report them (a unit test of the bar alone)."""

    def __init__(self) -> None:
        self.id, self.type = "0123456789abcdef", "train"
        self.statuses = [
            JobStatus(self.id, "PENDING"),
            JobStatus(self.id, "PROGRESS", Progress(epoch=1, epochs=3, step=5, steps=10, loss=0.6931, eta_s=75.0)),
            JobStatus(self.id, "PROGRESS", Progress(epoch=2, epochs=3, step=10, steps=10, loss=0.1234, eta_s=12.0)),
            JobStatus(self.id, "SUCCESS"),
        ]

    def status(self) -> JobStatus:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


def test_long_job_bar_shows_epoch_step_loss_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("producers.progress.time.sleep", lambda s: None)
    buffer = io.StringIO()
    follow_long_job(FakeHandle(), timeout=10, console=Console(file=buffer, width=200, force_terminal=True))  # type: ignore[arg-type]
    shown = buffer.getvalue()
    assert "epoch 2/3" in shown and "step 10/10" in shown and "loss 0.1234" in shown and "ETA 0:00:12" in shown


def test_parquet_input_keeps_types_in_schema(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["a", "b"]}), path)
    reader = TableReader(path)
    assert reader.schema.field("id").type == pa.int32()
    assert [b.num_rows for b in reader.batches(["text"])] == [2]


def test_chunks_cut_across_read_blocks_in_order(conveyor_env: dict[str, str], tmp_path: Path) -> None:
    from producers.client import Client
    from producers.score.run import ScoreRequest, ScoreRun

    path = tmp_path / "big.csv"
    path.write_text("text\n" + "".join(f"row {i}\n" for i in range(300_003)))
    with Client() as client:
        run = ScoreRun(
            client, ClassifyScoring(labels=["a", "b"]), ScoreRequest(path, tmp_path / "o.csv", "text", chunk_size=1000)
        )
        state = run.prepare()
        assert state.manifest.rows == 300_003 and state.manifest.chunks == 301
        assert len(list(run.reader.batches(["text"]))) > 1  # the chunks below span block boundaries
        chunks = list(run._chunks())
        state.remove()
    assert [c for c, _ in chunks] == list(range(301))
    assert [len(v) for _, v in chunks] == [1000] * 300 + [3]
    assert [v for _, values in chunks for v in values] == [f"row {i}" for i in range(300_003)]


def test_a_full_classify_chunk_of_the_longest_texts_is_a_valid_job() -> None:
    """Chunks are cut by rows: the default chunk of maximal texts must fit a job's own limits."""
    from shared.jobs import MAX_TEXT_CHARS, ClassifyJob
    from shared.settings import Settings

    kind = ClassifyScoring(labels=["a", "b"])
    rows = ["x" * MAX_TEXT_CHARS] * kind.chunk_size(Settings())
    assert isinstance(kind.job("score-abc-0000001", rows), ClassifyJob)
    ClassifyJob.model_validate(kind.job("score-abc-0000001", rows).model_dump())
