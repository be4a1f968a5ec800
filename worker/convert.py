"""Between protobuf messages and engine types. Shared by both kinds of worker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from engine.async_engine import EngineDeadError
from engine.engine import Engine, StepOutput
from engine.sampler import TokenLogprobs
from engine.sampling import Constraint, SamplingParams
from engine.scheduler import OutOfPagesError
from kv_transfer import KVLayout, LayoutMismatchError, TransferError
from protos import common_pb2


class PeerFailure(TransferError):
    """A hand-off failed through the peer worker at `peer` (its gRPC address): the prefill
    worker never delivered the KV, or refused the destination. Error replies name the peer so
    that the router charges the failure to it, not to the worker that reports it."""

    def __init__(self, message: str, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


def constraint_from_proto(p: common_pb2.SamplingParams) -> Constraint | None:
    """The request's constraint (the `constraint` oneof), or None; ValueError if malformed."""
    kind = p.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object":
        return Constraint("json_object") if p.json_object else None
    return Constraint(kind, getattr(p, kind))


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the bad field."""
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        max_new_tokens=p.max_new_tokens,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        constraint=constraint_from_proto(p),
        resumed_output_tokens=p.resumed_output_tokens,
    )


def logprobs_to_proto(lp: TokenLogprobs | None) -> common_pb2.TokenLogprobs | None:
    if lp is None:
        return None
    return common_pb2.TokenLogprobs(
        logprob=lp.logprob,
        top=[common_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def stream_chunk(outs: list[StepOutput]) -> common_pb2.StreamChunk:
    """The tokens at hand as one chunk (logprobs parallel to them, when asked for): a decode
    worker's stream message, or the prefill worker's early first token."""
    lps = [logprobs_to_proto(o.logprobs) for o in outs]
    return common_pb2.StreamChunk(
        token_ids=[o.token_id for o in outs], logprobs=[lp for lp in lps if lp is not None]
    )


def logprobs_from_proto(msg: common_pb2.TokenLogprobs, present: bool) -> TokenLogprobs | None:
    if not present:
        return None
    return TokenLogprobs(msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def weights_identity(model_path: str, load_format: str, seed: int) -> str:
    """16 hex digits naming the weights a worker serves, cheap to compute at start-up: a
    SHA-256 over config.json, the safetensors index and every shard's name and size (not the
    tensors: hashing gigabytes would slow every start). Seeded dummy weights are named by
    their config and seed, as every process with both draws the same tensors."""
    root = Path(model_path)
    digest = hashlib.sha256()
    config = root / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    if load_format == "dummy":
        digest.update(f"dummy seed {seed}".encode())
        return "dummy:" + digest.hexdigest()[:16]
    index = root / "model.safetensors.index.json"
    digest.update(index.read_bytes() if index.is_file() else b"")
    for shard in sorted(root.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def engine_layout(engine: Engine, model_name: str) -> KVLayout:
    cache = engine.runner.kv_cache
    config = engine.config
    return KVLayout(
        model=model_name,
        dtype=str(cache.dtype).removeprefix("torch."),
        page_size=cache.page_size,
        num_layers=cache.num_layers,
        num_kv_heads=cache.num_kv_heads,
        head_dim=cache.k_dim,
        v_head_dim=None if cache.v_dim == cache.k_dim else cache.v_dim,
        weights=weights_identity(config.model_path, config.load_format, config.seed),
    )


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        model=layout.model,
        dtype=layout.dtype,
        page_size=layout.page_size,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        fingerprint=layout.fingerprint,
        v_head_dim=layout.v_head_dim or 0,
        weights=layout.weights,
    )


def layout_from_proto(msg: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        model=msg.model,
        dtype=msg.dtype,
        page_size=msg.page_size,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        v_head_dim=msg.v_head_dim or None,
        weights=msg.weights,
    )


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a worker answers an exception with."""
    if isinstance(exc, LayoutMismatchError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, OutOfPagesError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, (TransferError, EngineDeadError)):
        # The peer or the engine is gone: the router retries on another pair.
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL
