"""The `cuda_ipc` backend's batch copy mode without a GPU: the `CUmemcpyAttributes` layout,
what `CudaDriver` hands `cuMemcpyBatchAsync` (checked on a stand-in for libcuda whose functions
record their arguments), the driver without the call (and without Triton, for the kernel
mode), and `auto`'s choice. Byte for byte on CUDA memory: tests/gpu/test_cuda_ipc.py."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np
import pytest

from bench import cuda_ipc_host
from kv_transfer import KVLayout
from kv_transfer.cuda_ipc import (
    BATCH_UNAVAILABLE,
    KERNEL_UNAVAILABLE,
    Copies,
    CudaDriver,
    CudaIpcTransferEngine,
    IpcError,
    _MemcpyAttributes,
    _MemLocation,
    auto_copy_mode,
    batch_pays_off,
)

STREAM = 0x5EA
SIZE_MAX = (1 << 64) - 1
V2, V1 = "cuMemcpyBatchAsync_v2", "cuMemcpyBatchAsync"  # CUDA 13; CUDA 12.8 (with failIdx)


class FakeFunction:
    """A libcuda function: records each call's arguments, answers `rc` (0 unless set)."""

    def __init__(self, lib: FakeLibcuda, name: str, effect: Any = None) -> None:
        self.lib, self.name, self.effect = lib, name, effect
        self.argtypes: list[Any] = []
        self.restype: Any = None

    def __call__(self, *args: Any) -> int:
        self.lib.calls.append((self.name, args))
        return int(self.effect(*args) or 0) if self.effect else 0


class FakeLibcuda:
    """The driver calls `CudaDriver` makes, with the batch call under the names given only
    (an attribute it lacks is a symbol the library does not export)."""

    def __init__(self, batch_names: tuple[str, ...] = (V2,), rc: int = 0, fail_at: int = 0):
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.batches: list[dict[str, Any]] = []
        self.rc, self.fail_at = rc, fail_at

        def out(value: int) -> Any:  # writes through the byref() it is given
            return lambda ref, *_: setattr(ref._obj, "value", value)

        effects: dict[str, Any] = {
            "cuDeviceGet": lambda ref, ordinal: setattr(ref._obj, "value", ordinal),
            "cuDevicePrimaryCtxRetain": out(0xC0),
            "cuStreamCreate": out(STREAM),
            "cuGetErrorName": lambda rc, ref: setattr(ref._obj, "value", b"CUDA_ERROR_X"),
        }
        for name in ("cuInit", "cuCtxSetCurrent", "cuCtxGetCurrent", "cuMemGetAddressRange_v2",
                     "cuIpcGetMemHandle", "cuIpcOpenMemHandle_v2", "cuIpcCloseMemHandle",
                     "cuMemcpyDtoDAsync_v2", "cuStreamSynchronize", "cuPointerGetAttribute",
                     *effects):  # fmt: skip
            setattr(self, name, FakeFunction(self, name, effects.get(name)))
        for name in batch_names:
            setattr(self, name, FakeFunction(self, name, self._batch(name == V1)))

    def _batch(self, with_fail_index: bool) -> Any:
        def call(dsts: Any, srcs: Any, sizes: Any, count: int, attrs: Any, attrs_idxs: Any,
                 num_attrs: int, *rest: Any) -> int:  # fmt: skip
            *fail, stream = rest
            assert len(fail) == (1 if with_fail_index else 0)
            a = attrs.contents
            self.batches.append({
                "dsts": np.ctypeslib.as_array(dsts, shape=(count,)).tolist(),
                "srcs": np.ctypeslib.as_array(srcs, shape=(count,)).tolist(),
                "sizes": np.ctypeslib.as_array(sizes, shape=(count,)).tolist(),
                "dsts_at": ctypes.cast(dsts, ctypes.c_void_p).value,
                "attrs": (a.srcAccessOrder, a.srcLocHint.type, a.srcLocHint.id,
                          a.dstLocHint.type, a.dstLocHint.id, a.flags),
                "attrs_idxs": [attrs_idxs[i] for i in range(num_attrs)],
                "stream": stream.value,
            })  # fmt: skip
            if self.rc and fail:
                fail[0].contents.value = self.fail_at
            return self.rc

        return call

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_memcpy_attributes_have_the_documented_layout() -> None:
    # CUmemLocation {CUmemLocationType type; int id;}: 8 bytes; CUmemcpyAttributes_v1
    # {srcAccessOrder; srcLocHint; dstLocHint; unsigned flags}: 24 bytes, no padding.
    assert ctypes.sizeof(_MemLocation) == 8
    assert (_MemLocation.type.offset, _MemLocation.id.offset) == (0, 4)
    assert ctypes.sizeof(_MemcpyAttributes) == 24
    offsets = [getattr(_MemcpyAttributes, f).offset
               for f in ("srcAccessOrder", "srcLocHint", "dstLocHint", "flags")]  # fmt: skip
    assert offsets == [0, 4, 12, 20]
    assert ctypes.alignment(_MemcpyAttributes) == 4


