"""linux/seccomp (Mesos isolators/linux/seccomp.cpp, docs/isolators/linux-seccomp.md): each container's
command runs under a seccomp filter.

Part of the default security profile: always on with the linux launcher, whatever `--isolation`
names (Mesos filters nothing unless told). Which profile a container gets:

- `linux_info.privileged`, or `linux_info.seccomp.unconfined: true`: none;
- `linux_info.seccomp.profile_name`: that file of `--seccomp_config_dir` (Mesos's field);
- else `--seccomp_profile_name`: that file of `--seccomp_config_dir`, or `unconfined` for none;
- else the agent's own default profile (reconciler/linux/seccomp_default.json; see reconciler.linux.seccomp).

Profiles are in Docker's JSON format (Mesos reads the same format). The flags' profile is read and
compiled when the agent starts, and a container's again when it is prepared (cached while the file
does not change), so a broken file stops the agent, or fails the launch, with a message naming it.
The containerizer compiles the profile for the capabilities the command will hold (a Docker profile
may allow a call only to holders of a capability), and the command's process loads it last before
exec.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.isolators.base import Isolator, IsolatorSetupError, LaunchInfo, PermanentError
from reconciler.launch_spec import SeccompProfile
from reconciler.linux import seccomp

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

UNCONFINED = "unconfined"
DEFAULT = "default"
UNCONFINED_HINT = "or run with --seccomp_profile_name=unconfined"


class LinuxSeccompIsolator(Isolator):
    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        self._profiles: dict[str, str] = {}
        directory, name = config.seccomp_config_dir, config.seccomp_profile_name
        if directory is not None and not os.path.isdir(directory):
            raise IsolatorSetupError(f"flag --seccomp_config_dir: {directory} is not a directory")
        # The profile of every container that names none (None: unconfined).
        self.default: SeccompProfile | None = {"name": DEFAULT, "path": None}
        if name == UNCONFINED:
            self.default = None
            return
        if name is not None:
            if directory is None:
                raise IsolatorSetupError(f"flag --seccomp_profile_name: profile '{name}' needs --seccomp_config_dir, "
                                         "the directory it is a file of")
            path = os.path.join(directory, name)
            self.default = {"name": name, "path": path}
            if not os.path.isfile(path):
                raise IsolatorSetupError(f"flag --seccomp_profile_name: profile '{name}' is not a file of "
                                         f"--seccomp_config_dir {directory}")
        try:
            seccomp.check_libseccomp()
        except seccomp.SeccompError as exc:
            raise IsolatorSetupError(f"flag --isolation: linux/seccomp: {exc}, {UNCONFINED_HINT}") from None
        try:
            seccomp.compile_for(self.default["path"], frozenset())
        except seccomp.SeccompError as exc:
            flag = "--seccomp_profile_name" if name is not None else "--isolation: linux/seccomp"
            raise IsolatorSetupError(f"flag {flag}: {exc} ({UNCONFINED_HINT})") from None

    def _container_profile(self, config: ContainerConfig) -> SeccompProfile | None:
        container = config.spec.container
        asked = container.linux_info.seccomp if container is not None and container.linux_info is not None else None
        if config.privileged or (asked is not None and asked.unconfined):
            return None
        if asked is not None and asked.profile_name is not None:
            directory = self.config.seccomp_config_dir
            if directory is None:
                raise PermanentError(f"Seccomp profile '{asked.profile_name}' (linux_info.seccomp.profile_name) "
                                     "cannot be found: the agent runs without --seccomp_config_dir")
            return {"name": asked.profile_name, "path": os.path.join(directory, asked.profile_name)}
        return self.default

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        profile = self._container_profile(config)
        if profile is None:
            self._profiles[container_id] = UNCONFINED
            return None
        try:
            # Cached: after the first launch this costs a stat of the file.
            seccomp.compile_for(profile["path"], frozenset())
        except seccomp.SeccompError as exc:
            source = "--seccomp_profile_name" if profile is self.default else "linux_info.seccomp.profile_name"
            raise PermanentError(f"Failed to load seccomp profile '{profile['name']}' ({source}): {exc}") from None
        self._profiles[container_id] = profile["name"]
        return LaunchInfo(seccomp=profile.copy())

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        # What the manifest and flags say now; a container launched under other flags keeps the filter
        # it was started with (the kernel's), only its status shows the current choice.
        for state in states:
            try:
                profile = self._container_profile(state.config)
            except PermanentError:
                continue
            self._profiles[state.config.container_id] = profile["name"] if profile is not None else UNCONFINED

    def status(self, container_id: str) -> dict[str, Any]:
        name = self._profiles.get(container_id)
        return {"security": {"seccomp": name}} if name is not None else {}

    def cleanup(self, container_id: str) -> None:
        self._profiles.pop(container_id, None)
