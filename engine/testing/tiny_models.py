"""Small real Hugging Face checkpoints for tests and the default demo.

Each family is built with transformers' own model class (random weights, float32, safetensors)
and shares one small byte-level BPE tokenizer trained on :data:`CORPUS`, so nothing has to be
downloaded. The weights are random: the models produce deterministic but meaningless text.

Usage::

    python -m engine.testing.tiny_models --out models [--family llama --family qwen3-moe]

Writing is idempotent: a family whose directory holds a marker file with the current
:data:`GENERATOR_VERSION` is left alone. Bump the version whenever anything written changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

GENERATOR_VERSION = "pdserve-tiny-models-2"
MARKER_FILE = ".pdserve-tiny-model"
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "qwen3-moe", "deepseek-v3")

VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 2048
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json")

# ChatML as Qwen writes it; the tools block exercises the `tojson` filter and the role check
# exercises `raise_exception`.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "{{- messages[0]['content'] + '\\n\\n' }}\n"
    "{%- endif %}\n"
    "{{- '# Tools\\n\\n<tools>' }}\n"
    "{%- for tool in tools %}\n"
    "{{- '\\n' + (tool | tojson) }}\n"
    "{%- endfor %}\n"
    "{{- '\\n</tools><|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "{%- endif %}\n"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '')"
    " + '<|im_end|>' + '\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

CORPUS = """\
A language model server turns requests into tokens and tokens back into text. Each request
arrives with a prompt, a sampling configuration and a limit on the number of new tokens. The
server tokenizes the prompt, schedules it, runs the model, samples the next token, and streams
the decoded text back to the client until the model emits an end of sequence token or the
limit is reached.

The first forward pass over the prompt is called prefill. Prefill is compute bound: every
prompt token attends to every earlier token, and the matrix multiplications are large. The
passes that follow are called decode. Each decode step produces one new token per sequence,
so decode is memory bound: the weights and the key value cache are read for very little
arithmetic. Disaggregated serving runs prefill and decode on different workers so that each
phase can be batched and scaled on its own.

The key value cache stores the attention keys and values of every token that a sequence has
seen, so that a decode step only computes attention for the newest token. The cache is the
largest consumer of memory after the weights. A paged cache splits it into fixed size pages,
like the pages of virtual memory. A page table maps each sequence to the pages that hold its
tokens, so that memory is allocated one page at a time and freed as soon as a request
finishes. Pages that hold a shared prefix, such as a long system prompt, can be reused by many
requests. A radix tree over token ids finds the longest cached prefix of a new prompt, and
only the rest of the prompt needs a prefill.

Batching is what makes a server fast. Continuous batching adds new requests to the running
batch at every step and removes finished ones, instead of waiting for a whole batch to end.
The scheduler decides which waiting requests to admit, given the free pages and a token
budget for the step. Long prompts can be split into chunks, so that a single prefill does not
stall the decode of every other request. When memory runs out, the scheduler can preempt a
request, free its pages, and recompute them later.

Sampling chooses the next token from the logits. Greedy sampling takes the token with the
highest score. Temperature divides the logits before the softmax; top k keeps the k most
likely tokens; top p keeps the smallest set of tokens whose probability reaches p. A
repetition penalty lowers the score of tokens that were already generated. Stop strings end a
request when they appear in the decoded text, and the text before them is returned.

Rotary position embeddings rotate the queries and keys by an angle that grows with the
position. Scaling methods such as linear, llama3 and yarn stretch those angles so that a model
trained on short sequences can read longer ones. Grouped query attention shares each key value
head among several query heads, which makes the cache smaller. A mixture of experts layer
routes every token to a few of many feed forward experts; the router picks the top experts and
weights their outputs. Expert parallelism places different experts on different devices.

