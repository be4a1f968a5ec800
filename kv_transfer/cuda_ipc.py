"""The `cuda_ipc` transfer backend: same-host KV hand-off from device memory to device memory.

The receiving engine (the decode worker) exports every region it registers as a CUDA IPC
handle of the device allocation holding it; the writing engine (the prefill worker) asks the
receiver's session for that table once, opens the handles in its own process, and copies the
writes device to device on a stream of its own, then waits for the stream: long writes
(contiguous page runs) one `cuMemcpyDtoDAsync` each or all in one `cuMemcpyBatchAsync` (CUDA
12.8+); short ones (scattered pages) all in one Triton kernel launch (`copy_kernel.py`), or
one gather and one scatter per source/destination region pair (`COPY_MODES`). No host bounce
and no network.

It speaks the same `TransferEngine` API as Mooncake, so the state machines, timeouts, page
accounting and layout checks above it are the same:

- `initialize(local_hostname, ...)` starts the handle-exchange listener on `local_hostname`
  (`host` or `host:port`; port 0 or none: a free one); the session id is `host:port`.
  `metadata_server`, `protocol` and `device_name` are accepted and unused (the listener is
  its own metadata service; the device is the one the memory lives on).
- `register_memory(addr, length)`: `[addr, addr + length)` must lie in one device allocation
  (`cudaMalloc`, which is what torch's caching allocator hands out; not its
  `expandable_segments` or `cudaMallocAsync` modes, whose memory has no legacy IPC handle).
- `batch_transfer_sync_write(session, srcs, dsts, lengths)`: every destination range must lie
  in one region the receiver registered (checked here: an unregistered destination fails the
  call, with nothing written); sources are this process's device pointers whose bytes are
  final (as with Mooncake, no stream ordering with the code that produced them is implied).
  Returns when every byte has landed, 0; a negative code, with the reason logged, on failure.

Peers: the exchange connection to a receiver stays open; a receiver that exits closes it, and
the next write to that session drops the old table and its mappings and asks again (a new
process on the same port has a new instance id, and its table is used from then on). Both
engines must be on one host (checked by kernel boot id): IPC handles mean nothing elsewhere.

The CUDA driver is reached through ctypes (`libcuda.so.1`, present wherever the NVIDIA driver
is), so the backend adds no dependency to a GPU host; the driver calls sit behind
`IpcDriver`, so the exchange, the address arithmetic and the errors run, and are tested,
without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import select
import socket
import socketserver
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from kv_transfer.transfer_engine import TransferEngine

log = logging.getLogger(__name__)

# Mooncake's codes: 0 is success; we fail with -1 and log why (check() names the call).
_FAILED = -1
_EXCHANGE_TIMEOUT_S = 10.0
_MAX_LINE = 16 << 20  # a region table line; thousands of regions fit
_MAX_REQUEST = 4096  # a request line to the exchange (they are a few bytes)


class IpcError(RuntimeError):
    """A CUDA IPC step failed (driver call, handle exchange, or an address outside the
    registered memory)."""


# ---- the driver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """The device allocation holding an address: what one IPC handle exports."""

    base: int
    size: int
    handle: bytes  # opaque, 64 bytes for CUDA
    device: int  # ordinal on the exporting process


class IpcDriver(Protocol):
    """The device calls of the backend. Every method raises `IpcError` on failure and may be
    called from any thread (it binds the device's context itself)."""

    def export(self, addr: int) -> Allocation:
        """The allocation holding `addr`, with an IPC handle another process can open."""
        ...

    def device_of(self, addr: int) -> int:
        """The ordinal of the device that `addr` (device memory of this process) lives on."""
        ...

    def open(self, handle: bytes, device: int) -> int:
        """Map another process's allocation into this one, usable from `device`; returns the
        mapped base address."""
        ...

    def close(self, mapped_base: int) -> None:
        """Unmap what `open` returned."""
        ...

    def copy(self, device: int, copies: Copies) -> None:
        """Copy each write of `copies` device to device, on `device`'s context, and return
        once all have landed."""
        ...

    def copy_rows(self, device: int, rows: Sequence[RowCopy]) -> None:
        """Do every row copy (`run_row_copies`) on `device`, and return once all have
        landed."""
        ...

    @property
    def can_copy_batch(self) -> bool:
        """Whether `copy_batch` can run here (the CUDA driver has `cuMemcpyBatchAsync`)."""
        ...

    def copy_batch(self, device: int, copies: Copies) -> None:
        """Copy every write of `copies` device to device in one batch call on `device`'s
        context, and return once all have landed. Raises `IpcError` (`BATCH_UNAVAILABLE`)
        where `can_copy_batch` is false."""
        ...

    @property
    def can_copy_kernel(self) -> bool:
        """Whether `copy_kernel` can run here (Triton imports)."""
        ...

    def copy_kernel(self, device: int, copies: Copies) -> None:
        """Copy every write of `copies` in one Triton kernel launch on `device` (both sides
        this process's addresses on `device`), and return once all have landed. Raises
        `IpcError` where `can_copy_kernel` is false (`KERNEL_UNAVAILABLE`) or the kernel
        fails to compile or run."""
        ...


class _IpcMemHandle(ctypes.Structure):
    # Unsigned bytes, not c_char: a c_char array field reads back as bytes cut at its first
    # NUL, and a handle has NULs anywhere (that cut handles to 4 bytes on the H200).
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


_CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_CU_MEMORYTYPE_DEVICE = 2
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_CU_STREAM_NON_BLOCKING = 1


class _MemLocation(ctypes.Structure):
    """`CUmemLocation`: `{CUmemLocationType type; int id;}` (CUDA 13 puts a struct of two
    bytes in a union with `id`: the same 8 bytes)."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    """`CUmemcpyAttributes_v1` (CUDA 12.8+): how the copies of a batch read their sources.
    24 bytes: the order at 0, the two location hints at 4 and 12, the flags at 20."""

    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),  # CUmemcpySrcAccessOrder
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),  # CUmemcpyFlags
    ]


_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1
_CU_MEM_LOCATION_TYPE_INVALID = 0  # no hint: hints only matter for managed or pageable memory
_CU_MEMCPY_FLAG_DEFAULT = 0
_SIZE_MAX = (1 << 64) - 1  # the failing index when a batch error is about no one copy

# The batch call, newest first: CUDA 13 exports the 12.8 form without its failIdx argument
# as `_v2`; CUDA 12.8 and 12.9 have only the one with it.
_BATCH_SYMBOLS = (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True))
BATCH_UNAVAILABLE = (
    "the cuda_ipc copy mode 'batch' needs cuMemcpyBatchAsync, which this NVIDIA driver does "
    "not have: install a driver of CUDA 12.8 or newer, or set PDSERVE_CUDA_IPC_COPY to auto, "
    "memcpy, rows or kernel"
)

KERNEL_UNAVAILABLE = (
    "the cuda_ipc copy mode 'kernel' needs Triton, which does not import here (the log says "
    "why): install triton (torch's CUDA wheels bring it), or set PDSERVE_CUDA_IPC_COPY to auto, "
    "memcpy, rows or batch"
)


class CudaDriver:
    """`IpcDriver` on the CUDA driver API through ctypes. One non-blocking stream per device
    for the copies; a copy call waits for its stream only. One per process (`shared_driver`):
    it holds the process's IPC mappings."""

    def __init__(self, lib: Any = None) -> None:
        """`lib`: the driver library (`libcuda.so.1` if None; tests pass a stand-in whose
        functions record their calls)."""
        try:
            self._cu: Any = lib if lib is not None else ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise IpcError(
                "the 'cuda_ipc' transfer backend needs the NVIDIA driver (libcuda.so.1, not "
                f"found: {e}); on a host without NVIDIA GPUs use --transfer-backend mooncake"
            ) from e
        u64, c_int, c_uint = ctypes.c_uint64, ctypes.c_int, ctypes.c_uint
        p, size_t = ctypes.c_void_p, ctypes.c_size_t
        signatures: dict[str, list[Any]] = {
            "cuInit": [c_uint],
            "cuDeviceGet": [ctypes.POINTER(c_int), c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(p), c_int],
            "cuCtxSetCurrent": [p],
            "cuCtxGetCurrent": [ctypes.POINTER(p)],
            "cuMemGetAddressRange_v2": [ctypes.POINTER(u64), ctypes.POINTER(size_t), u64],
            "cuIpcGetMemHandle": [ctypes.POINTER(_IpcMemHandle), u64],
            "cuIpcOpenMemHandle_v2": [ctypes.POINTER(u64), _IpcMemHandle, c_uint],
            "cuIpcCloseMemHandle": [u64],
            "cuMemcpyDtoDAsync_v2": [u64, u64, size_t, p],
            "cuStreamCreate": [ctypes.POINTER(p), c_uint],
            "cuStreamSynchronize": [p],
            "cuPointerGetAttribute": [p, c_int, u64],
            "cuGetErrorName": [c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for name, argtypes in signatures.items():
            fn = getattr(self._cu, name)
            fn.argtypes, fn.restype = argtypes, c_int
        self._batch, self._batch_name, self._batch_fail_index = self._batch_call()
        # One attribute entry for every copy of a batch, from copy 0: sources read in stream
        # order, no location hints, no flags.
        attrs = _MemcpyAttributes(
            srcAccessOrder=_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint=_MemLocation(_CU_MEM_LOCATION_TYPE_INVALID, 0),
            dstLocHint=_MemLocation(_CU_MEM_LOCATION_TYPE_INVALID, 0),
            flags=_CU_MEMCPY_FLAG_DEFAULT,
        )
        self._batch_attrs = ctypes.pointer(attrs)
        self._batch_attrs_first = ctypes.pointer(ctypes.c_size_t(0))
        self._lock = threading.RLock()
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._streams: dict[int, ctypes.c_void_p] = {}
        self._torch_streams: dict[int, Any] = {}
        self._copiers: dict[int, Any] = {}  # device -> copy_kernel.WriteCopier
        self._kernel_import_error: str | None = None  # None: not tried yet
        self._opened: dict[tuple[bytes, int], tuple[int, int]] = {}  # -> (mapped, open count)
        self._call("cuInit", 0)

    def _batch_call(self) -> tuple[Any, str, bool]:
        """The batch copy function, its name, and whether it takes failIdx; (None, "", False)
        if the driver has neither form."""
        u64p, size_t = ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t
        size_tp = ctypes.POINTER(size_t)
        for name, fail_index in _BATCH_SYMBOLS:
            try:
                fn = getattr(self._cu, name)
            except AttributeError:  # ctypes: the library does not export it
                continue
            # (dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, [failIdx,] hStream)
            argtypes: list[Any] = [u64p, u64p, size_tp, size_t,
                                   ctypes.POINTER(_MemcpyAttributes), size_tp, size_t]  # fmt: skip
            fn.argtypes = [*argtypes, *([size_tp] if fail_index else []), ctypes.c_void_p]
            fn.restype = ctypes.c_int
            return fn, name, fail_index
        return None, "", False

    @property
    def can_copy_batch(self) -> bool:
        return self._batch is not None

    def _call(self, name: str, *args: Any) -> None:
        self._check(name, getattr(self._cu, name)(*args))

    def _error_name(self, rc: int) -> str:
        err = ctypes.c_char_p()
        self._cu.cuGetErrorName(rc, ctypes.byref(err))
        return (err.value or b"?").decode()

    def _check(self, name: str, rc: int) -> None:
        if rc != 0:
            raise IpcError(f"{name} failed: {self._error_name(rc)} ({rc})")

    def _bind(self, device: int) -> None:
        """Make `device`'s primary context (torch's) current on this thread."""
        with self._lock:
            ctx = self._contexts.get(device)
            if ctx is None:
                dev = ctypes.c_int()
                self._call("cuDeviceGet", ctypes.byref(dev), device)
                ctx = ctypes.c_void_p()
                self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev.value)
                self._contexts[device] = ctx
        self._call("cuCtxSetCurrent", ctx)

    def device_of(self, addr: int) -> int:
        # Pointer queries want some context current on the thread (a writer's thread may have
        # none yet); any will do, the address itself names its device.
        current = ctypes.c_void_p()
        self._call("cuCtxGetCurrent", ctypes.byref(current))
        if not current.value:
            self._bind(0)
        kind = ctypes.c_uint()
        rc = self._cu.cuPointerGetAttribute(
            ctypes.byref(kind), _CU_POINTER_ATTRIBUTE_MEMORY_TYPE, addr
        )
        if rc != 0 or kind.value != _CU_MEMORYTYPE_DEVICE:
            raise IpcError(
                f"address {addr:#x} is not CUDA device memory; the 'cuda_ipc' backend moves KV "
                "pools held on the GPU (start the workers with --device cuda)"
            )
        ordinal = ctypes.c_int()
        self._call(
            "cuPointerGetAttribute",
            ctypes.byref(ordinal),
            _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
        )
        return ordinal.value

    def export(self, addr: int) -> Allocation:
        device = self.device_of(addr)
        self._bind(device)
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._call("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), addr)
        handle = _IpcMemHandle()
        try:
            self._call("cuIpcGetMemHandle", ctypes.byref(handle), base.value)
        except IpcError as e:
            raise IpcError(
                f"{e}: the allocation at {base.value:#x} cannot be shared by CUDA IPC (torch's "
                "allocator must use plain cudaMalloc: unset PYTORCH_CUDA_ALLOC_CONF's "
                "expandable_segments and backend:cudaMallocAsync)"
            ) from e
        return Allocation(base.value, size.value, bytes(handle.reserved), device)

    def open(self, handle: bytes, device: int) -> int:
        if len(handle) != 64:
            raise IpcError(f"a CUDA IPC handle has 64 bytes, got {len(handle)}")
        # A handle may be opened once per process and device: engines of one process (and a
        # peer's regions sharing an allocation) share the mapping, counted.
        with self._lock:
            known = self._opened.get((handle, device))
            if known is not None:
                self._opened[(handle, device)] = (known[0], known[1] + 1)
                return known[0]
            self._bind(device)
            raw = _IpcMemHandle()
            ctypes.memmove(raw.reserved, handle, 64)
            mapped = ctypes.c_uint64()
            self._call(
                "cuIpcOpenMemHandle_v2",
                ctypes.byref(mapped),
                raw,
                _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
            )
            self._opened[(handle, device)] = (mapped.value, 1)
            return mapped.value

    def close(self, mapped_base: int) -> None:
        with self._lock:
            key = next((k for k, (m, _) in self._opened.items() if m == mapped_base), None)
            if key is None:
                raise IpcError(f"{mapped_base:#x} is not an open CUDA IPC mapping")
            count = self._opened[key][1]
            if count > 1:
                self._opened[key] = (mapped_base, count - 1)
                return
            del self._opened[key]
            self._bind(key[1])
            self._call("cuIpcCloseMemHandle", mapped_base)

    def _stream(self, device: int) -> ctypes.c_void_p:
        """Bind `device`'s context and return its copy stream (created on first use)."""
        self._bind(device)
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = ctypes.c_void_p()
                self._call("cuStreamCreate", ctypes.byref(stream), _CU_STREAM_NON_BLOCKING)
                self._streams[device] = stream
        return stream

    def copy(self, device: int, copies: Copies) -> None:
        stream = self._stream(device)
        memcpy = self._cu.cuMemcpyDtoDAsync_v2  # looked up once: this loop runs per write
        for dst, src, length in copies.tuples():
            if rc := memcpy(dst, src, length, stream):
                self._check("cuMemcpyDtoDAsync_v2", rc)
        self._call("cuStreamSynchronize", stream)

    def copy_batch(self, device: int, copies: Copies) -> None:
        if self._batch is None:
            raise IpcError(BATCH_UNAVAILABLE)
        stream = self._stream(device)
        # Empty writes are left out (nothing to copy; the batch call's rules for a zero size
        # are not documented); `kept` maps a failing index back to the caller's writes.
        kept: np.ndarray | None = None
        if not (copies.length > 0).all():
            kept = np.flatnonzero(copies.length > 0)
            copies = copies.take(kept)
        count = len(copies)
        if count:
            # int64 arrays read as CUdeviceptr and size_t (64-bit, values below 2**62).
            dst, src, size = (np.ascontiguousarray(a, dtype=np.int64)
                              for a in (copies.dst, copies.src, copies.length))  # fmt: skip
            u64p, size_tp = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t)
            args: list[Any] = [dst.ctypes.data_as(u64p), src.ctypes.data_as(u64p),
                               size.ctypes.data_as(size_tp), count, self._batch_attrs,
                               self._batch_attrs_first, 1]  # fmt: skip
            fail = ctypes.c_size_t(_SIZE_MAX)
            if self._batch_fail_index:
                args.append(ctypes.pointer(fail))
            if rc := self._batch(*args, stream):
                where = ""
                if fail.value < count:
                    i = fail.value
                    at = i if kept is None else int(kept[i])
                    where = (f" at write {at} ([{int(dst[i]):#x}, +{int(size[i])}) from "
                             f"{int(src[i]):#x})")  # fmt: skip
                raise IpcError(
                    f"{self._batch_name} of {count} writes failed{where}: "
                    f"{self._error_name(rc)} ({rc})"
                )
        self._call("cuStreamSynchronize", stream)

    def tensor(self, addr: int, nbytes: int, device: int) -> Any:
        """A uint8 torch tensor over `[addr, addr + nbytes)` on `device`, not a copy."""
        import torch

        t = torch.as_tensor(_CudaArray(addr, nbytes), device=torch.device("cuda", device))
        if t.data_ptr() != addr:
            raise IpcError(f"memory at {addr:#x} is not on cuda:{device}; torch copied it")
        return t

    def _torch_stream(self, device: int) -> Any:
        """Bind `device`'s context and return the torch stream of row and kernel copies."""
        import torch

        self._bind(device)
        with self._lock:
            stream = self._torch_streams.get(device)
            if stream is None:
                stream = self._torch_streams[device] = torch.cuda.Stream(device=device)
        return stream

    def copy_rows(self, device: int, rows: Sequence[RowCopy]) -> None:
        import torch

        stream = self._torch_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            run_row_copies(rows, lambda a, n: self.tensor(a, n, device), f"cuda:{device}")
        stream.synchronize()

    @property
    def can_copy_kernel(self) -> bool:
        with self._lock:
            if self._kernel_import_error is None:
                try:
                    import kv_transfer.copy_kernel  # noqa: F401 (torch and triton, once)

                    self._kernel_import_error = ""
                except ImportError as e:
                    self._kernel_import_error = str(e) or type(e).__name__
                    log.warning("cuda_ipc: no copy kernel, Triton does not import: %s", e)
            return not self._kernel_import_error

    def copy_kernel(self, device: int, copies: Copies) -> None:
        if not self.can_copy_kernel:
            raise IpcError(f"{KERNEL_UNAVAILABLE} ({self._kernel_import_error})")
        import torch

        from kv_transfer.copy_kernel import WriteCopier

        stream = self._torch_stream(device)
        with self._lock:
            copier = self._copiers.get(device)
            if copier is None:
                copier = self._copiers[device] = WriteCopier(torch.device("cuda", device))
        with copier.lock:  # its pinned table buffer: one hand-off at a time per device
            try:
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    copier.copy(copies.src, copies.dst, copies.length)
                stream.synchronize()
            except Exception as e:  # Triton's compile errors, torch's CUDA errors
                raise IpcError(
                    f"the copy kernel ({len(copies)} writes) failed: {type(e).__name__}: {e}"
                ) from e


@functools.lru_cache(maxsize=1)
def shared_driver() -> CudaDriver:
    """This process's `CudaDriver` (created on first use)."""
    return CudaDriver()


class _CudaArray:
    """Raw device memory as `__cuda_array_interface__` (version 2: no stream to wait on), for
    `torch.as_tensor` to wrap without copying."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (addr, False),
            "version": 2,
        }


# ---- the region table and its arithmetic ---------------------------------------------------


@dataclass(frozen=True)
class ExportedRegion:
    """One registered region as the receiver exports it: where it is in the receiver's
    address space, and the allocation (IPC handle) that holds it."""

    addr: int
    length: int
    alloc_base: int
    alloc_size: int
    handle: str  # hex of the IPC handle
    device: int

    def __post_init__(self) -> None:
        for name in ("addr", "length", "alloc_base", "alloc_size", "device"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"region field {name} must be an int >= 0, got {value!r}")
        if not (
            self.alloc_base <= self.addr
            and self.addr + self.length <= self.alloc_base + self.alloc_size
        ):
            raise ValueError(
                f"region [{self.addr:#x}, +{self.length}) is not inside its allocation "
                f"[{self.alloc_base:#x}, +{self.alloc_size})"
            )
        bytes.fromhex(self.handle)  # ValueError if not hex


@dataclass(frozen=True)
class PeerTable:
    """What a receiver answers to the exchange: who it is and what it registered."""

    instance: str  # new per engine: a restarted receiver on the same port is a new peer
    boot_id: str  # the kernel's boot id: equal only on the same host
    pid: int
    regions: tuple[ExportedRegion, ...]

    def to_json(self) -> bytes:
        body = {**asdict(self), "regions": [asdict(r) for r in self.regions]}
        return json.dumps(body).encode() + b"\n"

    @staticmethod
    def from_json(line: bytes) -> PeerTable:
        """Raises `IpcError` naming what is wrong with a malformed table."""
        try:
            body = json.loads(line)
            return PeerTable(
                instance=str(body["instance"]),
                boot_id=str(body["boot_id"]),
                pid=int(body["pid"]),
                regions=tuple(ExportedRegion(**r) for r in body["regions"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise IpcError(f"malformed region table from the peer: {e}") from e


_INT64_MIN = np.iinfo(np.int64).min
# Addresses and lengths stay below this, so that an address plus a length cannot wrap in int64.
_MAX_VALUE = 1 << 62


@dataclass(frozen=True)
class Copies:
    """Writes as parallel int64 arrays `[n]`: `length[i]` bytes from `src[i]` to `dst[i]`.
    A hand-off has up to a few hundred thousand; everything per write is done on the arrays."""

    dst: np.ndarray
    src: np.ndarray
    length: np.ndarray

    @staticmethod
    def of(dsts: Sequence[int], srcs: Sequence[int], lengths: Sequence[int]) -> Copies:
        """Raises `ValueError` naming the problem for a length below 0 or a value that is not
        an int below 2**62."""
        arrays = []
        for name, values in (("destination", dsts), ("source", srcs), ("length", lengths)):
            try:
                a = np.fromiter(values, dtype=np.int64, count=len(values))
            except (OverflowError, TypeError, ValueError) as e:
                raise ValueError(f"a write's {name} is not an int of 64 bits: {e}") from e
            if len(a) and int(a.max()) >= _MAX_VALUE:  # a negative one is found nowhere
                raise ValueError(f"a write's {name} is out of range: {int(a.max()):#x}")
            arrays.append(a)
        if len(arrays[2]) and int(arrays[2].min()) < 0:
            i = int(np.argmax(arrays[2] < 0))
            raise ValueError(f"a write length is negative: lengths[{i}] = {int(arrays[2][i])}")
        return Copies(*arrays)

    def __len__(self) -> int:
        return len(self.dst)

    def take(self, index: np.ndarray) -> Copies:
        return Copies(self.dst[index], self.src[index], self.length[index])

    def tuples(self) -> Iterator[tuple[int, int, int]]:
        """`(dst, src, length)` of each write, in order, as Python ints."""
        return zip(self.dst.tolist(), self.src.tolist(), self.length.tolist(), strict=True)


class RegionIndex:
    """Finds the region holding each of many address ranges at once (`np.searchsorted` over
    the sorted starts). Regions may overlap (one registered twice, or nested): a range is
    found in the region that starts closest before it among those holding all of it (ties:
    the longer).

    `locate` answers with positions: 0 for none, `k + 1` for `regions[k]`; `starts` and
    `lengths` are indexed by position (0 is a sentinel that holds nothing, so that looking a
    position up never needs a mask)."""

    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.regions = sorted(regions)  # (addr, length)
        self.starts = np.array([_INT64_MIN] + [a for a, _ in self.regions], dtype=np.int64)
        self.lengths = np.array([0] + [n for _, n in self.regions], dtype=np.int64)
        self._ends = self.starts + self.lengths
        # The furthest end of the regions up to each: a range that ends beyond it is in none
        # of them, so the walk back in `locate` stops there.
        self._reach = np.maximum.accumulate(self._ends)

    def __len__(self) -> int:
        return len(self.regions)

    def locate(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """For each range `[addrs[i], addrs[i] + lengths[i])`, the position of the region
        holding all of it, or 0: int64 [n]."""
        ends = addrs + lengths
        at = np.searchsorted(self.starts, addrs, side="right")
        at -= 1
        held = self._ends[at] >= ends
        if held.all():
            return at
        # Missed by the region starting closest before it. If some earlier region reaches far
        # enough, the range lies in nested or overlapping regions: walk back, all such ranges
        # a step at a time (rare: a KV pool's regions are disjoint).
        missed = np.flatnonzero(~held)
        walk = missed[self._reach[at[missed]] >= ends[missed]]
        back = at[walk]
        at[missed] = 0
        while len(walk):
            back -= 1
            found = self._ends[back] >= ends[walk]
            at[walk[found]] = back[found]
            walk, back = walk[~found], back[~found]
        return at

    def find_all(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """For each range, the index in `regions` of the region holding it, or -1."""
        return self.locate(addrs, lengths) - 1

    def find(self, addr: int, length: int) -> tuple[int, int] | None:
        """The `(addr, length)` of the region `locate` picks for one range, or None."""
        i = int(self.find_all(np.array([addr]), np.array([length]))[0])
        return None if i < 0 else self.regions[i]


class MappedPeer:
    """A receiver's regions mapped into this process: translates the receiver's addresses to
    ours. One mapping per allocation, however many regions it holds."""

    def __init__(self, table: PeerTable, driver: IpcDriver, device: int) -> None:
        self.table = table
        self.device = device
        self._driver = driver
        self.mapped: dict[int, int] = {}  # receiver's allocation base -> our mapped base
        try:
            for region in table.regions:
                if region.alloc_base not in self.mapped:
                    handle = bytes.fromhex(region.handle)
                    self.mapped[region.alloc_base] = driver.open(handle, device)
        except BaseException:
            self.close()
            raise
        ours = {r.addr: self.mapped[r.alloc_base] + (r.addr - r.alloc_base)
                for r in table.regions}  # fmt: skip
        self._theirs = RegionIndex([(r.addr, r.length) for r in table.regions])
        self.local_regions = RegionIndex([(ours[r.addr], r.length) for r in table.regions])
        # By position in `_theirs`: how far our address of the region is from theirs, and
        # its position in `local_regions`.
        local_at = {region: k + 1 for k, region in enumerate(self.local_regions.regions)}
        theirs = self._theirs.regions
        self._shift = np.array([0] + [ours[a] - a for a, _ in theirs], dtype=np.int64)
        self._local_at = np.array([0] + [local_at[(ours[a], n)] for a, n in theirs],
                                  dtype=np.int64)  # fmt: skip
        # Row copies wrap both sides as tensors of one device: only if the mappings are on ours.
        try:
            self.same_device = all(driver.device_of(m) == device for m in self.mapped.values())
        except IpcError:
            self.same_device = False

    def translate(
        self, dsts: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Our addresses of the receiver's `[dsts[i], dsts[i] + lengths[i])` and the position
        in `local_regions` of the region holding each; None if any lies in no registered
        region (`missing` names the first)."""
        at = self._theirs.locate(dsts, lengths)
        if not at.all():
            return None
        return dsts + self._shift[at], self._local_at[at]

    def missing(self, dsts: np.ndarray, lengths: np.ndarray) -> int:
        """The index of the first range that lies in no registered region (-1: none)."""
        outside = np.flatnonzero(self._theirs.locate(dsts, lengths) == 0)
        return int(outside[0]) if len(outside) else -1

    def close(self) -> None:
        for mapped in self.mapped.values():
            try:
                self._driver.close(mapped)
            except IpcError as e:
                log.warning("closing a CUDA IPC mapping failed: %s", e)
        self.mapped.clear()


# ---- copies as rows --------------------------------------------------------------------------


# Rows narrower than this are not worth an index entry each: such writes go one by one.
MIN_ROW_BYTES = 256


@dataclass(frozen=True)
class RowCopy:
    """Writes between one source region and one destination region (both in this process's
    address space), as rows of `unit` bytes: row `src_rows[i]` of the source, seen as
    `[src_len // unit, unit]`, goes to row `dst_rows[i]` of the destination. One gather and
    one scatter do them all, however many writes (pages) they were."""

    src_addr: int
    src_len: int
    dst_addr: int
    dst_len: int
    unit: int
    src_rows: np.ndarray  # int64 [n]
    dst_rows: np.ndarray  # int64 [n]


@dataclass(frozen=True)
class RegionPairs:
    """Writes grouped by the (source region, destination region) pair holding them
    (`group_by_region_pair`)."""

    paired: Copies  # pair after pair (pairs in order of their first write), each in order
    bounds: np.ndarray  # int64 [pairs + 1]: pair p is paired[bounds[p]:bounds[p + 1]]
    src_regions: np.ndarray  # int64 [pairs, 2]: (addr, length) of each pair's source region
    dst_regions: np.ndarray  # int64 [pairs, 2]
    single: Copies  # non-empty writes whose source or destination lies in no region

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def rows(self, min_row_bytes: int = MIN_ROW_BYTES) -> tuple[list[RowCopy], Copies]:
        """Each pair's writes as one `RowCopy` whose rows are as wide as every offset and
        length of the pair allow (their gcd), and the writes left to copy one by one:
        `single`, then those of the pairs whose rows would be under `min_row_bytes`."""
        c, bounds = self.paired, self.bounds
        if not len(c):
            return [], self.single
        sizes = np.diff(bounds)
        src_off = c.src - np.repeat(self.src_regions[:, 0], sizes)
        dst_off = c.dst - np.repeat(self.dst_regions[:, 0], sizes)
        starts = bounds[:-1]
        unit = np.gcd(
            np.gcd(np.gcd.reduceat(src_off, starts), np.gcd.reduceat(dst_off, starts)),
            np.gcd.reduceat(c.length, starts),
        )
        wide = unit >= min_row_bytes
        single = self.single
        if not wide.all():
            single = _concat([single, c.take(np.repeat(~wide, sizes))])
            keep = np.repeat(wide, sizes)
            c, src_off, dst_off = c.take(keep), src_off[keep], dst_off[keep]
            sizes, unit = sizes[wide], unit[wide]
        if not len(unit):
            return [], single
        # One page size throughout (the usual case): a scalar divides faster than an array.
        write_unit: int | np.ndarray = int(unit[0])
        if not (unit == write_unit).all():
            write_unit = np.repeat(unit, sizes)
        src_rows, dst_rows = src_off // write_unit, dst_off // write_unit
        if not (c.length == write_unit).all():  # writes of several rows: one entry per row
            per_write = c.length // write_unit
            first = np.cumsum(per_write) - per_write
            within = np.arange(int(per_write.sum()), dtype=np.int64) - np.repeat(first, per_write)
            src_rows = np.repeat(src_rows, per_write) + within
            dst_rows = np.repeat(dst_rows, per_write) + within
            sizes = np.add.reduceat(per_write, np.cumsum(sizes) - sizes)
        row_bounds = np.concatenate(([0], np.cumsum(sizes))).tolist()
        pairs = zip(self.src_regions[wide].tolist(), self.dst_regions[wide].tolist(),
                    unit.tolist(), row_bounds[:-1], row_bounds[1:], strict=True)  # fmt: skip
        planned = [
            RowCopy(s_addr, s_len, d_addr, d_len, u, src_rows[a:b], dst_rows[a:b])
            for (s_addr, s_len), (d_addr, d_len), u, a, b in pairs
        ]
        return planned, single


def _concat(parts: Sequence[Copies]) -> Copies:
    return Copies(
        np.concatenate([p.dst for p in parts]),
        np.concatenate([p.src for p in parts]),
        np.concatenate([p.length for p in parts]),
    )


def _runs(key: np.ndarray) -> np.ndarray:
    """Where each run of equal values of `key` starts."""
    if not len(key):
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(key[1:] != key[:-1]) + 1
    return np.concatenate(([0], change))


def group_by_region_pair(
    copies: Copies,
    src_regions: RegionIndex,
    dst_regions: RegionIndex,
    dst_at: np.ndarray | None = None,
) -> RegionPairs:
    """Group non-empty writes by the (source region, destination region) pair holding them;
    a write whose source or destination lies in no region goes to `single`. `dst_at`: the
    destinations' positions in `dst_regions` (`RegionIndex.locate`), if known already."""
    s = src_regions.locate(copies.src, copies.length)
    d = dst_regions.locate(copies.dst, copies.length) if dst_at is None else dst_at
    span = len(dst_regions) + 1
    key = s * span + d
    paired = (copies.length > 0) & (s > 0) & (d > 0)
    if paired.all():
        c, single = copies, copies.take(np.zeros(0, dtype=np.int64))
    else:
        c, single = copies.take(paired), copies.take((copies.length > 0) & ~paired)
        key = key[paired]
    # A hand-off lists its writes layer by layer and K before V, so each pair's writes come
    # together already: then no sort is needed, only where the pair changes.
    first = _runs(key)
    if len(np.unique(key[first])) != len(first):
        pair_keys, first_seen, inverse = np.unique(key, return_index=True, return_inverse=True)
        rank = np.empty(len(pair_keys), dtype=np.int64)
        rank[np.argsort(first_seen)] = np.arange(len(pair_keys))
        order = np.argsort(rank[inverse.ravel()], kind="stable")
        c, key = c.take(order), key[order]
        first = _runs(key)
    pair_s, pair_d = np.divmod(key[first], span)
    return RegionPairs(
        c,
        np.append(first, len(key)).astype(np.int64),
        np.column_stack([src_regions.starts[pair_s], src_regions.lengths[pair_s]]),
        np.column_stack([dst_regions.starts[pair_d], dst_regions.lengths[pair_d]]),
        single,
    )


def plan_row_copies(
    copies: Copies,
    src_regions: RegionIndex,
    dst_regions: RegionIndex,
    min_row_bytes: int = MIN_ROW_BYTES,
) -> tuple[list[RowCopy], Copies]:
    """Split writes into row copies per (source region, destination region) pair, and the
    writes left to copy one by one: those whose source lies in no region of `src_regions`,
    and those of a pair whose common row width (the gcd of every offset and length) is under
    `min_row_bytes`."""
    return group_by_region_pair(copies, src_regions, dst_regions).rows(min_row_bytes)


def run_row_copies(rows: Sequence[RowCopy], view: Any, device: str) -> None:
    """Do `rows` with torch on `device`: `view(addr, nbytes)` is a uint8 tensor over memory.
    A consecutive run of rows is one slice copy; other rows one gather plus one scatter.
    Index tensors are uploaded once per distinct row list (every layer of a KV hand-off
    has the same one)."""
    import torch

    uploaded: dict[bytes, torch.Tensor] = {}

    def index(rows_: np.ndarray) -> torch.Tensor:
        key = rows_.tobytes()
        if key not in uploaded:
            uploaded[key] = torch.from_numpy(rows_).to(device)
        return uploaded[key]

    for r in rows:
        src = view(r.src_addr, r.src_len - r.src_len % r.unit).view(-1, r.unit)
        dst = view(r.dst_addr, r.dst_len - r.dst_len % r.unit).view(-1, r.unit)
        n, s0, d0 = len(r.src_rows), int(r.src_rows[0]), int(r.dst_rows[0])
        if bool(np.all(np.diff(r.src_rows) == 1)) and bool(np.all(np.diff(r.dst_rows) == 1)):
            dst[d0 : d0 + n].copy_(src[s0 : s0 + n])
        else:
            dst.index_copy_(0, index(r.dst_rows), src.index_select(0, index(r.src_rows)))


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()  # no procfs: the host name is the best same-host check


# ---- the exchange listener (receiver side) -------------------------------------------------


class _ExchangeHandler(socketserver.StreamRequestHandler):
    """One connected writer: answers each `{"op": "regions"}` line with the region table,
    until the writer disconnects."""

    server: _ExchangeServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.request)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.request)
        super().finish()

    def handle(self) -> None:
        while line := self.rfile.readline(_MAX_REQUEST):
            try:
                op = json.loads(line).get("op")
            except (ValueError, AttributeError):
                op = None
            if op == "regions":
                self.wfile.write(self.server.engine.table().to_json())
            else:
                self.wfile.write(json.dumps({"error": f"unknown request {line[:80]!r}"}).encode())
                self.wfile.write(b"\n")
            self.wfile.flush()


