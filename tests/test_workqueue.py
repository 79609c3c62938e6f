"""The keyed work queue's guarantees, and the CrashLoopBackOff delays."""

from __future__ import annotations

import asyncio

from reconciler.loop import restart_delay
from reconciler.workqueue import WorkQueue


def test_a_name_is_never_handled_twice_at_once_and_wakeups_collapse() -> None:
    async def scenario() -> tuple[int, int, list[str]]:
        running: set[str] = set()
        overlaps = 0
        calls: list[str] = []
        gate = asyncio.Event()

        async def handler(name: str) -> None:
            nonlocal overlaps
            if name in running:
                overlaps += 1
            running.add(name)
            calls.append(name)
            await gate.wait()
            running.discard(name)

        queue = WorkQueue(handler)
        queue.add("web")
        await asyncio.sleep(0)
        for _ in range(50):          # fifty wake-ups while the first pass runs
            queue.add("web")
        queue.add("db")
        await asyncio.sleep(0)
        gate.set()
        await queue.wait_idle()
        return overlaps, calls.count("web"), calls

    overlaps, web_passes, calls = asyncio.run(scenario())
    assert overlaps == 0
    assert web_passes == 2           # the running pass, then exactly one more for all fifty wake-ups
    assert "db" in calls             # another name is not held up by the first


def test_add_after_keeps_the_earliest_timer_and_add_fires_at_once() -> None:
    async def scenario() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen: list[tuple[str, float]] = []

        async def handler(name: str) -> None:
            seen.append((name, loop.time() - started))

        queue = WorkQueue(handler)
        queue.add_after("a", 0.2)
        queue.add_after("a", 0.05)   # earlier: replaces
        queue.add_after("a", 0.3)    # later: ignored
        queue.add_after("b", 0.2)
        queue.add("b")               # now: cancels b's timer
        await asyncio.sleep(0.4)
        await queue.wait_idle()
        return seen

    seen = asyncio.run(scenario())
    assert [name for name, _ in seen] == ["b", "a"]
    assert seen[1][1] < 0.15


def test_a_failing_handler_does_not_stop_the_queue() -> None:
    async def scenario() -> list[str]:
        calls: list[str] = []

        async def handler(name: str) -> None:
            calls.append(name)
            if name == "bad":
                raise RuntimeError("boom")

        queue = WorkQueue(handler)
        queue.add("bad")
        queue.add("good")
        await queue.wait_idle()
        queue.add("bad")
        await queue.wait_idle()
        return calls

    assert asyncio.run(scenario()) == ["bad", "good", "bad"]


def test_crash_loop_backoff_is_immediate_then_10s_doubling_to_300s() -> None:
    assert [restart_delay(step) for step in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]
