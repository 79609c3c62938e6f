"""posix/rlimits (Mesos isolators/posix/rlimits.cpp): `container.rlimit_info` applied before the command runs.

The isolator only translates: RLMT_* names become the kernel's resource numbers, and a limit with
neither soft nor hard becomes unlimited (RLIM_INFINITY for both), as in Mesos. The container's
init calls setrlimit(2) for each one before it forks the command, so the limits are inherited by
the command and everything it starts, and nothing of the agent's own limits changes.

What the models already refuse (one of soft/hard without the other, soft above hard, an unknown
or repeated type) never reaches here. What only the kernel can judge -- raising a hard limit above
the agent's own without CAP_SYS_RESOURCE -- ends the container with "Failed to set <TYPE> limit:
<reason>" in its status, as Mesos's launch helper does.
"""

from __future__ import annotations

import resource

from reconciler.container import ContainerConfig
from reconciler.isolators.base import Isolator, LaunchInfo
from reconciler.launch_spec import RLimitSetting
from reconciler.models import RLIMIT_NUMBERS, RLimit


def launch_rlimit(rlimit: RLimit) -> RLimitSetting:
    """What the init passes to setrlimit(2) for one manifest rlimit (`name` is for its messages)."""
    if rlimit.soft is None and rlimit.hard is None:
        soft = hard = resource.RLIM_INFINITY
    else:
        assert rlimit.soft is not None and rlimit.hard is not None  # the model refuses half-set limits
        soft, hard = rlimit.soft, rlimit.hard
    return {"name": rlimit.type, "resource": RLIMIT_NUMBERS[rlimit.type], "soft": soft, "hard": hard}


class PosixRLimitsIsolator(Isolator):
    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        container = config.spec.container
        if container is None or container.rlimit_info is None or not container.rlimit_info.rlimits:
            return None
        return LaunchInfo(rlimits=[launch_rlimit(r) for r in container.rlimit_info.rlimits])
