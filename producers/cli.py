"""The `conveyor` command: run the stack, submit jobs, follow them. Results print as JSON."""

from __future__ import annotations

import base64
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from producers.cli_errors import ConveyorGroup, preflight
from producers.dlq_cli import dlq_app
from producers.gateway.cli import gateway, keys_app
from producers.models.cli import models_app
from producers.schema_options import option_values, schema_options
from producers.score.cli import score_app
from producers.tenancy.cli import users_app
from shared.errors import ConveyorError, describe_validation_error
from shared.jobs import ClassifyJob, FineTuneJob, JobBase, RecommendJob, TrainJob, TranscribeJob
from shared.kinds import JOB_MODELS, KINDS, KindSpec
from shared.settings import Settings

# ConveyorGroup (producers/cli_errors.py): infrastructure failures in two lines for every command.
app = typer.Typer(
    cls=ConveyorGroup,
    help="Conveyor: asynchronous inference and batch jobs over Redis and Celery.",
    no_args_is_help=True,
)
submit_app = typer.Typer(help="Submit a job; prints its id, or its result with --wait.", no_args_is_help=True)
app.add_typer(submit_app, name="submit")
app.add_typer(models_app, name="models")
app.add_typer(score_app, name="score")
app.add_typer(dlq_app, name="dlq")
app.add_typer(keys_app, name="keys")
app.command()(gateway)
app.add_typer(users_app, name="users")

Wait = Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")]
Debug = Annotated[
    bool, typer.Option("--debug", help="With an infrastructure error, show its traceback too (or CONVEYOR_DEBUG=1).")
]
Timeout = Annotated[float, typer.Option(help="Seconds to wait with --wait.")]


@app.callback()
def _global_options(debug: Debug = False) -> None:
    """Options for every command (read by ConveyorGroup)."""


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# The result backend's reconnect policy for the CLI: give up after ~2 s (Celery's default retries
# 20 times a second apart), so a Redis lost mid-wait is named within seconds (producers/cli_errors.py).
CLI_BACKEND_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def _client() -> Any:
    from producers.client import Client

    try:
        client = Client()
    except RuntimeError as exc:
        _fail(str(exc))
    options = dict(client.app.conf.result_backend_transport_options or {})
    client.app.conf.result_backend_transport_options = {**options, "retry_policy": CLI_BACKEND_RETRY}
    return client


def _submit(job_type: str, fields: dict[str, Any], wait: bool, timeout: float) -> None:
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        job = JOB_MODELS[job_type].model_validate({"type": job_type, **fields})
    except ValidationError as exc:
        _fail(f"invalid {job_type} job: {describe_validation_error(exc)}", 2)
    client = _client()
    try:
        handle = client.submit(job)
    except ConveyorError as exc:  # refused at submit: IdempotencyConflict, DuplicateJob, QueueFull
        _fail(f"{type(exc).__name__}: {exc}", 4)
    if not wait:
        _print_json({"id": handle.id, "type": job_type})
        return
    if job_type in ("train", "fine-tune"):
        from producers.progress import follow_long_job

        follow_long_job(handle, timeout)  # a live bar from the job's PROGRESS state, on stderr
    _print_result(handle, timeout)


def _print_result(handle: Any, timeout: float) -> None:
    from celery.exceptions import TimeoutError as CeleryTimeout  # AsyncResult.get's: not a builtin TimeoutError

    try:
        _print_json(handle.result_json(timeout=timeout))
    except ConveyorError as exc:
        _fail(str(exc))
    except (TimeoutError, CeleryTimeout):
        preflight()  # Celery's backend waits through a lost connection: say so, rather than "no result"
        _fail(f"job {handle.id} has no result after {timeout:.0f}s; state {handle.status().state}", 3)


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values else None


# -- submit -------------------------------------------------------------------------------
# Every job option defaults to None and is sent only when given: the job schema (shared/jobs.py)
# stays the one home of defaults, some of which depend on other fields (ALS's regularization).
def _opt(job: type[JobBase], field: str, text: str | None = None, *flags: str) -> Any:
    """A typer option for a job field: its help from the schema, with the schema's default."""
    info = job.model_fields[field]
    help_text = text or info.description or field.replace("_", " ")
    default = None if info.is_required() else info.get_default(call_default_factory=False)
    if default is not None and "Unset:" not in help_text:
        help_text = f"{help_text} (default: {default})"
    return typer.Option(*flags, help=help_text)


JobPriority = Annotated[int | None, typer.Option(min=0, max=9, help="0 lowest to 9 most urgent (default: 5).")]


