"""engine.device.StagedUpload: the values the caller writes arrive on the device, and each upload
is its own tensor (a later upload never changes an earlier one's values). On CUDA the buffers
are pinned and reused; here, on the CPU, each array is fresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.device import StagedUpload


def test_uploads_carry_what_was_written_and_stay_independent() -> None:
    staging = StagedUpload(torch.device("cpu"))

    def rows_of(base: int):
        def fill(out: np.ndarray) -> None:
            out[:] = base + np.arange(out.size).reshape(out.shape)

        return fill

    first = staging.upload(3, 4, rows_of(0))
    second = staging.upload(3, 5, rows_of(100))
    third = staging.upload(3, 2, rows_of(200))
    assert first.dtype == torch.int64 and first.shape == (3, 4)
    assert torch.equal(first, torch.arange(12).view(3, 4))
    assert torch.equal(second, 100 + torch.arange(15).view(3, 5))
    assert torch.equal(third, 200 + torch.arange(6).view(3, 2))
    assert staging.upload(3, 0, rows_of(0)).shape == (3, 0)  # an empty step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_slots_grow_together_and_keep_each_upload() -> None:
    """On CUDA: the values arrive through the pinned slots, an upload that outgrows them grows
    every slot from one allocation (the next uploads of that size allocate nothing), and an
    upload still copying when the slots grow keeps its values."""
    staging = StagedUpload(torch.device("cuda"))
    sent: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rows, cols in [(3, 4), (3, 5000), (3, 4999), (3, 5000), (3, 20000), (3, 7)]:
        expected = torch.randint(0, 1 << 40, (rows, cols), dtype=torch.int64)

        def fill(out: np.ndarray, values: torch.Tensor = expected) -> None:
            out[:] = values.numpy()

        sent.append((staging.upload(rows, cols, fill), expected))
        buffers = [b for b in staging._buffers if b is not None]
        assert len(buffers) == 2 and buffers[0].numel() == buffers[1].numel() >= rows * cols
        assert buffers[0].untyped_storage().data_ptr() == buffers[1].untyped_storage().data_ptr()
        if (rows, cols) == (3, 5000):
            grown_at = buffers[0].data_ptr()
        if (rows, cols) == (3, 4999):
            assert buffers[0].data_ptr() == grown_at  # reused, not allocated again
    torch.cuda.synchronize()
    for on_device, expected in sent:
        assert torch.equal(on_device.cpu(), expected)


def test_another_dtype() -> None:
    """`dtype` (the extend kernel's int32 query blocks): the array `fill` gets and the tensor
    that arrives are of it."""
    staging = StagedUpload(torch.device("cpu"), dtype=torch.int32)
    dtypes = []

    def fill(out: np.ndarray) -> None:
        dtypes.append(out.dtype)
        out[0] = [1, 2, 3]
        out[1] = [4, 5, 6]

    got = staging.upload(2, 3, fill)
    assert dtypes == [np.int32] and got.dtype == torch.int32
    assert got.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_upload_lists() -> None:
    """`upload_lists`: equal-length int lists as the rows of one tensor, in the dtype."""
    got = StagedUpload(torch.device("cpu"), dtype=torch.int32).upload_lists([1, 2], [3, 4])
    assert got.dtype == torch.int32 and got.tolist() == [[1, 2], [3, 4]]
    assert StagedUpload(torch.device("cpu")).upload_lists([5], [6], [7]).tolist() == [[5], [6], [7]]
