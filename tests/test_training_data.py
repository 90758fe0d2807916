"""Training inputs: bad files fail with InvalidJob naming the problem, before any training;
real files (MovieLens 100K from the recbole package) read correctly; checkpoints round-trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import ml100k

from shared.errors import InvalidJob
from workers.training import checkpoint
from workers.training.data import read_interactions, read_labeled_texts


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def interactions_csv(n_users: int = 4, n_items: int = 5) -> str:
    rows = [f"u{u},i{(u + k) % n_items},{k + 1},{1000 + k}" for u in range(n_users) for k in range(3)]
    return "user,item,rating,timestamp\n" + "\n".join(rows) + "\n"


# -- interactions ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="file not found"):
        read_interactions(tmp_path / "nope.csv")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="not a regular file"):
        read_interactions(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="empty"):
        read_interactions(write(tmp_path / "a.csv", ""))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="no interaction rows"):
        read_interactions(write(tmp_path / "a.csv", "user,item\n"))


def test_missing_column_is_named_without_repeating_the_header(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob) as err:
        read_interactions(write(tmp_path / "a.csv", "customer,item\n1,2\n"))
    assert "no user column (looked for user, user_id, userid) among the header's 2 columns" in str(err.value)
    assert "customer" not in str(err.value)  # the file's text stays out of errors


def test_bad_number_names_line_and_column(tmp_path: Path) -> None:
    text = interactions_csv().replace("u1,i1,1,", "u1,i1,five,")
    with pytest.raises(InvalidJob, match=r"line 5: column 'rating' is not a number$"):
        read_interactions(write(tmp_path / "a.csv", text))


def test_bad_time(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match=r"neither a number nor an ISO 8601 time$"):
        read_interactions(write(tmp_path / "a.csv", "user,item,time\na,b,yesterday\n"))


def test_ragged_row(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="line 3: 3 fields where the header has 2"):
        read_interactions(write(tmp_path / "a.csv", "user,item\na,b\na,b,c\n"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"user,item\n\xff\xfe,1\n")
    with pytest.raises(InvalidJob, match="not UTF-8"):
        read_interactions(path)


def test_bad_json_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="line 2: not valid JSON"):
        read_interactions(write(tmp_path / "a.jsonl", '{"user": 1, "item": 2}\n{"user": 1,\n'))


def test_too_few_interactions(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="too few interactions: 2 distinct"):
        read_interactions(write(tmp_path / "a.csv", "user,item\na,x\nb,y\na,x\n"))


def test_duplicates_aggregate_and_non_positive_weights_drop(tmp_path: Path) -> None:
    text = interactions_csv() + "u0,i0,2,2000\nu0,i1,-3,3000\n"  # u0/i0 again; a return (-3)
    data = read_interactions(write(tmp_path / "a.csv", text))
    assert data.rows == 14 and data.dropped_rows == 1
    pair = next(
        n for n in range(len(data.user)) if data.users[data.user[n]] == "u0" and data.items[data.item[n]] == "i0"
    )
    assert data.weight[pair] == 3.0 and data.order[pair] == 2000.0  # summed, latest time kept


def test_jsonl_with_numeric_ids_and_iso_times(tmp_path: Path) -> None:
    lines = [
        {"user": u, "item": float(i), "quantity": 1, "timestamp": f"2011-01-0{i + 1}T10:00:00"}
        for u in range(3)
        for i in range(4)
    ]
    data = read_interactions(write(tmp_path / "a.jsonl", "\n".join(json.dumps(x) for x in lines)))
    assert data.users == ["0", "1", "2"] and data.items == ["0", "1", "2", "3"]  # 1.0 names item "1"
    assert data.has_time and data.order[1] > data.order[0]


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", interactions_csv())
    assert read_interactions(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_recbole_movielens_header() -> None:
    data = read_interactions(ml100k())  # user_id:token item_id:token rating:float timestamp:float
    assert (len(data.users), len(data.items), len(data.user)) == (943, 1682, 100_000)
    assert data.has_time and data.weight.min() == 1.0 and data.weight.max() == 5.0


# -- labeled texts -----------------------------------------------------------------------


def labeled_csv(n: int = 10) -> str:
    return "text,label\n" + "\n".join(
        f'"message {i}, with a comma",{"spam" if i % 3 == 0 else "ham"}' for i in range(n)
    )


def test_labeled_missing_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob) as err:
        read_labeled_texts(write(tmp_path / "a.csv", labeled_csv()), text_column="sms")
    assert "no column 'sms' (text_column) among the header's 2 columns" in str(err.value)


def test_labeled_one_class(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="every row has the same label"):
        read_labeled_texts(write(tmp_path / "a.csv", labeled_csv().replace("spam", "ham")))


def test_labeled_too_few_rows(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="too few rows: 3"):
        read_labeled_texts(write(tmp_path / "a.csv", labeled_csv(3)))


def test_labeled_blank_text(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="line 3: no value in column 'text'"):
        read_labeled_texts(write(tmp_path / "a.csv", labeled_csv().replace('"message 1, with a comma"', '"  "')))


def test_labeled_jsonl_with_integer_labels(tmp_path: Path) -> None:
    lines = [json.dumps({"body": f"text {i}", "y": i % 2}) for i in range(10)]
    data = read_labeled_texts(write(tmp_path / "a.jsonl", "\n".join(lines)), "body", "y")
    assert data.classes == ["0", "1"] and data.texts[3] == "text 3"


def test_labeled_csv_keeps_quoted_commas(tmp_path: Path) -> None:
    data = read_labeled_texts(write(tmp_path / "a.csv", labeled_csv()))
    assert data.texts[0] == "message 0, with a comma" and data.classes == ["ham", "spam"]


# -- checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip_is_atomic_and_fingerprinted(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path) is None
    checkpoint.save(tmp_path, 1, {"w": torch.ones(3), "step": 7, "names": ["a"]}, fingerprint="job-a")
    checkpoint.save(tmp_path, 2, {"w": torch.full((3,), 2.0), "step": 14, "names": ["a"]}, fingerprint="job-a")
    restored = checkpoint.latest(tmp_path, "job-a")
    assert restored is not None
    epoch, state = restored
    assert epoch == 2 and state["step"] == 14 and torch.equal(state["w"], torch.full((3,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_FILE]  # no temp file left behind
    assert checkpoint.latest(tmp_path, "job-b") is None  # another job's checkpoint is not resumed
    checkpoint.clear(tmp_path)
    assert checkpoint.latest(tmp_path) is None
