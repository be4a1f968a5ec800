"""Ranks 1..N-1 of an expert-parallel decode instance, one process each:
``python -m decode_worker.ranks --rank R --master HOST:PORT`` and rank 0's flags
(``worker.ranks``; rank 0 starts them, or a launcher does with ``--dist-init-addr``)."""

from decode_worker import MODES
from worker import ranks

if __name__ == "__main__":
    # worker.ranks's main, so that objects sent to rank 0 pickle as worker.ranks.*.
    raise SystemExit(ranks.main(MODES))
