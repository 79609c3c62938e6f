"""linux/seccomp (Mesos isolators/linux/seccomp.cpp, docs/isolators/linux-seccomp.md): each container's
command runs under a seccomp filter.

Part of the default security profile: always on with the linux launcher, whatever `--isolation`
names (Mesos filters nothing unless told). Which profile a container gets:

- `linux_info.privileged`, or `linux_info.seccomp.unconfined: true`: none;
- `linux_info.seccomp.profile_name`: that file of `--seccomp_config_dir` (Mesos's field);
- else `--seccomp_profile_name`: that file of `--seccomp_config_dir`, or `unconfined` for none;
- else the agent's own default profile (reconciler/linux/seccomp_default.json; see reconciler.linux.seccomp).

Profiles are in Docker's JSON format (Mesos reads the same format). The flags' profile is checked
when the agent starts, and a container's when it is prepared, so a broken file fails fast with a
message naming it. The containerizer compiles the profile for the capabilities the command will
hold (a Docker profile may allow a call only to holders of a capability), and the command's process
loads it last before exec.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from reconciler.isolators.base import (
    ContainerConfig,
    ContainerState,
    Isolator,
    IsolatorSetupError,
    LaunchInfo,
    PermanentError,
)
from reconciler.linux import seccomp

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

UNCONFINED = "unconfined"
DEFAULT = "default"


class LinuxSeccompIsolator(Isolator):
    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        self._profiles: dict[str, str] = {}
        name = config.seccomp_profile_name
        self.default: dict[str, Any] | None = {"name": DEFAULT, "path": None}
        if name == UNCONFINED:
            self.default = None
        elif name is not None:
            if config.seccomp_config_dir is None:
                raise IsolatorSetupError(f"flag --seccomp_profile_name: profile '{name}' needs --seccomp_config_dir, "
                                         "the directory it is a file of")
            self.default = {"name": name, "path": os.path.join(config.seccomp_config_dir, name)}
        if config.seccomp_config_dir is not None and not os.path.isdir(config.seccomp_config_dir):
            raise IsolatorSetupError(f"flag --seccomp_config_dir: {config.seccomp_config_dir} is not a directory")
        if self.default is not None:
            flag = "seccomp_profile_name" if name else "isolation"
            try:
                seccomp.compile_for(self.default["path"], frozenset())
            except seccomp.SeccompError as exc:
                hint = "" if name else " (or run with --seccomp_profile_name=unconfined)"
                raise IsolatorSetupError(f"flag --{flag}: linux/seccomp: {exc}{hint}") from None

    def _container_profile(self, config: ContainerConfig) -> dict[str, Any] | None:
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
        self._profiles[container_id] = profile["name"] if profile is not None else UNCONFINED
        if profile is None:
            return None
        if profile["path"] is not None:
            try:
                seccomp.load_profile(profile["path"])
            except seccomp.SeccompError as exc:
                raise PermanentError(f"Failed to load seccomp profile '{profile['name']}': {exc}") from None
        return LaunchInfo(seccomp=profile)

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
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
