"""Model and engine configuration: frozen, validated at construction.

`ModelConfig` is read from a Hugging Face `config.json` (both the transformers 4 field names
real checkpoints use, `rope_theta`/`rope_scaling`/`num_experts`, and the transformers 5 ones,
`rope_parameters`/`num_local_experts`). DeepSeek-V3-class models (also Kimi-K2) add an
`MLAConfig` and the grouped sigmoid routing fields. `EngineConfig` holds the runtime knobs, named
after SGLang's flags where the meaning is the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")
# Multi-head latent attention: the KV cache holds a compressed latent, not per-head K/V.
MLA_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `rope_type` plus the scaling parameters that type reads."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
            raise ValueError(f"rope type {self.rope_type!r} needs original_max_position_embeddings")

    @staticmethod
    def from_hf(raw: dict[str, Any]) -> RopeConfig:
        params = dict(raw.get("rope_parameters") or {})
        legacy = raw.get("rope_scaling") or {}
        params = {**legacy, **params}
        if "rope_theta" not in params and "rope_theta" in raw:
            params["rope_theta"] = raw["rope_theta"]
        rope_type = str(params.get("rope_type") or params.get("type") or "default")
        factor = params.get("factor")
        original = params.get("original_max_position_embeddings")
        if rope_type == "yarn" and factor is None and original:
            factor = raw["max_position_embeddings"] / original
        return RopeConfig(
            theta=float(params.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            factor=float(factor) if factor is not None else 1.0,
            original_max_position_embeddings=original,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2).

    Each token's keys and values are compressed into one `kv_lora_rank` latent (shared by all
    heads) plus one `qk_rope_head_dim` rotary key; per head, the query/key width is
    `qk_nope_head_dim + qk_rope_head_dim` and the value width `v_head_dim`. Queries are
    compressed through a `q_lora_rank` bottleneck when it is set (V3), or projected directly
    when it is None (V2-Lite). `rope_interleave`: the rotary dimensions come in adjacent pairs
    `(x0, x1), (x2, x3), ...` (DeepSeek's layout) instead of two halves.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank must be >= 1 or None, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, as the engine needs it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Multi-head latent attention (None: standard GQA with num_kv_heads x head_dim K and V).
    # With MLA, head_dim is the per-head query/key width (qk_nope + qk_rope).
    mla: MLAConfig | None = None
    # MoE (num_experts == 0 for dense models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Routing: "softmax" top-k (Qwen), or "sigmoid" with a score-correction bias and top-k
    # restricted to the best `topk_groups` of `num_expert_groups` groups (DeepSeek-V3 noaux_tc).
    scoring_func: str = "softmax"
    num_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    # Always-on experts beside the routed ones, each of moe_intermediate_size (DeepSeek).
    num_shared_experts: int = 0
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if (self.mla is not None) != (self.architecture in MLA_ARCHITECTURES):
            raise ValueError(
                f"{self.architecture} {'needs' if self.mla is None else 'takes no'} MLA settings"
            )
        if self.mla is None and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.is_moe:
            self._validate_routing()

    def _validate_routing(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}; {SCORING_FUNCS}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(
                f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.num_shared_experts}")
        groups = self.num_expert_groups
        if groups < 1 or self.num_experts % groups:
            raise ValueError(
                f"n_group ({groups}) must be >= 1 and divide n_routed_experts ({self.num_experts})"
            )
        if not 1 <= self.topk_groups <= groups:
            raise ValueError(f"topk_group ({self.topk_groups}) must be in [1, n_group={groups}]")
        if self.scoring_func == "sigmoid":
            per_group = self.num_experts // groups
            # A group's score is the sum of its two best experts.
            if per_group < 2:
                raise ValueError(
                    f"grouped routing needs >= 2 experts per group, got {per_group} "
                    f"({self.num_experts} experts in {groups} groups)"
                )
            if self.num_experts_per_tok > self.topk_groups * per_group:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the "
                    f"{self.topk_groups * per_group} experts of the topk_group={self.topk_groups} "
                    "selected groups"
                )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        """Width of the rotary part of each query/key head."""
        return self.head_dim if self.mla is None else self.mla.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.is_moe
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    @staticmethod
    def from_pretrained(model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return ModelConfig.from_hf(json.loads(path.read_text()), name=Path(model_dir).name)

    @staticmethod
    def from_hf(raw: dict[str, Any], name: str = "model") -> ModelConfig:
        archs = raw.get("architectures") or []
        if len(archs) != 1:
            raise ValueError(f"config.json must name exactly one architecture, got {archs}")
        arch = archs[0]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")
        if arch == "DeepseekV3ForCausalLM":
            return _deepseek_v3_from_hf(raw, name)
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        is_qwen2 = arch == "Qwen2ForCausalLM"
        is_qwen3 = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        attention_bias = bool(raw.get("attention_bias", False))
        moe = arch in MOE_ARCHITECTURES
        return ModelConfig(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=is_qwen3,
            num_experts=(raw.get("num_experts") or raw.get("num_local_experts") or 0) if moe else 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=raw.get("moe_intermediate_size", 0) if moe else 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=raw.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            eos_token_ids=_eos_ids(raw),
            name=name,
        )


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def _deepseek_v3_from_hf(raw: dict[str, Any], name: str) -> ModelConfig:
    """DeepSeek-V3 / Kimi-K2. Absent fields take transformers' `DeepseekV3Config` defaults."""
    if raw.get("attention_bias", False):
        raise ValueError("DeepseekV3ForCausalLM with attention_bias=true is not implemented")
    quant = (raw.get("quantization_config") or {}).get("quant_method")
    if quant is not None:
        # The published DeepSeek-V3/R1 and Kimi-K2 weights are block-wise FP8.
        raise ValueError(
            f"quantized checkpoints (quant_method={quant!r}) are not supported; "
            "use a bfloat16 conversion of the weights"
        )
    topk_method = raw.get("topk_method", "noaux_tc")
    scoring = raw.get("scoring_func", "sigmoid")
    if (topk_method, scoring) != ("noaux_tc", "sigmoid"):
        raise ValueError(
            f"unsupported DeepSeek routing topk_method={topk_method!r} "
            f"scoring_func={scoring!r}; only 'noaux_tc' with 'sigmoid' is implemented"
        )
    mla = MLAConfig(
        kv_lora_rank=raw.get("kv_lora_rank", 512),
        qk_nope_head_dim=raw.get("qk_nope_head_dim", 128),
        qk_rope_head_dim=raw.get("qk_rope_head_dim", 64),
        v_head_dim=raw.get("v_head_dim") or 128,
        q_lora_rank=raw.get("q_lora_rank", 1536),
        rope_interleave=bool(raw.get("rope_interleave", True)),
    )
    num_layers = raw["num_hidden_layers"]
    first_dense = raw.get("first_k_dense_replace")
    first_dense = 3 if first_dense is None else first_dense
    freq = raw.get("moe_layer_freq") or 1
    num_heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture="DeepseekV3ForCausalLM",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        # MLA has no per-head K/V in the cache; kv_cache_spec() of the model says what it holds.
        num_kv_heads=num_heads,
        head_dim=mla.qk_head_dim,
        intermediate_size=raw["intermediate_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=RopeConfig.from_hf(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        mla=mla,
        num_experts=raw.get("n_routed_experts") or raw.get("num_local_experts") or 0,
        num_experts_per_tok=raw.get("num_experts_per_tok") or 8,
        moe_intermediate_size=raw.get("moe_intermediate_size", 2048),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        # Dense: the first `first_k_dense_replace` layers, and those off the moe_layer_freq beat.
        mlp_only_layers=tuple(i for i in range(num_layers) if i < first_dense or i % freq),
        scoring_func="sigmoid",
        num_expert_groups=raw.get("n_group") or 1,
        topk_groups=raw.get("topk_group") or 1,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5)),
        num_shared_experts=raw.get("n_shared_experts") or 0,
        eos_token_ids=_eos_ids(raw),
        name=name,
    )


LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Routed-expert kernels (engine/layers/moe.py): auto = triton on CUDA, torch elsewhere.
MOE_BACKENDS = ("auto", "torch", "triton")
# Decode-sized linear layers (engine/layers/linear.py): auto = the skinny Triton GEMM where it
# measured faster than cuBLAS (Hopper), torch elsewhere.
GEMM_BACKENDS = ("auto", "torch", "triton")
# PDSERVE_PDL (engine/kernels/pdl.py): programmatic dependent launch of the Triton kernels on
# Hopper and later; unset is "wait".
PDL_MODES = {"0": 0, "off": 0, "wait": 1, "1": 1, "early": 2}


def pdl_mode_from_env() -> int:
    """PDSERVE_PDL's mode (0 off, 1 wait, 2 early); a value not listed is a ValueError."""
    name = os.environ.get("PDSERVE_PDL", "wait")
    if name not in PDL_MODES:
        raise ValueError(f"PDSERVE_PDL must be one of {', '.join(PDL_MODES)}, got {name!r}")
    return PDL_MODES[name]


def _ints_from_env(name: str) -> tuple[str, tuple[int, ...]]:
    """Environment variable `name`'s text and its comma-separated integers (empty where any
    is not one: the caller's length check then names the form)."""
    value = os.environ.get(name, "")
    try:
        return value, tuple(int(x) for x in value.split(","))
    except ValueError:
        return value, ()


