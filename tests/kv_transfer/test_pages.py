"""Page runs and write batches: which bytes go where."""

from __future__ import annotations

import dataclasses

import pytest

from kv_transfer import (
    KVLayout,
    KVPoolDescriptor,
    LayoutMismatchError,
    PageRun,
    build_write_batch,
    coalesce_runs,
)

LAYOUT = KVLayout("tiny-llama", "float32", page_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
PAGE = LAYOUT.page_bytes  # 256


def test_contiguous_pages_make_one_run() -> None:
    assert coalesce_runs([3, 4, 5, 6], [10, 11, 12, 13]) == [PageRun(3, 10, 4)]


def test_fragmented_pages_split_where_either_side_jumps() -> None:
    assert coalesce_runs([3, 4, 5, 9], [0, 1, 2, 7]) == [PageRun(3, 0, 3), PageRun(9, 7, 1)]
    # source contiguous but destination not: no merge across the jump
    assert coalesce_runs([0, 1, 2, 3], [5, 6, 9, 10]) == [PageRun(0, 5, 2), PageRun(2, 9, 2)]
    assert coalesce_runs([0, 2, 4], [0, 1, 2]) == [
        PageRun(0, 0, 1),
        PageRun(2, 1, 1),
        PageRun(4, 2, 1),
    ]


def test_reversed_pages_do_not_merge() -> None:
    assert coalesce_runs([5, 4, 3], [2, 1, 0]) == [
        PageRun(5, 2, 1),
        PageRun(4, 1, 1),
        PageRun(3, 0, 1),
    ]


def test_single_and_no_pages() -> None:
    assert coalesce_runs([7], [0]) == [PageRun(7, 0, 1)]
    assert coalesce_runs([], []) == []


def test_bad_page_lists() -> None:
    with pytest.raises(ValueError, match="3 source pages but 2 destination pages"):
        coalesce_runs([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="source -1 -> destination 0"):
        coalesce_runs([-1], [0])
    with pytest.raises(ValueError, match="source 1 -> destination -4"):
        coalesce_runs([0, 1], [3, -4])


SRC = KVPoolDescriptor(
    LAYOUT,
    k_base_addrs=(0x10000, 0x20000),
    v_base_addrs=(0x30000, 0x40000),
    num_pages=16,
)
DST = KVPoolDescriptor(
    LAYOUT,
    k_base_addrs=(0x100000, 0x200000),
    v_base_addrs=(0x300000, 0x400000),
    num_pages=8,
)


def test_write_batch_addresses_and_bytes() -> None:
    batch = build_write_batch(SRC, DST, [3, 4, 5, 9], [0, 1, 2, 7])
    # layer by layer, K before V, runs in order: (3->0, 3 pages), (9->7, 1 page)
    assert batch.srcs == [
        0x10000 + 3 * PAGE, 0x10000 + 9 * PAGE,  # layer 0 K
        0x30000 + 3 * PAGE, 0x30000 + 9 * PAGE,  # layer 0 V
        0x20000 + 3 * PAGE, 0x20000 + 9 * PAGE,  # layer 1 K
        0x40000 + 3 * PAGE, 0x40000 + 9 * PAGE,  # layer 1 V
    ]  # fmt: skip
    assert batch.dsts == [
        0x100000, 0x100000 + 7 * PAGE,
        0x300000, 0x300000 + 7 * PAGE,
        0x200000, 0x200000 + 7 * PAGE,
        0x400000, 0x400000 + 7 * PAGE,
    ]  # fmt: skip
    assert batch.lengths == [3 * PAGE, PAGE] * 4
    assert batch.total_bytes == 4 * PAGE * 2 * 2  # pages x layers x (K, V)
    assert len(batch) == 8


def test_contiguous_batch_is_two_writes_per_layer() -> None:
    batch = build_write_batch(SRC, DST, range(8), range(8))
    assert len(batch) == 2 * LAYOUT.num_layers
    assert batch.lengths == [8 * PAGE] * 4


def test_empty_batch() -> None:
    batch = build_write_batch(SRC, DST, [], [])
    assert len(batch) == 0 and batch.total_bytes == 0


def test_write_batch_rejects_pages_outside_the_pools() -> None:
    with pytest.raises(ValueError, match="page 16 is outside the source pool of 16 pages"):
        build_write_batch(SRC, DST, [16], [0])
    with pytest.raises(ValueError, match="page 8 is outside the destination pool of 8 pages"):
        build_write_batch(SRC, DST, [0], [8])
    with pytest.raises(ValueError, match="destination page is named twice"):
        build_write_batch(SRC, DST, [0, 1], [3, 3])


def test_write_batch_rejects_mismatched_layouts() -> None:
    other = dataclasses.replace(DST, layout=dataclasses.replace(LAYOUT, head_dim=16))
    with pytest.raises(
        LayoutMismatchError, match="head_dim 8 \\(source\\) vs 16 \\(destination\\)"
    ):
        build_write_batch(SRC, other, [0], [0])


def test_chunks_keep_order_and_cover_everything() -> None:
    batch = build_write_batch(SRC, DST, [0, 2, 4, 6], [0, 2, 4, 6])  # 4 runs x 4 = 16
    parts = batch.chunks(5)
    assert [len(p) for p in parts] == [5, 5, 5, 1]
    assert [a for p in parts for a in p.srcs] == batch.srcs
    assert [a for p in parts for a in p.dsts] == batch.dsts
    assert sum(p.total_bytes for p in parts) == batch.total_bytes
    assert batch.chunks(100) == [batch]
    with pytest.raises(ValueError, match="max_writes must be >= 1, got 0"):
        batch.chunks(0)