@pytest.mark.parametrize(("names", "used"), [((V2,), V2), ((V1,), V1), ((V1, V2), V2)])
def test_the_batch_call_gets_exactly_the_writes(names: tuple[str, ...], used: str) -> None:
    lib = FakeLibcuda(names)
    driver = CudaDriver(lib)
    assert driver.can_copy_batch
    fn = getattr(lib, used)
    # (dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, [failIdx,] hStream)
    assert len(fn.argtypes) == (9 if used == V1 else 8)
    assert fn.argtypes[4] is ctypes.POINTER(_MemcpyAttributes)
    dst = np.array([1 << 40, (1 << 40) + 4096, 1 << 41], dtype=np.int64)
    src = np.array([1 << 39, 7 << 36, (1 << 39) + 64], dtype=np.int64)
    length = np.array([4096, 32768, 64], dtype=np.int64)
    driver.copy_batch(0, Copies(dst, src, length))
    (batch,) = lib.batches
    assert batch["dsts"] == dst.tolist()
    assert batch["srcs"] == src.tolist()
    assert batch["sizes"] == length.tolist()
    assert batch["dsts_at"] == dst.ctypes.data  # the array itself, by pointer: no copy
    # One attribute entry from copy 0: stream order, no location hints, no flags.
    assert batch["attrs"] == (1, 0, 0, 0, 0, 0)
    assert batch["attrs_idxs"] == [0]
    assert batch["stream"] == STREAM
    names_called = lib.names()
    assert names_called[-2:] == [used, "cuStreamSynchronize"]  # then waits, as memcpy does
    assert lib.calls[-1][1][0].value == STREAM
    assert names_called.count("cuStreamCreate") == 1
    driver.copy_batch(0, Copies(dst[:1], src[:1], length[:1]))  # the same stream again
    assert lib.names().count("cuStreamCreate") == 1 and lib.batches[1]["dsts"] == dst[:1].tolist()


def test_empty_writes_are_left_out_and_a_failure_names_the_write() -> None:
    lib = FakeLibcuda((V1,), rc=1, fail_at=1)
    driver = CudaDriver(lib)
    writes = Copies.of([0x1000, 0x2000, 0x3000], [0x9000, 0xA000, 0xB000], [8, 0, 16])
    with pytest.raises(IpcError) as err:
        driver.copy_batch(0, writes)
    assert lib.batches[0]["sizes"] == [8, 16]
    # The driver's index 1 of the two it got is the caller's write 2.
    assert "cuMemcpyBatchAsync of 2 writes failed at write 2 ([0x3000, +16) from 0xb000)" in str(
        err.value
    )
    assert "CUDA_ERROR_X (1)" in str(err.value)
    assert "cuStreamSynchronize" not in lib.names()
    # An error about no one copy (failIdx SIZE_MAX), and CUDA 13's call, which has no failIdx.
    for lib in (FakeLibcuda((V1,), rc=1, fail_at=SIZE_MAX), FakeLibcuda((V2,), rc=1)):
        with pytest.raises(IpcError, match=r"of 3 writes failed: CUDA_ERROR_X \(1\)$"):
            CudaDriver(lib).copy_batch(0, Copies.of([1, 2, 3], [4, 5, 6], [1, 1, 1]))


def test_all_writes_empty_makes_no_batch_call() -> None:
    lib = FakeLibcuda()
    CudaDriver(lib).copy_batch(0, Copies.of([1], [2], [0]))
    assert lib.batches == [] and lib.names()[-1] == "cuStreamSynchronize"