Tensor parallelism splits each weight matrix across devices and joins the partial results with
an all reduce. Pipeline parallelism places different layers on different devices. The transfer
of the key value cache from a prefill worker to a decode worker must be fast, so that the first
token arrives quickly and the time between tokens stays low. Good servers measure the time to
first token, the time per output token, the throughput in tokens per second, and the number of
requests that meet their latency targets.
"""


def _train_tokenizer_json() -> str:
    """Train the shared BPE tokenizer on :data:`CORPUS` and return its ``tokenizer.json``.

    The result has exactly :data:`VOCAB_SIZE` ids: the special tokens take ids 0, 1, 2 in the
    order of :data:`SPECIAL_TOKENS`, then the 256 byte symbols, then the learned merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(
            f"tokenizer training produced {tokenizer.get_vocab_size(with_added_tokens=True)} "
            f"ids, expected {VOCAB_SIZE}; the corpus is too small"
        )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token!r} got id {tokenizer.token_to_id(token)}")
    return str(tokenizer.to_str())


def _tokenizer_config() -> dict[str, Any]:
    """The ``tokenizer_config.json`` written next to the trained tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: Path) -> Path:
    """Train the shared tokenizer and write ``tokenizer.json`` and ``tokenizer_config.json``.

    Training is deterministic, so two calls write identical files. Returns ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_train_tokenizer_json(), encoding="utf-8")
    config = json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return out_dir


def _common_config(special_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "initializer_range": 0.05,  # less flat logits than 0.02: greedy argmax has clear margins
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "bos_token_id": None,
        "eos_token_id": special_ids[IM_END],
        "pad_token_id": special_ids[ENDOFTEXT],
        "dtype": "float32",
    }


def _llama(common: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **common,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    return LlamaForCausalLM(config)


def _qwen2(common: dict[str, Any]) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **common,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Qwen2ForCausalLM(config)


def _qwen3(common: dict[str, Any]) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **common,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # deliberately != hidden_size / num_attention_heads
        intermediate_size=128,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    )
    return Qwen3ForCausalLM(config)


def _qwen3_moe(common: dict[str, Any]) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # Qwen3MoeConfig declares no head_dim field, but the model reads one when present.
    extra: dict[str, Any] = {"head_dim": 16}
    config = Qwen3MoeConfig(
        **common,
        **extra,
        hidden_size=64,
        num_hidden_layers=3,
        mlp_only_layers=[0],  # the first layer is dense, as in some MoE checkpoints
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Qwen3MoeForCausalLM(config)


def _deepseek_v3(common: dict[str, Any]) -> Any:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        **common,
        hidden_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
        num_attention_heads=4,
        num_key_value_heads=4,  # MLA: one latent for all heads; transformers wants H here
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_interleave=True,
        num_mtp_layers=0,  # no multi-token-prediction layers in this checkpoint
        tie_word_embeddings=False,
        # mscale != mscale_all_dim: the cos/sin factor and the softmax scale both differ from 1.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
    )
    model = DeepseekV3ForCausalLM(config)
    # transformers initialises the score-correction bias to zeros; a random one exercises it
    # (it changes which experts are chosen, not their weights).
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3-moe": _qwen3_moe,
    "deepseek-v3": _deepseek_v3,
}
_SEEDS: dict[str, int] = {
    "llama": 1101,
    "qwen2": 2202,
    "qwen3": 3303,
    "qwen3-moe": 4404,
    "deepseek-v3": 5505,
}
# Config keys that transformers 5 saves under its internal names, renamed to the names that
# published checkpoints use (transformers reads both).
_PUBLISHED_CONFIG_NAMES: dict[str, dict[str, str]] = {
    "qwen3-moe": {"num_local_experts": "num_experts"},
}


def _is_current(model_dir: Path) -> bool:
    marker = model_dir / MARKER_FILE
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == GENERATOR_VERSION


