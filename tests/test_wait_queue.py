"""The scheduler's wait queue: lower priority first, equal ones first come first served, bounded.

The pure structure, then through the scheduler app with fake nodes (tests/test_scheduler_app.py):
one pipeline of one request's room, held; requests queue behind it; a `priority: -1` request that
arrives after ten `priority: 0` ones reaches the node before them, and those keep their order.
"""

from __future__ import annotations

import random

import pytest
from test_scheduler_app import WHOLE, in_thread, nodes, scheduler, wait_until  # noqa: F401

from parallax.scheduler.wait_queue import QueueFull, WaitQueue


def drain(queue: WaitQueue) -> list[tuple[int, int]]:
    order = []
    while (first := queue.first()) is not None:
        order.append((first.priority, first.seq))
        queue.remove(first)
    return order


def test_lower_priority_first_then_arrival_order():
    queue = WaitQueue(capacity=100)
    priorities = [random.Random(3).randint(-20, 20) for _ in range(50)]
    for priority in priorities:
        queue.push(priority)
    order = drain(queue)
    assert order == sorted((p, i) for i, p in enumerate(priorities))
    assert len(queue) == 0 and queue.first() is None


def test_bounded_and_removal_anywhere():
    queue = WaitQueue(capacity=3)
    a, b, c = queue.push(0), queue.push(0), queue.push(-1)
    with pytest.raises(QueueFull):
        queue.push(-20)
    queue.remove(a)  # gave up while waiting
    queue.remove(a)  # idempotent
    assert len(queue) == 2 and queue.first() is c
    d = queue.push(5)
    assert [w for w in (c, b, d) if not w.removed] == [c, b, d]
    assert drain(queue) == [(-1, c.seq), (0, b.seq), (5, d.seq)]


def test_many_removals_keep_the_heap_bounded():
    queue = WaitQueue(capacity=4)
    keep = queue.push(-1)  # never leaves: removed entries pile up behind it
    for _ in range(1000):
        queue.remove(queue.push(0))
    assert len(queue) == 1 and len(queue._heap) <= 2 * len(queue) + 17
    assert queue.first() is keep
    with pytest.raises(ValueError):
        WaitQueue(-1)


def test_scheduler_serves_waiters_by_priority(scheduler, nodes):  # noqa: F811
    s = scheduler(retry_attempts=400, retry_interval_s=0.05)  # 20 s budget: loaded CI
    s.bring_up({"a": WHOLE}, max_running=1)
    threads = [in_thread(lambda: s.chat("HOLD"))]
    wait_until(lambda: len(nodes.received) == 1, what="the first request at the node")

    def queue_depth() -> str:
        return s.http.get("/metrics").text

    for i in range(10):
        threads.append(in_thread(lambda i=i: s.chat(f"normal {i}")))
        wait_until(lambda i=i: f"parallax_scheduler_queue_depth {i + 1}.0" in queue_depth(),
                   what=f"request {i} queued")
    threads.append(in_thread(lambda: s.chat("urgent", priority=-1)))
    wait_until(lambda: "parallax_scheduler_queue_depth 11.0" in queue_depth(),
               what="the urgent request queued")
    nodes.release.set()
    for thread, out in threads:
        thread.join(timeout=20)
        assert out and out[0].status_code == 200, out
    order = [body["messages"][-1]["content"] for _, body in nodes.received]
    assert order == ["HOLD", "urgent", *(f"normal {i}" for i in range(10))]


def test_a_full_wait_queue_answers_429(scheduler, nodes):  # noqa: F811
    s = scheduler(retry_attempts=400, retry_interval_s=0.05, max_queued=1)
    s.bring_up({"a": WHOLE}, max_running=1)
    first = in_thread(lambda: s.chat("HOLD"))
    wait_until(lambda: len(nodes.received) == 1, what="the first request at the node")
    second = in_thread(lambda: s.chat("waits"))
    wait_until(lambda: "parallax_scheduler_queue_depth 1.0" in s.http.get("/metrics").text,
               what="the second request queued")
    response = s.chat("one too many", priority=-20)
    assert response.status_code == 429 and "already wait" in response.json()["message"]
    nodes.release.set()
    for thread, out in (first, second):
        thread.join(timeout=10)
        assert out[0].status_code == 200
