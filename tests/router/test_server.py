"""The router's HTTP API against in-process fake workers: shapes, streaming, errors, aborts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from engine.tokenizer import Tokenizer
from router.app.server import serve
from router.client.dispatch import RetryConfig
from router.config import RouterConfig
from router.fleet.breaker import BREAKER_FAILURES
from router.fleet.health import TRANSPORTS, HealthConfig
from router.fleet.policies import RoundRobin, make_policy
from tests.router.conftest import router_for, run
from tests.router.fake_worker import EOS, Failure, FakeWorker

REPLY = " Hello world! 🚀 The end."


def fake(tokenizer: Tokenizer, text: str = REPLY, **kw: Any) -> FakeWorker:
    ids = tokenizer.encode(text)
    return FakeWorker(reply=lambda prompt: list(ids), **kw)


async def wait_for(condition: Any, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def assert_error_body(body: Any, status_type: str = "invalid_request_error") -> dict[str, Any]:
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == status_type and err["message"]
    return err


# ---- completions ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_completion_json(model_dir: Path, tokenizer: Tokenizer, transport: str) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        health = HealthConfig(session_transport=transport)
        async with router_for(model_dir, workers=(w,), health=health) as r:
            status, reply = await r.post(
                "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": "The KV cache",
                    "max_tokens": 20,
                    "temperature": 0,
                    "top_p": 0.9,
                    "top_k": 5,
                    "seed": 7,
                    "stop_token_ids": [9],
                    "ignore_eos": False,
                },
            )
        assert status == 200
        assert reply["id"].startswith("cmpl-") and reply["object"] == "text_completion"
        assert reply["model"] == "tiny" and isinstance(reply["created"], int)
        assert reply["choices"] == [
            {"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop"}
        ]
        prompt_ids = tokenizer.encode("The KV cache")
        n_out = len(tokenizer.encode(REPLY)) + 1  # and the EOS, counted but not shown
        assert reply["usage"] == {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": n_out,
            "total_tokens": len(prompt_ids) + n_out,
            "prompt_tokens_details": {"cached_tokens": 1},
        }
        (sent,) = w.requests
        assert list(sent.token_ids) == prompt_ids and w.transfer_ids == [0]
        s = sent.sampling
        assert (s.temperature, s.max_new_tokens, s.top_k, s.seed) == (0, 20, 5, 7)
        assert s.top_p == pytest.approx(0.9) and list(s.stop_token_ids) == [9]

    run(body())


def test_completion_batch_and_n(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            status, reply = await r.post(
                "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": [[1, 2], [5, 6, 7]],
                    "n": 2,
                    "seed": 10,
                    "max_tokens": 3,
                },
            )
        assert status == 200
        assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
        assert all(c["finish_reason"] == "length" for c in reply["choices"])
        by_id = {r.request_id: r for r in w.requests}
        assert len(by_id) == 4  # unique worker request ids
        rid = reply["id"]
        assert list(by_id[f"{rid}-2"].token_ids) == [5, 6, 7]
        assert [by_id[f"{rid}-{i}"].sampling.seed for i in range(4)] == [10, 11, 10, 11]
        # Prompt tokens count once per prompt; completion tokens per choice.
        usage = reply["usage"]
        assert usage["prompt_tokens"] == 2 + 3
        assert usage["completion_tokens"] == 4 * 3

    run(body())


def test_oversized_prompt_and_head_are_refused_before_work(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    """Issue 20, bug 4: megabytes of prompt text that could never fit the context are a 400
    at once (tokenizing them took seconds and gigabytes); a head over the limit is a 431."""
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            big = {"model": "tiny", "prompt": "lorem ipsum " * 400_000}  # 4.8 MB
            start = time.monotonic()
            status, reply = await r.post("/v1/completions", big)
            assert status == 400, reply
            assert "characters" in reply["error"]["message"]
            assert time.monotonic() - start < 1.5
            headers = {"X-Padding": "a" * (70 << 10)}
            async with r.http.post(
                r.url + "/v1/completions", json={"prompt": "x"}, headers=headers
            ) as resp:
                assert resp.status == 431
                assert "headers exceed" in (await resp.json())["error"]["message"]
            status, _ = await r.post("/v1/completions", {"model": "tiny", "prompt": "hi"})
            assert status == 200
            assert len(w.requests) == 1

    run(body())


def test_fan_out_beyond_the_limit_is_a_400_before_any_work(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    """Issue 20, bug 2: n x prompts beyond --max-sequences-per-request is refused whole,
    naming the limit and the value; nothing reaches a worker."""
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,), max_sequences_per_request=6) as r:
            body = {"model": "tiny", "prompt": [[1, 2]] * 4, "n": 2, "max_tokens": 1}
            status, reply = await r.post("/v1/completions", body)
            assert status == 400
            error = reply["error"]
            assert error["code"] == "too_many_sequences" and error["param"] == "n"
            assert "8 sequences" in error["message"] and "at most 6" in error["message"]
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 7}
            status, reply = await r.post("/v1/chat/completions", chat)
            assert status == 400 and "at most 6" in reply["error"]["message"]
            assert not w.requests
            body["n"] = 1  # 4 sequences: within the limit
            status, _ = await r.post("/v1/completions", body)
            assert status == 200

    run(body())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_completion_stream(model_dir: Path, tokenizer: Tokenizer, transport: str) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        health = HealthConfig(session_transport=transport)
        async with router_for(model_dir, workers=(w,), health=health) as r:
            status, events = await r.sse(
                "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": "hi",
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": 30,
                },
            )
        assert status == 200 and events[-1] == "[DONE]"
        chunks, usage = events[:-2], events[-2]
        assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert len(chunks) > 3  # really streamed
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
        assert len({c["id"] for c in events[:-1]}) == 1

    run(body())


def test_completion_logprobs(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer, text=" the")

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            _, reply = await r.post(
                "/v1/completions",
                {"model": "tiny", "prompt": "x", "logprobs": 2, "max_tokens": 1},
            )
            _, zero = await r.post(
                "/v1/completions",
                {"model": "tiny", "prompt": "x", "logprobs": 0, "max_tokens": 1},
            )
        lp = reply["choices"][0]["logprobs"]
        (the,) = tokenizer.encode(" the")
        assert lp["tokens"] == [" the"] and lp["token_logprobs"] == [-0.5]
        assert lp["text_offset"] == [0]
        expected_top = {tokenizer.decode([the]): -0.5, tokenizer.decode([the + 1]): -1.5}
        assert lp["top_logprobs"] == [expected_top]
        assert zero["choices"][0]["logprobs"]["top_logprobs"] == [{" the": -0.5}]
        assert w.requests[0].sampling.logprobs and w.requests[0].sampling.top_logprobs == 2

    run(body())


# ---- chat -----------------------------------------------------------------------------------


def test_chat_json_and_logprobs(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer, text="🚀 ok")

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            status, reply = await r.post(
                "/v1/chat/completions",
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "logprobs": True,
                    "top_logprobs": 2,
                },
            )
        assert status == 200 and reply["object"] == "chat.completion"
        assert reply["id"].startswith("chatcmpl-")
        (choice,) = reply["choices"]
        assert choice["message"] == {"role": "assistant", "content": "🚀 ok", "refusal": None}
        assert choice["finish_reason"] == "stop"
        content = choice["logprobs"]["content"]
        ids = [*tokenizer.encode("🚀 ok"), EOS]
        assert len(content) == len(ids)
        assert b"".join(bytes(c["bytes"]) for c in content[:-1]) == "🚀 ok".encode()
        assert content[0]["token"].startswith("bytes:")  # a partial UTF-8 character
        assert all(len(c["top_logprobs"]) == 2 for c in content)
        assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}
        # The template ran: the worker saw the rendered conversation's ids.
        expected = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
        assert list(w.requests[0].token_ids) == expected
        # max_tokens defaulted to the rest of the context.
        assert w.requests[0].sampling.max_new_tokens == 64 - len(expected)

    run(body())


def test_chat_stream(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            status, events = await r.sse(
                "/v1/chat/completions",
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                    "n": 2,
                    "stream_options": {"include_usage": True},
                },
            )
        assert status == 200 and events[-1] == "[DONE]"
        chunks, usage = events[:-2], events[-2]
        assert all(c["object"] == "chat.completion.chunk" for c in events[:-1])
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "stop"
            assert "".join(c["delta"].get("content", "") for c in mine) == REPLY
            assert all(c["finish_reason"] is None for c in mine[:-1])
        assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0

    run(body())


# ---- stops, cancellation, disconnects -------------------------------------------------------


def test_stop_string_ends_and_aborts(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer, text=" Hello world! " * 10, token_delay_s=0.005)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            status, reply = await r.post(
                "/v1/completions",
                {"model": "tiny", "prompt": "x", "max_tokens": 50, "stop": ["d!  H"]},
            )
            assert status == 200
            assert reply["choices"][0]["text"] == " Hello worl"
            assert reply["choices"][0]["finish_reason"] == "stop"
            rid = w.requests[0].request_id
            await wait_for(lambda: rid in w.cancelled and rid in w.aborts)
            assert reply["usage"]["completion_tokens"] < 50

    run(body())


def test_stream_disconnect_cancels_worker(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer, text=" a" * 60, token_delay_s=0.02)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            resp = await r.http.post(
                r.url + "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                },
            )
            await resp.content.readuntil(b"\n\n")
            resp.close()  # the client goes away mid-stream
            await wait_for(lambda: len(w.requests) == 1)
            rid = w.requests[0].request_id
            await wait_for(lambda: rid in w.cancelled and rid in w.aborts)
            assert rid not in w.completed

    run(body())


def test_non_stream_disconnect_cancels_worker(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer, text=" a" * 60, token_delay_s=0.02)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            task = asyncio.create_task(
                r.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 60})
            )
            await wait_for(lambda: len(w.requests) == 1)
            await asyncio.sleep(0.1)
            task.cancel()
            rid = w.requests[0].request_id
            await wait_for(lambda: rid in w.cancelled and rid in w.aborts)

    run(body())


# ---- worker errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "server_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.INTERNAL, 503, "server_error"),
        (grpc.StatusCode.NOT_FOUND, 503, "server_error"),
    ],
)
def test_worker_error_before_first_token(
    model_dir: Path, tokenizer: Tokenizer, code: grpc.StatusCode, status: int, error_type: str
) -> None:
    w = fake(tokenizer, fail=Failure(code, "prompt token 999 is bad"))

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            got, reply = await r.post("/v1/completions", {"model": "tiny", "prompt": "x"})
            assert got == status
            err = assert_error_body(reply, error_type)
            assert "prompt token 999 is bad" in err["message"]
            # Streaming too: no output yet, so still a real HTTP status.
            got, events = await r.sse(
                "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}
            )
            assert got == status
            assert_error_body(events[0], error_type)
            # A worker that failed every attempt (6) with a worker failure has its circuit
            # open: /health says so, rather than ok while every request gets a 503.
            async with r.http.get(r.url + "/health") as resp:
                assert resp.status == (503 if code in BREAKER_FAILURES else 200)

    run(body())


def test_worker_error_mid_stream(model_dir: Path, tokenizer: Tokenizer) -> None:
    """With migration off, a failure after the first token is an error event in the stream
    (tests/router/test_resilience.py covers migration)."""
    w = fake(tokenizer, fail=Failure(grpc.StatusCode.UNAVAILABLE, "peer lost", after_tokens=3))

    async def body() -> None:
        async with router_for(model_dir, workers=(w,), retry=RetryConfig(migration_limit=0)) as r:
            status, events = await r.sse(
                "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}
            )
            assert status == 200 and events[-1] == "[DONE]"
            err = assert_error_body(events[-2], "server_error")
            assert "peer lost" in err["message"]
            assert "".join(e["choices"][0]["text"] for e in events[:-2])  # some text came first
            status, reply = await r.post("/v1/completions", {"model": "tiny", "prompt": "x"})
            assert status == 503 and "peer lost" in reply["error"]["message"]

    run(body())


# ---- disaggregated --------------------------------------------------------------------------


def test_disaggregated_pair(model_dir: Path, tokenizer: Tokenizer) -> None:
    p, d = fake(tokenizer, role="prefill"), fake(tokenizer, role="decode")

    async def body() -> None:
        async with router_for(model_dir, prefill=(p,), decode=(d,)) as r:
            status, reply = await r.post(
                "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 30}
            )
            _, events = await r.sse(
                "/v1/completions",
                {"model": "tiny", "prompt": "x", "max_tokens": 30, "stream": True},
            )
        assert status == 200 and reply["choices"][0]["text"] == REPLY
        # The prefix-cache hit is the prefill worker's (4), not the decode worker's (1).
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == REPLY
        assert len(set(p.transfer_ids)) == 2  # a fresh transfer id per request
        assert p.transfer_ids == d.transfer_ids and p.transfer_ids[0] != 0
        assert p.transfer_ids[0] < 1 << 63
        assert d.prefill_endpoints == [p.endpoint, p.endpoint]
        assert p.requests == d.requests

    run(body())


def test_disaggregated_prefill_failure_cancels_decode(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    p = fake(
        tokenizer,
        role="prefill",
        token_delay_s=0.05,
        fail=Failure(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long: 99 > 64"),
    )
    d = fake(tokenizer, role="decode")

    async def body() -> None:
        async with router_for(model_dir, prefill=(p,), decode=(d,)) as r:
            status, reply = await r.post("/v1/completions", {"model": "tiny", "prompt": "x"})
            assert status == 400 and "prompt too long: 99 > 64" in reply["error"]["message"]
            # The prefill's own error ended it there; the decode side was aborted.
            rid = d.requests[0].request_id
            await wait_for(lambda: rid in d.cancelled and rid in d.aborts)
            assert p.aborts == []

    run(body())


def test_disaggregated_decode_failure_cancels_prefill(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    p = fake(tokenizer, role="prefill", token_delay_s=2.0)  # still prefilling when decode fails
    d = fake(
        tokenizer,
        role="decode",
        fail=Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "no pages", after_tokens=-1),
    )

    async def body() -> None:
        async with router_for(model_dir, prefill=(p,), decode=(d,)) as r:
            status, reply = await r.post("/v1/completions", {"model": "tiny", "prompt": "x"})
            assert status == 503 and reply["error"]["code"] == "resource_exhausted"
            # Retried (--retry-max 3 attempts in all). Each attempt's prefill is aborted on
            # its session (one not sent yet is dropped unsent). The decode worker's own error
            # ended the request there, so nothing runs on it and it needed no abort.
            await wait_for(lambda: len(d.requests) == 3 and d.running == 0)
            arrived = {q.request_id for q in p.requests}
            await wait_for(lambda: arrived <= {*p.cancelled} & {*p.aborts})
            assert set(p.aborts) <= {q.request_id for q in d.requests}
            assert d.aborts == []
            assert len(set(d.transfer_ids)) == 3  # a fresh transfer id per attempt

    run(body())


def test_fingerprint_mismatch_refuses_to_start(model_dir: Path) -> None:
    p = FakeWorker(role="prefill", fingerprint="bf16-ps16-aaaa")
    d = FakeWorker(role="decode", fingerprint="bf16-ps32-bbbb")

    async def body() -> None:
        await p.start()
        await d.start()
        try:
            with pytest.raises(RuntimeError) as info:
                await serve(
                    RouterConfig(
                        str(model_dir),
                        prefill=(p.endpoint,),
                        decode=(d.endpoint,),
                        port=0,
                        startup_timeout_s=3,
                    )
                )
            message = str(info.value)
            assert "bf16-ps16-aaaa" in message and "bf16-ps32-bbbb" in message
            assert p.endpoint in message and d.endpoint in message
        finally:
            await p.stop()
            await d.stop()

    run(body())


def test_role_mismatch_and_dead_worker_refuse_to_start(model_dir: Path) -> None:
    w = FakeWorker(role="decode")

    async def body() -> None:
        await w.start()
        try:
            with pytest.raises(RuntimeError, match="role 'decode' but was given as --worker"):
                await serve(
                    RouterConfig(str(model_dir), workers=(w.endpoint,), port=0, startup_timeout_s=3)
                )
        finally:
            await w.stop()
        with pytest.raises(RuntimeError, match="did not answer GetInfo"):
            await serve(
                RouterConfig(str(model_dir), workers=(w.endpoint,), port=0, startup_timeout_s=0.3)
            )

    run(body())


# ---- plain HTTP behaviour -------------------------------------------------------------------


def test_http_errors(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,), max_body_bytes=4096) as r:

            async def raw(path: str, data: bytes, method: str = "POST") -> tuple[int, Any]:
                async with r.http.request(
                    method, r.url + path, data=data, headers={"Content-Type": "application/json"}
                ) as resp:
                    return resp.status, await resp.json(content_type=None)

            status, reply = await raw("/v1/completions", b"{not json")
            assert status == 400 and "not valid JSON" in assert_error_body(reply)["message"]
            status, reply = await raw("/v1/chat/completions", b"[1, 2]")
            assert status == 400 and "JSON object" in assert_error_body(reply)["message"]
            status, reply = await raw("/v1/completions", b'{"prompt": "' + b"a" * 5000 + b'"}')
            assert status == 413 and "4096" in assert_error_body(reply)["message"]
            status, reply = await r.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
            assert status == 404
            err = assert_error_body(reply)
            assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
            status, reply = await raw("/v1/nothing", b"{}")
            assert status == 404 and assert_error_body(reply)
            status, reply = await raw("/v1/completions", b"", method="GET")
            assert status == 405 and assert_error_body(reply)
            status, reply = await r.post(
                "/v1/completions", {"model": "tiny", "prompt": [1] * 60, "max_tokens": 10}
            )
            assert status == 400
            err = assert_error_body(reply)
            assert err["code"] == "context_length_exceeded" and "64" in err["message"]
            status, reply = await r.post("/v1/completions", {"model": "tiny", "prompt": [1, 512]})
            assert status == 400 and "512" in reply["error"]["message"]
            assert not w.requests  # nothing bad reached the worker

    run(body())


def test_one_model_by_id(model_dir: Path, tokenizer: Tokenizer) -> None:
    """GET /v1/models/{id}, ids with an organisation too (issue 20, operator's first hour)."""
    w = fake(tokenizer)

    async def body() -> None:
        for name in ("served", "org/served"):
            async with router_for(model_dir, workers=(w,), served_model_name=name) as r:
                async with r.http.get(r.url + f"/v1/models/{name}") as resp:
                    assert resp.status == 200
                    card = await resp.json()
                assert card["id"] == name and card["object"] == "model"
                assert card["max_model_len"] == 64
                async with r.http.get(r.url + "/v1/models/other") as resp:
                    assert resp.status == 404
                    assert (await resp.json())["error"]["code"] == "model_not_found"

    run(body())


def test_models_health_metrics(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,), served_model_name="served") as r:
            async with r.http.get(r.url + "/v1/models") as resp:
                models = await resp.json()
            assert models["object"] == "list"
            assert [m["id"] for m in models["data"]] == ["served"]
            assert models["data"][0]["max_model_len"] == 64
            # Streamed, so that its first token has a time to measure.
            await r.sse("/v1/completions", {"model": "served", "prompt": "x", "stream": True})
            await r.post("/v1/completions", {"model": "other", "prompt": "x"})
            async with r.http.get(r.url + "/health") as resp:
                assert resp.status == 200
            await w.set_serving(False)
            async with r.http.get(r.url + "/health") as resp:
                assert resp.status == 503
                assert (await resp.json())["workers"] == {w.endpoint: False}
            async with r.http.get(r.url + "/metrics") as resp:
                text = await resp.text()
        assert (
            'pdserve:router_requests_total{endpoint="/v1/completions",model_name="served",'
            'status="200"} 1.0' in text
        )
        assert (
            'pdserve:router_requests_total{endpoint="/v1/completions",model_name="served",'
            'status="404"} 1.0' in text
        )
        assert "router_registry_up" not in text  # no --registry: no such series (was a 0)
        for name in (
            'pdserve:time_to_first_token_seconds_count{model_name="served"} 1.0',
            "pdserve:inter_token_latency_seconds_count",
            'pdserve:e2e_request_latency_seconds_count{model_name="served"} 1.0',
            "pdserve:router_running_requests",
        ):
            assert name in text

    run(body())


