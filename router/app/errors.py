"""The one error type the router answers with, in OpenAI's error-body shape.

Every failure a client can see, from a malformed body to a worker that went away, becomes a
``RequestError``: an HTTP status plus ``{"error": {"message", "type", "param", "code"}}``
(the worker client's own errors through ``from_worker``). Type errors in the body are 400,
like OpenAI's own API (never 422).
"""

from __future__ import annotations

from typing import Any

import grpc

from router.brief import short
from router.client.errors import BAD_INPUT, NoUsableWorker, WorkerError

# OpenAI's error "type" per status; anything else 4xx is an invalid request.
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class RequestError(Exception):
    """A request that ends in an HTTP error; ``body()`` is what the client receives."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        if not 400 <= status < 600:
            raise ValueError(f"RequestError status must be 4xx or 5xx, got {status}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return _TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.message!r}, param={self.param!r})"


def http_status_for(code: grpc.StatusCode) -> int:
    """400 for bad input, 503 for everything else: a worker never turns into a 500."""
    return 400 if code in BAD_INPUT else 503


def from_worker(exc: WorkerError | NoUsableWorker) -> RequestError:
    """The HTTP reply for a worker client's failure: a worker's refusal of bad input is a 400
    with its message; no KV room a 503 that says so; anything else a 503 naming the worker
    (``no_worker_available`` when no route existed at all)."""
    if isinstance(exc, NoUsableWorker):
        return RequestError(503, str(exc), None, "no_worker_available")
    status = http_status_for(exc.grpc_code)
    if status == 400:
        return RequestError(400, exc.details, None, "invalid_request")
    if exc.grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the server is out of KV cache capacity right now; retry later ({exc.details})"
        return RequestError(503, message, None, "resource_exhausted")
    return RequestError(503, str(exc), None, "worker_unavailable")


def invalid(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    """A 400: the request is malformed or asks for something out of range."""
    return RequestError(400, message, param, code)


def unsupported(param: str, value: Any, allowed: str) -> RequestError:
    """A 400 for an OpenAI parameter pdserve accepts only at its default."""
    return RequestError(
        400,
        f"{param}={short(value)} is not supported; only {allowed} is",
        param,
        "unsupported_value",
    )


__all__ = ["RequestError", "from_worker", "http_status_for", "invalid", "short", "unsupported"]
