"""engine.testing.interpreter: a launch patches the language once for all its helpers' calls,
and leaves it as it found it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only"
)


@triton.jit
def scaled_sum(x, scale):  # a helper in this module, calling `tl.sum` (a helper of tl's)
    return tl.sum(x, axis=0) * scale


@triton.jit
def with_helpers(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.program_id(0)
    x = tl.load(x_ptr + i * N + tl.arange(0, N))
    tl.store(out_ptr + i, scaled_sum(x, 2.0) + scaled_sum(x, 1.0))


@triton.jit
def without_helpers(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.program_id(0)
    tl.store(out_ptr + i * N + tl.arange(0, N), tl.load(x_ptr + i * N + tl.arange(0, N)))


def test_helpers_see_the_patched_language_and_a_launch_restores_it() -> None:
    from triton.runtime import interpreter

    from engine.testing.interpreter import skip_helper_repatching

    assert skip_helper_repatching()  # the installed Triton has the structure it expects

    def patches(launch: Callable[[], Any]) -> int:
        """How many namespaces the interpreter patched during `launch`."""
        patch_builtin, count = interpreter._patch_builtin, [0]

        def counting(*args: Any) -> Any:
            count[0] += 1
            return patch_builtin(*args)

        interpreter._patch_builtin = counting
        try:
            launch()
        finally:
            interpreter._patch_builtin = patch_builtin
        return count[0]

    builtins = {name: getattr(tl.core, name) for name in ("load", "store", "reduce", "program_id")}
    x = torch.randn(5, 16)
    out, copy = torch.empty(5), torch.empty(5, 16)
    helpers = patches(lambda: with_helpers[(5,)](x, out, N=16))
    torch.testing.assert_close(out, 3 * x.sum(dim=1))
    # Two helper calls in each of five programs, and tl.sum in each: none patches again.
    assert helpers == patches(lambda: without_helpers[(5,)](x, copy, N=16))
    assert torch.equal(copy, x)
    assert {name: getattr(tl.core, name) for name in builtins} == builtins


@triton.jit
def int32_arithmetic(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * 3 + 7 - x)


def test_dead_work_skipped_keeps_results_and_dtypes() -> None:
    """Without the overflow checks that the interpreter never asserts, int32 arithmetic wraps
    as before (the sanitizer was computed and dropped: its `device_assert` needs `debug`);
    the cached dtype lookup answers as the interpreter's own for scalars, blocks and
    pointers."""
    from triton.runtime import interpreter

    from engine.testing.interpreter import skip_dead_interpreter_work

    assert skip_dead_interpreter_work()
    assert skip_dead_interpreter_work()  # once is enough: a second call changes nothing
    assert not interpreter.interpreter_builder.options.debug
    x = torch.tensor([0, 1, -5, 2**30, 2**31 - 1, -(2**31)] + [9] * 10, dtype=torch.int32)
    out = torch.empty_like(x)
    int32_arithmetic[(1,)](x, out, N=16)
    want = ((x.long() * 3 + 7 - x.long() + 2**31) % 2**32 - 2**31).int()  # two's complement
    assert torch.equal(out, want)
    lookup, original = interpreter._get_np_dtype, interpreter._get_np_dtype.__wrapped__
    names = "int1 int8 uint8 int16 int32 uint32 int64 uint64 float16 bfloat16 float32 float64"
    scalars = [getattr(tl, name) for name in [*names.split(), "float8e4nv", "float8e5"]]
    for ty in [*scalars, tl.pointer_type(tl.float32), tl.pointer_type(tl.int8)]:
        for t in (ty, tl.block_type(ty, [4, 8])):
            assert lookup(t) == original(t), t
            assert lookup(t) == original(t), t  # from the cache