@submit_app.command("classify")
def submit_classify(
    text: Annotated[list[str], typer.Option("--text", "-t", help="A text to classify; repeat for many.")],
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels for zero-shot classification.")] = None,
    model: Annotated[str | None, typer.Option(help="A trained classifier in the store: NAME[@N].")] = None,
    top_k: Annotated[int | None, _opt(ClassifyJob, "top_k")] = None,
    label_template: Annotated[str | None, _opt(ClassifyJob, "label_template")] = None,
    priority: JobPriority = None,
    wait: Wait = False,
    timeout: Timeout = 120.0,
) -> None:
    """Classify texts, zero-shot against --labels or with a trained --model."""
    fields = {
        "texts": text, "labels": _split(labels), "model": model, "top_k": top_k, "label_template": label_template,
        "priority": priority,
    }  # fmt: skip
    _submit("classify", fields, wait, timeout)


@submit_app.command("transcribe")
def submit_transcribe(
    audio: Annotated[Path, typer.Option(help="A WAV, FLAC or OGG file.")],
    inline: Annotated[bool, typer.Option(help="Send the bytes in the job instead of the path.")] = True,
    model: Annotated[str | None, _opt(TranscribeJob, "model")] = None,
    language: Annotated[str | None, _opt(TranscribeJob, "language")] = None,
    beam_size: Annotated[int | None, _opt(TranscribeJob, "beam_size")] = None,
    max_new_tokens: Annotated[int | None, _opt(TranscribeJob, "max_new_tokens")] = None,
    timestamps: Annotated[bool | None, _opt(TranscribeJob, "timestamps", None, "--timestamps/--no-timestamps")] = None,
    priority: JobPriority = None,
    wait: Wait = False,
    timeout: Timeout = 300.0,
) -> None:
    """Transcribe speech. By default the audio travels inline, so the worker needs no shared disk."""
    if not audio.is_file():
        _fail(f"{audio}: no such file", 2)
    source: dict[str, Any] = (
        {"audio_b64": base64.b64encode(audio.read_bytes()).decode()}
        if inline
        else {"audio_path": str(audio.resolve())}
    )
    fields = {
        **source, "model": model, "language": language, "beam_size": beam_size, "max_new_tokens": max_new_tokens,
        "timestamps": timestamps, "priority": priority,
    }  # fmt: skip
    _submit("transcribe", fields, wait, timeout)


@submit_app.command("recommend")
def submit_recommend(
    user: Annotated[list[str], typer.Option("--user", "-u", help="A user id; repeat for many.")],
    model: Annotated[str, typer.Option(help="A recommender in the store: NAME[@N].")],
    k: Annotated[int | None, _opt(RecommendJob, "k")] = None,
    include_seen: Annotated[
        bool | None,
        typer.Option("--include-seen/--exclude-seen", help="Keep the items a user already interacted with "
                     "(default: left out)."),
    ] = None,  # fmt: skip
    candidates: Annotated[str | None, typer.Option(help="Comma-separated item ids to rank.")] = None,
    priority: JobPriority = None,
    wait: Wait = False,
    timeout: Timeout = 120.0,
) -> None:
    """Top-k items for users from a trained recommender."""
    fields = {
        "users": user, "model": model, "k": k, "exclude_seen": None if include_seen is None else not include_seen,
        "candidates": _split(candidates), "priority": priority,
    }  # fmt: skip
    _submit("recommend", fields, wait, timeout)


@submit_app.command("train")
def submit_train(
    interactions: Annotated[Path, typer.Option(help="CSV/TSV/JSONL with user and item columns (worker path).")],
    output: Annotated[str, typer.Option(help="Name to register the model under.")],
    model_type: Annotated[str | None, _opt(TrainJob, "model_type", "bpr or als.")] = None,
    factors: Annotated[int | None, _opt(TrainJob, "factors", "Latent factors.")] = None,
    epochs: Annotated[int | None, _opt(TrainJob, "epochs", "Passes over the data.")] = None,
    regularization: Annotated[float | None, _opt(TrainJob, "regularization")] = None,
    learning_rate: Annotated[float | None, _opt(TrainJob, "learning_rate")] = None,
    batch_size: Annotated[int | None, _opt(TrainJob, "batch_size")] = None,
    holdout: Annotated[int | None, _opt(TrainJob, "holdout")] = None,
    seed: Annotated[int | None, _opt(TrainJob, "seed", "Random seed.")] = None,
    wait: Wait = False,
    timeout: Timeout = 3600.0,
) -> None:
    """Train a recommender; the model lands in the store as OUTPUT@N."""
    fields = {
        "interactions_path": str(interactions.resolve()), "output_name": output, "model_type": model_type,
        "factors": factors, "epochs": epochs, "regularization": regularization, "learning_rate": learning_rate,
        "batch_size": batch_size, "holdout": holdout, "seed": seed,
    }  # fmt: skip
    _submit("train", fields, wait, timeout)


