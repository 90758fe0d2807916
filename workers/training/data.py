"""Reading training data, with errors that name the problem, before any training starts.

Interactions: CSV, TSV or JSONL with a user and an item column, an optional weight
(``weight``, ``rating`` or ``quantity``) and an optional time (``time`` or ``timestamp``:
a number or ISO 8601). RecBole's typed headers (``user_id:token``) are read too.
Labeled texts: CSV, TSV or JSONL with configurable text and label columns.
Every problem raises ``InvalidJob``, naming the line and column but never repeating what the
file holds: a job may name a file it should not read, and its error must not reveal it.
A file over ``CONVEYOR_MAX_INPUT_FILE_MB`` is refused before it is read, and the read itself
stops at the limit (a file that grows after the check is refused too).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from shared.errors import InvalidJob
from shared.settings import Settings

USER_COLUMNS: Final = ("user", "user_id", "userid")
ITEM_COLUMNS: Final = ("item", "item_id", "itemid")
WEIGHT_COLUMNS: Final = ("weight", "rating", "quantity")
TIME_COLUMNS: Final = ("time", "timestamp")
MIN_INTERACTIONS: Final = 10
MIN_LABELED_ROWS: Final = 8
MB: Final = 1024 * 1024


def max_input_bytes(settings: Settings | None = None) -> int:
    """CONVEYOR_MAX_INPUT_FILE_MB in bytes."""
    return (settings or Settings()).max_input_file_mb * MB


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Interactions:
    """One row per distinct (user, item) pair: weights summed, the latest time kept.

    ``order`` ranks pairs by recency within the file: the pair's latest time where the file
    has one, else the position of its last occurrence.
    """

    users: list[str]  # index -> user id
    items: list[str]  # index -> item id
    user: np.ndarray  # int64 per pair
    item: np.ndarray  # int64 per pair
    weight: np.ndarray  # float32 per pair, > 0
    order: np.ndarray  # float64 per pair: larger is more recent
    rows: int  # rows read from the file
    dropped_rows: int  # rows with a weight <= 0 (returns, zero ratings), left out
    has_time: bool
    sha256: str


@dataclass(frozen=True)
class LabeledTexts:
    texts: list[str]
    labels: list[str]
    sha256: str

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def read_interactions(path: str | Path, min_rows: int = MIN_INTERACTIONS, max_bytes: int | None = None) -> Interactions:
    limit = max_input_bytes() if max_bytes is None else max_bytes
    path = _existing_file(path, "interactions_path", limit)
    header, records = _open_table(path, "interactions_path", limit)
    columns = {_plain_name(name): name for name in header}
    user_col = _pick(columns, USER_COLUMNS, path, header, required=True)
    item_col = _pick(columns, ITEM_COLUMNS, path, header, required=True)
    weight_col = _pick(columns, WEIGHT_COLUMNS, path, header, required=False)
    time_col = _pick(columns, TIME_COLUMNS, path, header, required=False)
    assert user_col is not None and item_col is not None  # required=True raises when absent

    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    pair_index: dict[tuple[int, int], int] = {}
    pair_user: list[int] = []
    pair_item: list[int] = []
    pair_weight: list[float] = []
    pair_order: list[float] = []
    rows = dropped = 0
    for line, record in records:
        rows += 1
        user = _cell(record, user_col, path, line)
        item = _cell(record, item_col, path, line)
        weight = _number(record, weight_col, path, line) if weight_col else 1.0
        if weight <= 0:
            dropped += 1
            continue
        order = _time(record, time_col, path, line) if time_col else float(line)
        u = user_index.setdefault(user, len(user_index))
        i = item_index.setdefault(item, len(item_index))
        pair = pair_index.get((u, i))
        if pair is None:
            pair_index[(u, i)] = len(pair_user)
            pair_user.append(u)
            pair_item.append(i)
            pair_weight.append(weight)
            pair_order.append(order)
        else:
            pair_weight[pair] += weight
            pair_order[pair] = max(pair_order[pair], order)
    if rows == 0:
        raise InvalidJob(f"{path}: no interaction rows below the header")
    if len(pair_user) < min_rows:
        raise InvalidJob(
            f"{path}: too few interactions: {len(pair_user)} distinct (user, item) pairs with a positive weight"
            f" (of {rows} rows), at least {min_rows} needed"
        )
    if len(user_index) < 2 or len(item_index) < 2:
        raise InvalidJob(f"{path}: needs at least 2 users and 2 items, found {len(user_index)} and {len(item_index)}")
    return Interactions(
        users=list(user_index),
        items=list(item_index),
        user=np.asarray(pair_user, dtype=np.int64),
        item=np.asarray(pair_item, dtype=np.int64),
        weight=np.asarray(pair_weight, dtype=np.float32),
        order=np.asarray(pair_order, dtype=np.float64),
        rows=rows,
        dropped_rows=dropped,
        has_time=time_col is not None,
        sha256=file_sha256(path),
    )


def read_labeled_texts(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    min_rows: int = MIN_LABELED_ROWS,
    field: str = "data_path",
    min_classes: int = 2,
    max_bytes: int | None = None,
) -> LabeledTexts:
    limit = max_input_bytes() if max_bytes is None else max_bytes
    path = _existing_file(path, field, limit)
    header, records = _open_table(path, field, limit)
    for wanted, option in ((text_column, "text_column"), (label_column, "label_column")):
        if wanted not in header:
            raise InvalidJob(f"{path}: no column {wanted!r} ({option}) among the header's {len(header)} columns")
    texts: list[str] = []
    labels: list[str] = []
    for line, record in records:
        texts.append(_cell(record, text_column, path, line, strip=False))
        labels.append(_cell(record, label_column, path, line))
    if len(texts) < min_rows:
        raise InvalidJob(f"{path}: too few rows: {len(texts)}, at least {min_rows} needed")
    if len(set(labels)) < min_classes:
        raise InvalidJob(f"{path}: every row has the same label; a classifier needs at least 2 classes")
    return LabeledTexts(texts, labels, file_sha256(path))


# -- file access -------------------------------------------------------------------------

Record = dict[str, Any]


def _too_big(field: str, limit: int, size: int | None = None) -> InvalidJob:
    held = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return InvalidJob(
        f"{field}: the file holds {held}, over the limit of {limit / MB:g} MB"
        " (CONVEYOR_MAX_INPUT_FILE_MB on the worker)"
    )


def _existing_file(path: str | Path, field: str, max_bytes: int) -> Path:
    path = Path(path)
    if not path.exists():
        raise InvalidJob(f"{field}: file not found: {path}")
    if not path.is_file():
        raise InvalidJob(f"{field}: not a regular file: {path}")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise InvalidJob(f"{field}: cannot read {path}: {exc.strerror or exc}") from exc
    size = path.stat().st_size
    if size == 0:
        raise InvalidJob(f"{field}: the file is empty: {path}")
    if size > max_bytes:
        raise _too_big(field, max_bytes, size)
    return path


def _open_table(path: Path, field: str, max_bytes: int) -> tuple[list[str], Iterator[tuple[int, Record]]]:
    """The header (column names) and an iterator of (line number, record); at most
    ``max_bytes`` are read, so a file that grew after ``_existing_file`` cannot exhaust memory."""
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidJob(f"{field}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > max_bytes:
        raise _too_big(field, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJob(f"{path}: not UTF-8 text (byte {exc.start}); expected CSV, TSV or JSONL") from exc
    del raw
    if "\r" in text:  # newlines as text mode reads them (what read_text did)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return _jsonl(path, text)
    return _delimited(path, text)


def _jsonl(path: Path, text: str) -> tuple[list[str], Iterator[tuple[int, Record]]]:
    records: list[tuple[int, Record]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidJob(f"{path}, line {line}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except (ValueError, RecursionError) as exc:
            raise InvalidJob(f"{path}, line {line}: not valid JSON ({type(exc).__name__})") from exc
        if not isinstance(record, dict):
            raise InvalidJob(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}")
        records.append((line, record))
    if not records:
        raise InvalidJob(f"{path}: no JSON lines in the file")
    header = list(dict.fromkeys(key for _, record in records for key in record))
    return header, iter(records)


def _delimited(path: Path, text: str) -> tuple[list[str], Iterator[tuple[int, Record]]]:
    first = text.split("\n", 1)[0]
    # A tab in the header means TSV whatever the suffix: RecBole's .inter files are TSV.
    delimiter = "\t" if "\t" in first or path.suffix.lower() in (".tsv", ".inter") else ","
    # TSV is read with quoting off: real TSV files carry stray quotes inside texts.
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise InvalidJob(f"{path}: the file is empty") from None
    if len(set(header)) != len(header):
        raise InvalidJob(f"{path}: repeated column names in the header (line 1)")

    def records() -> Iterator[tuple[int, Record]]:
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise InvalidJob(
                        f"{path}, line {reader.line_num}: {len(row)} fields where the header has {len(header)}"
                    )
                yield reader.line_num, dict(zip(header, row))
        except csv.Error as exc:
            raise InvalidJob(f"{path}, line {reader.line_num}: {exc}") from exc

    return header, records()


# -- columns and cells ---------------------------------------------------------------------


def _plain_name(column: str) -> str:
    """``user_id:token`` (RecBole) -> ``user_id``; case-insensitive."""
    return column.split(":", 1)[0].strip().lower()


def _pick(columns: dict[str, str], names: tuple[str, ...], path: Path, header: list[str], required: bool) -> str | None:
    for name in names:
        if name in columns:
            return columns[name]
    if required:
        raise InvalidJob(
            f"{path}: no {names[0]} column (looked for {', '.join(names)}) among the header's {len(header)} columns"
        )
    return None


def _shown(column: str) -> str:
    """A column as errors name it: the part before RecBole's ``:type`` (the rest is the file's text)."""
    return column.split(":", 1)[0]


def _cell(record: Record, column: str, path: Path, line: int, strip: bool = True) -> str:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidJob(f"{path}, line {line}: no value in column {_shown(column)!r}")
    if isinstance(value, (dict, list)):
        raise InvalidJob(f"{path}, line {line}: column {_shown(column)!r} holds a {type(value).__name__}, not a value")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 17850.0 and 17850 name the same id
    text = str(value)
    return text.strip() if strip else text


def _number(record: Record, column: str, path: Path, line: int) -> float:
    raw = _cell(record, column, path, line)
    try:
        value = float(raw)
    except ValueError:
        raise InvalidJob(f"{path}, line {line}: column {_shown(column)!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidJob(f"{path}, line {line}: column {_shown(column)!r} is not finite")
    return value


def _time(record: Record, column: str, path: Path, line: int) -> float:
    raw = _cell(record, column, path, line)
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        raise InvalidJob(
            f"{path}, line {line}: column {_shown(column)!r} is neither a number nor an ISO 8601 time"
        ) from None
