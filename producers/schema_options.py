"""Command-line options made from a job kind's schema: one option per job field, its help and
default from the field's description, lists repeated, files read as the kind's ``CliOption``
says. `conveyor submit NAME` and `conveyor score NAME` build their commands with these for
every kind that has no hand-written command."""

from __future__ import annotations

import base64
import inspect
import json
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.kinds import CliOption, KindSpec

# Envelope fields a command leaves to the schema's defaults (id, timestamps, version).
ENVELOPE_FIELDS = ("id", "type", "schema_version", "submitted_at")


def _option_type(annotation: Any, option: CliOption) -> tuple[Any, str]:
    """The option's type for typer, and how its value becomes the field's."""
    if option.file is not None:  # a repeated option where the field is a list
        listed = any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))
        return (list[Path] if listed else Path), option.file
    base = annotation
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(base) if a is not type(None)]
        if len(args) != 1:
            return str, "json"
        base = args[0]
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is list:
        return (str, "split") if option.split else (list[str], "list")
    if base is bool:
        return bool, "bool"
    if base in (int, float):
        return base, "plain"
    if base is str or typing.get_origin(base) is typing.Literal:
        return str, "plain"
    return str, "json"  # anything else (an object): given as JSON


def schema_options(spec: KindSpec, skip: Iterable[str] = ()) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """Keyword parameters (typer options, each defaulting to None: only what is given is sent)
    for the kind's job fields, and how to convert each value (``option_values``)."""
    params: list[inspect.Parameter] = []
    how: dict[str, str] = {}
    leave_out = {*ENVELOPE_FIELDS, *spec.cli_skip, *skip}
    for name, info in spec.job.model_fields.items():
        if name in leave_out:
            continue
        option = spec.cli.get(name, CliOption())
        flag = option.flag or "--" + name.replace("_", "-")
        kind, how[name] = _option_type(info.annotation, option)
        if option.file is not None and option.key:
            how[name] += ":" + option.key  # each file is sent as {key: value}
        text = info.description or name.replace("_", " ")
        default = None if info.is_required() else info.get_default(call_default_factory=False)
        if info.is_required():
            text += " (required)"
        elif default is not None:
            text += f" (default: {default})"
        decls = [f"{flag}/--no-{flag[2:]}"] if how[name] == "bool" else [flag]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[kind | None, typer.Option(*decls, help=text)],
            )
        )  # fmt: skip
    return params, how


def option_values(values: dict[str, Any], how: dict[str, str]) -> dict[str, Any]:
    """The job fields from the options given (None: not given); ValueError says what is wrong."""
    return {name: _convert(value, how[name]) for name, value in values.items() if value is not None}


def _convert(value: Any, how: str) -> Any:
    how, _, key = how.partition(":")
    if how in ("base64", "path") and isinstance(value, list):
        return [_convert(v, f"{how}:{key}" if key else how) for v in value]
    if how == "base64":
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        sent = base64.b64encode(path.read_bytes()).decode()
        return {key: sent} if key else sent
    if how == "path":
        sent = str(Path(value).resolve())
        return {key: sent} if key else sent
    if how == "split":
        return [v.strip() for v in str(value).split(",") if v.strip()]
    if how == "json":
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not JSON: {exc}") from None
    return value
