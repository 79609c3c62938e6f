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


def test_a_handler_result_requeues_the_name_after_that_delay() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen: list[float] = []

        async def handler(name: str) -> float | None:
            seen.append(loop.time() - started)
            return 0.05 if len(seen) < 3 else None   # twice "look at me again in 50 ms", then done

        queue = WorkQueue(handler)
        queue.add("web")
        await asyncio.sleep(0.4)
        await queue.wait_idle()
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) == 3
    assert 0.04 <= seen[1] - seen[0] < 0.3 and 0.04 <= seen[2] - seen[1] < 0.3


def test_a_handler_that_raises_is_retried_with_backoff_and_forgotten_on_success(monkeypatch) -> None:
    import reconciler.workqueue as workqueue
    monkeypatch.setattr(workqueue, "FAILURE_BACKOFF_INITIAL", 0.05)
    monkeypatch.setattr(workqueue, "FAILURE_BACKOFF_MAX", 0.1)

    async def scenario() -> tuple[list[float], list[int]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen: list[float] = []
        failures: list[int] = []

        async def handler(name: str) -> None:
            seen.append(loop.time() - started)
            failures.append(queue.failures(name))
            if len(seen) <= 3:
                raise RuntimeError("a bug")

        queue = WorkQueue(handler)
        queue.add("web")
        await asyncio.sleep(0.6)
        await queue.wait_idle()
        failures.append(queue.failures("web"))
        return seen, failures

    seen, failures = asyncio.run(scenario())
    assert len(seen) == 4                          # three failures, each retried; then a success, not retried
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert 0.04 <= gaps[0] < 0.09 and 0.09 <= gaps[1] < 0.2 and 0.09 <= gaps[2] < 0.2, gaps   # 50 ms, 100 ms, capped
    assert failures == [0, 1, 2, 3, 0]             # counted in a row, forgotten on success


def test_launch_failure_decides_from_the_error_type_alone() -> None:
    from reconciler.errors import PermanentError, ResourceExhaustedError, TemporaryError
    from reconciler.images.errors import ImageError, InvalidReference
    from reconciler.loop import RETRY_INITIAL, launch_failure
    now = 1000.0
    permanent = launch_failure(PermanentError("bad user"), "h", None, now, None)
    assert permanent.permanent and permanent.message == "bad user" and permanent.reason == "LaunchFailed"
    exhausted = launch_failure(ResourceExhaustedError("no handle"), "h", None, now, None)
    assert exhausted.waits_for_release and not exhausted.permanent and exhausted.reason == "ResourceExhausted"
    first = launch_failure(OSError("fork failed"), "h", None, now, None)
    assert (first.permanent, first.step, first.retry_at, first.reason, first.failed) == \
        (False, 1, now + RETRY_INITIAL, "LaunchFailed", False)
    second = launch_failure(OSError("fork failed"), "h", first, now, None)
    assert second.step == 2 and second.retry_at == now + 2 * RETRY_INITIAL
    asked = launch_failure(TemporaryError("busy", delay=7.0), "h", second, now, None)
    assert asked.retry_at == now + 7.0
    image = launch_failure(ImageError("registry 'r': HTTP 404 MANIFEST_UNKNOWN: ..."), "h", None, now, None)
    assert (image.reason, image.failed, image.permanent) == ("ProvisioningFailed", True, False)
    assert launch_failure(InvalidReference("bad reference"), "h", None, now, None).permanent


def test_a_requeue_of_zero_runs_the_name_again_at_once() -> None:
    async def scenario() -> int:
        calls = 0

        async def handler(name: str) -> float | None:
            nonlocal calls
            calls += 1
            return 0.0 if calls < 3 else None

        queue = WorkQueue(handler)
        queue.add("web")
        await asyncio.sleep(0.05)
        await queue.wait_idle()
        return calls

    assert asyncio.run(scenario()) == 3
