"""End to end with tools: a real colocated worker and a router started with
``--tool-call-parser`` and ``--reasoning-parser``, as processes, read with the official
``openai`` client. A random-weight model rarely calls a tool, so these check that requests
with tools work whole and streamed, that the chat template got the tools, that bad tool
requests are 400s after which the worker still serves, and /tokenize, /detokenize and
/v1/models/{id}."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.router.test_e2e import Process, colocated_worker, post, router_of, wait_idle

MODEL = "qwen3"
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                # Bounded: a random model held to the grammar closes the string in time.
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.testing.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tools-models"), [MODEL])[MODEL]


@pytest.fixture(scope="module")
def worker(model_path: Path) -> Iterator[Process]:
    with colocated_worker(model_path, max_total_tokens=4096) as proc:
        yield proc


@pytest.fixture(scope="module")
def router_url(model_path: Path, worker: Process) -> Iterator[str]:
    flags = ("--tool-call-parser", "qwen25", "--reasoning-parser", "qwen3")
    with router_of(model_path, worker, *flags) as url:
        yield url


@pytest.fixture(scope="module")
def client(router_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=router_url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def check_calls(message: Any) -> None:
    """Whatever calls the model made name a tool and carry arguments of its schema."""
    for call in message.tool_calls or []:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])


def test_tools_reach_the_template_whole_and_streamed(
    client: openai.OpenAI, router_url: str
) -> None:
    counted = post(router_url + "/tokenize", {"model": MODEL, "messages": MESSAGES, "tools": TOOLS})
    bare = post(router_url + "/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert counted["count"] > bare["count"]  # the tools are in the prompt
    choices: list[Any] = [
        "auto",
        "required",
        {"type": "function", "function": {"name": "get_weather"}},
    ]
    for tool_choice in choices:
        # A forced call is held to its grammar: room enough for the call to close.
        forced = tool_choice != "auto"
        whole = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
            max_tokens=160 if forced else 12, temperature=0,
        )  # fmt: skip
        assert whole.usage is not None and whole.usage.prompt_tokens == counted["count"]
        choice = whole.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        check_calls(choice.message)
        if forced:  # even a random-weight model calls the tool
            assert choice.message.tool_calls, choice.message
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0, stream=True
    )
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0
    )
    assert content == (whole.choices[0].message.content or "")
    none = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=12,
        temperature=0,
    )  # fmt: skip
    assert none.choices[0].message.tool_calls is None
    assert none.usage is not None and none.usage.prompt_tokens == counted["count"]


def test_bad_tool_requests_are_400_and_the_worker_keeps_serving(
    client: openai.OpenAI, worker: Process
) -> None:
    named: Any = {"type": "function", "function": {"name": "book_flight"}}
    with pytest.raises(openai.BadRequestError, match="book_flight") as info:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=named,
        )
    assert info.value.body["param"] == "tool_choice.function.name"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="only allowed when tools are given"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema"):
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}],
        )
    wait_idle(worker)
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert done.choices[0].finish_reason in ("stop", "length")


def test_tokenize_detokenize_and_model_card(client: openai.OpenAI, router_url: str) -> None:
    text = "The KV cache stores héllo wörld 🚀"
    tokens = post(router_url + "/tokenize", {"model": MODEL, "prompt": text})
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 2048
    assert post(router_url + "/detokenize", {"tokens": tokens["tokens"]}) == {"prompt": text}
    # The ids are the ones generation uses: a completion of them is a completion of the text.
    by_ids = client.completions.create(
        model=MODEL, prompt=tokens["tokens"], max_tokens=4, temperature=0
    )
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    request = urllib.request.Request(
        router_url + "/detokenize", data=b'{"tokens": [1, 99999999]}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400 and "outside the vocabulary" in info.value.read().decode()
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
