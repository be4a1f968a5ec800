"""The persistent-chain experiment's kernels (`bench.persistent_chain`) under Triton's
interpreter: the chain in one persistent launch gives the same bytes as one launch per product
(the same tile code), both near the float32 product, and the persistent kernel leaves its
counters zero for the next launch (a CUDA graph replays it as it is)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from bench.persistent_chain import Chain, Persistent, parse_shapes, reference, run_launches

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; the benchmark itself on GPUs"
)


@pytest.mark.parametrize(("programs", "dot_stages"), [(1, 0), (3, 0), (2, 3)])
def test_persistent_chain_equals_one_launch_each(programs: int, dot_stages: int) -> None:
    # Tiles of 32 rows and 32 columns: ragged last tiles in N (48) and K (48); on the CUDA
    # cores, and on the tensor cores (the vector as row 0 of 16, pipelined 3 deep).
    chain = Chain.build(
        parse_shapes("48x32,32x48,48x32"), torch.float32, "cpu", 32, 32, seed=3,
        dot_stages=dot_stages,
    )  # fmt: skip
    x0 = chain.bufs[0, :32].clone()
    want = reference(chain, x0)
    run_launches(chain)
    each = chain.output().clone()
    torch.testing.assert_close(each, want, rtol=1e-5, atol=1e-5)
    persistent = Persistent.build(chain, programs)
    for _ in range(2):  # twice: the counters are zero again after a launch
        chain.reset(x0)
        persistent.run()
        assert torch.equal(chain.output(), each)
        assert not persistent.scratch.any()


def test_a_chain_whose_shapes_do_not_connect_or_align_is_refused() -> None:
    with pytest.raises(ValueError, match="next one's K"):
        Chain.build(parse_shapes("32x16,16x48"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiples of 16"):
        Chain.build(parse_shapes("20x16,16x20"), torch.float32, "cpu")
