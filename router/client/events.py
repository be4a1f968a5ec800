"""What the router sends a worker and what comes back.

A ``WorkerRequest`` carries the sampling parameters as the wire's ``SamplingParams`` (the
application layer builds them from its own request types). A worker stream yields
``TokenChunk``s and ends with one ``Finished``, or raises ``WorkerError``
(``router.client.errors``).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos import common_pb2
from protos.contract import finish_from_proto
from router.client.errors import WorkerError, status_code_from_int


@dataclass(frozen=True)
class WorkerRequest:
    request_id: str  # unique per choice
    token_ids: tuple[int, ...]
    sampling: common_pb2.SamplingParams  # built once, never changed after (copy to vary it)
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


def request_to_proto(r: WorkerRequest) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=r.request_id, token_ids=list(r.token_ids), sampling=r.sampling
    )
