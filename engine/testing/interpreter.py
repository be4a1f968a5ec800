"""Triton's interpreter without its per-call re-patching of the language (the tests' speed).

Under `TRITON_INTERPRET=1` a launch patches `triton.language` for the interpreter
(`interpreter._patch_lang`: the namespaces its kernel's module holds, `tl`; undone when the
launch ends), and then every call of a `@triton.jit` helper from inside the kernel patches again:
`inspect.getmembers` over `tl`, `tl.tensor`, `tl.math` and `tl.core`, a few thousand
attributes, finding those builtins replaced already and patching what the helper's module holds
besides (`tl.core`, for `triton.language`'s own helpers such as `tl.sum`), never undone. The
kernels here call helpers in their inner loops (the warp routing's chunks, the MoE tiles'
loads): a third of a tiny model's interpreted forward pass (`cProfile` of
`test_triton_backend_runs_mla_like_transformers`: 42,660 helper calls, 69 of 232 s; the test
68 -> 55 s without the profiler).

`skip_helper_repatching()` makes a launch patch both namespaces (and undo both when it ends) and
a helper's call skip its own patch while a launch in the same thread has done so. It needs the
interpreter's structure as Triton 3.9 has it (`_patch_lang`, `GridExecutor`); without them it
changes nothing.

`skip_dead_interpreter_work()` takes out two costs that change no result:
- the integer-overflow sanitizer: every int32 `+`, `-` and `*` is redone in int64 and compared
  against the bounds, for a `device_assert` that the interpreter drops unless its options have
  `debug` on, which nothing sets (23% of an interpreted forward pass, `cProfile`: 37 of 161 s);
- the tl-to-numpy dtype lookup, which builds its dictionary of 19 types at every call (12 s).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

_state = threading.local()
_installed = False


class _Globals:
    """What `_patch_lang` reads of a function: its module's globals."""

    def __init__(self, names: dict[str, Any]) -> None:
        self.__globals__ = names


class _Unchanged:
    """A helper call's patch scope: nothing to restore."""

    def restore(self) -> None:
        pass


def skip_helper_repatching() -> bool:
    """Installs the skip (once); returns whether it is installed."""
    global _installed
    if _installed:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None:
        return False
    launch = executor.__call__

    def launch_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer = getattr(_state, "launch", False), getattr(_state, "patched", False)
        _state.launch, _state.patched = True, False  # the launch's own patch comes first
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state.launch, _state.patched = outer

    def patch_lang_once(fn: Any) -> Any:
        if getattr(_state, "patched", False):
            return _Unchanged()  # a helper inside a launch that has patched the language
        if not getattr(_state, "launch", False):
            return patch_lang(fn)
        # A launch: both namespaces a helper's globals may hold (`tl`, and `tl.core` as
        # `triton.language.standard`'s helpers hold it), so that no helper needs its own.
        scope = patch_lang(_Globals({"tl": tl, "core": tl.core}))
        _state.patched = True
        return scope

    interpreter.GridExecutor.__call__ = launch_once
    interpreter._patch_lang = patch_lang_once
    _installed = True
    return True


def skip_dead_interpreter_work() -> bool:
    """Turns the unemitted overflow checks off and caches the dtype lookup (once); returns
    whether both are installed."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return False
    uint64 = np.dtype(np.uint64)
    builder = getattr(interpreter, "interpreter_builder", None)
    lookup = getattr(interpreter, "_get_np_dtype", None)
    options = getattr(builder, "options", None)
    if builder is None or lookup is None or not dataclasses.is_dataclass(options):
        return False
    if getattr(options, "sanitize_overflow", False) and not getattr(options, "debug", True):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)  # type: ignore[type-var]
    if getattr(lookup, "__wrapped__", None) is None:
        import triton.language as tl

        # A block's numpy dtype is its element's; pointers (unhashable) are always uint64.
        found: dict[Any, Any] = {}

        def cached(tt_dtype: Any) -> Any:
            if isinstance(tt_dtype, tl.block_type):
                tt_dtype = tt_dtype.element_ty
            if isinstance(tt_dtype, tl.pointer_type):
                return uint64
            try:
                return found[tt_dtype]
            except KeyError:
                np_dtype = found[tt_dtype] = lookup(tt_dtype)
                return np_dtype

        cached.__wrapped__ = lookup  # type: ignore[attr-defined]
        interpreter._get_np_dtype = cached
    return not builder.options.sanitize_overflow
