"""engine.tokenizer against transformers' AutoTokenizer, and the tiny checkpoints themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.testing.tiny_models import (
    ENDOFTEXT,
    FAMILIES,
    IM_END,
    IM_START,
    VOCAB_SIZE,
    write_sharded,
    write_tiny_models,
)
from engine.tokenizer import Tokenizer

TEXTS = [
    "The KV cache stores the keys and values of every token.",
    "héllo wörld — ünïcode façade, naïve café",
    "emoji 🚀🤖 and CJK 批处理 and Кириллица",
    "  leading and  double spaces\n\ttabs and\r\nnewlines  ",
    "",
    "x",
]

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "What is a page table?"}],
    "system+user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Explain prefill in one line."},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is decode?"},
        {"role": "assistant", "content": "One token per step.", "tool_calls": None},
        {"role": "user", "content": "And prefill? 🚀"},
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> in a city, ünïcode kept",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["qwen3"]


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def _copy_tokenizer_json(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# ---- encode / decode ------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(
        text, add_special_tokens=False
    )
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens(tok: Tokenizer, hf_tok: Any) -> None:
    assert tok.vocab_size == VOCAB_SIZE == len(hf_tok)
    assert [tok.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END)] == [0, 1, 2]
    assert tok.id_to_token(2) == IM_END
    assert tok.id_to_token(VOCAB_SIZE) is None
    assert tok.id_to_token(-1) is None
    assert tok.token_to_id("<|not a token|>") is None
    assert tok.bos_token_id is None
    assert tok.eos_token_id == hf_tok.eos_token_id == 2
    assert tok.pad_token_id == hf_tok.pad_token_id == 0

    text = f"{IM_START}user\nhi{IM_END}\n"
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 1  # written special tokens are single ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhi\n" == hf_tok.decode(ids, skip_special_tokens=True)


def test_decode_rejects_negative_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="-3"):
        tok.decode([5, -3])


def test_eos_ids_join_tokenizer_and_generation_config(tok: Tokenizer, model_dir: Path) -> None:
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {0, 2}
    assert tok.eos_token_ids == frozenset({0, 2})


def test_eos_id_as_int_and_from_config(tmp_path: Path, model_dir: Path) -> None:
    d = _copy_tokenizer_json(model_dir, tmp_path / "m")
    _write_json(d / "generation_config.json", {"eos_token_id": 1})
    _write_json(d / "config.json", {"eos_token_id": [0]})
    tok = Tokenizer.from_pretrained(d)
    assert tok.eos_token_ids == frozenset({0, 1})  # no tokenizer_config: no eos_token
    assert tok.eos_token_id is None

    _write_json(d / "config.json", {"eos_token_id": "2"})
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_pretrained(d)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)


def test_add_bos_token_and_dict_special_tokens(tmp_path: Path, model_dir: Path) -> None:
    d = _copy_tokenizer_json(model_dir, tmp_path / "m")
    _write_json(
        d / "tokenizer_config.json",
        {
            "bos_token": {"__type": "AddedToken", "content": ENDOFTEXT, "special": True},
            "eos_token": {"content": IM_END},
            "add_bos_token": True,
            "additional_special_tokens": ["<|new_special|>"],
        },
    )
    tok = Tokenizer.from_pretrained(d)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 2
    assert tok.encode("hi")[0] == 0
    assert tok.encode("hi", add_special_tokens=False) == tok.encode("hi")[1:]
    # Named special tokens missing from tokenizer.json are added, as transformers does.
    assert tok.token_to_id("<|new_special|>") == VOCAB_SIZE
    assert tok.vocab_size == VOCAB_SIZE + 1
    assert tok.encode("a<|new_special|>b", add_special_tokens=False)[1] == VOCAB_SIZE


# ---- chat templates -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok: Any, name: str, add_generation_prompt: bool, with_tools: bool
) -> None:
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    text = tok.apply_chat_template(messages, add_generation_prompt, tools=tools)
    expected = hf_tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text == expected
    expected_ids = hf_tok.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    assert tok.encode_chat(messages, add_generation_prompt, tools=tools) == list(expected_ids)
    assert tok.encode(text, add_special_tokens=False) == list(expected_ids)


def test_chatml_shape(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATIONS["system+user"])
    assert text == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nExplain prefill in one line.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "no role"}], r"messages\[0\] needs a string 'role'"),
        ([{"role": "user", "content": "x"}, {"role": 3, "content": "x"}], r"messages\[1\]"),
        ([{"role": "robot", "content": "x"}], "Unknown role: robot"),  # raise_exception
    ],
)
def test_bad_messages(tok: Tokenizer, messages: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_bad_tools(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        tok.apply_chat_template(CONVERSATIONS["user"], tools=["get_weather"])  # type: ignore[list-item]
    deep: list[Any] = []
    for _ in range(1000):
        deep = [deep]
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    with pytest.raises(ValueError, match="nested too deeply"):
        tok.apply_chat_template(CONVERSATIONS["user"], tools=[tool])


def test_no_chat_template(tmp_path: Path, model_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(_copy_tokenizer_json(model_dir, tmp_path / "m"))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS["user"])
    assert tok.encode("plain prompts still work")


# Exercises what transformers' environment provides: trim/lstrip blocks, namespace, loop
# controls, dict(), tojson with arguments, strftime_now, {% generation %}, special-token and
# caller variables.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message.role == 'skip' %}
        {% continue %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
[{{ ns.count }}:{{ message.role }}]
    {% generation %}{{ message.content }}{% endgeneration %}

    {% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
    {% endif %}
{% endfor %}
{{ dict(a=1, b=[1, 2]) | tojson(indent=2) }}
{% if tools %}{{ tools | tojson }}{% endif %}
year={{ strftime_now('%Y') }} eos={{ eos_token }} flag={{ custom_flag | default('unset') }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_custom_template_matches_transformers(tmp_path: Path, model_dir: Path) -> None:
    d = _copy_tokenizer_json(model_dir, tmp_path / "m")
    _write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": ENDOFTEXT,
            "eos_token": {"__type": "AddedToken", "content": IM_END, "special": True},
            "chat_template": [
                {"name": "default", "template": CUSTOM_TEMPLATE},
                {"name": "other", "template": "unused"},
            ],
        },
    )
    tok = Tokenizer.from_pretrained(d)
    hf_tok = AutoTokenizer.from_pretrained(d)
    messages = [
        {"role": "user", "content": "one"},
        {"role": "skip", "content": "dropped"},
        {"role": "assistant", "content": "two", "reasoning": "because"},
    ]
    variants: list[dict[str, Any]] = [{}, {"custom_flag": "on", "tools": TOOLS}]
    for kwargs in variants:
        ours = tok.apply_chat_template(messages, **kwargs)
        theirs = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **kwargs
        )
        assert ours == theirs
    assert "<think>because</think>" in ours and "flag=on" in ours


def test_chat_template_file_takes_priority(tmp_path: Path, model_dir: Path) -> None:
    d = _copy_tokenizer_json(model_dir, tmp_path / "m")
    _write_json(d / "tokenizer_config.json", {"chat_template": "from config"})
    (d / "chat_template.jinja").write_text("from file {{ messages | length }}", encoding="utf-8")
    tok = Tokenizer.from_pretrained(d)
    assert tok.apply_chat_template(CONVERSATIONS["user"]) == "from file 1"


# ---- tiny checkpoints -----------------------------------------------------------------

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3-moe": "Qwen3MoeForCausalLM",
    "deepseek-v3": "DeepseekV3ForCausalLM",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_in_transformers(tiny_models: dict[str, Path], family: str) -> None:
    model_dir = tiny_models[family]
    loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    model, info = loaded
    assert type(model).__name__ == ARCHITECTURES[family]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.float32
    assert model.config.vocab_size == VOCAB_SIZE
    assert model.config.eos_token_id == 2 and model.config.pad_token_id == 0
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.vocab_size == VOCAB_SIZE
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The page pool")])).logits
    assert logits.shape[-1] == VOCAB_SIZE and torch.isfinite(logits).all()


def test_tiny_model_configs(tiny_models: dict[str, Path]) -> None:
    cfg = {f: json.loads((p / "config.json").read_text()) for f, p in tiny_models.items()}
    assert cfg["llama"]["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["llama"]["rope_parameters"]["factor"] == 8.0
    assert cfg["llama"]["tie_word_embeddings"] is False
    assert cfg["qwen2"]["tie_word_embeddings"] is True
    assert cfg["qwen3"]["head_dim"] == 32 != cfg["qwen3"]["hidden_size"] // 4
    assert cfg["qwen3"]["rope_parameters"]["rope_type"] == "yarn"
    moe = cfg["qwen3-moe"]
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["mlp_only_layers"]) == (8, 2, [0])
    ds = cfg["deepseek-v3"]
    assert (ds["n_routed_experts"], ds["n_group"], ds["first_k_dense_replace"]) == (8, 2, 1)
    assert ds["rope_interleave"] is True and ds["rope_parameters"]["mscale_all_dim"] == 0.8


def test_write_tiny_models_is_idempotent(tiny_models: dict[str, Path]) -> None:
    out_dir = tiny_models["llama"].parent
    before = (tiny_models["llama"] / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_models(out_dir, ["llama"]) == {"llama": tiny_models["llama"]}
    assert (tiny_models["llama"] / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="gpt9"):
        write_tiny_models(out_dir, ["gpt9"])


def test_write_sharded(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["qwen3-moe"]
    dst = write_sharded(src, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert not (dst / "model.safetensors").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()

    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        original = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert set(index["weight_map"]) == set(original)
    total = 0
    for shard in shards:
        with safe_open(str(dst / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                assert index["weight_map"][name] == shard
                tensor = f.get_tensor(name)
                assert torch.equal(tensor, original[name])
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total

    model = AutoModelForCausalLM.from_pretrained(dst)
    reference = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
