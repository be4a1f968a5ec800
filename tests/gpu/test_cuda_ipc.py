"""The `cuda_ipc` backend on a real GPU: pages written by one process into another's device
pool land byte for byte, in every copy mode, for pages of 1, 16 and 64 tokens, contiguous
and scattered; on a second GPU too when there is one. The copy kernel alone, compiled: byte
ranges of every width and alignment. Skipped without CUDA.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_cuda_ipc.py
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from bench.kv_transfer_gpu import (  # noqa: E402 (after the skip mark: the bench needs CUDA)
    Receiver,
    allocate,
    close,
    new_engine,
    page_patterns,
    pages_hash,
    register,
    run_case,
)
from kv_transfer import (  # noqa: E402
    KVLayout,
    KVPoolDescriptor,
    PageWriter,
    TransferEngine,
    TransferError,
    build_write_batch,
)
from kv_transfer import descriptor_from_tensors as describe  # noqa: E402
from kv_transfer.cuda_ipc import (  # noqa: E402
    BATCH_UNAVAILABLE,
    COPY_MODES,
    KERNEL_UNAVAILABLE,
    CudaIpcTransferEngine,
    shared_driver,
)
from tests.kv_transfer.test_copy_kernel import ODD, check_writes  # noqa: E402

PROMPT_TOKENS = 192


def engines(
    pool: KVPoolDescriptor, modes: tuple[str, ...] = COPY_MODES
) -> Iterator[dict[str, tuple[TransferEngine, PageWriter]]]:
    """An engine and writer per copy mode of `modes` (batch only where the driver has it,
    kernel where Triton imports: test_batch_mode_scattered_handoff and
    test_kernel_mode_scattered_handoff say when not)."""
    made: dict[str, tuple[TransferEngine, PageWriter]] = {}
    for mode in modes:
        if mode == "batch" and not shared_driver().can_copy_batch:
            continue
        if mode == "kernel" and not shared_driver().can_copy_kernel:
            continue
        engine = new_engine("cuda_ipc", mode)
        register(engine, pool)
        made[mode] = (engine, PageWriter(engine))
    yield made
    for engine, _ in made.values():
        close(engine)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("receiver_device", ["cuda:0", "cuda:1"])
def test_pages_land_byte_for_byte(page_size: int, receiver_device: str) -> None:
    if torch.device(receiver_device).index >= torch.cuda.device_count():
        pytest.skip(f"no {receiver_device}")
    layout = KVLayout("gpu-test", "bfloat16", page_size, 3, 2, 64)
    prompt_pages = -(-PROMPT_TOKENS // page_size)
    src = allocate(layout, 2 * prompt_pages, "cuda:0", random=True)
    base = allocate(layout, 2 * prompt_pages, "cuda:0", random=False)
    pool = describe(layout, src[:3], src[3:])
    receiver = Receiver(layout, 2 * prompt_pages, receiver_device)
    try:
        for made in engines(pool):
            for src_pages, dst_pages in page_patterns(prompt_pages).values():
                # run_case raises if any mode's destination pages differ from the source
                # (SHA-256) or if any other page was written.
                result = run_case(receiver, made, src, pool, base, src_pages, dst_pages, 0, 1)
                assert result["bytes"] == prompt_pages * layout.k_page_bytes * 2 * 3
    finally:
        receiver.stop()


@pytest.mark.parametrize("page_size", [1, 16])
def test_batch_mode_scattered_handoff(page_size: int) -> None:
    """Every other destination page, all writes in one cuMemcpyBatchAsync: byte for byte."""
    if not shared_driver().can_copy_batch:
        pytest.skip(BATCH_UNAVAILABLE)
    layout = KVLayout("gpu-test", "bfloat16", page_size, 3, 2, 64)
    prompt_pages = -(-PROMPT_TOKENS // page_size)
    src = allocate(layout, 2 * prompt_pages, "cuda:0", random=True)
    base = allocate(layout, 2 * prompt_pages, "cuda:0", random=False)
    pool = describe(layout, src[:3], src[3:])
    receiver = Receiver(layout, 2 * prompt_pages, "cuda:0")
    try:
        for made in engines(pool, ("batch",)):
            src_pages, dst_pages = page_patterns(prompt_pages)["every other page"]
            result = run_case(receiver, made, src, pool, base, src_pages, dst_pages, 0, 1)
            assert set(result) == {"writes", "bytes", "batch", "baseline"}
            assert result["writes"] == prompt_pages * 2 * 3  # one per page, layer, K and V
    finally:
        receiver.stop()


@pytest.mark.parametrize("page_size", [1, 16])
def test_kernel_mode_scattered_handoff(page_size: int) -> None:
    """Every other destination page, all writes in one Triton launch: byte for byte."""
    if not shared_driver().can_copy_kernel:
        pytest.skip(KERNEL_UNAVAILABLE)
    layout = KVLayout("gpu-test", "bfloat16", page_size, 3, 2, 64)
    prompt_pages = -(-PROMPT_TOKENS // page_size)
    src = allocate(layout, 2 * prompt_pages, "cuda:0", random=True)
    base = allocate(layout, 2 * prompt_pages, "cuda:0", random=False)
    pool = describe(layout, src[:3], src[3:])
    receiver = Receiver(layout, 2 * prompt_pages, "cuda:0")
    try:
        for made in engines(pool, ("kernel",)):
            for src_pages, dst_pages in page_patterns(prompt_pages).values():
                result = run_case(receiver, made, src, pool, base, src_pages, dst_pages, 0, 1)
                assert set(result) == {"writes", "bytes", "kernel", "baseline"}
    finally:
        receiver.stop()


@pytest.mark.parametrize("word", [1, 2, 4, 8, 16])
def test_copy_kernel_compiled_byte_for_byte(word: int) -> None:
    """tests/kv_transfer/test_copy_kernel.py's ranges, on device memory, the kernel compiled:
    odd lengths at misaligned places, each word width, many short writes."""
    if not shared_driver().can_copy_kernel:
        pytest.skip(KERNEL_UNAVAILABLE)
    if word == 1:
        assert check_writes("cuda:0", ODD, word=1) == 1
        lengths = np.random.default_rng(2).integers(0, 300, 400).tolist()
        assert check_writes("cuda:0", lengths, word=1, seed=3) == 1
        return
    lengths = [word * k for k in (1, 3, 2048 // word, (32768 + 48) // word, 0, 5)]
    assert check_writes("cuda:0", lengths, word) == word


def test_bad_writes_fail_and_a_gone_receiver_is_noticed(caplog: pytest.LogCaptureFixture) -> None:
    layout = KVLayout("gpu-test", "bfloat16", 16, 2, 2, 64)
    src = allocate(layout, 8, "cuda:0", random=True)
    pool = describe(layout, src[:2], src[2:])
    receiver = Receiver(layout, 8, "cuda:0")
    engine = CudaIpcTransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    register(engine, pool)
    try:
        writer = PageWriter(engine)
        writer.write(receiver.session_id, build_write_batch(pool, receiver.pool, [0, 1], [5, 6]))
        host = (ctypes.c_char * 4096)()
        dst = receiver.pool.k_base_addrs[0]
        with caplog.at_level(logging.ERROR):
            # From host memory: refused, the backend moves device memory only.
            rc = engine.transfer_sync_write(receiver.session_id, ctypes.addressof(host), dst, 64)
            assert rc == -1 and "not CUDA device memory" in caplog.text
            # Past the receiver's pool: refused, nothing written.
            # (straddling its end: the next tensor may start right there, registered too)
            end = receiver.pool.k_base_addrs[0] + receiver.pool.num_pages * layout.k_page_bytes
            rc = engine.transfer_sync_write(receiver.session_id, pool.k_base_addrs[0], end - 32, 64)
            assert rc == -1 and "not inside memory registered" in caplog.text
        # Host memory cannot be registered either.
        assert engine.register_memory(ctypes.addressof(host), 4096) == -1
    finally:
        receiver.stop()
    with pytest.raises(TransferError):
        writer.write(receiver.session_id, build_write_batch(pool, receiver.pool, [0], [0]))
    engine.close()


def test_a_write_from_a_fresh_thread() -> None:
    """The prefill worker writes from a thread pool (asyncio.to_thread), whose threads have no
    CUDA context current: the backend binds one itself."""
    layout = KVLayout("gpu-test", "bfloat16", 16, 2, 2, 64)
    src = allocate(layout, 8, "cuda:0", random=True)
    pool = describe(layout, src[:2], src[2:])
    receiver = Receiver(layout, 8, "cuda:0")
    engine = new_engine("cuda_ipc")
    register(engine, pool)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            batch = build_write_batch(pool, receiver.pool, [0, 3, 4], [7, 1, 2])
            PageWriter(engine).write(receiver.session_id, batch)
        except BaseException as exc:
            errors.append(exc)

    try:
        thread = threading.Thread(target=write)
        thread.start()
        thread.join(60)
        assert not errors, errors
        assert receiver.ask("hash", [7, 1, 2]) == pages_hash(src, [0, 3, 4])
    finally:
        receiver.stop()
        close(engine)