def test_a_driver_without_the_batch_call(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = CudaDriver(FakeLibcuda(batch_names=()))
    assert not driver.can_copy_batch
    with pytest.raises(IpcError) as err:
        driver.copy_batch(0, Copies.of([1], [2], [3]))
    assert str(err.value) == BATCH_UNAVAILABLE
    # Asked for by name (or by PDSERVE_CUDA_IPC_COPY): refused at once, in one line that
    # names both ways out.
    monkeypatch.setenv("PDSERVE_CUDA_IPC_COPY", "batch")
    for mode in ("batch", None):
        with pytest.raises(IpcError) as err:
            CudaIpcTransferEngine(driver, mode)
        assert "\n" not in str(err.value)
        assert "CUDA 12.8 or newer" in str(err.value)
        assert "PDSERVE_CUDA_IPC_COPY to auto, memcpy, rows or kernel" in str(err.value)
    # The other modes still work (auto never picking batch: test_cuda_ipc.py's MODE_CALLS, on
    # the shared-memory driver).
    monkeypatch.delenv("PDSERVE_CUDA_IPC_COPY")
    for mode in ("auto", "memcpy", "rows", "kernel"):
        CudaIpcTransferEngine(driver, mode)


def test_a_host_without_triton_has_no_kernel_mode(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delitem(sys.modules, "kv_transfer.copy_kernel", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    driver = CudaDriver(FakeLibcuda())
    assert not driver.can_copy_kernel
    assert "Triton does not import" in caplog.text
    with pytest.raises(IpcError) as err:
        driver.copy_kernel(0, Copies.of([1], [2], [3]))
    assert str(err.value).startswith(KERNEL_UNAVAILABLE) and "triton" in str(err.value)
    with pytest.raises(IpcError) as err:
        CudaIpcTransferEngine(driver, "kernel")
    assert str(err.value) == KERNEL_UNAVAILABLE
    assert "PDSERVE_CUDA_IPC_COPY to auto, memcpy, rows or batch" in str(err.value)
    for mode in ("auto", "memcpy", "rows", "batch"):
        CudaIpcTransferEngine(driver, mode)


def test_auto_takes_a_batch_for_long_writes_only() -> None:
    mb = 1 << 20
    # The H200 cases: a 2,048-token Llama-3-8B prompt (268 MB), 64 regions a side.
    assert batch_pays_off(64, 268 * mb)  # 16-token pages, contiguous: 4 MB writes
    assert not batch_pays_off(8192, 268 * mb)  # 16-token pages scattered: 32 KB writes
    assert not batch_pays_off(131_072, 268 * mb)  # 1-token pages
    assert not batch_pays_off(2048, 268 * mb)  # 64-token pages: 128 KB writes
    assert not batch_pays_off(3, 3 * 1024)  # a few short writes
    assert batch_pays_off(16 * 64, 1024 * mb)  # many, but 1 MB each


@pytest.mark.parametrize(
    ("writes", "mb", "can_batch", "can_kernel", "same_device", "mode"),
    [
        (64, 268, True, True, True, "batch"),  # contiguous runs
        (64, 268, False, True, True, "memcpy"),  # ... on a driver before CUDA 12.8
        (64, 268, True, True, False, "batch"),  # ... to another GPU
        (131_072, 268, True, True, True, "kernel"),  # scattered 1-token pages
        (8192, 268, True, True, True, "kernel"),  # scattered 16-token pages
        (8192, 268, True, False, True, "rows"),  # ... without Triton
        (8192, 268, True, True, False, "rows"),  # ... to another GPU: memcpy (no pairs)
    ],
)
def test_auto_copy_mode(
    writes: int, mb: int, can_batch: bool, can_kernel: bool, same_device: bool, mode: str
) -> None:
    assert auto_copy_mode(writes, mb << 20, can_batch, can_kernel, same_device) == mode


@pytest.mark.parametrize(("pattern", "calls"), [("contiguous", (0, 0, 1, 0)),
                                                ("every-other", (0, 0, 0, 1))])  # fmt: skip
def test_auto_through_the_engine(pattern: str, calls: tuple[int, int, int, int]) -> None:
    """A hand-off through `PageWriter` and the engine on a counting driver that has the batch
    call and Triton: 512 KB runs in one batch, 32 KB pages in one kernel launch."""
    layout = KVLayout("m", "bfloat16", 16, 4, 8, 128)  # 32 KB pages, 4 layers
    (row,) = cuda_ipc_host.run_case(layout, 256, pattern, ["auto"], warmup=0, reps=1)
    assert (row.memcpy_calls, row.row_pairs, row.batch_calls, row.kernel_launches) == calls