@submit_app.command("fine-tune")
def submit_fine_tune(
    data: Annotated[Path, typer.Option(help="CSV or JSONL with text and label columns (worker path).")],
    output: Annotated[str, typer.Option(help="Name to register the classifier under.")],
    base_model: Annotated[str | None, _opt(FineTuneJob, "base_model", "The model to start from.")] = None,
    text_column: Annotated[str | None, _opt(FineTuneJob, "text_column", "Column with the text.")] = None,
    label_column: Annotated[str | None, _opt(FineTuneJob, "label_column", "Column with the label.")] = None,
    epochs: Annotated[int | None, _opt(FineTuneJob, "epochs", "Passes over the data.")] = None,
    learning_rate: Annotated[float | None, _opt(FineTuneJob, "learning_rate", "Learning rate.")] = None,
    batch_size: Annotated[int | None, _opt(FineTuneJob, "batch_size", "Examples per step.")] = None,
    max_length: Annotated[int | None, _opt(FineTuneJob, "max_length", "Tokens kept per text.")] = None,
    validation_split: Annotated[float | None, _opt(FineTuneJob, "validation_split", "Share held out.")] = None,
    seed: Annotated[int | None, _opt(FineTuneJob, "seed", "Random seed.")] = None,
    wait: Wait = False,
    timeout: Timeout = 3600.0,
) -> None:
    """Fine-tune a text classifier; classify can use OUTPUT by name as soon as it finishes."""
    fields = {
        "data_path": str(data.resolve()), "output_name": output, "base_model": base_model,
        "text_column": text_column, "label_column": label_column, "epochs": epochs,
        "learning_rate": learning_rate, "batch_size": batch_size, "max_length": max_length,
        "validation_split": validation_split, "seed": seed,
    }  # fmt: skip
    _submit("fine-tune", fields, wait, timeout)


# -- submit commands generated from a kind's schema (every kind without a command above) -------
def generated_submit(spec: KindSpec) -> Any:
    """`conveyor submit NAME` for a kind, from its job schema (producers/schema_options.py): only
    the options given are sent, and the schema validates the job as a whole."""
    params, how = schema_options(spec)
    params.append(inspect.Parameter("wait", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Wait))
    params.append(inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=300.0, annotation=Timeout))

    def command(**values: Any) -> None:
        wait, timeout = values.pop("wait"), values.pop("timeout")
        try:
            fields = option_values(values, how)
        except ValueError as exc:
            _fail(str(exc), 2)
        _submit(spec.name, fields, wait, timeout)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = spec.summary
    command.__name__ = f"submit_{spec.name.replace('-', '_')}"
    return command


def _add_generated_submits() -> None:
    have = {c.name for c in submit_app.registered_commands}
    for name, spec in KINDS.items():
        if name not in have:
            submit_app.command(name)(generated_submit(spec))


@submit_app.command("json")
def submit_json(
    file: Annotated[str, typer.Argument(help="A JSON job (with its 'type'), or - for standard input.")],
    wait: Wait = False,
    timeout: Timeout = 600.0,
) -> None:
    """Submit a job written as JSON, as producers in other languages would build it."""
    raw = sys.stdin.read() if file == "-" else Path(file).read_text()
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("type") not in JOB_MODELS:
        _fail(f"the job needs a 'type' among {', '.join(JOB_MODELS)}", 2)
    _submit(str(data.pop("type")), data, wait, timeout)


