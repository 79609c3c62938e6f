"""linux/capabilities (Mesos isolators/linux/capabilities.cpp, docs/isolators/linux-capabilities.md).

Which capabilities a container's command holds, from the agent's flags and the manifest:

- `--bounding_capabilities`: the most any container may have (absent: everything the agent has).
- `--effective_capabilities`: what a container gets when its manifest asks for nothing (absent:
  the user's defaults, i.e. root keeps its capabilities and any other user has none).
- `linux_info.effective_capabilities` (or the deprecated `capability_info`) and
  `linux_info.bounding_capabilities`: the container's own request, within the flags.

Mesos's rules and messages: a container's bounding set must lie within the bounding flag; its
effective set (the manifest's, else the effective flag) must lie within its bounding set (the
manifest's, else the flag, else the effective set itself). A request that breaks them is a
permanent launch failure.

The init applies the result in the command's process just before exec: every capability outside
the bounding set is dropped from it (PR_CAPBSET_DROP), then the effective set becomes the
process's effective, permitted, inheritable and ambient sets -- across setuid for a non-root user
(PR_SET_KEEPCAPS), so that the exec'd program keeps exactly what was granted. For root, unlike
Mesos, the kernel's "root gets its whole bounding set at exec" rule is switched off (SECBIT_NOROOT)
when an effective set is given, so a root command too holds only what was granted; programs with
file capabilities still gain those within the bounding set, as the bounding set means.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from reconciler.isolators.base import ContainerConfig, Isolator, IsolatorSetupError, LaunchInfo, PermanentError
from reconciler.linux import syscalls
from reconciler.models import CAPABILITY_NUMBERS

if TYPE_CHECKING:
    from reconciler.config import AgentConfig


def mesos_set(names: set[str] | list[str]) -> str:
    """A set as Mesos's stringify(std::set<Capability>) writes it: '{ CHOWN, NET_RAW }', in kernel order."""
    ordered = sorted(set(names), key=CAPABILITY_NUMBERS.__getitem__)
    return "{ " + ", ".join(ordered) + " }" if ordered else "{  }"


def last_capability() -> int:
    """The highest capability number this kernel knows (/proc/sys/kernel/cap_last_cap)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        # Older kernels lack the file; probe the bounding set instead (EINVAL past the last one).
        number = 0
        while True:
            try:
                syscalls.bounding_is_set(number + 1)
            except OSError:
                return number
            number += 1


class LinuxCapabilitiesIsolator(Isolator):
    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        if os.geteuid() != 0:
            raise IsolatorSetupError("flag --isolation: Linux capabilities isolator requires root permissions")
        effective, bounding = config.effective_capabilities, config.bounding_capabilities
        if effective is not None and bounding is not None and not set(effective) <= set(bounding):
            raise IsolatorSetupError(
                "flag --effective_capabilities: Allowed capabilities are not a subset of the bounding capabilities "
                f"(effective {mesos_set(effective)}, bounding {mesos_set(bounding)})")
        self.last_cap = last_capability()
        self.kernel_capabilities = {name for name, n in CAPABILITY_NUMBERS.items() if n <= self.last_cap}
        # What the agent holds is all it can pass on (the launch helper and its inits are its children).
        permitted = syscalls.capget().permitted
        self.agent_capabilities = {name for name, n in CAPABILITY_NUMBERS.items() if permitted >> n & 1}
        for flag, names in (("effective_capabilities", effective), ("bounding_capabilities", bounding)):
            unknown = set(names or ()) - self.kernel_capabilities
            if unknown:
                raise IsolatorSetupError(f"flag --{flag}: {mesos_set(unknown)} not supported by this kernel "
                                         f"(its last capability is number {self.last_cap})")
        if effective is not None and not set(effective) <= self.agent_capabilities:
            raise IsolatorSetupError(
                f"flag --effective_capabilities: the agent itself does not hold "
                f"{mesos_set(set(effective) - self.agent_capabilities)}, so no container could be granted them "
                "(start the agent with them in its bounding set)")

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        effective, bounding = self.container_sets(config)
        if effective is None and bounding is None:
            return None
        assert bounding is not None  # Mesos: the bounding set is always present, the effective set may not be
        beyond_kernel = {*(effective or ()), *bounding} - self.kernel_capabilities
        if beyond_kernel:
            raise PermanentError(f"Capabilities '{mesos_set(beyond_kernel)}' are not supported by this kernel")
        if effective is not None and not effective <= self.agent_capabilities:
            missing = effective - self.agent_capabilities
            raise PermanentError(
                f"Requested capabilities '{mesos_set(effective)}', but the agent itself does not hold "
                f"'{mesos_set(missing)}', so it cannot grant them")
        return LaunchInfo(capabilities={
            # Names for a reader of the checkpointed launch info; numbers for the init.
            "effective_names": None if effective is None else sorted(effective, key=CAPABILITY_NUMBERS.__getitem__),
            "bounding_names": sorted(bounding, key=CAPABILITY_NUMBERS.__getitem__),
            "effective": None if effective is None else sorted(CAPABILITY_NUMBERS[c] for c in effective),
            "bounding": sorted(CAPABILITY_NUMBERS[c] for c in bounding),
            "last_cap": self.last_cap,
        })

    def container_sets(self, config: ContainerConfig) -> tuple[set[str] | None, set[str] | None]:
        """(effective, bounding) for the container, by Mesos's rules; PermanentError with its messages."""
        container = config.spec.container
        linux_info = container.linux_info if container is not None else None
        effective: set[str] | None = None
        bounding: set[str] | None = None
        if linux_info is not None:
            if linux_info.capability_info is not None and linux_info.effective_capabilities is not None:
                raise PermanentError("Only one of 'capability_info' or 'effective_capabilities' is allowed")
            requested = linux_info.effective_capabilities if linux_info.effective_capabilities is not None \
                else linux_info.capability_info
            if requested is not None:
                effective = set(requested.capabilities)
            if linux_info.bounding_capabilities is not None:
                bounding = set(linux_info.bounding_capabilities.capabilities)
        flags = self.config
        if effective is None and flags.effective_capabilities is not None:
            effective = set(flags.effective_capabilities)
        if bounding is not None and flags.bounding_capabilities is not None:
            allowed = set(flags.bounding_capabilities)
            if not bounding <= allowed:
                raise PermanentError(
                    f"Bounding capabilities '{mesos_set(bounding)}', but only '{mesos_set(allowed)}' are allowed")
        if bounding is None and flags.bounding_capabilities is not None:
            bounding = set(flags.bounding_capabilities)
        if bounding is None and effective is not None:
            bounding = set(effective)
        if effective is not None:
            assert bounding is not None
            if not effective <= bounding:
                raise PermanentError(
                    f"Requested capabilities '{mesos_set(effective)}', but only '{mesos_set(bounding)}' are allowed")
        return effective, bounding
