"""Owns the device: the model, its weights, the KV pool tensors, and one forward pass."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from engine.config import EngineConfig, ModelConfig
from engine.device import Device
from engine.eplb import initial_placement
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import AttentionBackend, TorchAttentionBackend
from engine.layers.ep_moe import ExpertParallelExperts, expert_parallel_layers, shard_experts
from engine.loader import (
    WeightTarget,
    WeightTargets,
    iter_checkpoint,
    load_dummy_weights,
    load_weights,
)
from engine.models import CausalLM, build_model
from engine.parallel import ParallelConfig
from engine.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

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
        self.attention: AttentionBackend = TorchAttentionBackend()
        with torch.device(device.torch_device):
            torch_default = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model: CausalLM = build_model(model_config, self.attention)
                self.ep_layers = self._shard_experts()
            finally:
                torch.set_default_dtype(torch_default)
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
            "KV pool: %d pages of %d tokens (%.1f MiB)",
            self.kv_cache.num_pages,
            config.page_size,
            self.kv_cache.total_bytes / 2**20,
        )

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

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        """Turn a scheduled batch into device tensors (one host-to-device copy per field)."""
        ids: list[int] = []
        positions: list[int] = []
        seq_index: list[int] = []
        prefix_lens = []
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.extend_lens, strict=True)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seq_index.extend([b] * n)
            prefix_lens.append(start)
        width = max(len(seq.page_table) for seq in batch.seqs)
        table = [seq.page_table + [0] * (width - len(seq.page_table)) for seq in batch.seqs]
        dev = self.device.torch_device

        def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(dev, non_blocking=True)

        page_table = tensor(table)
        pos = tensor(positions)
        ps = self.config.page_size
        out_slots = page_table[tensor(seq_index), pos // ps] * ps + pos % ps
        extend = tensor(batch.extend_lens)
        seq_lens = [p + n for p, n in zip(prefix_lens, batch.extend_lens, strict=True)]
        fb = ForwardBatch(
            input_ids=tensor(ids),
            positions=pos,
            out_slots=out_slots,
            page_table=page_table,
            prefix_lens=tensor(prefix_lens),
            extend_lens=extend,
            logits_indices=torch.cumsum(extend, 0) - 1,
            max_extend_len=max(batch.extend_lens),
            max_seq_len=max(seq_lens),
            kv_cache=self.kv_cache,
            is_decode=batch.is_decode,
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
            page_table=torch.zeros(0, 1, dtype=torch.int64, device=dev),
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
        fb = self.prepare(batch)
        hidden = self.model(fb)
        return self.model.compute_logits(hidden[fb.logits_indices])
