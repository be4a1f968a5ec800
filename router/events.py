"""What the router sends a worker and what comes back, free of protobuf types.

A worker stream yields ``TokenChunk``s and ends with one ``Finished``, or raises
``WorkerError``: a ``RequestError`` whose HTTP status comes from the gRPC status
(``http_status_for``). Workers never turn into a 500: everything but bad input is a 503.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos import common_pb2
from protos.contract import finish_from_proto
from router.errors import RequestError
from router.protocol import Sampling


@dataclass(frozen=True)
class WorkerRequest:
    request_id: str  # unique per choice
    token_ids: tuple[int, ...]
    sampling: Sampling  # max_tokens resolved (not None)
    stream: bool = True  # tokens as produced; False: all with the last message
    stream_interval: int = 1  # streamed: the worker sends tokens every this many


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the best alternatives, ``(token_id, logprob)``."""

    logprob: float
    top: tuple[tuple[int, float], ...]


# The events and deltas made per token batch are slotted, not frozen: a frozen dataclass
# costs about 1 µs more to build, several times per request. Nothing mutates them.
@dataclass(slots=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]  # parallel to token_ids when asked for, else empty


@dataclass(slots=True)
class Finished:
    reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


WorkerEvent = TokenChunk | Finished

# INVALID_ARGUMENT and OUT_OF_RANGE are the client's fault; the rest is ours. These may go
# away on another worker or a moment later (RESOURCE_EXHAUSTED: no KV room now; UNAVAILABLE:
# worker, peer or transfer lost; INTERNAL/UNKNOWN: a worker bug or a broken stream), so
# ``router.resilience`` retries them; the others (NOT_FOUND, UNIMPLEMENTED...) would fail again.
_CLIENT_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class WorkerError(RequestError):
    """A worker call that failed, with the gRPC status it failed with."""

    def __init__(self, grpc_code: grpc.StatusCode, details: str, endpoint: str) -> None:
        status = http_status_for(grpc_code)
        if status == 400:
            message = details
            code = "invalid_request"
        elif grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            message = f"the server is out of KV cache capacity right now; retry later ({details})"
            code = "resource_exhausted"
        else:
            message = f"worker {endpoint} failed: {grpc_code.name}: {details}"
            code = "worker_unavailable"
        super().__init__(status, message, None, code)
        self.grpc_code = grpc_code
        self.details = details
        self.endpoint = endpoint

    @property
    def retryable(self) -> bool:
        return self.grpc_code in _RETRYABLE


def http_status_for(code: grpc.StatusCode) -> int:
    """400 for bad input, 503 for everything else (never 500)."""
    return 400 if code in _CLIENT_ERRORS else 503


def status_code_from_int(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of an ``Error.code`` field; UNKNOWN for values it does not know."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def event_from_proto(msg: common_pb2.GenerateResponse, endpoint: str) -> WorkerEvent:
    """One stream message as an event; an ``error`` message raises ``WorkerError``."""
    kind = msg.WhichOneof("response")
    if kind == "chunk":
        chunk = msg.chunk
        # Most requests ask for no logprobs: skip building an empty generator per chunk.
        logprobs = chunk.logprobs
        return TokenChunk(
            token_ids=tuple(chunk.token_ids),
            logprobs=tuple(
                TokenLogprob(lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                for lp in logprobs
            )
            if logprobs
            else (),
        )
    if kind == "complete":
        c = msg.complete
        return Finished(
            reason=finish_from_proto(c.finish_reason),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
        )
    if kind == "error":
        # A decode worker whose prefill worker never delivered names it: the failure is
        # charged to that worker (its circuit, the retry's `avoid`), not to the messenger.
        err = msg.error
        raise WorkerError(status_code_from_int(err.code), err.message, err.peer or endpoint)
    raise WorkerError(grpc.StatusCode.INTERNAL, "empty GenerateResponse", endpoint)


def sampling_to_proto(s: Sampling) -> common_pb2.SamplingParams:
    if s.max_tokens is None:
        raise ValueError("max_tokens must be resolved before a request goes to a worker")
    msg = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        max_new_tokens=s.max_tokens,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    if s.seed is not None:
        msg.seed = s.seed
    c = s.constraint
    if c is not None:
        if c.kind == "json_object":
            msg.json_object = True
        else:
            setattr(msg, c.kind, c.spec)
    if s.resumed_output_tokens:
        msg.resumed_output_tokens = s.resumed_output_tokens
    return msg


def request_to_proto(r: WorkerRequest) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=r.request_id, token_ids=list(r.token_ids), sampling=sampling_to_proto(r.sampling)
    )
