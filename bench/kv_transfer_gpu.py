"""KV hand-off between GPU pools of two processes through a transfer backend (`cuda_ipc` in
each copy mode: auto, memcpy, rows, batch where the driver has cuMemcpyBatchAsync, and kernel
where Triton imports; or Mooncake's CUDA build), beside a plain device-to-device copy of the
same pages, checked byte for byte. Needs a CUDA GPU.

A receiver process (the decode side) holds a zeroed KV pool on `--receiver-device` and
registers it with its engine; this process (the prefill side) holds a pool of random bytes on
`--device`, registered too, and writes one prompt's pages into the receiver with `PageWriter`
(as the prefill worker does), for pages of each `--page-sizes` tokens, with contiguous
destination pages (one run) and with every other page (no run longer than one page). The
baseline is the same pages copied inside this process, one `index_copy_` per layer and K/V,
into a second local pool. After each case the receiver hashes the destination pages (SHA-256
of their bytes), which must equal the source pages' hash, and checks that every other page is
still zero.

Each case is timed as the median of `--reps` after `--warmup` calls, except where its first
call takes over 0.2 s (a driver call per 2 KB page: memcpy and batch with 1-token pages
scattered, 0.5-1 s a hand-off on the H200): one more call is timed, so the default run takes
about a minute rather than several.

    python -m bench.kv_transfer_gpu                  # cuda_ipc, Llama-3-8B shape (32 layers,
                                                     # 8 KV heads, head_dim 128, bf16), 2,048
                                                     # -token prompt, pages of 1, 16, 64 tokens
    python -m bench.kv_transfer_gpu --receiver-device cuda:1   # decode pool on a second GPU
    python -m bench.kv_transfer_gpu --backend mooncake         # Mooncake's CUDA build, TCP
    python -m bench.kv_transfer_gpu --layers 4 --prompt-tokens 256 --reps 3   # a quick check
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kv_transfer import (
    KVLayout,
    KVPoolDescriptor,
    PageWriter,
    TransferEngine,
    build_write_batch,
    create_transfer_engine,
)
from kv_transfer import descriptor_from_tensors as describe
from kv_transfer.cuda_ipc import (
    BATCH_UNAVAILABLE,
    COPY_MODES,
    KERNEL_UNAVAILABLE,
    CudaIpcTransferEngine,
    shared_driver,
)

PEER_TIMEOUT_S = 120.0
# A case whose first call takes longer is timed once more only (`timed`).
SLOW_CALL_S = 0.2


def allocate(layout: KVLayout, num_pages: int, device: str, random: bool) -> list[torch.Tensor]:
    """K of every layer, then V of every layer: `[num_pages, page_size, heads, head_dim]`."""
    shape = (num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim)
    dtype = getattr(torch, layout.dtype)
    tensors = []
    for _ in range(2 * layout.num_layers):
        if random:
            raw = torch.randint(-128, 128, (*shape[:-1], shape[-1] * 2), dtype=torch.int8)
            tensors.append(raw.to(device).view(dtype).contiguous())
        else:
            tensors.append(torch.zeros(shape, dtype=dtype, device=device))
    return tensors


def pages_hash(tensors: Sequence[torch.Tensor], pages: Sequence[int]) -> str:
    """SHA-256 of the bytes of `pages` (in that order) of every tensor."""
    index = torch.tensor(list(pages), dtype=torch.long, device=tensors[0].device)
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.index_select(0, index).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def sync(device: str) -> None:
    """Wait for `device`'s work (a no-op on the CPU, where the harness itself can be tried
    with Mooncake: --backend mooncake --device cpu --receiver-device cpu)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def register(engine: TransferEngine, pool: KVPoolDescriptor) -> None:
    for addr, length in pool.regions():
        if engine.register_memory(addr, length) != 0:
            raise RuntimeError(f"register_memory({addr:#x}, {length}) failed")


def new_engine(backend: str, copy_mode: str | None = None) -> TransferEngine:
    """An initialized engine on loopback; `copy_mode` for cuda_ipc."""
    if backend == "cuda_ipc":
        engine = CudaIpcTransferEngine(copy_mode=copy_mode)
        if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("cuda_ipc initialize failed")
        return engine
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    return create_transfer_engine(backend)


