"""Expert-parallel MoE: one layer's experts sharded over the ranks of the default group.

Each rank holds `slots_per_rank` physical expert slots; an `ExpertPlacement` says which logical
expert each slot holds (redundant copies of hot experts included). A token's (token, expert)
pair goes to one replica of its expert, chosen by token index; a token's hidden state travels
once to each rank that holds one of its chosen replicas and its partial sum comes back, with
two all-to-alls (dispatch, combine). Every rank must call `forward` the same number of times,
even with no tokens: the collectives pair up.

Routing load is counted per logical expert on every forward; `apply_placement` moves expert
weights between ranks (broadcast from a rank that holds them) to a new placement at run time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.eplb import ExpertPlacement, moves
from engine.layers.moe import FusedExperts, GroupedRouting, MoEBackend, TorchMoEBackend
from engine.parallel import ParallelConfig


class ExpertParallelExperts(nn.Module):
    """Drop-in for `FusedExperts` (same forward signature) across an expert-parallel group."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        parallel: ParallelConfig,
        placement: ExpertPlacement,
    ) -> None:
        super().__init__()
        if placement.num_logical != num_experts or placement.num_ranks != parallel.ep_size:
            raise ValueError(
                f"placement for {placement.num_logical} experts on {placement.num_ranks} ranks "
                f"does not fit {num_experts} experts on {parallel.ep_size} ranks"
            )
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.parallel = parallel
        # The local slots, stored like FusedExperts' stacked weights: w13 [S, 2I, H], w2 [S, H, I].
        self.local = FusedExperts(placement.slots_per_rank, hidden_size, intermediate_size)
        self.placement = placement
        # Routes the tokens (the model calls its select_experts) and computes the local slots.
        self.backend: MoEBackend = TorchMoEBackend()
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        # Forward calls since the counters were reset (the same on every rank: lockstep).
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("replica_table", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("replica_count", torch.empty(0, dtype=torch.int64), persistent=False)
        self._set_tables(placement)

    load: torch.Tensor
    steps: torch.Tensor
    replica_table: torch.Tensor
    replica_count: torch.Tensor

    def _set_tables(self, placement: ExpertPlacement) -> None:
        replicas = [placement.replicas(e) for e in range(self.num_experts)]
        width = max(len(r) for r in replicas)
        table = [list(r) + [r[0]] * (width - len(r)) for r in replicas]
        device = self.load.device
        self.replica_table = torch.tensor(table, dtype=torch.int64, device=device)
        self.replica_count = torch.tensor([len(r) for r in replicas], device=device)
        self.placement = placement

    def local_slots_of(self, expert: int) -> list[int]:
        """This rank's slot indices (0-based within the rank) that hold logical `expert`."""
        first = self.parallel.rank * self.placement.slots_per_rank
        return [
            p - first
            for p in self.placement.replicas(expert)
            if self.placement.rank_of(p) == self.parallel.rank
        ]

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x `[T, H]` (T may be 0); each token's output is the weighted sum of its experts'.

        Each token's hidden state goes once to each rank that holds one of its chosen replicas
        (not once per chosen expert), with that rank's share of its choices: the local slots
        `[k]` (-1 where the choice lives elsewhere) and their routing weights. The rank returns
        one row per token received, the weighted sum of its local experts' outputs, and the
        sender adds up the rows that come back.
        """
        num_tokens, top_k = topk_ids.shape
        world = self.parallel.ep_size
        slots_per_rank = self.placement.slots_per_rank
        flat_ids = topk_ids.flatten()
        self.load += torch.bincount(flat_ids, minlength=self.num_experts)
        self.steps += 1
        token_of = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
        # One replica per (token, expert) pair, spread by token index offset by rank: at small
        # batches every rank's token 0 would otherwise pick the same copy.
        spread = token_of + self.parallel.rank
        slot = self.replica_table[flat_ids, spread % self.replica_count[flat_ids]]
        dest = (slot // slots_per_rank).view(num_tokens, top_k)  # [T, k] rank of each choice
        local = (slot % slots_per_rank).view(num_tokens, top_k)  # [T, k] slot on that rank
        goes = torch.zeros(num_tokens, world, dtype=torch.bool, device=x.device)
        goes.scatter_(1, dest, True)  # [T, world]: token t has a choice on rank r
        # Rows to send, ordered by destination rank, then token.
        row_rank, row_token = goes.t().nonzero(as_tuple=True)  # [R], [R]
        mine = dest[row_token] == row_rank[:, None]  # [R, k]: the row's choices on its rank
        row_slots = torch.where(mine, local[row_token], -1).to(torch.int32)
        row_weights = torch.where(mine, topk_weights[row_token], 0)
        # Per destination rank: the rows, and the (token, expert) pairs among them, which
        # size the rank's kernels (its rows carry every choice's column, -1 where elsewhere).
        send_counts = torch.stack(
            [goes.sum(dim=0), torch.bincount(dest.flatten(), minlength=world)], 1
        )
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # one read on the host
        send_splits = [rows for rows, _ in counts[:world]]
        recv_splits = [rows for rows, _ in counts[world:]]
        num_recv = sum(recv_splits)
        recv_pairs = sum(pairs for _, pairs in counts[world:])

        def exchange(
            t: torch.Tensor, out_rows: int, out_splits: list[int], in_splits: list[int]
        ) -> torch.Tensor:
            out = t.new_empty((out_rows, *t.shape[1:]))
            dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits)
            return out

        # Dispatch: each row's hidden state once, its local slots and routing weights.
        rows = exchange(x[row_token], num_recv, recv_splits, send_splits)
        rows_slots = exchange(row_slots, num_recv, recv_splits, send_splits)
        rows_weights = exchange(row_weights, num_recv, recv_splits, send_splits)
        y = self._compute(rows, rows_slots, rows_weights, recv_pairs)
        # Combine: the per-rank partial sums go back in the order they came.
        back = exchange(y, len(row_token), send_splits, recv_splits)
        out = torch.zeros_like(x)
        out.index_add_(0, row_token, back)
        return out

    def forward_routed(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        top_k: int,
        renormalize: bool,
        defer: bool = False,
    ) -> torch.Tensor:
        """`FusedExperts.forward_routed`: routed by the backend, then `forward` (always a
        tensor: `defer` is declined, the combine being the exchange's)."""
        weights, ids = self.backend.select_experts(router_logits, top_k, renormalize)
        return self(x, weights, ids)

    def forward_routed_grouped(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        correction_bias: torch.Tensor,
        routing: GroupedRouting,
        defer: bool = False,
    ) -> torch.Tensor:
        """`FusedExperts.forward_routed_grouped` without shared experts (they stay a separate
        MLP under expert parallelism): routed by the backend, then `forward` (`defer`
        declined, as in `forward_routed`)."""
        weights, ids = self.backend.route_grouped(router_logits, correction_bias, routing)
        return self(x, weights, ids)

    def _compute(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        weights: torch.Tensor,
        pairs: int | None = None,
    ) -> torch.Tensor:
        """Received rows `[R, H]`, their local slots `[R, k]` (-1: not here) and weights `[R,
        k]`: each row's weighted sum of its local experts' outputs, `[R, H]`, by the backend.
        `pairs`: the slots that are here, known from the exchange's counts."""
        return self.backend.experts(rows, self.local.w13, self.local.w2, weights, slots, pairs)

    @torch.no_grad()
    def apply_placement(self, new: ExpertPlacement) -> None:
        """Move to `new` on every rank at once (a collective): copy each changed slot's weights
        from a slot that holds its expert now, then switch the routing tables."""
        old = self.placement
        if new.slots_per_rank != old.slots_per_rank or new.num_ranks != old.num_ranks:
            raise ValueError("a new placement must keep the ranks and slots per rank")
        rank = self.parallel.rank
        w13, w2 = self.local.w13, self.local.w2
        # First read every source as it is in the old placement, then write: a slot may be
        # both the source of one move and the destination of another.
        incoming: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for move in moves(old, new):
            src_rank, dst_rank = old.rank_of(move.source_slot), new.rank_of(move.slot)
            src_local = move.source_slot - src_rank * old.slots_per_rank
            dst_local = move.slot - dst_rank * new.slots_per_rank
            if src_rank == dst_rank:
                if rank == dst_rank:
                    incoming.append((dst_local, w13[src_local].clone(), w2[src_local].clone()))
                continue
            # Everyone joins the broadcast (the default group); only the destination keeps it.
            buf13 = w13[src_local].clone() if rank == src_rank else torch.empty_like(w13[0])
            buf2 = w2[src_local].clone() if rank == src_rank else torch.empty_like(w2[0])
            dist.broadcast(buf13, src=src_rank)
            dist.broadcast(buf2, src=src_rank)
            if rank == dst_rank:
                incoming.append((dst_local, buf13, buf2))
        for dst_local, new13, new2 in incoming:
            w13[dst_local].copy_(new13)
            w2[dst_local].copy_(new2)
        self._set_tables(new)


def expert_parallel_layers(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def shard_experts(model: nn.Module, parallel: ParallelConfig, placement: ExpertPlacement) -> int:
    """Replace every `FusedExperts` of `model` by its expert-parallel shard; returns how many."""
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, FusedExperts) and not name.endswith(".local")
    ]
    for name, module in swaps:
        if module.num_shared:
            # The shared experts run on every rank for its own tokens: not shardable experts.
            raise ValueError(
                f"{name} stacks {module.num_shared} shared experts; build the model without "
                "shared-expert fusion for expert parallelism"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        hidden = module.w13.shape[2]
        ep = ExpertParallelExperts(
            module.num_experts, hidden, module.intermediate_size, parallel, placement
        )
        # .to() casts floating-point tensors only: the routing tables stay int64.
        setattr(parent, attr, ep.to(device=module.w13.device, dtype=module.w13.dtype))
    return len(swaps)


def global_load(layer: ExpertParallelExperts) -> list[int]:
    """A layer's routing counts per logical expert, summed over every rank (collective)."""
    load = layer.load.clone()
    dist.all_reduce(load)
    return [int(v) for v in load.tolist()]
