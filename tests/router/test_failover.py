"""Real worker processes killed under the router (SIGKILL, no goodbye): a decode or colocated
worker mid-stream is migrated, with the greedy output identical to an undisturbed run; a dead
prefill worker's requests are retried on the other one. Pages balance on the survivors."""

from __future__ import annotations

import re
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from cluster.local import Child
from tests.e2e.procs import workers as started
from tests.router.procs import call, load, metric, router_process, sse_events, wait_idle

MODEL = "qwen3-moe"
MAX_NEW = 400  # long enough (about a second here) to kill its worker after a few tokens
PROMPT = "The decode worker reserves pages for the prompt and"
# Health checks far apart: the router must notice the dead worker from the request itself.
ROUTER_FLAGS = ("--policy", "round_robin", "--health-check-interval", "30")
# A grammar that never ends and whose state matters at every token (every fourth character a
# comma): a migrated request's new worker goes on exactly only if it replays the tokens so far.
COMMAS = 'root ::= item root\nitem ::= [a-z] [a-z] [a-z] ","'


def greedy(stream: bool, ebnf: str | None = None) -> dict[str, Any]:
    sampling: dict[str, Any] = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    if ebnf is not None:
        sampling["ebnf"] = ebnf
    return {"text": PROMPT, "sampling_params": sampling, "stream": stream}


@pytest.fixture
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[MODEL]


def workers(stack: ExitStack, model_dir: Path, *roles: str) -> list[tuple[Child, str]]:
    return stack.enter_context(started(model_dir, *((role,) for role in roles)))


def kill_mid_stream(
    url: str,
    candidates: list[tuple[Child, str]],
    role: str,
    hang: bool = False,
    ebnf: str | None = None,
) -> tuple[Any, str]:
    """Stream a long greedy request (constrained by `ebnf`), SIGKILL the candidate serving it
    after a few tokens (or SIGSTOP it: ``hang``), and return the stream's last event and that
    worker's endpoint."""
    events = sse_events(url + "/generate", greedy(stream=True, ebnf=ebnf))
    killed = ""
    last: Any = None
    for event in events:
        if event == "[DONE]":
            break
        last = event
        if not killed and len(event["output_ids"]) >= 3:
            for child, endpoint in candidates:
                if load(endpoint, role).num_running:
                    if hang:
                        child.proc.send_signal(signal.SIGSTOP)
                    else:
                        child.proc.kill()
                        child.proc.wait(timeout=10)
                    killed = endpoint
            assert killed, "no worker was running the request"
            assert len(event["output_ids"]) < MAX_NEW, "the request ended before the kill"
    return last, killed


def check_complete(last: Any, reference: list[int], prompt_tokens: int) -> None:
    assert last["output_ids"] == reference  # no token twice, none missing, same tokens
    meta = last["meta_info"]
    assert meta["completion_tokens"] == MAX_NEW and meta["prompt_tokens"] == prompt_tokens
    assert meta["finish_reason"] == {"type": "length", "length": MAX_NEW}


def test_decode_worker_killed_mid_stream(model_dir: Path) -> None:
    with ExitStack() as stack:
        (_, prefill), d1, d2 = workers(stack, model_dir, "prefill", "decode", "decode")
        _, url = stack.enter_context(
            router_process(model_dir, "--prefill", prefill, "--decode", d1[1], d2[1],
                           *ROUTER_FLAGS)
        )  # fmt: skip
        status, undisturbed = call(url + "/generate", "POST", greedy(stream=False))
        assert status == 200 and len(undisturbed["output_ids"]) == MAX_NEW
        last, killed = kill_mid_stream(url, [d1, d2], "decode")
        check_complete(last, undisturbed["output_ids"], undisturbed["meta_info"]["prompt_tokens"])
        assert metric(url, 'pdserve:router_migrations_total{code="UNAVAILABLE"}') == 1
        survivor = d2[1] if killed == d1[1] else d1[1]
        wait_idle(prefill, "prefill")
        wait_idle(survivor, "decode")


def test_colocated_worker_killed_mid_stream(model_dir: Path) -> None:
    """A constrained request: the grammar's state moves with it (the new worker replays)."""
    with ExitStack() as stack:
        w1, w2 = workers(stack, model_dir, "null", "null")
        _, url = stack.enter_context(
            router_process(model_dir, "--worker", w1[1], w2[1], *ROUTER_FLAGS)
        )
        status, undisturbed = call(url + "/generate", "POST", greedy(False, COMMAS))
        assert status == 200
        assert re.fullmatch(r"([a-z]{3},)*[a-z,]*", undisturbed["text"]), undisturbed["text"]
        last, killed = kill_mid_stream(url, [w1, w2], "null", ebnf=COMMAS)
        check_complete(last, undisturbed["output_ids"], undisturbed["meta_info"]["prompt_tokens"])
        assert metric(url, "pdserve:router_migrations_total") == 1
        wait_idle(w2[1] if killed == w1[1] else w1[1], "null")


def test_hung_worker_mid_stream_fails_over_by_keepalive(model_dir: Path) -> None:
    """A worker that stops answering but keeps its sockets open (SIGSTOP: a hang, a long
    pause): the router's keepalive pings go unanswered, the session breaks, and the request
    migrates. Resumed, the worker finds its session gone and frees the request's pages."""
    with ExitStack() as stack:
        w1, w2 = workers(stack, model_dir, "null", "null")
        _, url = stack.enter_context(
            router_process(model_dir, "--worker", w1[1], w2[1], *ROUTER_FLAGS,
                           "--worker-keepalive", "1")
        )  # fmt: skip
        status, undisturbed = call(url + "/generate", "POST", greedy(stream=False))
        assert status == 200
        start = time.monotonic()
        last, hung = kill_mid_stream(url, [w1, w2], "null", hang=True)
        assert time.monotonic() - start < 20
        check_complete(last, undisturbed["output_ids"], undisturbed["meta_info"]["prompt_tokens"])
        assert metric(url, 'pdserve:router_migrations_total{code="UNAVAILABLE"}') == 1
        stopped = w1 if hung == w1[1] else w2
        stopped[0].proc.send_signal(signal.SIGCONT)
        wait_idle(w1[1], "null")
        wait_idle(w2[1], "null")


def test_prefill_worker_killed(model_dir: Path) -> None:
    with ExitStack() as stack:
        p1, p2, (_, decode) = workers(stack, model_dir, "prefill", "prefill", "decode")
        _, url = stack.enter_context(
            router_process(model_dir, "--prefill", p1[1], p2[1], "--decode", decode,
                           *ROUTER_FLAGS)
        )  # fmt: skip
        body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
        status, before = call(url + "/generate", "POST", body)
        assert status == 200
        p1[0].proc.kill()
        p1[0].proc.wait(timeout=10)
        for _ in range(6):  # round robin sends every other one to the dead worker first
            status, reply = call(url + "/generate", "POST", body)
            assert status == 200, reply
            assert reply["output_ids"] == before["output_ids"]
        assert metric(url, 'pdserve:router_retries_total{code="UNAVAILABLE"}') >= 1
        wait_idle(p2[1], "prefill")
        wait_idle(decode, "decode")