# -- following jobs -------------------------------------------------------------------------
@app.command()
def result(
    job_id: str,
    wait: Wait = False,
    timeout: Timeout = 120.0,
) -> None:
    """Print a job's result (JSON); without --wait, its state if it has none yet."""
    handle = _client().job(job_id)
    if not wait and not handle.status().done:
        _print_json({"id": job_id, "state": handle.status().state})
        raise typer.Exit(3)
    _print_result(handle, timeout)


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; none: workers, queues and jobs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON (the default when output is not a terminal).")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C, with rates.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    inspect: Annotated[
        bool, typer.Option("--inspect", help="Also ask the workers over Celery (a broadcast: a second or more).")
    ] = False,
) -> None:
    """A job's state and progress; or, from Redis alone, the workers (device, models, batches/s,
    heartbeat), the queues (length, oldest job, priorities), dead letters and per kind the jobs,
    batch sizes and p50/p95 latencies. A view in a terminal, JSON otherwise (producers/status/)."""
    if job_id:
        st = _client().job(job_id).status()
        _print_json(
            {"id": st.id, "state": st.state, "progress": st.progress.model_dump() if st.progress else None,
             "error": st.error}  # fmt: skip
        )
        return
    from producers.status.command import run
    from shared.redis_connect import redis_client

    settings = Settings()  # Redis alone: no Celery app unless --inspect asks for its broadcast
    run(redis_client(settings), settings, as_json=as_json, watch=watch, interval=interval,
        inspect=_client().workers if inspect else None)  # fmt: skip


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: a queued one never runs, a training job stops within seconds."""
    _client().cancel(job_id)
    _print_json({"id": job_id, "cancelled": True})


# -- running the stack ----------------------------------------------------------------------
Devices = Annotated[
    str | None, typer.Option(help="auto, cpu, or GPU indices like 0,1. Default: CONVEYOR_DEVICES (auto).")
]


@app.command()
def up(
    devices: Devices = None,
    flower: Annotated[bool, typer.Option(help="Start Flower too.")] = True,
    detach: Annotated[bool, typer.Option(help="Run in the background; `conveyor down` stops it.")] = False,
) -> None:
    """Redis (embedded unless CONVEYOR_REDIS_URL is set), workers and Flower. Ctrl-C stops all."""
    from producers.stack import FLOWER_PASSWORD_FILE, LOG_FILE, Stack, flower_login, log_dir, start_detached

    settings = Settings()
    try:
        if detach:
            state = start_detached(settings, devices, flower)
            flower_url, metrics_url, gateway_url = state.flower_url, state.metrics_url, state.gateway_url
            typer.echo(
                f"conveyor is up in the background (pid {state.pid}); its console in {settings.home / LOG_FILE}, "
                f"one log file per process in {log_dir(settings)}"
            )
        else:
            stack = Stack(settings, devices, flower)
            stack.start()
            flower_url, metrics_url, gateway_url = stack.flower_url, stack.metrics_url, stack.gateway_url
            for note in stack.notes:
                typer.echo(note, err=True)
            typer.echo("conveyor is up: Redis, workers" + (" and Flower" if flower_url else "") + ". Ctrl-C stops all.")
            typer.echo(f"logs: one file per process in {log_dir(settings)}")
    except RuntimeError as exc:
        _fail(str(exc))
    from producers.models.preparing import missing_line

    if (unprepared := missing_line(settings)) is not None:
        typer.echo(unprepared, err=True)
    if flower_url:
        user, password = flower_login(settings)
        # The password goes to a terminal, never into a log file.
        shown = password if sys.stdout.isatty() else f"(password in {settings.home / FLOWER_PASSWORD_FILE})"
        typer.echo(f"Flower: {flower_url}  login {user} / {shown}", color=False)
    if metrics_url:
        typer.echo(f"Prometheus metrics: {metrics_url}  (Flower's login)", color=False)
    if gateway_url:
        typer.echo(f"HTTP gateway: {gateway_url}  (docs at {gateway_url}docs; keys: conveyor keys add NAME --tenant T)")
    sys.stdout.flush()
    if not detach:
        raise typer.Exit(stack.wait())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exporter(ctx: typer.Context) -> None:
    """Serve Conveyor's Prometheus metrics (queues, jobs, batches, workers); `conveyor up` starts it.
    Options: --address, --port (default CONVEYOR_METRICS_ADDRESS, CONVEYOR_METRICS_PORT)."""
    from producers.exporter import main as exporter_main

    raise typer.Exit(exporter_main(ctx.args))


@app.command()
def down() -> None:
    """Stop the `conveyor up` of this CONVEYOR_HOME, and a Redis an `up` killed hard left behind."""
    from producers.stack import stop_detached

    stopped = stop_detached(Settings())
    typer.echo("stopped " + "; ".join(stopped) if stopped else "nothing to stop")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context, devices: Devices = None) -> None:
    """Start workers: one per GPU (or one on the CPU), each pinned to its device."""
    cmd = [sys.executable, "-m", "workers.launch", "--devices", devices or Settings().devices, *ctx.args]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)  # the launcher takes this process's place: signals reach it directly


@app.command()
def demo(
    timeout: Timeout = 600.0,
    kind: Annotated[list[str] | None, typer.Option(help="Only this job type (repeatable).")] = None,
) -> None:
    """Run one job of every job type that a live worker serves, and print the results. Built-in
    models it needs and the store lacks are built first (`conveyor models prepare`)."""
    from producers.demo import demo_types, run_demo

    unknown = sorted(set(kind or ()) - demo_types())
    if unknown:
        _fail(f"no demo job of type {', '.join(unknown)}; one of {', '.join(sorted(demo_types()))}", 2)
    raise typer.Exit(run_demo(_client(), Settings(), timeout, set(kind) if kind else None))


@app.command()
def schema(job_type: Annotated[str | None, typer.Argument(help="classify, transcribe, ...")] = None) -> None:
    """Print the JSON Schema of a job type (or of all), for producers in other languages."""
    if job_type is None:
        _print_json({name: model.model_json_schema() for name, model in JOB_MODELS.items()})
        return
    if job_type not in JOB_MODELS:
        _fail(f"unknown job type {job_type!r}; one of {', '.join(JOB_MODELS)}", 2)
    _print_json(JOB_MODELS[job_type].model_json_schema())


_add_generated_submits()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":
    main()
