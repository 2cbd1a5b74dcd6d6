"""API errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from typing import Optional

# OpenAI's error types, by what went wrong.
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error answered to the client: its HTTP status, OpenAI error body and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = INVALID_REQUEST,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body: OpenAI's error object."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = INVALID_REQUEST, param: Optional[str] = None, code=None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400: the request is invalid; `param` names the field at fault."""
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    """A 503 with Retry-After: the server cannot take the request now, but may later."""
    return APIError(
        503, message, type=SERVER_ERROR, code="server_overloaded", headers={"Retry-After": str(retry_after_s)}
    )
