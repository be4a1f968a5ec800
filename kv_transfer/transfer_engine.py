"""The transfer engine API: Mooncake's Python `TransferEngine`, and the backends that speak it.

Any engine that speaks this API can move KV pages: `initialize`, `get_rpc_port`,
`register_memory`, `unregister_memory`, `transfer_sync_write`, `batch_transfer_sync_write`.
Calls return Mooncake's integer codes (0 on success, negative on failure); `check` turns a
code into a `TransferError`. Backends are chosen by name and imported only when chosen.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any


class TransferError(RuntimeError):
    """A transfer-engine call failed, or a transfer did not complete."""


def check(rc: int, what: str) -> None:
    """Raise `TransferError` naming `what` unless `rc` is Mooncake's success code 0."""
    if rc != 0:
        raise TransferError(f"{what} failed with return code {rc}")


class TransferEngine(ABC):
    """One endpoint of one-sided writes into registered memory of other endpoints.

    Contract (Mooncake's):
    - `initialize` is called once, before anything else; 0 means ready.
    - Memory is registered before it is used: the destination of a write must lie inside a
      region registered on the receiving engine, or the write fails (the sender's source should
      be registered on the sender, which RDMA needs; TCP does not check it).
    - A session id names the target engine: `"host:rpc_port"`, i.e. the target's `session_id`.
    - The sync writes block the calling thread until every byte has landed or the write has
      failed; they return 0 on success and a negative code on failure.
    """

    @abstractmethod
    def initialize(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str
    ) -> int: ...

    @abstractmethod
    def get_rpc_port(self) -> int: ...

    @abstractmethod
    def register_memory(self, addr: int, length: int) -> int: ...

    @abstractmethod
    def unregister_memory(self, addr: int) -> int: ...

    @abstractmethod
    def transfer_sync_write(self, session_id: str, src: int, dst: int, length: int) -> int: ...

    @abstractmethod
    def batch_transfer_sync_write(
        self, session_id: str, srcs: list[int], dsts: list[int], lengths: list[int]
    ) -> int: ...

    @property
    @abstractmethod
    def session_id(self) -> str:
        """`"host:rpc_port"` of this engine, the id its peers write to; valid after initialize."""


class MooncakeTransferEngine(TransferEngine):
    """Mooncake's `mooncake.engine.TransferEngine`, unchanged behind the `TransferEngine` API.

    Mooncake logs through glog to stderr; `MC_LOG_LEVEL=ERROR` in the environment (set before
    the first engine is created) keeps only errors, and the harmless lines it prints at every
    start are held back (`_MOONCAKE_START_NOISE`). Over TCP, one batch may hold only about 2,000
    writes to a peer (see `kv_transfer.writer`); `PageWriter` keeps within it.
    """

    def __init__(self) -> None:
        try:
            from mooncake.engine import TransferEngine as _MooncakeEngine
        except ImportError as e:
            raise ImportError(
                "the 'mooncake' transfer backend needs Mooncake's transfer engine: pip install "
                "mooncake-transfer-engine (GPU hosts) or mooncake-transfer-engine-non-cuda "
                "(CPU hosts), and the RDMA verbs library it links even for TCP (Debian/Ubuntu: "
                f"apt-get install libibverbs1); importing mooncake.engine failed: {e}"
            ) from e
        self._engine: Any = _MooncakeEngine()
        self._hostname: str | None = None

    def initialize(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str
    ) -> int:
        with _filtered_stderr(_MOONCAKE_START_NOISE):
            rc = int(
                self._engine.initialize(local_hostname, metadata_server, protocol, device_name)
            )
        if rc == 0:
            # "host:port" pins Mooncake's port; the session id uses the RPC port it reports.
            host, sep, port = local_hostname.rpartition(":")
            self._hostname = host if sep and port.isdigit() and ":" not in host else local_hostname
        return rc

    def get_rpc_port(self) -> int:
        return int(self._engine.get_rpc_port())

    def register_memory(self, addr: int, length: int) -> int:
        return int(self._engine.register_memory(addr, length))

    def unregister_memory(self, addr: int) -> int:
        return int(self._engine.unregister_memory(addr))

    def transfer_sync_write(self, session_id: str, src: int, dst: int, length: int) -> int:
        return int(self._engine.transfer_sync_write(session_id, src, dst, length))

    def batch_transfer_sync_write(
        self, session_id: str, srcs: list[int], dsts: list[int], lengths: list[int]
    ) -> int:
        return int(self._engine.batch_transfer_sync_write(session_id, srcs, dsts, lengths))

    @property
    def session_id(self) -> str:
        if self._hostname is None:
            raise RuntimeError("the transfer engine has no session id before initialize() succeeds")
        return f"{self._hostname}:{self.get_rpc_port()}"


def _cuda_ipc() -> TransferEngine:
    from kv_transfer.cuda_ipc import CudaIpcTransferEngine

    return CudaIpcTransferEngine()


# What Mooncake prints at every start, harmless: glog's note that it logs before being set up,
# the TCP protocol's allocator, no RDMA device on a TCP host, and a lookup of its own segment
# before it registered one.
_MOONCAKE_START_NOISE = (
    "Logging before InitGoogleLogging",
    "Using default malloc/free for protocol",
    "No RDMA devices found",
    "Local segment descriptor not found",
)


@contextlib.contextmanager
def _filtered_stderr(benign: tuple[str, ...]) -> Iterator[None]:
    """Hold back what native code writes to stderr (fd 2) while the block runs, then write
    out every line but those containing one of `benign`. Python's own logging in that window
    goes through the same fd and is kept too."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().decode(errors="replace").splitlines(keepends=True)
                if not any(b in line for b in benign)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# Backend name -> constructor. Same-host device backends (CUDA IPC, Ascend's engine) go here as
# constructors that import their module inside, so that choosing one never imports another.
_BACKENDS: dict[str, Callable[[], TransferEngine]] = {
    "mooncake": MooncakeTransferEngine,
    "cuda_ipc": _cuda_ipc,
}
TRANSFER_BACKENDS = tuple(_BACKENDS)  # the names `create_transfer_engine` takes


def create_transfer_engine(
    backend: str = "mooncake",
    *,
    hostname: str = "127.0.0.1",
    metadata_server: str = "P2PHANDSHAKE",
    protocol: str = "tcp",
    device_name: str = "",
) -> TransferEngine:
    """A ready (initialized) engine of the named backend; raises `TransferError` if init fails."""
    constructor = _BACKENDS.get(backend)
    if constructor is None:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"unknown transfer backend {backend!r}; known backends: {known}")
    engine = constructor()
    check(
        engine.initialize(hostname, metadata_server, protocol, device_name),
        f"{backend} initialize(local_hostname={hostname!r}, metadata_server={metadata_server!r}, "
        f"protocol={protocol!r}, device_name={device_name!r})",
    )
    return engine