def close(engine: TransferEngine) -> None:
    if isinstance(engine, CudaIpcTransferEngine):
        engine.close()


def receiver_main(
    layout: KVLayout, num_pages: int, device: str, backend: str, inbox: Any, outbox: Any
) -> None:
    """Hold a zeroed pool, publish it, answer hash requests until told to stop."""
    try:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(device)
        tensors = allocate(layout, num_pages, device, random=False)
        n = layout.num_layers
        pool = describe(layout, tensors[:n], tensors[n:])
        engine = new_engine(backend)
        register(engine, pool)
        sync(device)
        outbox.put((engine.session_id, pool))
    except Exception as exc:
        outbox.put(exc)
        return
    while (message := inbox.get(timeout=PEER_TIMEOUT_S)) != "stop":
        op, pages = message
        if op == "hash":
            sync(device)
            outbox.put(pages_hash(tensors, pages))
        elif op == "untouched_nonzero":
            index = torch.tensor(pages, dtype=torch.long, device=device)
            outbox.put(sum(int(t.index_select(0, index).count_nonzero()) for t in tensors))
        elif op == "zero":
            for t in tensors:
                t.zero_()
            sync(device)
            outbox.put("ok")
    close(engine)


class Receiver:
    """The receiver process, started with `spawn` (CUDA does not survive fork)."""

    def __init__(
        self, layout: KVLayout, num_pages: int, device: str, backend: str = "cuda_ipc"
    ) -> None:
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        args = (layout, num_pages, device, backend, self.inbox, self.outbox)
        self.proc = ctx.Process(target=receiver_main, args=args)
        self.proc.start()
        ready = self.outbox.get(timeout=PEER_TIMEOUT_S)
        if isinstance(ready, Exception):
            raise RuntimeError(f"the receiver failed to start: {ready}")
        self.session_id, self.pool = ready

    def ask(self, op: str, pages: list[int]) -> Any:
        self.inbox.put((op, pages))
        return self.outbox.get(timeout=PEER_TIMEOUT_S)

    def stop(self) -> None:
        self.inbox.put("stop")
        self.proc.join(PEER_TIMEOUT_S)


def timed(fn: Callable[[], None], warmup: int, reps: int) -> float:
    """Median seconds of `reps` calls of `fn` (which must return with its work finished)
    after `warmup` calls. The first call is timed too: if it took over `SLOW_CALL_S`, one
    more call is the result (with no warm-up, the first is), since the rate of such a case is
    plain from one call and ten would cost seconds each."""
    seconds = []
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if warmup == 0:
        seconds.append(first)
    if first > SLOW_CALL_S:
        warmup, reps = min(warmup, 1), 1
    for _ in range(warmup - 1):
        fn()
    while len(seconds) < reps:
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def page_patterns(prompt_pages: int) -> dict[str, tuple[list[int], list[int]]]:
    """Source and destination page ids: one run, and every other page (no run of two)."""
    src = list(range(prompt_pages))
    return {
        "contiguous": (src, list(range(prompt_pages))),
        "every other page": (src, list(range(0, 2 * prompt_pages, 2))),
    }


