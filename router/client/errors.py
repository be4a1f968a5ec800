"""How a worker call fails, as the worker client sees it: ``WorkerError`` (a gRPC status, its
details, the worker to blame) and ``NoUsableWorker`` (no route at all).

These know nothing of HTTP: the application layer turns them into OpenAI error replies
(``router.app.errors.from_worker``).
"""

from __future__ import annotations

import grpc

# INVALID_ARGUMENT and OUT_OF_RANGE are the client's fault; the rest is ours. These may go
# away on another worker or a moment later (RESOURCE_EXHAUSTED: no KV room now; UNAVAILABLE:
# worker, peer or transfer lost; INTERNAL/UNKNOWN: a worker bug or a broken stream), so
# ``router.client.dispatch`` retries them; the others (NOT_FOUND, UNIMPLEMENTED...) would
# fail again.
BAD_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
RETRYABLE = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class WorkerError(Exception):
    """A worker call that failed, with the gRPC status it failed with and the worker it is
    charged to (``endpoint``: a decode worker whose KV never came names its prefill worker)."""

    def __init__(self, grpc_code: grpc.StatusCode, details: str, endpoint: str) -> None:
        super().__init__(f"worker {endpoint} failed: {grpc_code.name}: {details}")
        self.grpc_code = grpc_code
        self.details = details
        self.endpoint = endpoint

    @property
    def retryable(self) -> bool:
        return self.grpc_code in RETRYABLE

    @property
    def bad_input(self) -> bool:
        """The request's own fault (the worker refused it): retrying cannot help."""
        return self.grpc_code in BAD_INPUT

    def __repr__(self) -> str:
        return f"WorkerError({self.grpc_code.name}, {self.details!r}, {self.endpoint!r})"


class NoUsableWorker(Exception):
    """No worker of a needed role is healthy, closed-circuit and not draining."""

    def __init__(self, what: str) -> None:
        super().__init__(f"no usable worker: {what}")


def status_code_from_int(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of an ``Error.code`` field; UNKNOWN for values it does not know."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
