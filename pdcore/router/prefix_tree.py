"""An approximate prefix cache of every worker at once: one radix tree of prompt text.

The tree holds the text of the prompts the router sent, character by character (edges are
strings, split where two prompts part), and each node records which workers ("tenants")
were sent a prompt passing through it and when (a tick, for least-recently-used order).
A tenant on a node is on all its ancestors too, so "the longest prefix some worker has
seen" is one walk from the root. It is SGLang's router tree in miniature: the text stands
in for tokens, so the router needs no tokenizer, and it is only a guess at what the
workers cache -- `policy_kv_aware` asks the workers instead.

Memory is bounded per tenant: `evict(max_chars)` removes a tenant's least recently used
leaves until it holds at most `max_chars` characters; a node nobody holds goes away.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Collection, Iterator


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text  # the edge from the parent
        self.parent = parent
        self.children: dict[str, _Node] = {}  # keyed by the first character of their text
        self.tenants: dict[str, int] = {}  # tenant -> tick of its last use of this node


def _shared(edge: str, text: str, start: int) -> int:
    """How many leading characters of `edge` equal text[start:]."""
    if text.startswith(edge, start):
        return len(edge)
    return len(os.path.commonprefix([edge, text[start : start + len(edge)]]))


class PrefixTree:
    """Prompt text per tenant (a worker's key), with longest-prefix match and LRU eviction."""

    def __init__(self) -> None:
        self._root = _Node("", None)
        self._tick = 0
        self._sizes: dict[str, int] = {}  # tenant -> characters it holds

    def _now(self) -> int:
        self._tick += 1
        return self._tick

    def size(self, tenant: str) -> int:
        """Characters held for `tenant` (0 if unknown)."""
        return self._sizes.get(tenant, 0)

    def tenants(self) -> list[str]:
        return list(self._sizes)

    def insert(self, text: str, tenant: str) -> None:
        """Record that `tenant` was sent `text` (refreshing the path's recency)."""
        now = self._now()
        node, i = self._root, 0
        added = 0
        node.tenants[tenant] = now
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
                child.tenants[tenant] = now
                added += len(child.text)
                break
            n = _shared(child.text, text, i)
            if n < len(child.text):
                child = self._split(child, n)
            if tenant not in child.tenants:
                added += len(child.text)
            child.tenants[tenant] = now
            node, i = child, i + n
        self._sizes[tenant] = self._sizes.get(tenant, 0) + added

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child`'s edge after `n` characters; return the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.text)
        upper = _Node(child.text[:n], parent)
        upper.tenants = dict(child.tenants)
        parent.children[child.text[0]] = upper
        child.text = child.text[n:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    def match(self, text: str, allowed: Collection[str] | None = None) -> tuple[int, str | None]:
        """(characters of `text` matched, the tenant holding them) for the longest prefix
        held by any tenant in `allowed` (all if None); the most recently used tenant wins a
        tie, and its path is refreshed. (0, None) when nothing matches."""
        node, i = self._root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None or not _any_allowed(child.tenants, allowed):
                break
            n = _shared(child.text, text, i)
            node, i = child, i + n
            if n < len(child.text):
                break
        if node is self._root:
            return 0, None
        candidates = [t for t in node.tenants if allowed is None or t in allowed]
        tenant = max(candidates, key=node.tenants.__getitem__)
        now = self._now()
        up: _Node | None = node
        while up is not None:
            up.tenants[tenant] = now
            up = up.parent
        return i, tenant

    def match_tenant(self, text: str, tenant: str) -> int:
        """Characters of `text` that `tenant` holds as a prefix (no recency change)."""
        node, i = self._root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None or tenant not in child.tenants:
                break
            n = _shared(child.text, text, i)
            node, i = child, i + n
            if n < len(child.text):
                break
        return i

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything `tenant` holds (a worker left)."""
        if self._sizes.pop(tenant, None) is None:
            return
        stack = [self._root]
        while stack:
            node = stack.pop()
            node.tenants.pop(tenant, None)
            for key, child in list(node.children.items()):
                if tenant in child.tenants:
                    stack.append(child)
                    if len(child.tenants) == 1:
                        del node.children[key]  # only `tenant` held it, and its subtree

    def evict(self, max_chars: int) -> int:
        """Trim every tenant to at most `max_chars` characters, least recently used leaves
        first; return how many characters were dropped."""
        dropped = 0
        for tenant, size in list(self._sizes.items()):
            if size > max_chars:
                dropped += self._evict_tenant(tenant, max_chars)
        return dropped

    def _evict_tenant(self, tenant: str, max_chars: int) -> int:
        heap = [(n.tenants[tenant], id(n), n) for n in self._leaves(tenant)]
        heapq.heapify(heap)
        size = self._sizes[tenant]
        start = size
        while size > max_chars and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del node.tenants[tenant]
            size -= len(node.text)
            if not node.tenants:
                del parent.children[node.text[0]]
            if parent is not self._root and not any(
                tenant in c.tenants for c in parent.children.values()
            ):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
        self._sizes[tenant] = size
        return start - size

    def _leaves(self, tenant: str) -> Iterator[_Node]:
        """Nodes `tenant` holds whose children it does not (the only ones evictable)."""
        stack = [c for c in self._root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            held = [c for c in node.children.values() if tenant in c.tenants]
            if held:
                stack.extend(held)
            else:
                yield node

    def held_texts(self, tenant: str) -> list[str]:
        """Every root-to-leaf string `tenant` holds (for tests and debugging)."""
        out = []
        stack = [(c, c.text) for c in self._root.children.values() if tenant in c.tenants]
        while stack:
            node, text = stack.pop()
            held = [c for c in node.children.values() if tenant in c.tenants]
            if not held:
                out.append(text)
            stack.extend((c, text + c.text) for c in held)
        return out


def _any_allowed(tenants: dict[str, int], allowed: Collection[str] | None) -> bool:
    if allowed is None:
        return bool(tenants)
    return any(t in allowed for t in tenants)
