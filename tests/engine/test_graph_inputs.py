"""The decode graphs' input layout (engine.cuda_graph): per-bucket ranges of one flat buffer,
so that a step's inputs go to the device in one contiguous copy from pinned memory. The
graphs themselves need CUDA (tests/gpu, bench.gpu.greedy_gpu); the layout does not."""

from __future__ import annotations

import pytest
import torch

from engine.cuda_graph import GraphInputs, graph_buckets


def test_buckets_cover_every_batch_size_up_to_the_largest() -> None:
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert graph_buckets(300)[-3:] == [272, 288, 300]


def test_a_batch_is_staged_in_its_buckets_layout_and_padded_to_the_scratch_row() -> None:
    inputs = GraphInputs(max_bs=16, scratch_row=9, device=torch.device("cpu"))
    host, dev = inputs.fill(4, [11, 12, 13], [5, 6, 7], [0, 1, 2])
    assert host.is_contiguous() and dev.is_contiguous()
    assert host.numel() == dev.numel() == 12
    assert host.tolist() == [11, 12, 13, 0, 5, 6, 7, 0, 0, 1, 2, 9]
    dev.copy_(host)
    ids, positions, rows = inputs.views(4)
    assert ids.tolist() == [11, 12, 13, 0]
    assert positions.tolist() == [5, 6, 7, 0]
    assert rows.tolist() == [0, 1, 2, 9]
    # Every view of a bucket lies in the range its copy writes.
    for view in inputs.views(4):
        assert view.data_ptr() + view.numel() * 8 <= dev.data_ptr() + dev.numel() * 8


def test_consecutive_steps_stage_into_different_buffers() -> None:
    """With overlapped scheduling the next step is staged while the last copy may be queued."""
    inputs = GraphInputs(max_bs=4, scratch_row=3, device=torch.device("cpu"))
    first, _ = inputs.fill(2, [1, 2], [3, 4], [0, 1])
    second, _ = inputs.fill(2, [5, 6], [7, 8], [1, 0])
    assert first.data_ptr() != second.data_ptr()
    assert first.tolist() == [1, 2, 3, 4, 0, 1]
    assert second.tolist() == [5, 6, 7, 8, 1, 0]


def test_an_empty_fill_pads_the_whole_bucket_for_capture() -> None:
    inputs = GraphInputs(max_bs=8, scratch_row=5, device=torch.device("cpu"))
    host, _ = inputs.fill(2, [], [], [])
    assert host.tolist() == [0, 0, 0, 0, 5, 5]


def test_a_batch_larger_than_its_bucket_is_refused() -> None:
    inputs = GraphInputs(max_bs=8, scratch_row=5, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="do not fit bucket 2"):
        inputs.fill(2, [1, 2, 3], [0, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="at most 8"):
        inputs.fill(16, [1], [0], [0])
