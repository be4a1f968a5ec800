"""KV hand-off through the `cuda_ipc` backend, beside a plain device-to-device copy of the same
pages, checked byte for byte. Needs a CUDA GPU.

A receiver process (the decode side) holds a zeroed KV pool on `--receiver-device` and
registers it with a `cuda_ipc` engine; this process (the prefill side) holds a pool of random
bytes on `--device`, registered too, and writes one prompt's pages into the receiver with
`PageWriter` (as the prefill worker does), for pages of each `--page-sizes` tokens, with
contiguous destination pages (one run) and with every other page (no run longer than one
page), in each copy mode. The baseline is the same pages copied inside this process, one
`index_copy_` per layer and K/V, into a second local pool. After each case the receiver
hashes the destination pages (SHA-256 of their bytes), which must equal the source pages'
hash, and checks that every other page is still zero.

    python -m bench.cuda_ipc                      # Llama-3-8B shape (32 layers, 8 KV heads,
                                                  # head_dim 128, bf16), 2,048-token prompt
    python -m bench.cuda_ipc --receiver-device 1  # decode pool on a second GPU
    python -m bench.cuda_ipc --layers 4 --prompt-tokens 256 --reps 3   # a quick check
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kv_transfer import KVLayout, KVPoolDescriptor, PageWriter, build_write_batch
from kv_transfer import descriptor_from_tensors as describe
from kv_transfer.cuda_ipc import COPY_MODES, CudaIpcTransferEngine

PEER_TIMEOUT_S = 120.0


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


def register(engine: CudaIpcTransferEngine, pool: KVPoolDescriptor) -> None:
    for addr, length in pool.regions():
        if engine.register_memory(addr, length) != 0:
            raise RuntimeError(f"cuda_ipc register_memory({addr:#x}, {length}) failed")


def receiver_main(layout: KVLayout, num_pages: int, device: str, inbox: Any, outbox: Any) -> None:
    """Hold a zeroed pool, publish it, answer hash requests until told to stop."""
    try:
        torch.cuda.set_device(device)
        tensors = allocate(layout, num_pages, device, random=False)
        n = layout.num_layers
        pool = describe(layout, tensors[:n], tensors[n:])
        engine = CudaIpcTransferEngine()
        if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("cuda_ipc initialize failed")
        register(engine, pool)
        torch.cuda.synchronize()
        outbox.put((engine.session_id, pool))
    except Exception as exc:
        outbox.put(exc)
        return
    while (message := inbox.get(timeout=PEER_TIMEOUT_S)) != "stop":
        op, pages = message
        if op == "hash":
            torch.cuda.synchronize()
            outbox.put(pages_hash(tensors, pages))
        elif op == "untouched_nonzero":
            index = torch.tensor(pages, dtype=torch.long, device=device)
            outbox.put(sum(int(t.index_select(0, index).count_nonzero()) for t in tensors))
        elif op == "zero":
            for t in tensors:
                t.zero_()
            torch.cuda.synchronize()
            outbox.put("ok")
    engine.close()


class Receiver:
    """The receiver process, started with `spawn` (CUDA does not survive fork)."""

    def __init__(self, layout: KVLayout, num_pages: int, device: str) -> None:
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=receiver_main, args=(layout, num_pages, device, self.inbox, self.outbox)
        )
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
    """Median seconds of `fn` (which must return with its work finished)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(reps):
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
    sender: dict[str, tuple[CudaIpcTransferEngine, PageWriter]],
    src_tensors: list[torch.Tensor],
    src_pool: KVPoolDescriptor,
    base_tensors: list[torch.Tensor],
    src_pages: list[int],
    dst_pages: list[int],
    warmup: int,
    reps: int,
) -> dict[str, Any]:
    """Time every copy mode and the in-process baseline; check each mode's bytes."""
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
        torch.cuda.synchronize()

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
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.cuda_ipc needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 1
    torch.cuda.set_device(args.device)
    print(
        f"device: {torch.cuda.get_device_name(args.device)}; prefill pool on {args.device}, "
        f"decode pool on {args.receiver_device}; {args.layers} layers, {args.kv_heads} KV "
        f"heads, head_dim {args.head_dim}, {args.dtype}, {args.prompt_tokens}-token prompt"
    )
    print(
        "\n| page tokens | pages | dst pattern | writes | MB | "
        + " | ".join(f"{m} GB/s" for m in COPY_MODES)
        + " | copy GB/s | best/copy |"
    )
    print("|" + "---|" * (7 + len(COPY_MODES)))
    for page_size in args.page_sizes:
        layout = KVLayout("bench", args.dtype, page_size, args.layers, args.kv_heads, args.head_dim)
        prompt_pages = -(-args.prompt_tokens // page_size)
        pool_pages = 2 * prompt_pages
        src_tensors = allocate(layout, pool_pages, args.device, random=True)
        base_tensors = allocate(layout, pool_pages, args.device, random=False)
        n = layout.num_layers
        src_pool = describe(layout, src_tensors[:n], src_tensors[n:])
        sender = {}
        for mode in COPY_MODES:
            engine = CudaIpcTransferEngine(copy_mode=mode)
            if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
                raise RuntimeError("cuda_ipc initialize failed")
            register(engine, src_pool)
            sender[mode] = (engine, PageWriter(engine))
        receiver = Receiver(layout, pool_pages, args.receiver_device)
        try:
            for pattern, (src_pages, dst_pages) in page_patterns(prompt_pages).items():
                r = run_case(receiver, sender, src_tensors, src_pool, base_tensors, src_pages,
                             dst_pages, args.warmup, args.reps)  # fmt: skip
                rates = {m: r["bytes"] / r[m] / 1e9 for m in (*COPY_MODES, "baseline")}
                best = max(rates[m] for m in COPY_MODES)
                print(f"| {page_size} | {prompt_pages} | {pattern} | {r['writes']:,} | "
                      f"{r['bytes'] / 1e6:.1f} | "
                      + " | ".join(f"{rates[m]:.1f}" for m in COPY_MODES)
                      + f" | {rates['baseline']:.1f} | {100 * best / rates['baseline']:.0f}% |",
                      flush=True)  # fmt: skip
        finally:
            receiver.stop()
            for engine, _ in sender.values():
                engine.close()
        del src_tensors, base_tensors
        torch.cuda.empty_cache()
    print("\nevery case checked: destination pages equal the source byte for byte (SHA-256), "
          "other pages untouched")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
