"""Turning "these source pages go to those destination pages" into one batch of writes.

Consecutive positions whose source and destination ids both step by one merge into a run, and a
run is one write per layer per K/V, so a contiguous hand-off costs `2 * num_layers` writes
however many pages it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.layout import KVPoolDescriptor, check_compatible


@dataclass(frozen=True)
class PageRun:
    """`count` pages from `src_start, src_start + 1, ...` to `dst_start, dst_start + 1, ...`."""

    src_start: int
    dst_start: int
    count: int


@dataclass(frozen=True)
class WriteBatch:
    """The arguments of one `batch_transfer_sync_write`: entry `i` copies `lengths[i]` bytes
    from local `srcs[i]` to remote `dsts[i]`."""

    srcs: list[int]
    dsts: list[int]
    lengths: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(self.lengths)

    def __len__(self) -> int:
        return len(self.srcs)

    def chunks(self, max_writes: int) -> list[WriteBatch]:
        """This batch cut, in order, into batches of at most `max_writes` entries."""
        if max_writes < 1:
            raise ValueError(f"max_writes must be >= 1, got {max_writes}")
        if len(self.srcs) <= max_writes:
            return [self]  # not copied: a 1-token-page hand-off has 131,072 writes
        return [
            WriteBatch(
                self.srcs[i : i + max_writes],
                self.dsts[i : i + max_writes],
                self.lengths[i : i + max_writes],
            )
            for i in range(0, len(self.srcs), max_writes)
        ]


def coalesce_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[PageRun]:
    """Position `i` maps `src_pages[i]` to `dst_pages[i]`; merge the positions where both ids
    step by exactly one into runs, in order."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(
            f"{len(src_pages)} source pages but {len(dst_pages)} destination pages; "
            "each source page needs exactly one destination"
        )
    runs: list[PageRun] = []
    for src, dst in zip(src_pages, dst_pages, strict=True):
        if src < 0 or dst < 0:
            raise ValueError(f"page ids must be >= 0, got source {src} -> destination {dst}")
        if runs:
            last = runs[-1]
            if src == last.src_start + last.count and dst == last.dst_start + last.count:
                runs[-1] = PageRun(last.src_start, last.dst_start, last.count + 1)
                continue
        runs.append(PageRun(src, dst, 1))
    return runs


def _check_pages(pages: Sequence[int], num_pages: int, pool: str) -> None:
    for page in pages:
        if not 0 <= page < num_pages:
            raise ValueError(f"page {page} is outside the {pool} pool of {num_pages} pages")


def build_write_batch(
    src: KVPoolDescriptor,
    dst: KVPoolDescriptor,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
) -> WriteBatch:
    """The writes that copy every layer's K and V of `src_pages` (in `src`) to `dst_pages` (in
    `dst`): one entry per run per layer per K/V, ordered layer by layer, K before V.

    Raises `LayoutMismatchError` if the layouts differ and `ValueError` for a page outside
    its pool or a destination page named twice.
    """
    check_compatible(src.layout, dst.layout, local_label="source", remote_label="destination")
    _check_pages(src_pages, src.num_pages, "source")
    _check_pages(dst_pages, dst.num_pages, "destination")
    if len(set(dst_pages)) != len(dst_pages):
        raise ValueError(f"a destination page is named twice in {list(dst_pages)}")
    runs = coalesce_runs(src_pages, dst_pages)
    k_bytes, v_bytes = src.layout.k_page_bytes, src.layout.v_page_bytes
    srcs: list[int] = []
    dsts: list[int] = []
    lengths: list[int] = []
    for layer in range(src.layout.num_layers):
        for src_base, dst_base, page_bytes in (
            (src.k_base_addrs[layer], dst.k_base_addrs[layer], k_bytes),
            (src.v_base_addrs[layer], dst.v_base_addrs[layer], v_bytes),
        ):
            for run in runs:
                srcs.append(src_base + run.src_start * page_bytes)
                dsts.append(dst_base + run.dst_start * page_bytes)
                lengths.append(run.count * page_bytes)
    return WriteBatch(srcs, dsts, lengths)
