"""Constrained decoding end to end with the official ``openai`` client: a colocated worker, and
a prefill worker with a decode worker, each behind a router process, on a random-weight model.

A random model writes valid output only if the constraint holds it to the grammar: every reply
must parse and validate. Greedy replies are the same colocated and disaggregated (the prefill
worker samples the first token under the grammar, the decode worker goes on from it). Bad
constraints get a 400 naming the problem, and the workers keep serving with every page free.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import grammar_cases as cases
from tests.router.test_e2e import Process, wait_idle

MODEL = "llama"
MODES = ("colocated", "disaggregated")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.testing.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("grammar-models"), [MODEL])[MODEL]


@pytest.fixture(scope="module")
def cluster(model_path: Path) -> Iterator[dict[str, Any]]:
    """Both modes at once: {"workers": [...], "colocated": client, "disaggregated": client}."""
    common = ["--model-path", str(model_path), "--port", "0", "--max-total-tokens", "8192"]
    workers = [
        Process(["decode_worker", "--disaggregation-mode", "null", "--host", "127.0.0.1",
                 *common]),
        Process(["prefill_worker", *common]),
        Process(["decode_worker", *common]),
    ]  # fmt: skip
    routers: list[Process] = []
    try:
        colocated, prefill, decode = (w.wait_ready() for w in workers)
        route = ["router", "--model-path", str(model_path), "--port", "0"]
        routers = [
            Process([*route, "--worker", colocated.ready["endpoint"]]),
            Process([*route, "--prefill", prefill.ready["endpoint"],
                     "--decode", decode.ready["endpoint"]]),
        ]  # fmt: skip
        urls = [r.wait_ready().ready["url"] for r in routers]
        clients = [openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0) for u in urls]
        yield {"workers": workers, **dict(zip(MODES, clients, strict=True))}
        for c in clients:
            c.close()
    finally:
        for p in (*routers, *workers):
            p.stop()


def ask(
    client: openai.OpenAI,
    prompt: str,
    stream: bool,
    chat: bool,
    temperature: float = 0.0,
    seed: int | None = None,
    response_format: dict[str, Any] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> tuple[str, str | None, int]:
    """(text, finish_reason, cached prompt tokens) of one reply, streamed or whole, through
    chat or completions."""
    kw: dict[str, Any] = {
        "model": MODEL, "max_tokens": cases.MAX_TOKENS, "temperature": temperature,
        "seed": seed, "extra_body": extra_body, "stream": stream,
    }  # fmt: skip
    if response_format is not None and chat:
        kw["response_format"] = response_format
    elif response_format is not None:  # the client's completions take it as an extra field
        kw["extra_body"] = {**(extra_body or {}), "response_format": response_format}
    if stream:
        kw["stream_options"] = {"include_usage": True}
    out: Any
    if chat:
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
    else:
        out = client.completions.create(prompt=prompt, **kw)
    if not stream:
        choice = out.choices[0]
        text = choice.message.content if chat else choice.text
        details = out.usage.prompt_tokens_details
        return text or "", choice.finish_reason, details.cached_tokens if details else 0
    parts: list[str] = []
    reason, cached = None, 0
    for chunk in out:
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
        for choice in chunk.choices:
            parts.append((choice.delta.content if chat else choice.text) or "")
            reason = choice.finish_reason or reason
    return "".join(parts), reason, cached


def json_format(name: str) -> dict[str, Any]:
    schema = cases.SCHEMAS[name]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schemas_valid_and_equal_in_both_modes(cluster: dict[str, Any]) -> None:
    """Every schema, greedy, in both modes at once (concurrent requests: batches above 1),
    chat and completions, streamed and whole; plus a sampled reply per schema."""
    names = list(cases.SCHEMAS)
    jobs: list[tuple[str, str, bool, bool, float, int | None]] = []
    for i, name in enumerate(names):
        for mode in MODES:
            jobs.append((mode, name, i % 2 == 0, i % 3 != 0, 0.0, None))
        jobs.append((MODES[i % 2], name, i % 2 == 1, True, 1.0, i))  # sampled

    def run(job: tuple[str, str, bool, bool, float, int | None]) -> tuple[str, str | None, int]:
        mode, name, stream, chat, temperature, seed = job
        prompt = f"Reply with {name} JSON."
        fmt = json_format(name)
        return ask(cluster[mode], prompt, stream, chat, temperature, seed, response_format=fmt)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(run, jobs))
    greedy: dict[tuple[str, str], str] = {}
    for (mode, name, _, _, temperature, _), (text, reason, _) in zip(jobs, replies, strict=True):
        assert reason == "stop", (mode, name, text)
        cases.check_schema(name, text)
        if temperature == 0:
            greedy[mode, name] = text
    for name in names:
        assert greedy["colocated", name] == greedy["disaggregated", name], name


@pytest.mark.parametrize("mode", MODES)
def test_regex_ebnf_and_json_object(cluster: dict[str, Any], mode: str) -> None:
    client = cluster[mode]
    jobs: list[tuple[str, str, dict[str, Any]]] = [
        ("regex", name, {"regex": pattern}) for name, pattern in cases.REGEXES.items()
    ]
    jobs += [("ebnf", name, {"ebnf": grammar}) for name, (grammar, _) in cases.EBNF.items()]
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        replies = list(
            pool.map(
                lambda j: ask(
                    client, f"a {j[1]}:", j[0] == "regex", True, 0.7, 11, extra_body=j[2]
                ),
                jobs,
            )
        )
        # json_object through the completions endpoint.
        obj = pool.submit(
            ask, client, "An object:", False, False, response_format={"type": "json_object"}
        )
        obj_text, obj_reason, _ = obj.result()
    for (kind, name, _), (text, reason, _) in zip(jobs, replies, strict=True):
        assert reason == "stop", (kind, name, text)
        (cases.check_regex if kind == "regex" else cases.check_ebnf)(name, text)
    # An unbounded object may run out of tokens; what came is then a prefix of one.
    if obj_reason == "stop":
        assert isinstance(json.loads(obj_text), dict), obj_text
    else:
        assert obj_reason == "length" and obj_text.startswith("{"), obj_text


@pytest.mark.parametrize("mode", MODES)
def test_prefix_cache_hit_gives_the_same_reply(cluster: dict[str, Any], mode: str) -> None:
    prompt = "A long shared system prompt that the prefix cache keeps for the next request. " * 3
    fmt = json_format("nested")
    first = ask(cluster[mode], prompt, False, True, response_format=fmt)
    second = ask(cluster[mode], prompt, True, True, response_format=fmt)
    assert second[2] > 0  # cached prompt tokens
    assert first[:2] == second[:2]
    cases.check_schema("nested", first[0])


BAD: list[tuple[dict[str, Any], str]] = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "foo"}},
            }
        },
        'Unsupported type "foo"',
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "integer", "minimum": 9, "maximum": 1},
                },
            }
        },
        "minimum",
    ),
    ({"extra_body": {"regex": "(ab"}}, "parenthesis is not closed"),
    ({"extra_body": {"ebnf": 'start ::= "a"'}}, 'root rule with name "root" is not found'),
    ({"extra_body": {"regex": "a", "ebnf": 'root ::= "a"'}}, "at most one output constraint"),
]


@pytest.mark.parametrize("mode", MODES)
def test_bad_constraints_get_400_and_workers_keep_serving(
    cluster: dict[str, Any], mode: str
) -> None:
    client = cluster[mode]
    for i, (kw, fragment) in enumerate(BAD):
        with pytest.raises(openai.BadRequestError, match=fragment) as info:
            ask(client, "x", i % 2 == 1, i % 3 != 2, **kw)
        body = info.value.body
        assert isinstance(body, dict) and body.get("type") == "invalid_request_error", body
    text, reason, _ = ask(client, "still there?", False, True, extra_body={"regex": "(yes|no)"})
    assert reason == "stop" and text in ("yes", "no")
    for worker in cluster["workers"]:
        wait_idle(worker)
