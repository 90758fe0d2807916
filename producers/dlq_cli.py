"""`conveyor dlq`: the dead-letter queue (shared/dead_letters.py). Output is JSON."""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn

import redis
import typer

from shared import dead_letters
from shared.redis_connect import redis_client
from shared.settings import Settings

dlq_app = typer.Typer(help="Dead letters: jobs that exhausted their retries, and messages no worker could read.")

PREVIEW_CHARS = 200


def _redis() -> redis.Redis:
    try:
        return redis_client(Settings())
    except RuntimeError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _summary(letter: dead_letters.DeadLetter) -> dict[str, Any]:
    row = letter.model_dump(mode="json", exclude={"message"})
    preview = letter.message[:PREVIEW_CHARS]
    row["message_preview"] = preview + (" ..." if len(letter.message) > PREVIEW_CHARS else "")
    row["message_chars"] = len(letter.message)
    return row


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(min=1, help="Most entries to show, newest first.")] = 100) -> None:
    client = _redis()
    _print(
        {
            "count": dead_letters.count(client),
            "letters": [_summary(x) for x in dead_letters.list_letters(client, limit)],
        }
    )


@dlq_app.command("show")
def dlq_show(letter_id: str) -> None:
    letter = dead_letters.get(_redis(), letter_id)
    if letter is None:
        _fail(f"no dead letter {letter_id!r}")
    _print(json.loads(letter.to_json()))


@dlq_app.command("requeue")
def dlq_requeue(
    letter_id: Annotated[str | None, typer.Argument(help="The dead letter to requeue.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every dead letter, oldest first.")] = False,
) -> None:
    if (letter_id is None) == (not all_):
        _fail("give a dead letter's id, or --all", 2)
    client = _redis()
    if all_:
        moved = dead_letters.requeue_all(client)
        _print({"requeued": sum(moved.values()), "queues": moved, "left": dead_letters.count(client)})
        return
    assert letter_id is not None
    try:
        queue = dead_letters.requeue(client, letter_id)
    except (dead_letters.DeadLetterNotFound, dead_letters.UnreadableDeadLetter) as exc:
        _fail(str(exc))
    _print({"id": letter_id, "requeued": True, "queue": queue})


@dlq_app.command("purge")
def dlq_purge() -> None:
    _print({"purged": dead_letters.purge(_redis())})
