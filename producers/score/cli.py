"""`conveyor score KIND FILE --column C --out OUT`: a whole file
through the workers, with a live bar; the same command again resumes an interrupted run."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from producers.schema_options import option_values, schema_options
from shared.errors import describe_validation_error
from shared.kinds import KINDS, KindSpec

score_app = typer.Typer(
    help="Score every row of a CSV, TSV, JSONL or Parquet file into an output file (format by extension), "
    "in the input's order, resumably. Chunks go to the bulk queues, below every interactive job.",
    no_args_is_help=True,
)

Input = Annotated[Path, typer.Argument(help="CSV, TSV, JSONL or Parquet file.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output file: .csv, .tsv, .jsonl or .parquet.")]
Keep = Annotated[str | None, typer.Option(help="Comma-separated input columns to copy (default: all).")]
Header = Annotated[bool, typer.Option(help="CSV/TSV: the first line names the columns (else f0, f1, ...).")]
Quoting = Annotated[bool, typer.Option(help='CSV/TSV: fields may be "quoted" (off: quotes are plain text).')]
ChunkSize = Annotated[int | None, typer.Option(min=1, help="Rows per job (default: from the job type and batch size).")]
InFlight = Annotated[int | None, typer.Option(min=1, help="Chunks queued or running at once.")]
Overwrite = Annotated[bool, typer.Option(help="Replace OUT if it exists (an interrupted run resumes regardless).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")]
ModelCheck = Annotated[
    bool, typer.Option(help="Look the model up in the local store (CONVEYOR_MODEL_DIR) before queueing.")
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values is not None else None


def _score(job_type: str, options: dict[str, Any], input: Path, out: Path, column: str, common: dict[str, Any]) -> None:
    from producers.client import Client
    from producers.progress import ScoreBar, summary_line
    from producers.score.kinds import scoring
    from producers.score.run import ScoreAborted, ScoreRequest, ScoreRun
    from producers.score.state import ResumeRefused
    from producers.tabular import TextOptions

    quiet = common["quiet"]
    try:
        kind = scoring(job_type)(**options)
    except ValidationError as exc:
        _fail(f"invalid {job_type} options: {describe_validation_error(exc)}", 2)
    request = ScoreRequest(
        input, out, column, _split(common["keep"]), TextOptions(common["header"], common["quoting"]),
        common["chunk_size"], common["in_flight"], common["overwrite"], common["model_check"],
    )  # fmt: skip
    try:
        client = Client()
    except RuntimeError as exc:
        _fail(str(exc))
    run = ScoreRun(client, kind, request)
    try:
        state = run.prepare()
    except (ScoreAborted, ResumeRefused) as exc:
        _fail(str(exc), 2)
    if state.resumed and not quiet:
        typer.echo(f"resuming: {state.rows_done:,} of {state.manifest.rows:,} rows already done", err=True)
    try:
        if quiet:
            summary = run.run()
        else:
            with ScoreBar(f"{job_type} {input.name}") as bar:
                summary = run.run(bar.update)
    except KeyboardInterrupt:
        _fail(f"interrupted; what finished is kept in {state.dir}: run the same command again to resume", 130)
    except ScoreAborted as exc:
        _fail(f"{exc}; what finished is kept in {state.dir}")
    finally:
        client.close()
    if not quiet:
        typer.echo(summary_line(summary), err=True)


def _common(
    keep: str | None, header: bool, quoting: bool, chunk_size: int | None, in_flight: int | None,
    overwrite: bool, quiet: bool, model_check: bool,
) -> dict[str, Any]:  # fmt: skip
    return {"keep": keep, "header": header, "quoting": quoting, "chunk_size": chunk_size, "in_flight": in_flight,
            "overwrite": overwrite, "quiet": quiet, "model_check": model_check}  # fmt: skip


@score_app.command("classify")
def score_classify(
    input: Input,
    out: Out,
    column: Annotated[str, typer.Option(help="The column holding the text.")] = "text",
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels for zero-shot classification.")] = None,
    model: Annotated[str | None, typer.Option(help="A trained classifier in the store: NAME or NAME@N.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the best k labels in the ranking.")] = None,
    label_template: Annotated[
        str | None, typer.Option(help="Zero-shot: the sentence a label is put in, {} for it.")
    ] = None,
    keep: Keep = None,
    header: Header = True,
    quoting: Quoting = True,
    chunk_size: ChunkSize = None,
    in_flight: InFlight = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    model_check: ModelCheck = True,
) -> None:
    """Adds label, score and ranking (JSON, best first) and error to every row."""
    options = {"labels": _split(labels), "model": model, "top_k": top_k, "label_template": label_template}
    _score("classify", options, input, out, column,
           _common(keep, header, quoting, chunk_size, in_flight, overwrite, quiet, model_check))  # fmt: skip


@score_app.command("transcribe")
def score_transcribe(
    input: Input,
    out: Out,
    column: Annotated[str, typer.Option(help="The column holding audio paths the workers can read.")] = "path",
    model: Annotated[str, typer.Option(help="A Whisper model in the store.")] = "whisper-tiny.en",
    language: Annotated[str | None, typer.Option(help="Spoken language (multilingual models).")] = None,
    beam_size: Annotated[int, typer.Option(help="1 is greedy.")] = 1,
    keep: Keep = None,
    header: Header = True,
    quoting: Quoting = True,
    chunk_size: ChunkSize = None,
    in_flight: InFlight = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    model_check: ModelCheck = True,
) -> None:
    """Adds text and error to every row: one job per audio file."""
    options = {"model": model, "language": language, "beam_size": beam_size}
    _score("transcribe", options, input, out, column,
           _common(keep, header, quoting, chunk_size, in_flight, overwrite, quiet, model_check))  # fmt: skip


@score_app.command("recommend")
def score_recommend(
    input: Input,
    out: Out,
    model: Annotated[str, typer.Option(help="A recommender in the store: NAME or NAME@N.")],
    column: Annotated[str, typer.Option(help="The column holding user ids.")] = "user_id",
    k: Annotated[int, typer.Option(help="Items per user.")] = 10,
    include_seen: Annotated[bool, typer.Option(help="Keep items the user already interacted with.")] = False,
    keep: Keep = None,
    header: Header = True,
    quoting: Quoting = True,
    chunk_size: ChunkSize = None,
    in_flight: InFlight = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    model_check: ModelCheck = True,
) -> None:
    """Adds items (JSON, best first), fallback (unknown user: popular items) and error to every row."""
    options = {"model": model, "k": k, "exclude_seen": not include_seen}
    _score("recommend", options, input, out, column,
           _common(keep, header, quoting, chunk_size, in_flight, overwrite, quiet, model_check))  # fmt: skip


def generated_score(spec: KindSpec) -> Any:
    """`conveyor score NAME` for a kind that declares ``score_columns``: the job's other fields are
    options (producers/schema_options.py), each row one entry of its ``items`` field."""
    assert spec.items is not None
    params, how = schema_options(spec, skip=(spec.items,))
    row = spec.items[:-1] if spec.items.endswith("s") else spec.items
    fixed = [
        inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Input),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Out),
        inspect.Parameter(
            "column", inspect.Parameter.KEYWORD_ONLY, default=row,
            annotation=Annotated[str, typer.Option(help=f"The column holding each {row}.")],
        ),
    ]  # fmt: skip
    common = [
        ("keep", Keep, None), ("header", Header, True), ("quoting", Quoting, True), ("chunk_size", ChunkSize, None),
        ("in_flight", InFlight, None), ("overwrite", Overwrite, False), ("quiet", Quiet, False),
        ("model_check", ModelCheck, True),
    ]  # fmt: skip
    tail = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in common]

    def command(**values: Any) -> None:
        input, out, column = values.pop("input"), values.pop("out"), values.pop("column")
        shared = {name: values.pop(name) for name, _, _ in common}
        try:
            options = option_values(values, how)
        except ValueError as exc:
            _fail(str(exc), 2)
        _score(spec.name, options, input, out, column, shared)

    command.__signature__ = inspect.Signature([*fixed, *params, *tail])  # type: ignore[attr-defined]
    columns = ", ".join(c.name for c in spec.score_columns)
    command.__doc__ = f"Adds {columns} and error to every row: {spec.summary}"
    command.__name__ = f"score_{spec.name.replace('-', '_')}"
    return command


def _add_generated_scores() -> None:
    have = {c.name for c in score_app.registered_commands}
    for name, spec in KINDS.items():
        if name not in have and spec.score_columns and spec.scoring is None:
            score_app.command(name)(generated_score(spec))


_add_generated_scores()
