"""The scheduler's wait queue: requests waiting for a free pipeline, in the order they get one.

Pure (no asyncio): the forwarder (parallax/scheduler/forward.py) lets only the first waiter in
line try to place itself, so the order here is the order requests are served. Lower `priority`
first (as vLLM's API has it), equal priorities first come, first served. Bounded: `push` beyond
`capacity` raises `QueueFull` (the forwarder answers 429).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The wait queue holds `capacity` waiters already."""


@dataclass(order=True)
class Waiter:
    """One queued request; ordered by (priority, arrival)."""

    priority: int
    seq: int
    removed: bool = field(default=False, compare=False)


class WaitQueue:
    """Waiters by (priority, arrival); removal of any waiter is O(1) (lazy, in the heap)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"the wait queue's capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._heap: list[Waiter] = []
        self._count = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._count

    def push(self, priority: int) -> Waiter:
        """Queue a request; raises QueueFull at capacity."""
        if self._count >= self.capacity:
            raise QueueFull(f"{self._count} requests already wait")
        waiter = Waiter(priority, next(self._seq))
        heapq.heappush(self._heap, waiter)
        self._count += 1
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """Take a waiter out (it was placed, gave up or went away); idempotent."""
        if not waiter.removed:
            waiter.removed = True
            self._count -= 1
            self._drop_removed()
            if len(self._heap) > 2 * self._count + 16:  # keep the heap bounded by the queue
                self._heap = [w for w in self._heap if not w.removed]
                heapq.heapify(self._heap)

    def first(self) -> Waiter | None:
        """The waiter served next (None: nobody waits)."""
        self._drop_removed()
        return self._heap[0] if self._heap else None

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0].removed:
            heapq.heappop(self._heap)