def _is_tile(keys: int) -> bool:
    """Whether `keys` can be a kernel's key tile: a power of two of at least 16."""
    return keys >= 16 and not keys & (keys - 1)


def decode_tiles_from_env() -> tuple[int, ...] | None:
    """PDSERVE_DECODE_TILES=KEYS,WARPS,STAGES[,SHORT_KEYS,SHORT_MAX] (e.g. `32,4,3` or
    `64,4,3,32,256`): the decode split kernel's launch where a step takes one split
    (`attention.default_tiles`), for an engine A/B; the two optional values give a range of at
    most SHORT_MAX keys tiles of SHORT_KEYS instead (`attention.DecodeTiles`). Unset is None
    (the default tiles). A bad value is a ValueError that names the form."""
    value, values = _ints_from_env("PDSERVE_DECODE_TILES")
    if not value:
        return None
    form = "KEYS,WARPS,STAGES[,SHORT_KEYS,SHORT_MAX], e.g. 32,4,3 or 64,4,3,32,256"
    if len(values) not in (3, 5):
        raise ValueError(f"PDSERVE_DECODE_TILES must be {form}, got {value!r}")
    block_n, warps, stages = values[:3]
    short_n, short_max = values[3:] or (0, 0)
    if not _is_tile(block_n) or warps not in (1, 2, 4, 8) or stages < 1:
        raise ValueError(
            f"PDSERVE_DECODE_TILES needs keys a power of two >= 16, warps 1-8 and stages >= 1, "
            f"got {value!r}"
        )
    if len(values) == 5 and (not _is_tile(short_n) or short_n >= block_n or short_max < 1):
        raise ValueError(
            f"PDSERVE_DECODE_TILES needs SHORT_KEYS a power of two >= 16 below KEYS and "
            f"SHORT_MAX >= 1, got {value!r}"
        )
    return values


def mla_decode_tiles_from_env() -> tuple[int, int, int, bool] | None:
    """PDSERVE_MLA_DECODE_TILES=KEYS,WARPS,STAGES,AHEAD (e.g. `32,4,3,1`): the quartered MLA
    decode kernel's launch in 16-bit types, for an engine A/B (`mla_decode.env_launch`): keys
    a tile, warps (0: the rule), pipeline stages, and 1 to read each tile's page ids a step
    ahead (`mla_decode(..., pages_ahead=True)`); `64,0,2,0` is the launch before the
    thirty-fourth session. Unset is None (the rule: `mla_decode.default_pages_ahead`). A bad
    value is a ValueError that names the form."""
    value, values = _ints_from_env("PDSERVE_MLA_DECODE_TILES")
    if not value:
        return None
    if len(values) != 4:
        raise ValueError(
            f"PDSERVE_MLA_DECODE_TILES must be KEYS,WARPS,STAGES,AHEAD, e.g. 32,4,3,1, "
            f"got {value!r}"
        )
    keys, warps, stages, ahead = values
    if not _is_tile(keys) or warps not in (0, 1, 2, 4, 8) or stages < 1:
        raise ValueError(
            f"PDSERVE_MLA_DECODE_TILES needs keys a power of two >= 16, warps 0 (the rule), "
            f"1, 2, 4 or 8 and stages >= 1, got {value!r}"
        )
    if ahead not in (0, 1):
        raise ValueError(f"PDSERVE_MLA_DECODE_TILES's AHEAD is 0 or 1, got {value!r}")
    return keys, warps, stages, bool(ahead)


