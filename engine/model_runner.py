"""Owns the device: the model, its weights, the KV pool tensors, and one forward pass."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import cast

import numpy as np
import torch

from engine.config import EngineConfig, ModelConfig
from engine.cuda_graph import DecodeGraphs
from engine.device import Device, StagedUpload, check_interpreted_dtype
from engine.eplb import initial_placement
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import AttentionBackend, make_attention_backend
from engine.layers.ep_moe import ExpertParallelExperts, expert_parallel_layers, shard_experts
from engine.layers.linear import gemm_backend_for, set_gemm_backend
from engine.layers.moe import MoEBackend, moe_backend_for, set_moe_backend
from engine.loader import (
    WeightTarget,
    WeightTargets,
    iter_checkpoint,
    load_dummy_weights,
    load_weights,
)
from engine.models import CausalLM, build_model
from engine.page_table import DevicePageTable
from engine.parallel import ParallelConfig
from engine.piecewise_graph import PiecewiseGraphs
from engine.prefill_warmup import warm_up_prefill
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger(__name__)

# The most context tokens a prefill run as decode rows may read in all (`runs_as_decode`): 128
# tokens from scratch read 8,256; 256 read 32,896.
SHORT_PREFILL_MAX_READS = 32_896

CPU_DEFAULT_KV_BYTES = 256 << 20


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        config: EngineConfig,
        device: Device,
        parallel: ParallelConfig | None = None,
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.device = device
        self.parallel = parallel or ParallelConfig()
        self.dtype = device.resolve_dtype(config.dtype)
        backends = {
            "attention-backend": config.attention_backend,
            "moe-backend": config.moe_backend,
            "gemm-backend": config.gemm_backend,
        }
        check_interpreted_dtype(self.dtype, device.kind, backends)
        self.attention: AttentionBackend = make_attention_backend(
            config.attention_backend, device.kind, model_config.mla is not None
        )
        self.moe_backend: MoEBackend | None = None
        if model_config.is_moe:
            self.moe_backend = moe_backend_for(config.moe_backend, device.kind)
        with torch.device(device.torch_device):
            torch_default = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model: CausalLM = build_model(
                    model_config, self.attention, self._fuse_shared_experts()
                )
                self.ep_layers = self._shard_experts()
            finally:
                torch.set_default_dtype(torch_default)
        self.gemm_backend = gemm_backend_for(config.gemm_backend, device.kind)
        set_gemm_backend(cast(torch.nn.Module, self.model), self.gemm_backend)
        if self.moe_backend is not None:
            set_moe_backend(cast(torch.nn.Module, self.model), self.moe_backend)
        # RoPE tables stay float32 whatever the weights' dtype, like the reference.
        self.model.rotary.float()
        self._load_weights()
        # The model says what a token's cache entry is (per-head K/V, or MLA's latent + rope key).
        self.kv_spec: KVCacheSpec = self.model.kv_cache_spec()
        self.kv_cache = KVCache(
            model_config.num_layers,
            self._num_pages(),
            config.page_size,
            self.kv_spec,
            self.dtype,
            device.torch_device,
        )
        log.info(
            "KV pool: %d pages of %d tokens (%.1f MiB); attention backend %s%s",
            self.kv_cache.num_pages,
            config.page_size,
            self.kv_cache.total_bytes / 2**20,
            type(self.attention).__name__,
            ("" if self.moe_backend is None else f", MoE backend {self.moe_backend.name}")
            + f", GEMM backend {self.gemm_backend.name}",
        )
        context = config.context_length or model_config.max_position_embeddings
        self.max_context = context
        # Rows: every running request, plus one mid-prefill and one spare.
        self.page_table = DevicePageTable(
            config.max_running_requests + 2,
            -(-context // config.page_size),
            self.kv_cache.scratch_page,
            device.torch_device,
        )
        self._staging = StagedUpload(device.torch_device)  # a prefill's per-token rows
        self._seq_staging = StagedUpload(device.torch_device)  # per-sequence rows (`_upload`)
        self.graphs: DecodeGraphs | None = None
        reason = self._graph_blocker()
        if reason is None:
            self.graphs = DecodeGraphs(
                self, min(config.cuda_graph_max_bs, config.max_running_requests)
            )
            self.graphs.capture()
        elif device.kind == "cuda":
            log.info("decode runs eagerly: %s", reason)
        self.short_prefill_tokens = self._short_prefill_tokens()
        self.pieces: PiecewiseGraphs | None = None
        if (
            reason is None
            and not config.disable_piecewise_cuda_graph
            and config.piecewise_cuda_graph_max_tokens > 0
        ):
            self.pieces = PiecewiseGraphs(self, config.piecewise_cuda_graph_max_tokens)
            self.pieces.capture()
        self.warmup_prefills, self.warmup_seconds = 0, 0.0
        warm = device.kind == "cuda" and not config.disable_prefill_warmup
        if warm and not self.parallel.enabled:
            self.warmup_prefills, self.warmup_seconds = warm_up_prefill(self)

    def _short_prefill_tokens(self) -> int:
        """The most tokens a prefill may have to run as decode rows (`runs_as_decode`); 0 when
        none may: under expert parallelism (ranks step in lockstep through one path), or where
        the attention backend's decode lets a row attend before the others' KV is written."""
        limit = self.config.short_prefill_tokens
        if self.parallel.enabled or not self.attention.decode_writes_kv_first():
            return 0
        if limit < 0:
            return self.graphs.max_bs if self.graphs is not None else 0
        return limit

    def _fuse_shared_experts(self) -> bool:
        """Whether MoE layers stack their shared experts into the routed experts' weights:
        where the MoE backend computes them in its own launches, and not under expert
        parallelism (every rank runs the shared experts for its own tokens; only routed
        experts are sharded)."""
        return (
            self.moe_backend is not None
            and self.moe_backend.fuses_shared_experts
            and not self.parallel.enabled
            and not self.config.disable_shared_experts_fusion
        )

    def _graph_blocker(self) -> str | None:
        """Why decode cannot run as CUDA graphs here, or None when it can."""
        if self.config.disable_cuda_graph:
            return "--disable-cuda-graph"
        if self.device.kind != "cuda":
            return f"CUDA graphs need a CUDA device, not {self.device.kind}"
        if not self.attention.graph_safe:
            return f"the {type(self.attention).__name__} cannot be captured"
        if self.parallel.enabled:
            return "expert-parallel collectives are not captured"
        unsafe = {
            type(m).__name__
            for m in cast(torch.nn.Module, self.model).modules()
            if getattr(m, "graph_safe", True) is False
        }
        if unsafe:
            return f"{', '.join(sorted(unsafe))} cannot be captured"
        return None

    def _shard_experts(self) -> dict[str, ExpertParallelExperts]:
        """With expert parallelism, keep only this rank's share of every MoE layer's experts."""
        if not (self.parallel.enabled and self.model_config.is_moe):
            return {}
        placement = initial_placement(
            self.model_config.num_experts,
            self.parallel.ep_size,
            self.parallel.num_redundant_experts,
        )
        shard_experts(self.model, self.parallel, placement)  # type: ignore[arg-type]
        return expert_parallel_layers(self.model)  # type: ignore[arg-type]

    def _weight_targets(self) -> WeightTargets:
        """The model's weight map, with expert tensors sent to this rank's slots only."""
        targets: dict[str, WeightTarget | tuple[WeightTarget, ...]] = dict(self.model.weight_map())
        for name, layer in self.ep_layers.items():
            for key, target in list(targets.items()):
                if not isinstance(target, WeightTarget) or target.expert is None:
                    continue
                param_prefix, _, suffix = target.param.rpartition(".")
                if param_prefix != name:
                    continue
                targets[key] = tuple(
                    replace(target, param=f"{name}.local.{suffix}", expert=slot)
                    for slot in layer.local_slots_of(target.expert)
                )
        return targets

    def _load_weights(self) -> None:
        fmt = self.config.load_format
        if fmt == "dummy":
            load_dummy_weights(self.model, self.config.seed)
        else:
            with torch.no_grad():
                load_weights(
                    self.model, iter_checkpoint(self.config.model_path), self._weight_targets()
                )

    def _num_pages(self) -> int:
        c, m = self.config, self.model_config
        if c.num_pages is not None:
            return c.num_pages
        if c.max_total_tokens is not None:
            return -(-c.max_total_tokens // c.page_size)
        per_page = m.num_layers * self.kv_spec.page_bytes(c.page_size, self.dtype)
        if c.kv_cache_memory_bytes is not None:
            budget = c.kv_cache_memory_bytes
        elif self.device.kind == "cpu":
            budget = CPU_DEFAULT_KV_BYTES
        else:
            free, total = self.device.memory_info()
            budget = int(total * c.mem_fraction_static) - (total - free)
        pages = budget // per_page
        if pages < 1:
            raise ValueError(
                f"the KV budget of {budget} bytes holds no page of {per_page} bytes; "
                "raise --mem-fraction-static or --kv-cache-memory"
            )
        return pages

    # -- steps ------------------------------------------------------------------------------

    def _slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat KV slot of each token, from its sequence's row of the device page table."""
        ps = self.config.page_size
        pages = self.page_table.table[rows, positions // ps]
        return pages.long() * ps + positions % ps

    def decode_batch(
        self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, max_seq_len: int
    ) -> ForwardBatch:
        """A decode batch over device tensors `[B]` (a graph's static buffers, or one step's);
        `max_seq_len` bounds every sequence's context."""
        bsz = ids.shape[0]
        return ForwardBatch(
            input_ids=ids,
            positions=positions,
            out_slots=positions,  # replaced in run_decode, on the device
            page_table=self.page_table.table,
            req_rows=rows,
            prefix_lens=positions,
            extend_lens=torch.ones_like(positions),
            logits_indices=torch.arange(bsz, device=ids.device),
            max_extend_len=1,
            max_seq_len=max_seq_len,
            kv_cache=self.kv_cache,
            is_decode=True,
            host_extend_lens=(1,) * bsz,
        )

    def run_decode(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits `[B, vocab]` of a decode batch, with device work only (graph-capturable when
        the attention backend is)."""
        fb.out_slots = self._slots(fb.req_rows, fb.positions)
        self.attention.prepare(fb)
        return self.model.compute_logits(self.model(fb))

    def _upload(self, *rows: list[int]) -> torch.Tensor:
        """Equal-length int lists as one `[len(rows), n]` int64 device tensor (one copy),
        written into a reused pinned buffer: pinning a fresh tensor each step cost about 0.1
        ms of host time while a prefill's device waited (`bench.profile_decode`'s host gaps:
        `aten::pin_memory`, `aten::is_pinned`)."""
        return self._seq_staging.upload_lists(*rows)

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        """Turn a scheduled prefill (extend) batch into device tensors."""
        rows = self.page_table.rows_for(batch.seqs)
        prefix_lens = batch.prefix_lens

        def per_token_rows(out: np.ndarray) -> None:
            # Per token: id, position, page-table row, written with numpy into the upload's
            # (pinned) buffer: torch.tensor on Python lists took 5 ms for 16k tokens, and
            # pinning a fresh copy 0.4-0.5 ms, while the device waited for the step.
            at = 0
            for seq, start, n, row in zip(
                batch.seqs, prefix_lens, batch.extend_lens, rows, strict=True
            ):
                prompt = seq.prompt_array
                if prompt is not None and start + n <= len(prompt):
                    out[0, at : at + n] = prompt[start : start + n]
                else:  # past the prompt (a recompute after preemption), or no array
                    out[0, at : at + n] = seq.token_ids[start : start + n]
                out[1, at : at + n] = np.arange(start, start + n)
                out[2, at : at + n] = row
                at += n

        per_token = self._staging.upload(3, sum(batch.extend_lens), per_token_rows)
        per_seq = self._upload(rows, prefix_lens, list(batch.extend_lens))
        extend = per_seq[2]
        seq_lens = [p + n for p, n in zip(prefix_lens, batch.extend_lens, strict=True)]
        fb = ForwardBatch(
            input_ids=per_token[0],
            positions=per_token[1],
            out_slots=self._slots(per_token[2], per_token[1]),
            page_table=self.page_table.table,
            req_rows=per_seq[0],
            prefix_lens=per_seq[1],
            extend_lens=extend,
            logits_indices=torch.cumsum(extend, 0) - 1,
            max_extend_len=max(batch.extend_lens),
            max_seq_len=max(seq_lens),
            kv_cache=self.kv_cache,
            is_decode=batch.is_decode,
            host_extend_lens=tuple(batch.extend_lens),
            host_prefix_lens=tuple(prefix_lens),
        )
        self.attention.prepare(fb)
        return fb

    @torch.inference_mode()
    def forward_idle(self) -> None:
        """A step with no tokens: a rank with no requests still joins its MoE collectives."""
        dev = self.device.torch_device
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        fb = ForwardBatch(
            input_ids=empty,
            positions=empty,
            out_slots=empty,
            page_table=self.page_table.table,
            req_rows=empty,
            prefix_lens=empty,
            extend_lens=empty,
            logits_indices=empty,
            max_extend_len=0,
            max_seq_len=0,
            kv_cache=self.kv_cache,
            is_decode=True,
        )
        self.attention.prepare(fb)
        self.model(fb)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits `[B, vocab]` (float32) at each sequence's last new token."""
        if batch.is_decode:
            seqs = batch.seqs
            ids = [seq.token_ids[-1] for seq in seqs]
            return self.forward_decode(seqs, [seq.num_computed_tokens for seq in seqs], ids)
        if self.runs_as_decode(batch):
            return self._forward_as_decode(batch)
        fb = self.prepare(batch)
        if self.pieces is not None and self.pieces.fits(batch.num_tokens):
            hidden = self.pieces.run(fb)
        else:
            hidden = self.model(fb)
        return self.model.compute_logits(hidden[fb.logits_indices])

    def runs_as_decode(self, batch: ScheduledBatch) -> bool:
        """Whether prefill `batch` runs as decode rows, one per new token: its sequence's
        page-table row, its position, its id; each row attends to its context up to itself,
        the rows before it in the same step included (the decode step writes every row's KV
        first), which is the prefill's causal attention. Through the decode graphs, a short
        prefill launches no kernel from Python: Moonlight's 1 x 128 took 29.6 ms of host
        launches against about 11 ms of device work on an H100 (`bench.prefill_phases`).
        Taken up to `short_prefill_tokens` tokens, while the rows' context reads (each row
        reads its whole context; the extend kernel reads a prefix once per block of queries)
        stay within `SHORT_PREFILL_MAX_READS` tokens."""
        tokens = batch.num_tokens
        if not 0 < tokens <= self.short_prefill_tokens:
            return False
        reads = 0
        for start, n in zip(batch.prefix_lens, batch.extend_lens, strict=True):
            reads += n * start + n * (n + 1) // 2
        return reads <= SHORT_PREFILL_MAX_READS

    def _forward_as_decode(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = self.page_table.rows_for(batch.seqs)
        ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        last: list[int] = []
        for seq, start, n, row in zip(
            batch.seqs, batch.prefix_lens, batch.extend_lens, rows, strict=True
        ):
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            token_rows += [row] * n
            last.append(len(ids) - 1)
        logits = self._decode_rows(ids, positions, token_rows)
        return logits[self._upload(last)[0]]

    def forward_decode(
        self,
        seqs: list[Sequence],
        positions: list[int],
        ids: list[int] | None = None,
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step of `seqs` at `positions`, their input tokens given on the host
        (`ids`) or on the device (`device_ids` `[B]`: the previous step's samples, not yet
        read back, for overlapped scheduling). Logits `[B, vocab]`, float32."""
        rows = self.page_table.rows_for(seqs)
        host_ids = ids if ids is not None else [0] * len(seqs)
        return self._decode_rows(host_ids, positions, rows, device_ids)

    def _decode_rows(
        self,
        ids: list[int],
        positions: list[int],
        rows: list[int],
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[N, vocab]` of N decode rows (id, position, page-table row each), through
        the decode graphs where they fit."""
        if self.graphs is not None and self.graphs.fits(len(ids)):
            return self.graphs.replay(ids, positions, rows, device_ids)
        inputs = self._upload(ids, positions, rows)
        input_ids = inputs[0] if device_ids is None else device_ids
        fb = self.decode_batch(input_ids, inputs[1], inputs[2], max(positions) + 1)
        return self.run_decode(fb)
