"""`conveyor gateway` (serve the HTTP API) and `conveyor keys add|revoke|list` (its API keys)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from shared.settings import Settings

if TYPE_CHECKING:
    from producers.gateway.keys import KeyStore

keys_app = typer.Typer(help="API keys of the HTTP gateway (Authorization: Bearer KEY).", no_args_is_help=True)


def _store() -> KeyStore:
    from producers.gateway.keys import KeyStore
    from shared.redis_connect import redis_client

    try:
        return KeyStore(redis_client(Settings()))
    except RuntimeError as exc:  # no Redis configured
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="A name for the key (letters, digits, . _ -).")],
    tenant: Annotated[str, typer.Option(help="The tenant whose jobs it submits and reads.")],
    types: Annotated[str | None, typer.Option(help="Comma-separated job types it may submit (default: all).")] = None,
    rate_per_s: Annotated[
        float | None, typer.Option(help="Its own request rate (default CONVEYOR_GATEWAY_RATE_PER_S).")
    ] = None,
    burst: Annotated[int | None, typer.Option(help="Its own burst (default CONVEYOR_GATEWAY_RATE_BURST).")] = None,
) -> None:
    """Make an API key and print it, once: only its hash is kept."""
    store = _store()
    type_list = [t.strip() for t in types.split(",") if t.strip()] if types else None
    try:
        key = store.add(name, tenant, type_list, rate_per_s, burst)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(key)
    typer.echo(f"(API key {name!r} for tenant {tenant!r}; shown only now, keep it secret)", err=True)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: gateways refuse it within a second."""
    if not _store().revoke(name):
        typer.echo(f"error: no API key named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps({"name": name, "revoked": True}))


@keys_app.command("list")
def keys_list() -> None:
    """The keys: name, tenant, job types, rate (never the keys themselves)."""
    rows = [k.model_dump(mode="json") for k in _store().list()]
    typer.echo(json.dumps(rows, indent=2))


def gateway(
    port: Annotated[int | None, typer.Option(help="Default CONVEYOR_GATEWAY_PORT.")] = None,
    address: Annotated[str | None, typer.Option(help="Default CONVEYOR_GATEWAY_ADDRESS (127.0.0.1).")] = None,
) -> None:
    """Serve the HTTP gateway: POST /v1/jobs/TYPE, GET /v1/jobs/ID and its /wait, DELETE /v1/jobs/ID; docs at /docs."""
    serve(Settings(), port, address)


def serve(settings: Settings, port: int | None = None, address: str | None = None) -> None:
    import uvicorn

    from producers.gateway.app import create_app
    from shared.log_format import configure_logging

    configure_logging("gateway", fmt=settings.log_format)  # the webhooks' deliveries and give-ups
    uvicorn.run(
        create_app(settings),
        host=address or settings.gateway_address,
        port=port or settings.gateway_port,
        limit_concurrency=settings.gateway_max_connections,
        log_config=None,  # records go through configure_logging above, in CONVEYOR_LOG_FORMAT
        log_level="warning",
        server_header=False,
        proxy_headers=False,  # the client address is the socket's, never a header's
        timeout_graceful_shutdown=5,
    )
