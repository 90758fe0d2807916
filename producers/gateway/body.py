"""Request bodies, read within a bound: the declared Content-Length is checked before a byte is
read, and the bytes are counted as they come (a chunked body, or one that lies about its length),
so an oversize body costs at most the bound and is refused (413) before anything parses it."""

from __future__ import annotations

from fastapi import HTTPException, Request


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (CONVEYOR_GATEWAY_MAX_BODY_KB)")


async def read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"Content-Length is not a number: {declared[:40]!r}") from None
        if size > limit:
            raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
