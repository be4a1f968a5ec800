"""Allocator of KV-cache page ids in `[0, num_pages)`; no device code.

The pool only tracks which ids are in use. What a page holds (the K and V tensors) is
`KVCache`'s business, and who owns an allocated page (a request, the radix cache) is the
caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable


class PagePool:
    """A fixed set of page ids handed out and taken back.

    Contract:
    - `alloc(n)` is all-or-nothing: it returns `n` distinct free ids, or `None` and allocates
      nothing when fewer than `n` are free.
    - `free(pages)` is all-or-nothing too: an id out of range, not allocated, or repeated in the
      batch raises `ValueError` and leaves the pool unchanged.
    - Freed ids are reused last-in first-out, so the ids a run hands out are deterministic and
      recently freed (cache-warm) pages go out first.
    - `alloc(n, avoid)` skips the free ids in `avoid` (left free, in their place), and
      `on_free`, when set, is told every batch of ids `free` takes back.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got num_pages={num_pages}")
        self._num_pages = num_pages
        # Reversed so that a fresh pool hands out 0, 1, 2, ... in order.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._allocated = [False] * num_pages
        self.on_free: Callable[[list[int]], None] | None = None

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_pages - len(self._free)

    def alloc(self, n: int, avoid: Collection[int] = ()) -> list[int] | None:
        """Take `n` free pages, none of them in `avoid`, or return `None` (taking nothing) if
        fewer than `n` such pages are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages, got n={n}")
        if n > len(self._free):
            return None
        pages: list[int] = []
        if not avoid:
            pages = [self._free.pop() for _ in range(n)]
        else:
            skipped: list[int] = []
            at = len(self._free)
            while len(pages) < n and at > 0:
                at -= 1
                page = self._free[at]
                (skipped if page in avoid else pages).append(page)
            if len(pages) < n:
                return None
            del self._free[at:]
            self._free.extend(reversed(skipped))  # back where they were
        for page in pages:
            self._allocated[page] = True
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return allocated pages to the pool; validates the whole batch before changing state."""
        batch = list(pages)
        seen: set[int] = set()
        for page in batch:
            if not 0 <= page < self._num_pages:
                raise ValueError(f"page {page} is out of range [0, {self._num_pages})")
            if not self._allocated[page] or page in seen:
                raise ValueError(f"page {page} is not allocated (double free)")
            seen.add(page)
        for page in batch:
            self._allocated[page] = False
        self._free.extend(batch)
        if self.on_free is not None and batch:
            self.on_free(batch)

    def is_free(self, page: int) -> bool:
        """Whether `page` is in the pool and free now."""
        return 0 <= page < self._num_pages and not self._allocated[page]

    def is_allocated(self, page: int) -> bool:
        """Whether `page` is currently handed out; `False` for ids outside the pool."""
        return 0 <= page < self._num_pages and self._allocated[page]