# ---- native /generate -----------------------------------------------------------------------


def test_generate_native(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            status, one = await r.post(
                "/generate",
                {
                    "text": "hi",
                    "sampling_params": {"max_new_tokens": 3, "temperature": 0},
                    "return_logprob": True,
                },
            )
            assert status == 200
            ids = tokenizer.encode(REPLY)
            assert one["output_ids"] == ids[:3] and one["text"] == tokenizer.decode(ids[:3])
            meta = one["meta_info"]
            assert meta["finish_reason"] == {"type": "length", "length": 3}
            assert meta["prompt_tokens"] == len(tokenizer.encode("hi"))
            assert meta["completion_tokens"] == 3 and meta["cached_tokens"] == 1
            assert meta["output_token_logprobs"] == [[-0.5, t, None] for t in ids[:3]]
            status, many = await r.post(
                "/generate", {"input_ids": [5, 6], "sampling_params": {"n": 2, "stop": "world"}}
            )
            assert [m["index"] for m in many] == [0, 1]
            assert many[0]["text"] == " Hello "
            assert many[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "world"}
            status, eos = await r.post("/generate", {"input_ids": [5]})
            assert eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
            assert eos["output_ids"][-1] == EOS and eos["text"] == REPLY
            status, events = await r.sse("/generate", {"text": "hi", "stream": True})
            assert events[-1] == "[DONE]"
            texts = [e["text"] for e in events[:-1]]
            assert texts[-1] == REPLY and all(REPLY.startswith(t) for t in texts)  # cumulative
            assert events[-2]["output_ids"] == [*ids, EOS]

    run(body())


# ---- the official client --------------------------------------------------------------------


def test_openai_client(model_dir: Path, tokenizer: Tokenizer) -> None:
    w = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(w,)) as r:
            client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
            done = await client.completions.create(model="tiny", prompt="hi", max_tokens=30)
            assert done.choices[0].text == REPLY and done.usage is not None
            chat = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True
            )
            assert chat.choices[0].message.content == REPLY
            assert chat.choices[0].logprobs is not None
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            parts, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                usage = chunk.usage or usage
            assert "".join(parts) == REPLY and usage is not None
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(model="tiny", prompt="hi", max_tokens=0)
            assert "max_tokens" in str(info.value)
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="nope", prompt="hi")
            await client.close()

    run(body())