class _ExchangeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: CudaIpcTransferEngine) -> None:
        self.engine = engine
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _ExchangeHandler)

    def close_connections(self) -> None:
        """End every writer's connection, as the process exiting would: writers drop their
        mappings of this engine's memory at their next write."""
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


# ---- the engine ----------------------------------------------------------------------------


class _Peer:
    """A writer's hold on one receiver: the exchange connection and the mapped table."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.lock = threading.Lock()  # one write (and one refresh) at a time per peer
        self.sock: socket.socket | None = None
        self.reader: Any = None
        self.mapped: MappedPeer | None = None

    def connection_closed(self) -> bool:
        """True if the receiver closed the connection (readable with nothing pending is EOF:
        the receiver only ever writes in answer to a request)."""
        if self.sock is None:
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def drop(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock, self.reader = None, None


def _split_session(session_id: str) -> tuple[str, int]:
    host, sep, port = session_id.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise IpcError(f"session id must be 'host:port', got {session_id!r}")
    return host.strip("[]"), int(port)


# How writes are copied, by `PDSERVE_CUDA_IPC_COPY`: "memcpy", one cuMemcpyDtoDAsync per write;
# "rows", a gather and a scatter (torch) per source/destination region pair, for the writes
# whose source lies in memory registered on this engine (the rest one by one); "batch", all
# writes in one cuMemcpyBatchAsync (a driver of CUDA 12.8+); "kernel", all writes in one Triton
# kernel launch (copy_kernel.py); "auto" (the default): `auto_copy_mode`. "rows" and "kernel"
# copy between tensors of one device: to a peer's memory on another device they are memcpy.
COPY_MODES = ("auto", "memcpy", "rows", "batch", "kernel")
_ROWS_MIN_WRITES_PER_PAIR = 4
_ROWS_MAX_MEAN_WRITE_BYTES = 256 << 10


def writes_short_for_rows(writes: int, nbytes: int) -> bool:
    """Whether `writes` writes of `nbytes` in all are short (a mean under 256 KiB): scattered
    pages rather than runs. A long write is copied at the copy engines' full rate by one
    driver call (550-670 GB/s on the H200 for 4 MB writes) in about the time the call takes,
    while a gather and a scatter move its bytes twice (60-90 GB/s there). Known before the
    writes are grouped: the contiguous hand-off (64 writes of 4 MB) is never planned as rows."""
    return nbytes < _ROWS_MAX_MEAN_WRITE_BYTES * writes


def rows_pay_off(writes: int, pairs: int, nbytes: int) -> bool:
    """Whether `auto`, where it copies short writes as rows, does so for `writes` writes of
    `nbytes` in all, held by `pairs` region pairs: several per pair. A row copy costs some
    tens of µs of torch calls per pair, a memcpy call a few µs per write: rows win with
    scattered pages, not with a few runs per pair."""
    return writes >= _ROWS_MIN_WRITES_PER_PAIR * pairs and writes_short_for_rows(writes, nbytes)


def batch_pays_off(writes: int, nbytes: int) -> bool:
    """Whether `auto` copies `writes` writes of `nbytes` in all as one batch call, where the
    driver has it: long writes only (not `writes_short_for_rows`). Measured on the H200
    (`bench.kv_transfer_gpu`, Llama-3-8B's KV, a 2,048-token prompt, 268 MB): 64 writes of
    4 MB move at 574-667 GB/s in one batch against 547-577 with a memcpy call each; but the
    driver spends about 4 µs per copy of a batch, so scattered pages crawl: 131,072 writes of
    2 KB (1-token pages) at 0.5 GB/s (memcpy 0.3, one gather and scatter per region pair 12.5,
    an in-process `index_copy_` 203)."""
    return not writes_short_for_rows(writes, nbytes)


def auto_copy_mode(
    writes: int, nbytes: int, can_batch: bool, can_kernel: bool, same_device: bool
) -> str:
    """The copy mode `auto` takes for `writes` writes of `nbytes` in all: long writes in one
    batch call where the driver has it (`batch_pays_off`), else a memcpy call each; short
    ones (scattered pages) in one kernel launch where Triton imports and the peer's memory is
    on the writer's device, else "rows" (row copies where `rows_pay_off` for the region
    pairs, memcpy where not or where the devices differ)."""
    if batch_pays_off(writes, nbytes):
        return "batch" if can_batch else "memcpy"
    return "kernel" if can_kernel and same_device else "rows"


class CudaIpcTransferEngine(TransferEngine):
    """The `TransferEngine` API over CUDA IPC between processes of one host (module doc)."""

    # No queue limit here (Mooncake's TCP one is why `PageWriter` cuts batches): a hand-off in
    # one call lets its writes be planned as rows together.
    max_writes_per_call = 1 << 30

    def __init__(self, driver: IpcDriver | None = None, copy_mode: str | None = None) -> None:
        """`copy_mode`: one of `COPY_MODES`; None reads `PDSERVE_CUDA_IPC_COPY` (default
        "auto"). "batch" on a driver without the batch call raises `IpcError`
        (`BATCH_UNAVAILABLE`)."""
        mode = copy_mode or os.environ.get("PDSERVE_CUDA_IPC_COPY") or "auto"
        if mode not in COPY_MODES:
            raise ValueError(
                f"cuda_ipc copy mode {mode!r} is not one of {COPY_MODES} "
                "(set PDSERVE_CUDA_IPC_COPY to one of them, or unset it)"
            )
        self._copy_mode = mode
        self._driver: IpcDriver = driver if driver is not None else shared_driver()
        self._can_batch = self._driver.can_copy_batch
        if mode == "batch" and not self._can_batch:
            raise IpcError(BATCH_UNAVAILABLE)
        # Whether auto may launch the copy kernel: None until its first short writes (Triton is
        # imported only then); False once the kernel failed (then it copies as rows).
        self._kernel_ok: bool | None = None
        if mode == "kernel" and not self._driver.can_copy_kernel:
            raise IpcError(KERNEL_UNAVAILABLE)
        self._instance = uuid.uuid4().hex
        self._boot_id = _boot_id()
        self._regions: dict[int, ExportedRegion] = {}
        self._regions_lock = threading.Lock()
        self._local_index: RegionIndex | None = None  # of `_regions`; None: to build again
        self._server: _ExchangeServer | None = None
        self._host = ""
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()

    # -- lifecycle

    def initialize(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str
    ) -> int:
        if self._server is not None:
            log.error("cuda_ipc: initialize called twice")
            return _FAILED
        host, sep, port = local_hostname.rpartition(":")
        if not (sep and port.isdigit() and ":" not in host):
            host, port = local_hostname, "0"
        try:
            self._server = _ExchangeServer((host, int(port)), self)
        except OSError as e:
            log.error("cuda_ipc: cannot listen on %s:%s: %s", host, port, e)
            return _FAILED
        self._host = host
        server = self._server
        threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.1),
            name="cuda-ipc-exchange",
            daemon=True,
        ).start()
        return 0

    def close(self) -> None:
        """Stop the listener and unmap every peer (not in Mooncake's API; for tests and
        orderly shutdown)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server = None
        with self._peers_lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            with peer.lock:
                peer.drop()

    def get_rpc_port(self) -> int:
        if self._server is None:
            raise RuntimeError("the cuda_ipc engine has no port before initialize() succeeds")
        return int(self._server.server_address[1])

    @property
    def session_id(self) -> str:
        return f"{self._host}:{self.get_rpc_port()}"

    # -- receiver side

    def register_memory(self, addr: int, length: int) -> int:
        if length <= 0:
            log.error("cuda_ipc: register_memory(%#x, %d): length must be > 0", addr, length)
            return _FAILED
        try:
            alloc = self._driver.export(addr)
            region = ExportedRegion(
                addr, length, alloc.base, alloc.size, alloc.handle.hex(), alloc.device
            )
        except (IpcError, ValueError) as e:
            log.error("cuda_ipc: register_memory(%#x, %d) failed: %s", addr, length, e)
            return _FAILED
        with self._regions_lock:
            self._regions[addr] = region
            self._local_index = None
        return 0

    def unregister_memory(self, addr: int) -> int:
        with self._regions_lock:
            if self._regions.pop(addr, None) is None:
                log.error("cuda_ipc: unregister_memory(%#x): not registered", addr)
                return _FAILED
            self._local_index = None
        return 0

    def table(self) -> PeerTable:
        with self._regions_lock:
            regions = tuple(self._regions.values())
        return PeerTable(self._instance, self._boot_id, os.getpid(), regions)

    # -- writer side

    def _fetch(self, peer: _Peer) -> PeerTable:
        """Ask the receiver for its table, connecting first if needed."""
        if peer.sock is None:
            host, port = _split_session(peer.session_id)
            try:
                peer.sock = socket.create_connection((host, port), timeout=_EXCHANGE_TIMEOUT_S)
            except OSError as e:
                raise IpcError(f"cannot reach the cuda_ipc session {peer.session_id}: {e}") from e
            peer.reader = peer.sock.makefile("rb")
        sock, reader = peer.sock, peer.reader
        try:
            sock.sendall(b'{"op": "regions"}\n')
            line = reader.readline(_MAX_LINE)
        except OSError as e:
            raise IpcError(f"the cuda_ipc session {peer.session_id} failed: {e}") from e
        if not line:
            raise IpcError(f"the cuda_ipc session {peer.session_id} closed the connection")
        table = PeerTable.from_json(line)
        if table.boot_id != self._boot_id:
            raise IpcError(
                f"the cuda_ipc session {peer.session_id} runs on another host (CUDA IPC works "
                "between processes of one host only; use --transfer-backend mooncake)"
            )
        return table

    def _refresh(self, peer: _Peer, device: int) -> MappedPeer:
        """A fresh table from the receiver, mapped; the old mapping is dropped first."""
        if peer.mapped is not None:
            peer.mapped.close()
            peer.mapped = None
        table = self._fetch(peer)
        peer.mapped = MappedPeer(table, self._driver, device)
        return peer.mapped

    def _peer(self, session_id: str) -> _Peer:
        with self._peers_lock:
            peer = self._peers.get(session_id)
            if peer is None:
                peer = self._peers[session_id] = _Peer(session_id)
            return peer

    def _plan(self, peer: _Peer, device: int, writes: Copies) -> tuple[Copies, np.ndarray]:
        """The writes with their destinations in our mapping of the receiver's memory, and
        the position of each in `local_regions` of the mapping. A destination missing from
        the table we hold makes us ask the receiver again once (it may have registered more
        since); missing from a fresh table too, it raises `IpcError`."""
        if peer.connection_closed():
            peer.drop()  # the receiver went away: its mappings are void
        fresh = False
        if peer.mapped is None or peer.mapped.device != device:
            self._refresh(peer, device)
            fresh = True
        while True:
            mapped = peer.mapped
            if mapped is None:  # unreachable: _refresh sets it or raises
                raise IpcError(f"no mapping of the cuda_ipc session {peer.session_id}")
            translated = mapped.translate(writes.dst, writes.length)
            if translated is not None:
                local, local_at = translated
                return Copies(local, writes.src, writes.length), local_at
            if fresh:
                i = mapped.missing(writes.dst, writes.length)
                raise IpcError(
                    f"destination [{int(writes.dst[i]):#x}, +{int(writes.length[i])}) is not "
                    f"inside memory registered by the cuda_ipc session {peer.session_id}"
                )
            self._refresh(peer, device)
            fresh = True

    def _registered(self) -> RegionIndex:
        """The index of the regions registered here (built again only after a change)."""
        with self._regions_lock:
            if self._local_index is None:
                regions = [(r.addr, r.length) for r in self._regions.values()]
                self._local_index = RegionIndex(regions)
            return self._local_index

    def _kernel_usable(self) -> bool:
        """Whether `auto` may launch the copy kernel (Triton imported on first asking)."""
        if self._kernel_ok is None:
            self._kernel_ok = self._driver.can_copy_kernel
        return self._kernel_ok

    def _copy(self, device: int, copies: Copies, dst_at: np.ndarray, peer: _Peer) -> None:
        """Run the writes as the copy mode says (see `COPY_MODES`; `auto`: `auto_copy_mode`).
        `dst_at`: the destinations' positions in the mapping's `local_regions`."""
        mapped, auto = peer.mapped, self._copy_mode == "auto"
        same_device = mapped is not None and mapped.same_device
        mode = self._copy_mode
        if auto:
            nbytes = int(copies.length.sum())
            mode = auto_copy_mode(len(copies), nbytes, self._can_batch,
                                  same_device and self._kernel_usable(), same_device)  # fmt: skip
        if mode == "batch":
            self._driver.copy_batch(device, copies)
            return
        if mode == "kernel" and same_device:
            try:
                self._driver.copy_kernel(device, copies)
                return
            except IpcError as e:
                if not auto:
                    raise
                # A kernel that cannot compile or launch here: auto copies as rows from now
                # on (all of these writes again: the same bytes to the same places).
                log.warning("cuda_ipc: the copy kernel failed, auto copies as rows: %s", e)
                self._kernel_ok, mode = False, "rows"
        if mode != "rows" or mapped is None or not same_device:
            self._driver.copy(device, copies)
            return
        pairs = group_by_region_pair(copies, self._registered(), mapped.local_regions, dst_at)
        # Decided before any row is planned: the contiguous hand-off spent 15x memcpy's host
        # time building row plans it then did not use (123 GB/s on the H200, memcpy 722).
        paired = pairs.paired
        if auto and not rows_pay_off(len(paired), len(pairs), int(paired.length.sum())):
            self._driver.copy(device, copies)
            return
        rows, single = pairs.rows(MIN_ROW_BYTES)
        if len(single):
            self._driver.copy(device, single)
        if rows:
            self._driver.copy_rows(device, rows)

    def batch_transfer_sync_write(
        self, session_id: str, srcs: list[int], dsts: list[int], lengths: list[int]
    ) -> int:
        if not len(srcs) == len(dsts) == len(lengths):
            log.error(
                "cuda_ipc: %d sources, %d destinations, %d lengths; they must match",
                len(srcs),
                len(dsts),
                len(lengths),
            )
            return _FAILED
        try:
            writes = Copies.of(dsts, srcs, lengths)
        except ValueError as e:
            log.error("cuda_ipc: %s", e)
            return _FAILED
        if not srcs:
            return 0
        peer = self._peer(session_id)
        with peer.lock:
            try:
                device = self._driver.device_of(srcs[0])
                copies, dst_at = self._plan(peer, device, writes)
                self._copy(device, copies, dst_at, peer)
            except IpcError as e:
                log.error("cuda_ipc: write of %d ranges to %s failed: %s", len(srcs), session_id, e)
                # Whatever failed (a half-read answer, a gone peer, a bad table), the next
                # write starts from a fresh connection and table.
                peer.drop()
                return _FAILED
        return 0

    def transfer_sync_write(self, session_id: str, src: int, dst: int, length: int) -> int:
        return self.batch_transfer_sync_write(session_id, [src], [dst], [length])
