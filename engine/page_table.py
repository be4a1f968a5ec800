"""The page tables of live sequences, kept on the device: one row per sequence.

Kernels read a sequence's pages from its row instead of a table rebuilt every step, so a
decode step uploads only what changed (a page appended now and then) and the row indices. The
host keeps a copy of every row it uploaded and compares it with the sequence's page list
before each step; any difference (a new page, a page swapped by the prefix cache, a
preempted and re-admitted sequence) is re-uploaded, so the device rows never go stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.device import StagedUpload
from engine.sequence import SeqStatus, Sequence


@dataclass
class _Row:
    index: int
    pages: list[int] = field(default_factory=list)  # what the device row holds


class DevicePageTable:
    """`table` `[num_rows + 1, width]` int32; the last row is the scratch row (every entry the
    scratch page), which padded graph entries read and write."""

    def __init__(self, num_rows: int, width: int, scratch_page: int, device: torch.device):
        if num_rows < 1 or width < 1:
            raise ValueError(f"a page table needs rows and columns, got {num_rows}x{width}")
        self.width = width
        self.scratch_row = num_rows
        self.table = torch.zeros(num_rows + 1, width, dtype=torch.int32, device=device)
        self.table[self.scratch_row] = scratch_page
        self._free = list(range(num_rows - 1, -1, -1))
        self._rows: dict[Sequence, _Row] = {}
        self._staging = StagedUpload(self.table.device)  # the updates, through pinned buffers

    @property
    def num_free_rows(self) -> int:
        return len(self._free)

    def rows_for(self, seqs: list[Sequence]) -> list[int]:
        """Rows of `seqs` (assigned on first sight), with every row brought up to date with
        its sequence's pages in one upload. Rows of sequences that are neither running nor in
        `seqs` are taken back when rows run out (their next step re-uploads them whole)."""
        batch = set(seqs)
        flat_index: list[int] = []
        values: list[int] = []
        rows = []
        for seq in seqs:
            row = self._rows.get(seq)
            if row is None:
                row = self._rows[seq] = _Row(self._take_row(batch))
            pages = seq.page_table
            if len(pages) > self.width:
                raise ValueError(
                    f"request {seq.request_id} has {len(pages)} pages; the page table is "
                    f"{self.width} wide"
                )
            have = len(row.pages)
            start = have if pages[:have] == row.pages else 0
            if len(pages) > start:
                base = row.index * self.width
                flat_index.extend(range(base + start, base + len(pages)))
                values.extend(pages[start:])
            if start != have or len(pages) != have:
                row.pages = list(pages)
            rows.append(row.index)
        if values:
            # Through reused pinned buffers: a decode step ahead of the device must not wait
            # here (a pageable copy waits for the stream), nor pin a fresh copy each time.
            update = self._staging.upload_lists(flat_index, values)
            self.table.view(-1)[update[0]] = update[1].to(torch.int32)
        return rows

    def _take_row(self, batch: set[Sequence]) -> int:
        if not self._free:
            stale = [s for s in self._rows if s.status is not SeqStatus.RUNNING and s not in batch]
            for seq in stale:
                self._free.append(self._rows.pop(seq).index)
        if not self._free:
            raise RuntimeError(
                f"all {self.scratch_row} page-table rows are held by running requests; "
                "raise --max-running-requests"
            )
        return self._free.pop()

    def release(self, seq: Sequence) -> None:
        """Give a finished sequence's row back (optional: stale rows are also reclaimed)."""
        row = self._rows.pop(seq, None)
        if row is not None:
            self._free.append(row.index)
