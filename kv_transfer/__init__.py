"""The Mooncake-compatible KV transfer layer: engines, page layouts, write batches, and the
per-transfer state machines. Knows nothing of the services around it."""

from kv_transfer.fence import TransferRevoked, WriteFence
from kv_transfer.layout import (
    DTYPE_ITEMSIZE,
    KVLayout,
    KVPoolDescriptor,
    LayoutMismatchError,
    check_compatible,
    descriptor_from_tensors,
)
from kv_transfer.pages import PageRun, WriteBatch, build_write_batch, coalesce_runs
from kv_transfer.state import (
    Destination,
    KVReceiver,
    KVSender,
    TransferFailed,
    TransferState,
    TransferTable,
    TransferTimeout,
)
from kv_transfer.transfer_engine import (
    TRANSFER_BACKENDS,
    MooncakeTransferEngine,
    TransferEngine,
    TransferError,
    check,
    create_transfer_engine,
)
from kv_transfer.writer import MAX_WRITES_PER_CALL, PageWriter, write_batch

__all__ = [
    "DTYPE_ITEMSIZE",
    "MAX_WRITES_PER_CALL",
    "TRANSFER_BACKENDS",
    "Destination",
    "KVLayout",
    "KVPoolDescriptor",
    "KVReceiver",
    "KVSender",
    "LayoutMismatchError",
    "MooncakeTransferEngine",
    "PageRun",
    "PageWriter",
    "TransferEngine",
    "TransferError",
    "TransferFailed",
    "TransferRevoked",
    "TransferState",
    "TransferTable",
    "TransferTimeout",
    "WriteBatch",
    "WriteFence",
    "build_write_batch",
    "check",
    "check_compatible",
    "coalesce_runs",
    "create_transfer_engine",
    "descriptor_from_tensors",
    "write_batch",
]
