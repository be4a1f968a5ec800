"""The router's side of Decode.Session: many requests on one stream, and what a break does."""

from __future__ import annotations

import grpc
import pytest

from protos import common_pb2, decode_pb2
from protos.contract import ROLE_COLOCATED
from router.client.errors import WorkerError
from router.client.session import Finished, RequestStream, event_from_proto
from router.fleet.worker import WorkerClient
from tests.router.conftest import run
from tests.router.fake_worker import EOS, Failure, FakeWorker
from tests.router.test_server import wait_for


def submit(rid: str, prompt: tuple[int, ...] = (1, 2)) -> decode_pb2.DecodeRequest:
    sampling = common_pb2.SamplingParams(max_new_tokens=100, ignore_eos=True)
    return decode_pb2.DecodeRequest(
        request=common_pb2.GenerateRequest(request_id=rid, token_ids=prompt, sampling=sampling)
    )


async def drain(stream: RequestStream) -> list[int]:
    """The request's tokens; raises WorkerError as the router's dispatch would."""
    tokens: list[int] = []
    while True:
        event = event_from_proto(await stream.next(), stream.endpoint)
        if isinstance(event, Finished):
            return tokens
        tokens += event.token_ids


def test_requests_share_one_session_and_a_break_fails_them_all() -> None:
    async def body() -> None:
        # Prompt (1, 2) gets 3 tokens; prompt (9,) gets 60, long enough to be cut off.
        w = await FakeWorker(
            reply=lambda p: [65, 66, 67] if p[0] == 1 else list(range(100, 160)),
            token_delay_s=0.02,
        ).start()
        client = WorkerClient(w.endpoint, ROLE_COLOCATED)
        try:
            session = client.session()
            streams = [session.open(submit(f"r{i}", (1, 2) if i < 2 else (9,))) for i in range(4)]
            assert client.session() is session and len(session) == 4
            for s in streams[:2]:
                assert await drain(s) == [65, 66, 67, EOS]
                s.close()
            # A request the caller leaves early is aborted on the worker by the next frame.
            first = await streams[2].next()
            assert first.HasField("chunk")
            streams[2].close()
            await wait_for(lambda: "r2" in w.aborts and "r2" in w.cancelled)
            # The worker goes away with r3 in flight: r3 fails with a retryable status, and
            # the next request opens a new session.
            await w.stop()
            with pytest.raises(WorkerError) as info:
                await drain(streams[3])
            assert info.value.retryable and info.value.endpoint == w.endpoint
            assert session.broken and len(session) == 0
            assert client.session() is not session
            with pytest.raises(WorkerError):
                await client.session().open(submit("late")).next()
            assert w.completed[:2] == ["r0", "r1"]
        finally:
            await client.close()
            await w.stop()

    run(body())


def test_duplicate_request_id_on_one_session_is_refused() -> None:
    async def body() -> None:
        w = await FakeWorker(token_delay_s=0.05).start()
        client = WorkerClient(w.endpoint, ROLE_COLOCATED)
        try:
            session = client.session()
            first = session.open(submit("same"))
            with pytest.raises(ValueError, match="already open"):
                session.open(submit("same"))
            assert await drain(first) == [65, 66, 67, EOS]
        finally:
            await client.close()
            await w.stop()

    run(body())


def test_worker_error_message_ends_only_its_request() -> None:
    async def body() -> None:
        w = await FakeWorker(reply=lambda p: [70, 71]).start()
        client = WorkerClient(w.endpoint, ROLE_COLOCATED)
        try:
            session = client.session()
            good = session.open(submit("good"))
            assert await drain(good) == [70, 71, EOS]
            w.fail = Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad sampling", after_tokens=-1)
            with pytest.raises(WorkerError) as info:
                await drain(session.open(submit("bad")))
            assert info.value.bad_input and "bad sampling" in info.value.details
            assert not session.broken  # the session carries on
            w.fail = None
            assert await drain(session.open(submit("after"))) == [70, 71, EOS]
        finally:
            await client.close()
            await w.stop()

    run(body())


def test_frames_stay_under_the_workers_message_limit() -> None:
    async def body() -> None:
        # Six requests of ~1.5 MB each, opened at once: one frame would pass the worker's
        # 4 MiB limit (and break the session); they go out in several frames instead.
        w = await FakeWorker(reply=lambda p: [65, 66]).start()
        client = WorkerClient(w.endpoint, ROLE_COLOCATED)
        try:
            session = client.session()
            prompt = tuple(range(1000, 1000 + 500_000))
            streams = [session.open(submit(f"big{i}", prompt)) for i in range(6)]
            for s in streams:
                assert await drain(s) == [65, 66, EOS]
                s.close()
            assert not session.broken
        finally:
            await client.close()
            await w.stop()

    run(body(), timeout_s=60)


def test_sessions_follow_the_workers_listener_when_it_moves() -> None:
    async def body() -> None:
        w = await FakeWorker(reply=lambda p: [65, 66]).start()
        client = WorkerClient(w.endpoint, ROLE_COLOCATED)
        try:
            client.info = await client.get_info(5.0)
            host = w.endpoint.rpartition(":")[0]
            assert client.session_endpoint == f"{host}:{w.session_port}" != w.endpoint
            assert await drain(client.session().open(submit("a"))) == [65, 66, EOS]
            # The worker restarts its listener on another port (as a restarted worker would,
            # its main port pinned): the session breaks, the next one cannot connect...
            await w.stop_listener()
            await w.start_listener()
            with pytest.raises(WorkerError):
                await drain(client.session().open(submit("b")))
            # ...so the one after rides the main port while GetInfo finds the new listener.
            session = client.session()
            assert client.session_endpoint == w.endpoint
            assert await drain(session.open(submit("c"))) == [65, 66, EOS]
            await wait_for(lambda: client.session_endpoint == f"{host}:{w.session_port}")
            session = client.session()
            session._break(WorkerError(grpc.StatusCode.CANCELLED, "test", w.endpoint))
            assert await drain(client.session().open(submit("d"))) == [65, 66, EOS]
            assert w._sessions is not None and len(w._sessions.connections) == 1
        finally:
            await client.close()
            await w.stop()

    run(body())