def decode_splits_from_env() -> tuple[int, int] | None:
    """PDSERVE_DECODE_SPLITS=MAX[,MIN_TILES] (e.g. `16` or `64,2`): the decode attention's
    split rule for an engine A/B, at most MAX context splits a (sequence, KV head) and, where a
    step takes several, each split at least MIN_TILES key tiles (`attention.split_rule`); unset
    is None (64 and 1). A bad value is a ValueError that names the form."""
    value, values = _ints_from_env("PDSERVE_DECODE_SPLITS")
    if not value:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(
            f"PDSERVE_DECODE_SPLITS must be MAX[,MIN_TILES], both >= 1, e.g. 16 or 64,2, "
            f"got {value!r}"
        )
    return values[0], (values[1] if len(values) == 2 else 1)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime settings of one engine instance.

    The KV pool is sized, in order of precedence, by `num_pages`, `max_total_tokens`,
    `kv_cache_memory_bytes`, or (on accelerators) `mem_fraction_static` of device memory.
    """

    model_path: str
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    page_size: int = 16
    num_pages: int | None = None
    max_total_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    mem_fraction_static: float = 0.85
    context_length: int | None = None
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    disable_radix_cache: bool = False
    # Expert parallelism of one instance (one process per rank; see engine/parallel.py).
    ep_size: int = 1
    ep_num_redundant_experts: int = 0
    # Fast paths (engine/layers/attention.py, engine/cuda_graph.py); "auto" picks per device.
    attention_backend: str = "auto"
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False
    cuda_graph_max_bs: int = 256
    # Prefills of up to this many tokens run as decode rows, through the decode graphs where
    # they fit (engine/model_runner.py, `ModelRunner.runs_as_decode`): -1 auto (the graphs'
    # largest batch where graphs are captured, else off), 0 off.
    short_prefill_tokens: int = -1
    # Prefills of up to this many tokens (not run as decode rows) replay CUDA graphs captured
    # in pieces between attention calls (engine/piecewise_graph.py); 0 or
    # `disable_piecewise_cuda_graph` off, as `disable_cuda_graph` turns off all graphs. 1,024:
    # past it the device's work bounds a prefill either way (on an H100 Moonlight's 1 x 2,048
    # 27.1 ms in pieces against 26.7 eagerly), while the pieces' memory grows with the
    # largest bucket (788 MiB for Moonlight's buckets up to 2,048). A disaggregated decode
    # worker's flags default it to 0 (`worker.args.worker_engine_config`).
    disable_piecewise_cuda_graph: bool = False
    piecewise_cuda_graph_max_tokens: int = 1024
    # One prefill of each kind run at start on CUDA (engine/prefill_warmup.py), so that no
    # request waits for its kernels to compile; not under expert parallelism (its ranks'
    # collectives), nor on a disaggregated decode worker (`engine.cli`: it prefills only to
    # recompute a preempted request).
    disable_prefill_warmup: bool = False
    moe_backend: str = "auto"
    # Shared experts stacked into the routed experts' weights where the MoE backend computes
    # them in its own launches (the Triton backend, expert parallelism off): off keeps the MLP.
    disable_shared_experts_fusion: bool = False
    gemm_backend: str = "auto"
    # Constrained decoding (engine/grammar.py): a request whose grammar takes longer than this
    # to compile fails with a ValueError (a 400); the compile goes on in the background.
    grammar_compile_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        pdl_mode_from_env()  # a bad PDSERVE_PDL fails here, at start, not at the first launch
        decode_tiles_from_env()  # and so does a bad PDSERVE_DECODE_TILES
        decode_splits_from_env()  # or PDSERVE_DECODE_SPLITS
        mla_decode_tiles_from_env()  # or PDSERVE_MLA_DECODE_TILES
        if not self.grammar_compile_timeout_s > 0:
            raise ValueError(
                f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s}"
            )
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend must be one of {MOE_BACKENDS}, got {self.moe_backend!r}")
        if self.gemm_backend not in GEMM_BACKENDS:
            raise ValueError(
                f"gemm_backend must be one of {GEMM_BACKENDS}, got {self.gemm_backend!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        for name in ("num_pages", "max_total_tokens", "kv_cache_memory_bytes", "context_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {value}")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}"
            )
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError(
                "chunked_prefill_size must be >= 1, or -1 to disable, "
                f"got {self.chunked_prefill_size}"
            )
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.piecewise_cuda_graph_max_tokens < 0:
            raise ValueError(
                "piecewise_cuda_graph_max_tokens must be >= 0 (0: off), got "
                f"{self.piecewise_cuda_graph_max_tokens}"
            )
        if self.short_prefill_tokens < -1:
            raise ValueError(
                f"short_prefill_tokens must be -1 (auto), 0 (off) or a token count, "
                f"got {self.short_prefill_tokens}"
            )
        if self.ep_size < 1 or self.ep_num_redundant_experts < 0:
            raise ValueError(
                f"ep_size must be >= 1 and ep_num_redundant_experts >= 0, got "
                f"{self.ep_size} and {self.ep_num_redundant_experts}"
            )

    @property
    def chunked_prefill_enabled(self) -> bool:
        return self.chunked_prefill_size > 0

    @property
    def prefill_token_budget(self) -> int:
        """Most prompt tokens one prefill step computes."""
        if self.chunked_prefill_enabled:
            return min(self.chunked_prefill_size, self.max_prefill_tokens)
        return self.max_prefill_tokens