# ---- policies -------------------------------------------------------------------------------


def test_round_robin_spreads_and_one_failing_choice_ends_all(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    slow = fake(tokenizer, text=" a" * 60, token_delay_s=0.02)
    failing = fake(tokenizer, fail=Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad choice"))
    healthy = fake(tokenizer)

    async def body() -> None:
        async with router_for(model_dir, workers=(slow, failing), policy="round_robin") as r:
            status, reply = await r.post(
                "/v1/completions", {"model": "tiny", "prompt": "x", "n": 2, "max_tokens": 60}
            )
            assert status == 400 and reply["error"]["message"] == "bad choice"
            (rid,) = [q.request_id for q in slow.requests]
            await wait_for(lambda: rid in slow.cancelled and rid in slow.aborts)
        async with router_for(model_dir, workers=(healthy, slow), policy="round_robin") as r:
            slow.token_delay_s = 0
            for _ in range(2):
                status, _ = await r.post(
                    "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}
                )
                assert status == 200
            assert len(healthy.requests) == 1 and len(slow.requests) == 2  # 1 from before

    run(body())


def test_round_robin_policy() -> None:
    policy = RoundRobin()
    assert [policy.pick(["a", "b", "c"], [1]) for _ in range(5)] == ["a", "b", "c", "a", "b"]
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("no_such_policy")
