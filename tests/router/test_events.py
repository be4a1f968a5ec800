"""Worker replies as events, gRPC status as HTTP status (never 500), worker URLs."""

from __future__ import annotations

import grpc
import pytest

from protos import common_pb2
from router.app.errors import from_worker, http_status_for
from router.client.errors import NoUsableWorker, WorkerError, status_code_from_int
from router.client.session import Finished, TokenChunk, TokenLogprob, event_from_proto
from router.fleet.worker import endpoint_of


def test_every_status_maps_to_400_or_503() -> None:
    for code in grpc.StatusCode:
        expected = (
            400 if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE) else 503
        )
        assert http_status_for(code) == expected, code
        err = from_worker(WorkerError(code, "details", "w:1"))
        assert err.status == expected and err.body()["error"]["message"]
        assert err.type == ("invalid_request_error" if expected == 400 else "server_error")


def test_worker_error_details() -> None:
    bad = WorkerError(grpc.StatusCode.INVALID_ARGUMENT, "prompt has token 9999", "w:1")
    assert from_worker(bad).message == "prompt has token 9999" and not bad.retryable
    assert bad.bad_input
    full = WorkerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "0 free pages", "w:1")
    reply = from_worker(full)
    assert reply.status == 503 and reply.code == "resource_exhausted" and full.retryable
    lost = WorkerError(grpc.StatusCode.UNAVAILABLE, "transfer failed", "w:1")
    message = from_worker(lost).message
    assert "w:1" in message and "transfer failed" in message and lost.retryable
    none = from_worker(NoUsableWorker("the pool is empty"))
    assert none.status == 503 and none.code == "no_worker_available"
    assert WorkerError(grpc.StatusCode.INTERNAL, "bug", "w:1").retryable
    assert not WorkerError(grpc.StatusCode.NOT_FOUND, "no such transfer", "w:1").retryable


def test_status_code_from_int() -> None:
    assert status_code_from_int(3) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_code_from_int(8) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code_from_int(999) is grpc.StatusCode.UNKNOWN


def test_events_from_proto() -> None:
    chunk = common_pb2.GenerateResponse(
        request_id="r",
        chunk=common_pb2.StreamChunk(
            token_ids=[5],
            logprobs=[
                common_pb2.TokenLogprobs(
                    logprob=-1.0, top=[common_pb2.TokenLogprob(token_id=5, logprob=-1.0)]
                )
            ],
        ),
    )
    assert event_from_proto(chunk, "w") == TokenChunk((5,), (TokenLogprob(-1.0, ((5, -1.0),)),))
    done = common_pb2.GenerateResponse(
        complete=common_pb2.Complete(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            prompt_tokens=3,
            completion_tokens=2,
            cached_tokens=1,
        )
    )
    assert event_from_proto(done, "w") == Finished("length", 3, 2, 1)
    error = common_pb2.GenerateResponse(error=common_pb2.Error(code=3, message="bad id"))
    with pytest.raises(WorkerError) as info:
        event_from_proto(error, "w")
    assert info.value.bad_input and info.value.details == "bad id"
    with pytest.raises(WorkerError):
        event_from_proto(common_pb2.GenerateResponse(), "w")


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("grpc://host:1", "host:1"),
        ("http://host:2/", "host:2"),
        ("[::1]:3", "[::1]:3"),
    ],
)
def test_endpoint_of(url: str, endpoint: str) -> None:
    assert endpoint_of(url) == endpoint


@pytest.mark.parametrize("url", ["host", "host:port", "grpc://host:1/path", ":5"])
def test_endpoint_of_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        endpoint_of(url)
