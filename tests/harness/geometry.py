"""Session geometries and the page arithmetic the tests check the server against.

``Geo`` is the one geometry type of the tests: a frozen dataclass that also unpacks as
keyword arguments, so ``client.create_session(**geo)``, ``pb.Geometry(**geo)`` and
``{**geo, "max_len": 10}`` work as they did with the dicts it replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from q8kv.v1 import kvcache_pb2 as pb


@dataclass(frozen=True)
class Geo:
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_len: int = 4096

    # The mapping protocol of ``**geo``.
    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str) -> int:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def but(self, **changes: int) -> Geo:
        """A copy with ``changes``: ``GEOM.but(max_len=10)``."""
        return replace(self, **changes)

    def pb(self) -> pb.Geometry:
        return pb.Geometry(**self)

    def q8_bytes(self, tokens: int) -> int:
        """Codes + scales of ``tokens`` tokens of one layer: tokens * 2 * KVH * D / 32 * 36."""
        return tokens * 2 * self.num_kv_heads * self.head_dim // 32 * 36

    def values(self, tokens: int) -> int:
        """K and V values of ``tokens`` tokens of one layer."""
        return tokens * 2 * self.num_kv_heads * self.head_dim


# The end-to-end tests' usual session: grouped-query attention (4 query heads per kv head)
# over three layers, so per-layer lengths differ.
GEOM = Geo(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64, max_len=4096)


def page_bytes(page_code_bytes: int) -> int:
    return page_code_bytes * 9 // 8  # codes + one float32 scale per 32 codes


def pages_for(tokens: int, tokens_per_page: int) -> int:
    return math.ceil(tokens / tokens_per_page)
