"""Per-query top-k with deterministic tie-breaking (higher score first, then frame id)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any


@dataclass(order=True)
class _Entry:
    score: float
    neg_key: "_Reversed"
    payload: Any = field(compare=False)


@dataclass(frozen=True)
class _Reversed:
    key: str

    def __lt__(self, other: "_Reversed") -> bool:
        return self.key > other.key


class TopK:
    """Keep the ``k`` best ``(score, key, payload)`` items seen.

    Order: score descending, then key ascending, so equal scores resolve the same way
    whatever order frames arrive in (shards read in parallel, mapped tasks merged).
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        self.k = k
        self._heap: list[_Entry] = []  # min-heap: worst kept item on top

    def push(self, score: float, key: str, payload: Any = None) -> None:
        entry = _Entry(score, _Reversed(key), payload)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif self._heap[0] < entry:
            heapq.heapreplace(self._heap, entry)

    def threshold(self) -> float:
        """Score an item must beat to enter (``-inf`` while not full)."""
        return self._heap[0].score if len(self._heap) == self.k else float("-inf")

    def merge(self, other: "TopK") -> None:
        for e in other._heap:
            self.push(e.score, e.neg_key.key, e.payload)

    def items(self) -> list[tuple[float, str, Any]]:
        """Best first."""
        return [(e.score, e.neg_key.key, e.payload) for e in sorted(self._heap, reverse=True)]

    def __len__(self) -> int:
        return len(self._heap)
