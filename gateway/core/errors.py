"""Errors as the OpenAI API shapes them, raised anywhere on the request path.

Plain exceptions: `gateway.http.errors` renders them as responses."""

from __future__ import annotations


class ApiError(Exception):
    """An error the client should see: status, message, and the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_request")
