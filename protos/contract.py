"""What the router and the workers agree on besides the messages themselves: the worker
roles, the gRPC service names, the session methods (their paths and frame types, seen from
either end) and the finish reasons.

Written once here, next to the generated messages, and imported by both sides: it imports
nothing but ``protos``, so the router may use it (DESIGN.md: the router knows only
``protos``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

# --disaggregation-mode, GetInfo's ``role`` and a registry record's ``role``.
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_COLOCATED = "null"  # one worker does both phases
ROLES = (ROLE_PREFILL, ROLE_DECODE, ROLE_COLOCATED)

PREFILL_SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
DECODE_SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name

Submit = TypeVar("Submit")  # what a request frame submits: DecodeRequest, PrefillRequest
Reply = TypeVar("Reply")  # what comes back per request: GenerateResponse, PrefillReply


def _request_id(submit: Any) -> str:
    return str(submit.request.request_id)  # DecodeRequest and PrefillRequest alike


@dataclass(frozen=True)
class SessionMethod(Generic[Submit, Reply]):
    """One session method: a bidirectional stream that carries many requests, frames batched.
    The router writes request frames (requests submitted, request ids aborted) and reads reply
    frames; a worker reads the one and writes the other."""

    service: str  # the gRPC service, as grpc.health.v1 names it
    path: str  # the gRPC method
    request_frame: Callable[..., Any]  # (submit=[...], abort=[...]) -> a request frame
    parse_request: Callable[[bytes], Any]  # a request frame's bytes -> the frame
    reply_frame: Callable[[list[Reply]], Any]  # replies -> a reply frame
    parse_reply: Callable[[bytes], Any]  # a reply frame's bytes -> the frame
    replies: Callable[[Any], Iterable[Reply]]  # a reply frame -> its replies
    error: Callable[[str, common_pb2.Error], Reply]  # a request's failure as its reply
    ends: Callable[[Reply], bool]  # whether a reply is its request's last
    add_servicer: Callable[[Any, grpc.aio.Server], None]  # the generated registration
    request_id: Callable[[Submit], str] = _request_id

    def frame(self, submits: list[Submit], aborts: list[str]) -> Any:
        return self.request_frame(submit=submits, abort=aborts)

    @staticmethod
    def submits(frame: Any) -> Iterable[Submit]:
        return frame.submit

    @staticmethod
    def aborts(frame: Any) -> Iterable[str]:
        return frame.abort


# Decode.Session: a request's chunks, then its Complete or Error.
DECODE: SessionMethod[decode_pb2.DecodeRequest, common_pb2.GenerateResponse] = SessionMethod(
    service=DECODE_SERVICE,
    path=f"/{DECODE_SERVICE}/Session",
    request_frame=decode_pb2.SessionRequest,
    parse_request=decode_pb2.SessionRequest.FromString,
    reply_frame=lambda items: decode_pb2.SessionResponse(responses=items),
    parse_reply=decode_pb2.SessionResponse.FromString,
    replies=lambda frame: frame.responses,
    error=lambda rid, e: common_pb2.GenerateResponse(request_id=rid, error=e),
    ends=lambda reply: reply.WhichOneof("response") != "chunk",
    add_servicer=decode_pb2_grpc.add_DecodeServicer_to_server,
)
# Prefill.Session: a request's `first` token when it asked for it, then its answer or its error.
PREFILL: SessionMethod[prefill_pb2.PrefillRequest, prefill_pb2.PrefillReply] = SessionMethod(
    service=PREFILL_SERVICE,
    path=f"/{PREFILL_SERVICE}/Session",
    request_frame=prefill_pb2.PrefillSessionRequest,
    parse_request=prefill_pb2.PrefillSessionRequest.FromString,
    reply_frame=lambda items: prefill_pb2.PrefillSessionResponse(replies=items),
    parse_reply=prefill_pb2.PrefillSessionResponse.FromString,
    replies=lambda frame: frame.replies,
    error=lambda rid, e: prefill_pb2.PrefillReply(request_id=rid, error=e),
    ends=lambda reply: reply.WhichOneof("reply") != "first",
    add_servicer=prefill_pb2_grpc.add_PrefillServicer_to_server,
)

# The engine's finish reasons (engine.sequence.FinishReason's values) on the wire.
_FINISH_TO_PROTO = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def finish_to_proto(reason: str | None) -> common_pb2.FinishReason:
    """``"stop"``, ``"length"`` or ``"abort"`` (or a ``str`` enum of them); None: unspecified."""
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PROTO[reason]


def finish_from_proto(value: int) -> str:
    """The reason's name; ``"stop"`` for one this side does not know."""
    return _FINISH_FROM_PROTO.get(value, "stop")  # type: ignore[call-overload]
