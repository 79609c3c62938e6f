"""linux/capabilities (Mesos isolators/linux/capabilities.cpp, docs/isolators/linux-capabilities.md).

Part of the default security profile: always on with the linux launcher, whatever `--isolation`
names (unlike Mesos, which leaves a container every capability the agent has).

Which capabilities a container's command holds, from the agent's flags and the manifest:

- nothing asked anywhere: Docker's default set (DEFAULT_CAPABILITIES) bounds it, so root holds those
  14 and any other user none;
- `linux_info.privileged: true` (only with `--allow_privileged`): every capability the agent holds;
- `--bounding_capabilities`: the most any container may have, and the bounding set of a container
  whose manifest gives none.
- `--effective_capabilities`: what a container gets when its manifest asks for nothing (absent:
  the user's defaults, i.e. root holds its bounding set and any other user has none).
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
from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import Isolator, IsolatorSetupError, LaunchInfo, PermanentError
from reconciler.linux import syscalls
from reconciler.models import CAPABILITY_NUMBERS

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

# Docker's (and Podman's, less AUDIT_WRITE) default: what a root container holds unless it asks.
DEFAULT_CAPABILITIES = frozenset({
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
})


def by_number(names: set[str] | frozenset[str]) -> list[str]:
    return sorted(names, key=CAPABILITY_NUMBERS.__getitem__)


def mesos_set(names: set[str] | list[str]) -> str:
    """A set as Mesos's stringify(std::set<Capability>) writes it: '{ CHOWN, NET_RAW }', in kernel order."""
    ordered = sorted(set(names), key=CAPABILITY_NUMBERS.__getitem__)
    return "{ " + ", ".join(ordered) + " }" if ordered else "{  }"


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
        self.last_cap = syscalls.last_capability()
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
        self._profiles: dict[str, dict[str, Any]] = {}

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            try:
                sets = self.container_sets(state.config)
                self._profiles[state.config.container_id] = self._profile(state.config, *sets)
            except PermanentError:
                pass   # it was launched under other flags: its status shows no capabilities rather than wrong ones

    def status(self, container_id: str) -> dict[str, Any]:
        profile = self._profiles.get(container_id)
        return {"security": profile} if profile is not None else {}

    def cleanup(self, container_id: str) -> None:
        self._profiles.pop(container_id, None)

    def _profile(self, config: ContainerConfig, effective: set[str] | None, bounding: set[str]) -> dict[str, Any]:
        profile: dict[str, Any] = {"privileged": config.privileged, "bounding_capabilities": by_number(bounding),
                                   "no_new_privs": self._runs_as_another_user(config)}
        if effective is not None:
            profile["effective_capabilities"] = by_number(effective)
        return profile

    def _runs_as_another_user(self, config: ContainerConfig) -> bool:
        """Whether the command runs as a user other than root, which the init gives no_new_privs: its
        command.user, else (with an image) the image's User unless --docker_ignore_image_user."""
        user = config.spec.command.user or ""
        if not user and config.image is not None and not self.config.docker_ignore_image_user:
            user = str(config.image.config.get("User") or "")
        return user.partition(":")[0] not in ("", "root", "0")

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        effective, bounding = self.container_sets(config)
        beyond_kernel = {*(effective or ()), *bounding} - self.kernel_capabilities
        if beyond_kernel:
            raise PermanentError(f"Capabilities '{mesos_set(beyond_kernel)}' are not supported by this kernel")
        if effective is not None and not effective <= self.agent_capabilities:
            missing = effective - self.agent_capabilities
            raise PermanentError(
                f"Requested capabilities '{mesos_set(effective)}', but the agent itself does not hold "
                f"'{mesos_set(missing)}', so it cannot grant them")
        self._profiles[container_id] = self._profile(config, effective, bounding)
        return LaunchInfo(capabilities={
            # Names for a reader of the checkpointed launch info; numbers for the init.
            "effective_names": None if effective is None else by_number(effective),
            "bounding_names": by_number(bounding),
            "effective": None if effective is None else sorted(CAPABILITY_NUMBERS[c] for c in effective),
            "bounding": sorted(CAPABILITY_NUMBERS[c] for c in bounding),
            "last_cap": self.last_cap,
        })

    def container_sets(self, config: ContainerConfig) -> tuple[set[str] | None, set[str]]:
        """(effective, bounding) for the container, by Mesos's rules; PermanentError with its messages."""
        container = config.spec.container
        linux_info = container.linux_info if container is not None else None
        if linux_info is not None and linux_info.privileged:
            if not self.config.allow_privileged:
                raise PermanentError("Privileged containers are not allowed on this agent: "
                                     "linux_info.privileged needs the agent flag --allow_privileged")
            return None, set(self.agent_capabilities)
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
        if bounding is None:
            # Nothing asked, by the manifest or the flags: Docker's default set, of what the agent holds.
            bounding = set(DEFAULT_CAPABILITIES & self.agent_capabilities)
        if effective is not None:
            if not effective <= bounding:
                raise PermanentError(
                    f"Requested capabilities '{mesos_set(effective)}', but only '{mesos_set(bounding)}' are allowed")
        return effective, bounding
