"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause (a malformed body, a wrong type, an unknown adapter, a full
queue, a missing API key) is an :class:`APIError` with its HTTP status; the app turns it, and
FastAPI's own validation errors, into that JSON body so the official clients raise their usual
exception classes (``BadRequestError``, ``NotFoundError``, ``RateLimitError``...).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}
        #: counted and recorded already (by the engine loop), so the app does not again
        self.recorded = False

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str) -> APIError:
    """A 400 naming the field at fault."""
    return APIError(400, message, param=param)


def from_validation(errors: list[Any]) -> APIError:
    """The first of pydantic's ``errors()`` as a 400 naming its field (``messages.0.role``)."""
    if not errors:
        return bad_request(None, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return bad_request(None, f"malformed JSON body: {err.get('msg', '')}")
    if err.get("type") == "missing":
        return bad_request(param, f"{param}: required field is missing")
    what = err.get("msg", "invalid value")
    if "input" in err and not isinstance(err["input"], (dict, list)):
        what += f" (got {err['input']!r})"
    return bad_request(param, f"{param}: {what}" if param else what)
