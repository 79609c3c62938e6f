"""Isolators by their Mesos names, created in Mesos's fixed order (MesosContainerizer::create).

The order is the order of `prepare`; `cleanup` runs in reverse. An unknown name stops the agent at
start, with Mesos's message.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from reconciler.isolators.base import Isolator, IsolatorSetupError

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

# name -> "module:Class", listed in the order Mesos prepares them.
REGISTRY: dict[str, str] = {
    "filesystem/linux": "reconciler.isolators.filesystem_linux:LinuxFilesystemIsolator",
    "filesystem/shared": "reconciler.isolators.filesystem_shared:SharedFilesystemIsolator",
    "posix/cpu": "reconciler.isolators.posix:PosixCpuIsolator",
    "posix/mem": "reconciler.isolators.posix:PosixMemIsolator",
    "posix/rlimits": "reconciler.isolators.rlimits:PosixRLimitsIsolator",
    "cgroups/cpu": "reconciler.isolators.cgroups:CgroupsCpuIsolator",
    "cgroups/mem": "reconciler.isolators.cgroups:CgroupsMemIsolator",
    "cgroups/net_cls": "reconciler.isolators.net_cls:NetClsIsolator",
    "docker/runtime": "reconciler.isolators.docker_runtime:DockerRuntimeIsolator",
    "linux/capabilities": "reconciler.isolators.capabilities:LinuxCapabilitiesIsolator",
    "linux/devices": "reconciler.isolators.devices:LinuxDevicesIsolator",
    "linux/seccomp": "reconciler.isolators.seccomp:LinuxSeccompIsolator",
    "namespaces/ipc": "reconciler.isolators.namespaces:IpcNamespaceIsolator",
    "namespaces/pid": "reconciler.isolators.namespaces:PidNamespaceIsolator",
    "network/cni": "reconciler.isolators.network_cni:NetworkCniIsolator",
    "disk/du": "reconciler.isolators.disk_du:DiskDuIsolator",
    "disk/xfs": "reconciler.isolators.disk_xfs:DiskXfsIsolator",
}
ALIASES = {"process": ["posix/cpu", "posix/mem"], "cgroups": ["cgroups/cpu", "cgroups/mem"], "posix/disk": ["disk/du"]}


def expand(names: list[str]) -> list[str]:
    """Deprecated Mesos names rewritten, as Mesos does with a warning."""
    out: list[str] = []
    for name in names:
        for real in ALIASES.get(name, [name]):
            if real not in out:
                out.append(real)
    return out


def isolator_class(name: str) -> type[Isolator]:
    target = REGISTRY.get(name)
    if target is None:
        raise IsolatorSetupError(f"flag --isolation: Unknown or unsupported isolator '{name}'")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise IsolatorSetupError(f"flag --isolation: Unknown or unsupported isolator '{name}'") from None
        raise
    return getattr(module, class_name)


# The default security profile (docs/security.md): on for every container of the linux launcher whether
# or not --isolation names these; flags and manifests say how much of it a container gets.
SECURITY_PROFILE = ["linux/capabilities", "linux/devices", "linux/seccomp"]


def create(config: AgentConfig) -> list[Isolator]:
    """Instances in table order. Raises IsolatorSetupError with one line naming flag and reason."""
    names = expand(config.isolation)
    if config.launcher == "linux":
        names += [name for name in SECURITY_PROFILE if name not in names]
    ordered = [n for n in REGISTRY if n in names]
    for name in names:
        isolator_class(name)  # unknown names fail here, whatever their position
    isolators = []
    for name in ordered:
        cls = isolator_class(name)
        isolator = cls(config)
        isolator.name = name
        isolators.append(isolator)
    return isolators
