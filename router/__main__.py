"""``python -m router --model-path DIR (--worker URL ... | --prefill URL ... --decode URL ...)``.

Prints one JSON line ``{"event": "ready", "url": ...}`` on stdout once serving; SIGTERM or
SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from router.app.server import serve
from router.config import build_parser, config_from_args
from router.processes import supervise

log = logging.getLogger("router")


async def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if config.processes > 1 and config.process_index is None:
            return await supervise(config, sys.argv[1:] if argv is None else argv)
        server, url = await serve(config)
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: a --host/--port it cannot bind
        log.error("router cannot start: %s", exc)
        return 2
    # Every request allocates many short-lived objects; with CPython's default threshold (700)
    # the collector runs every few requests and scans the long-lived heap (tokenizer, app,
    # protobuf descriptors) each time. Freeze what startup built and collect less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    ready: dict[str, object] = {"event": "ready", "url": url}
    if config.process_index is not None:
        ready["process"] = config.process_index
    print(json.dumps(ready), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return _run(_main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
