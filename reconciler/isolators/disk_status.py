"""The status file's `disk` block, as disk/du and disk/xfs publish it (used, limit, when, enforced), and
when a new measurement is worth rewriting it for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.status import iso

# The status file's `disk` block follows a measurement only when it says something new: the figure
# moved by more than 1 %, it crossed the limit, or the block is this old. Every reconcile pass
# recomposes every status document and rewrites those that changed, so a block that changed with
# each measurement would rewrite every container's status file every interval.
STATUS_REFRESH_SECS = 60.0


@dataclass(frozen=True)
class DiskStatus:
    used_bytes: int
    limit_bytes: int | None
    checked_at: float
    enforced: bool

    def block(self) -> dict[str, Any]:
        return {"disk": {"used_bytes": self.used_bytes, "limit_bytes": self.limit_bytes,
                         "checked_at": iso(self.checked_at), "enforced": self.enforced}}


def status_news(shown: DiskStatus | None, now: DiskStatus) -> bool:
    """Whether `now` should replace the block the status file shows."""
    if shown is None or shown.limit_bytes != now.limit_bytes or shown.enforced != now.enforced:
        return True
    if abs(now.used_bytes - shown.used_bytes) * 100 > shown.used_bytes:
        return True
    if now.limit_bytes is not None and (now.used_bytes > now.limit_bytes) != (shown.used_bytes > now.limit_bytes):
        return True
    return now.checked_at - shown.checked_at >= STATUS_REFRESH_SECS
