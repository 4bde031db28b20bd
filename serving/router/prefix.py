"""Longest-prefix affinity: which engine was sent which prompt prefix, as block-hash chains.

A prompt is cut into blocks and each block's hash is chained with its parent's, so equal chains mean
equal prefixes (vLLM's prefix cache hashes its 16-token blocks the same way). The simulator builds
the chain from a trace's `hash_ids` (Mooncake: 512 tokens each); the HTTP router from the prompt's
text (`text_chain`). The index is the router's own approximation of every engine's cache, as
vllm-router's `cache_aware` keeps an approximate radix tree per worker (vllm-project/router
src/policies/cache_aware.rs, from sglang's sgl-router): what was routed where, with old entries
evicted once it holds `max_entries` blocks.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence

TEXT_BLOCK_CHARS = 2048  # ~512 tokens of English text or code at ~4 characters a token


def chain(block_ids: Sequence[int]) -> tuple[int, ...]:
    """Chained hashes of a prompt's block ids (block i's hash covers blocks 0..i)."""
    out = []
    h = 0
    for b in block_ids:
        h = hash((h, b))
        out.append(h)
    return tuple(out)


def text_chain(text: str, block_chars: int = TEXT_BLOCK_CHARS, max_blocks: int = 256) -> tuple[int, ...]:
    """Chained CRC-32s of a prompt's full text blocks (stable across processes, unlike `hash`)."""
    out = []
    h = 0
    data = text.encode("utf-8", "surrogatepass")
    step = block_chars
    for i in range(0, min(len(data) // step, max_blocks) * step, step):
        h = zlib.crc32(data[i : i + step], h)
        out.append(h)
    return tuple(out)


class PrefixIndex:
    """prefix-chain hash -> engines it was sent to; LRU over hashes."""

    __slots__ = ("_where", "max_entries", "blocks")

    def __init__(self, max_entries: int = 200_000) -> None:
        self._where: OrderedDict[int, set[str]] = OrderedDict()
        self.max_entries = max_entries
        self.blocks: dict[str, int] = {}  # engine -> blocks recorded for it (its approximate tree size)

    def record(self, prefix: Sequence[int], engine: str) -> None:
        where = self._where
        blocks = self.blocks
        for h in prefix:
            s = where.get(h)
            if s is None:
                where[h] = {engine}
                blocks[engine] = blocks.get(engine, 0) + 1
            else:
                if engine not in s:
                    s.add(engine)
                    blocks[engine] = blocks.get(engine, 0) + 1
                where.move_to_end(h)
        while len(where) > self.max_entries:
            _, gone = where.popitem(last=False)
            for e in gone:
                blocks[e] -= 1

    def match(self, prefix: Sequence[int]) -> dict[str, int]:
        """engine -> how many leading blocks of `prefix` it was sent (engines with none left out)."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        where = self._where
        for depth, h in enumerate(prefix, 1):
            s = where.get(h)
            if not s:
                break
            alive = set(s) if alive is None else alive & s
            if not alive:
                break
            for e in alive:
                out[e] = depth
        return out