def _use_published_config_names(config_path: Path, renames: dict[str, str]) -> None:
    """Rename config keys that transformers 5 saves under its internal names.

    Published checkpoints spell e.g. Qwen3-MoE's expert count ``num_experts``, which transformers
    5 maps to ``num_local_experts`` and saves as such; loaders must read what real checkpoints
    contain, so the tiny checkpoints use the published names. ``renames`` maps internal to
    published names. (DeepSeek-V3's ``attribute_map`` runs the other way: it already saves
    ``n_routed_experts``, the published name, so it needs no renaming.)
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    renamed = {renames.get(key, key): value for key, value in config.items()}
    config_path.write_text(json.dumps(renamed, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_family(family: str, model_dir: Path, tokenizer_dir: Path) -> None:
    """Build one family's model and write it, with the tokenizer, into ``model_dir``.

    The directory is assembled under a temporary name and renamed into place, so an
    interrupted run never leaves a directory that looks complete.
    """
    import torch
    from transformers import GenerationConfig

    tok_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    special_ids = {t["content"]: int(t["id"]) for t in tok_json["added_tokens"]}
    common = _common_config(special_ids)

    torch.manual_seed(_SEEDS[family])
    model = _BUILDERS[family](common).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=[special_ids[IM_END], special_ids[ENDOFTEXT]],
        pad_token_id=special_ids[ENDOFTEXT],
    )

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a model directory is not
        model.save_pretrained(staging, safe_serialization=True)
        _use_published_config_names(
            staging / "config.json", _PUBLISHED_CONFIG_NAMES.get(family, {})
        )
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, staging / name)
        (staging / MARKER_FILE).write_text(GENERATOR_VERSION + "\n", encoding="utf-8")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_tiny_models(out_dir: Path, families: Iterable[str] | None = None) -> dict[str, Path]:
    """Write tiny checkpoints under ``out_dir``, one directory per family, named as in FAMILIES.

    ``families`` defaults to all of :data:`FAMILIES`; an unknown name raises ValueError. A
    family whose directory already carries the current :data:`GENERATOR_VERSION` marker is
    skipped, so repeated calls are cheap. Returns ``{family: model_dir}`` for the requested
    families, in the order requested.
    """
    wanted = list(FAMILIES if families is None else dict.fromkeys(families))
    unknown = [f for f in wanted if f not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown tiny-model families {unknown}; known: {list(FAMILIES)}")

    out_dir = Path(out_dir)
    result = {family: out_dir / family for family in wanted}
    missing = [family for family, path in result.items() if not _is_current(path)]
    if missing:
        with tempfile.TemporaryDirectory(prefix="pdserve-tokenizer-") as tmp:
            tokenizer_dir = write_tokenizer(Path(tmp))
            for family in missing:
                _write_family(family, result[family], tokenizer_dir)
    return result


def _weight_files(src_dir: Path) -> list[Path]:
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [src_dir / name for name in dict.fromkeys(weight_map.values())]
    single = src_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {src_dir}")


def write_sharded(src_dir: Path, dst_dir: Path, max_shard_bytes: int) -> Path:
    """Re-save the checkpoint in ``src_dir`` as sharded safetensors in ``dst_dir``.

    Tensors keep their names, dtypes and values; they are packed in name order into
    ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` of tensor data
    each (a single larger tensor gets a shard of its own), with a
    ``model.safetensors.index.json`` that maps every tensor to its shard, as transformers
    writes it. Every other file in ``src_dir`` except weights and the generator marker (config,
    tokenizer, generation config) is copied. Returns ``dst_dir``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if src_dir.resolve() == dst_dir.resolve():
        raise ValueError(f"src_dir and dst_dir are the same directory: {src_dir}")

    tensors: dict[str, Any] = {}
    for path in _weight_files(src_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                tensors[name] = f.get_tensor(name)

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    dst_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, names in enumerate(shards, start=1):
        shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {n: tensors[n].contiguous() for n in names}
        save_file(shard, dst_dir / shard_name, metadata={"format": "pt"})
        for n in names:
            weight_map[n] = shard_name
            total_size += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (dst_dir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )

    for path in sorted(src_dir.iterdir()):
        skip = path.suffix == ".safetensors" or path.name in (
            "model.safetensors.index.json",
            MARKER_FILE,
        )
        if path.is_file() and not skip:
            shutil.copyfile(path, dst_dir / path.name)
    return dst_dir


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: write the requested families and print each model directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="directory to write models into")
    parser.add_argument(
        "--family",
        action="append",
        choices=FAMILIES,
        help="family to write (repeatable); default: all",
    )
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process only prints the directories it wrote
    for path in write_tiny_models(args.out, args.family).values():
        print(path)


if __name__ == "__main__":
    main()
