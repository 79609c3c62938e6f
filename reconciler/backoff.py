"""Exponential backoff, the one formula of every retry: the loop's CrashLoopBackOff and launch retries, a
failed destroy, the work queue's unexpected failures, the disk measuring process's restarts."""

from __future__ import annotations


def exponential(step: int, initial: float, maximum: float) -> float:
    """The wait before try number `step` (1 is the first retry): initial, doubling, at most maximum;
    0 for step 0 or less (the first try waits for nothing)."""
    if step <= 0:
        return 0.0
    return min(initial * 2.0 ** min(step - 1, 64), maximum)