def run_case(
    receiver: Receiver,
    sender: dict[str, tuple[TransferEngine, PageWriter]],
    src_tensors: list[torch.Tensor],
    src_pool: KVPoolDescriptor,
    base_tensors: list[torch.Tensor],
    src_pages: list[int],
    dst_pages: list[int],
    warmup: int,
    reps: int,
) -> dict[str, Any]:
    """Time every sender (backend or copy mode) and the in-process baseline; check each one's
    bytes. Seconds per hand-off by sender name, and "baseline"."""
    batch = build_write_batch(src_pool, receiver.pool, src_pages, dst_pages)
    want = pages_hash(src_tensors, src_pages)
    untouched = sorted(set(range(receiver.pool.num_pages)) - set(dst_pages))
    result: dict[str, Any] = {"writes": len(batch), "bytes": batch.total_bytes}
    for mode, (_engine, writer) in sender.items():
        receiver.ask("zero", [])

        def write(w: PageWriter = writer) -> None:
            w.write(receiver.session_id, batch)

        seconds = timed(write, warmup, reps)
        got = receiver.ask("hash", dst_pages)
        stray = receiver.ask("untouched_nonzero", untouched) if untouched else 0
        if got != want or stray:
            raise AssertionError(
                f"{mode}: destination pages differ from the source (hash {got} vs {want}) "
                f"or {stray} bytes of other pages were written"
            )
        result[mode] = seconds
    src_index = torch.tensor(src_pages, device=src_tensors[0].device)
    dst_index = torch.tensor(dst_pages, device=src_tensors[0].device)

    def baseline() -> None:
        for s, d in zip(src_tensors, base_tensors, strict=True):
            d.index_copy_(0, dst_index, s.index_select(0, src_index))
        sync(str(src_tensors[0].device))

    result["baseline"] = timed(baseline, warmup, reps)
    if pages_hash(base_tensors, dst_pages) != want:
        raise AssertionError("the baseline copy is wrong")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0", help="the prefill side's pool")
    parser.add_argument("--receiver-device", default="cuda:0", help="the decode side's pool")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="cuda_ipc", choices=["cuda_ipc", "mooncake"])
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("error: bench.kv_transfer_gpu needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 1
    if args.backend == "cuda_ipc" and not on_gpu:
        print("error: the cuda_ipc backend moves GPU memory: pass --device cuda:N", file=sys.stderr)
        return 1
    if on_gpu:
        torch.cuda.set_device(args.device)
    name = torch.cuda.get_device_name(args.device) if on_gpu else "CPU"
    print(
        f"device: {name}; prefill pool on {args.device}, "
        f"decode pool on {args.receiver_device}; {args.layers} layers, {args.kv_heads} KV "
        f"heads, head_dim {args.head_dim}, {args.dtype}, {args.prompt_tokens}-token prompt"
    )
    print("\n| page tokens | pages | dst pattern | sender | writes | MB | GB/s | copy GB/s | "
          "of copy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    modes: Sequence[str | None] = COPY_MODES if args.backend == "cuda_ipc" else (None,)
    if args.backend == "cuda_ipc" and not shared_driver().can_copy_batch:
        print(f"\nno batch row: {BATCH_UNAVAILABLE}")
        modes = [m for m in modes if m != "batch"]
    if args.backend == "cuda_ipc" and not shared_driver().can_copy_kernel:
        print(f"\nno kernel row: {KERNEL_UNAVAILABLE}")
        modes = [m for m in modes if m != "kernel"]
    for page_size in args.page_sizes:
        layout = KVLayout("bench", args.dtype, page_size, args.layers, args.kv_heads, args.head_dim)
        prompt_pages = -(-args.prompt_tokens // page_size)
        pool_pages = 2 * prompt_pages
        src_tensors = allocate(layout, pool_pages, args.device, random=True)
        base_tensors = allocate(layout, pool_pages, args.device, random=False)
        n = layout.num_layers
        src_pool = describe(layout, src_tensors[:n], src_tensors[n:])
        sender = {}
        for mode in modes:
            engine = new_engine(args.backend, mode)
            register(engine, src_pool)
            name = args.backend if mode is None else f"{args.backend} {mode}"
            sender[name] = (engine, PageWriter(engine))
        receiver = Receiver(layout, pool_pages, args.receiver_device, args.backend)
        try:
            for pattern, (src_pages, dst_pages) in page_patterns(prompt_pages).items():
                r = run_case(receiver, sender, src_tensors, src_pool, base_tensors, src_pages,
                             dst_pages, args.warmup, args.reps)  # fmt: skip
                copy_rate = r["bytes"] / r["baseline"] / 1e9
                for name in sender:
                    rate = r["bytes"] / r[name] / 1e9
                    cells = [page_size, prompt_pages, pattern, name, f"{r['writes']:,}",
                             f"{r['bytes'] / 1e6:.1f}", f"{rate:.1f}", f"{copy_rate:.1f}",
                             f"{100 * rate / copy_rate:.0f}%"]  # fmt: skip
                    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        finally:
            receiver.stop()
            for engine, _ in sender.values():
                close(engine)
        del src_tensors, base_tensors
        if on_gpu:
            torch.cuda.empty_cache()
    print(
        "\nevery case checked: destination pages equal the source byte for byte (SHA-256), "
        "other pages untouched"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
