"""A request body over MAX_BODY_BYTES is answered 413 before anything else looks at the request: before the
token is checked and before the body is read whole, so that no one, with or without a token, can make an API
process hold a large body in memory.

Pure ASGI on purpose: BaseHTTPMiddleware would hand the app a Request whose body it buffers."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import envelope

# Far above any request of this API (a creation is a few hundred bytes), far below what hurts a process.
MAX_BODY_BYTES = 64 * 1024
MSG_BODY_TOO_LARGE = f"Request body too large (at most {MAX_BODY_BYTES} bytes)"


class BodyTooLarge(HTTPException):
    """Raised while the body streams in, once it has passed the limit. An HTTPException, so that whatever is
    reading the body (FastAPI re-raises these untouched) lets it through to the app's handler, which answers
    it in the envelope; BodyLimit answers it itself if it gets that far."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail=MSG_BODY_TOO_LARGE)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # Said up front: answer at once, without reading a byte of it.
            await envelope(413, MSG_BODY_TOO_LARGE)(scope, receive, send)
            return

        # Chunked, or a Content-Length that lies: count what actually arrives.
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            if started:
                raise
            await envelope(413, MSG_BODY_TOO_LARGE)(scope, receive, send)
