"""An approximate radix tree of the prompts each worker was sent, for cache-aware routing.

The router cannot see a worker's prefix cache; it remembers instead which prompts (token ids)
it sent where. One tree holds every worker's prompts; each node records the workers
("tenants") whose prompts pass through it, so a tenant's nodes always form a subtree that
hangs from the root. ``match`` gives, per tenant, the length of the longest prefix of a
prompt that the tenant was sent; ``insert`` records a prompt under a tenant.

Each tenant holds at most ``max_tokens_per_tenant`` tokens (the sum of its nodes' key
lengths). Past that, its least recently used leaves go first (LRU per tenant, like the
worker's own cache). The tree is approximate: the worker may have evicted more, and prompts
other routers sent are not in it.

Not thread-safe: the router calls it from its one event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Hashable)

Tokens = tuple[int, ...]


class _Node:
    __slots__ = ("children", "key", "parent", "tenants")

    def __init__(self, key: Tokens, parent: _Node | None) -> None:
        self.key = key  # the edge's tokens, never empty except at the root
        self.parent = parent
        self.children: dict[int, _Node] = {}  # by the child key's first token
        self.tenants: set[Any] = set()  # the tree's tenants (type T of RadixTree)


class RadixTree(Generic[T]):
    """Prompts per tenant, with per-tenant size-bounded LRU eviction.

    Invariants: a tenant present at a node is present at all its ancestors; a node with no
    tenant is not in the tree. Each tenant's ``OrderedDict`` lists its nodes least recently
    used first, with every node after all of its descendants, so the first entry is always a
    leaf of that tenant's subtree and eviction never leaves a gap in a path.
    """

    def __init__(self, max_tokens_per_tenant: int) -> None:
        if max_tokens_per_tenant < 1:
            raise ValueError(f"max_tokens_per_tenant must be >= 1, got {max_tokens_per_tenant}")
        self.max_tokens_per_tenant = max_tokens_per_tenant
        self._root = _Node((), None)
        self._lru: dict[T, OrderedDict[_Node, None]] = {}
        self._size: dict[T, int] = {}

    # -- queries ---------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int]) -> dict[T, int]:
        """``{tenant: n}``: ``token_ids[:n]`` is the longest prefix that tenant was sent.
        Tenants sharing nothing with ``token_ids`` are absent. Does not count as a use."""
        tokens = tuple(token_ids)
        matched: dict[T, int] = {}
        node, pos, n = self._root, 0, len(tokens)
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = _common_prefix(child.key, tokens, pos)
            pos += k
            # Tenants shrink along a path, so deeper nodes overwrite with longer matches.
            for tenant in child.tenants:
                matched[tenant] = pos
            if k < len(child.key):
                break
            node = child
        return matched

    def size(self, tenant: T) -> int:
        """Tokens held for ``tenant`` (0 for an unknown one)."""
        return self._size.get(tenant, 0)

    def tenants(self) -> list[T]:
        return list(self._size)

    def num_nodes(self) -> int:
        """Nodes in the tree, the root excluded (for tests and metrics)."""
        return sum(1 for _ in self._walk()) - 1

    # -- updates ---------------------------------------------------------------------------

    def insert(self, token_ids: Sequence[int], tenant: T) -> None:
        """Record that ``tenant`` was sent ``token_ids``: its path becomes the tenant's most
        recently used, then the tenant's oldest leaves go while it holds too many tokens."""
        tokens = tuple(token_ids)
        lru = self._lru.get(tenant)
        if lru is None:
            lru = self._lru[tenant] = OrderedDict()
            self._size[tenant] = 0
        path: list[_Node] = []
        node, pos, n = self._root, 0, len(tokens)
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                child = _Node(tokens[pos:], node)
                node.children[tokens[pos]] = child
                path.append(child)
                break
            k = _common_prefix(child.key, tokens, pos)
            if k < len(child.key):
                child = self._split(child, k)
            path.append(child)
            pos += k
            node = child
        added = 0
        for node in reversed(path):  # leaf first: each ancestor ends up after its descendants
            if tenant not in node.tenants:
                node.tenants.add(tenant)
                added += len(node.key)
            lru[node] = None
            lru.move_to_end(node)
        self._size[tenant] += added
        self._evict(tenant)

    def remove_tenant(self, tenant: T) -> None:
        """Forget everything ``tenant`` was sent (the worker left the pool)."""
        lru = self._lru.pop(tenant, None)
        self._size.pop(tenant, None)
        for node in lru or ():
            self._drop(node, tenant)

    # -- internals ---------------------------------------------------------------------------

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut ``node``'s key after ``k`` tokens (0 < k < len); returns the new upper node."""
        parent = node.parent
        if parent is None:
            raise RuntimeError("the root of a RadixTree is never split")
        upper = _Node(node.key[:k], parent)
        upper.tenants = set(node.tenants)
        parent.children[upper.key[0]] = upper
        node.key = node.key[k:]
        node.parent = upper
        upper.children[node.key[0]] = node
        for tenant in upper.tenants:
            self._lru[tenant][upper] = None  # appended after `node`: the invariant holds
        return upper

    def _evict(self, tenant: T) -> None:
        lru = self._lru[tenant]
        while self._size[tenant] > self.max_tokens_per_tenant:
            node, _ = lru.popitem(last=False)
            self._size[tenant] -= len(node.key)
            self._drop(node, tenant)

    def _drop(self, node: _Node, tenant: T) -> None:
        node.tenants.discard(tenant)
        if not node.tenants and node.parent is not None:
            # No tenant left here means none below either: the whole subtree goes.
            del node.parent.children[node.key[0]]
            node.parent = None

    def _walk(self) -> Iterator[_Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _common_prefix(key: Tokens, tokens: Tokens, pos: int) -> int:
    """How many leading tokens of ``key`` equal ``tokens[pos:]``'s (slice compares run in C;
    a mismatch is found by bisection, so long keys cost O(len log len) in C, not Python)."""
    limit = min(len(key), len(tokens) - pos)
    if key[:limit] == tokens[pos : pos + limit]:
        return limit
    lo, hi = 0, limit - 1  # the answer is in [lo, hi]: key[:lo] matches, key[:limit] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[:mid] == tokens[pos : pos + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
