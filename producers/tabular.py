"""Tabular files for bulk scoring: CSV, TSV, JSONL and Parquet, read and written in
streaming batches with pyarrow so memory stays flat whatever the file's size.

The format is chosen by the file's extension. CSV and TSV columns are read as text (a
streaming reader infers types from its first block only, and a later block that disagrees
would fail mid-file); JSONL and Parquet keep their types.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

Format = Literal["csv", "tsv", "jsonl", "parquet"]
EXTENSIONS: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
BLOCK_BYTES: Final = 1 << 20  # text formats: one parsed block at a time
PARQUET_BATCH_ROWS: Final = 16_384


class TabularError(ValueError):
    """The file cannot be read (or written) as a table; the message names the file and why."""


def file_format(path: Path) -> Format:
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(EXTENSIONS))
        raise TabularError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}; use one of {known}")
    return fmt


@dataclass(frozen=True)
class TextOptions:
    """How to read CSV and TSV: a header line or not (then columns are f0, f1, ...), quotes or not."""

    header: bool = True
    quoting: bool = True


class TableReader:
    """One input file, read as many times as needed, each time as a stream of record batches."""

    def __init__(self, path: Path, options: TextOptions = TextOptions()) -> None:
        self.path = Path(path)
        self.format = file_format(self.path)
        self.options = options
        if not self.path.is_file():
            raise TabularError(f"{self.path}: no such file")
        self._schema: pa.Schema | None = None

    @property
    def schema(self) -> pa.Schema:
        """Column names and types, from the file's head (Parquet: its footer)."""
        if self._schema is None:
            self._schema = self._read_schema()
        return self._schema

    def _read_schema(self) -> pa.Schema:
        try:
            if self.format == "parquet":
                return pq.ParquetFile(self.path).schema_arrow
            if self.format == "jsonl":
                with pajson.open_json(self.path, read_options=pajson.ReadOptions(block_size=BLOCK_BYTES)) as reader:
                    return reader.schema
            with pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(
                    block_size=BLOCK_BYTES, autogenerate_column_names=not self.options.header, use_threads=False
                ),
                parse_options=self._parse_options(),
            ) as reader:
                names = reader.schema.names
            return pa.schema([pa.field(name, pa.string()) for name in names])
        except (pa.ArrowException, OSError) as exc:
            raise TabularError(f"{self.path}: cannot read it as {self.format.upper()}: {exc}") from None

    def _parse_options(self) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(
            delimiter="\t" if self.format == "tsv" else ",",
            quote_char='"' if self.options.quoting else False,
            newlines_in_values=self.options.quoting,  # a quoted field may span lines
        )

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows in file order, ``columns`` only (all when None), one bounded batch at a time."""
        cols = list(columns) if columns is not None else list(self.schema.names)
        try:
            if self.format == "parquet":
                yield from pq.ParquetFile(self.path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols)
                return
            if self.format == "jsonl":
                with pajson.open_json(self.path, read_options=pajson.ReadOptions(block_size=BLOCK_BYTES)) as reader:
                    for batch in reader:
                        yield batch.select(cols)
                return
            with pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(
                    block_size=BLOCK_BYTES, autogenerate_column_names=not self.options.header, use_threads=False
                ),
                parse_options=self._parse_options(),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in self.schema.names},
                    include_columns=cols,
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            ) as reader:
                yield from reader
        except (pa.ArrowException, OSError) as exc:
            raise TabularError(f"{self.path}: cannot read it as {self.format.upper()}: {exc}") from None

    def count_rows(self, column: str) -> int:
        """Rows in the file, by reading ``column`` to the end: a file that breaks mid-way fails here."""
        return sum(batch.num_rows for batch in self.batches([column]))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- writing ------------------------------------------------------------------------------
class TableWriter(Protocol):
    def write(self, batch: pa.RecordBatch) -> None: ...

    def close(self) -> None: ...


class _ArrowCsvWriter:
    def __init__(self, path: Path, schema: pa.Schema, delimiter: str) -> None:
        options = pacsv.WriteOptions(delimiter=delimiter, quoting_style="needed")
        self._writer = pacsv.CSVWriter(str(path), schema, write_options=options)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()


class _ParquetWriter:
    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(str(path), schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()


class _JsonlWriter:
    """pyarrow has no JSON writer: one object per line, in column order, UTF-8 as is."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed by close())

    def write(self, batch: pa.RecordBatch) -> None:
        self._file.writelines(
            json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in batch.to_pylist()
        )

    def close(self) -> None:
        self._file.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)  # dates, times, decimals


def open_writer(path: Path, schema: pa.Schema, fmt: Format | None = None) -> TableWriter:
    fmt = fmt or file_format(path)
    if fmt == "parquet":
        return _ParquetWriter(path, schema)
    if fmt == "jsonl":
        return _JsonlWriter(path)
    return _ArrowCsvWriter(path, schema, "\t" if fmt == "tsv" else ",")


def read_table(path: Path, options: TextOptions = TextOptions()) -> pa.Table:
    """A whole (small) file as one table: for tests and examples, not for big files."""
    reader = TableReader(path, options)
    return pa.Table.from_batches(list(reader.batches()), schema=reader.schema)
