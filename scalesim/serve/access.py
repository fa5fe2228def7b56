"""One access-log line per HTTP request.

:class:`AccessLog` is an ASGI middleware (a plain one: Starlette's ``BaseHTTPMiddleware`` would
wrap streaming responses and hide client disconnects from the handlers). As the last byte of a
response is sent (or when the app fails, or the client leaves, before that) it logs to the
``scalesim.serve.access`` logger at INFO::

    127.0.0.1:50412 "POST /v1/chat/completions" 200 0.412s agent=sys-1a2b3c request=17

with the agent and request id the server took the request for (its ``x-scalesim-*`` response
headers; ``-`` when there are none, as for a refused request). ``python -m scalesim.serve``
shows these lines on stderr; uvicorn's own access log stays off.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable
from urllib.parse import unquote

log = logging.getLogger("scalesim.serve.access")

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


class AccessLog:
    """Wraps an ASGI app (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # what is logged if the app fails before it answers
        status, headers = 500, dict[str, str]()
        logged = False

        def line() -> None:
            nonlocal logged
            logged = True
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            log.info('%s "%s %s" %d %.3fs agent=%s request=%s', where, scope["method"],
                     scope["path"], status, time.perf_counter() - start,
                     unquote(headers.get("x-scalesim-agent", "-")),
                     headers.get("x-request-id", "-"))

        async def logged_send(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                           for k, v in message.get("headers", ())}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                line()  # before the last byte leaves: the client never sees an unlogged reply
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            if not logged:  # the app failed, or the client left, before the response ended
                line()
