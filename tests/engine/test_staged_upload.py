"""engine.device.StagedUpload: the values the caller writes arrive on the device, and each upload
is its own tensor (a later upload never changes an earlier one's values). On CUDA the buffers
are pinned and reused; here, on the CPU, each array is fresh."""

from __future__ import annotations

import numpy as np
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
