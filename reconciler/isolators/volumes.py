"""Volumes bound from the host into a container that shares the host's filesystem: what filesystem/shared
does for every container, and filesystem/linux for one without an image (Mesos isolators/filesystem/shared.cpp).

Every such container gets its own mount namespace whose tree is made private first (PRIVATE_ROOT), so
nothing the container mounts (its volumes included) propagates to the host or to other containers, and
nothing is left to unmount: the mounts go away with the namespace.

Volumes (`container.volumes`), in order, as Mesos:
- `container_path` must exist on the host (the filesystem is shared: a container must not create
  paths outside its sandbox);
- no volume may be at, above or below another one or the sandbox (a mount would hide the other);
- a relative `host_path` is a directory in the sandbox, created with the mode and owner of
  `container_path` (so `tmp` → `/tmp` is a private 1777 /tmp); an absolute one must exist.
Unlike Mesos's filesystem/shared, `mode: RO` is honoured: the bind is remounted read-only (with
the flags the mount already has, which the kernel insists on keeping), including mounts below it.

Not an isolator: the two filesystem isolators use it, and never each other.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING

from reconciler.isolators.base import PRIVATE_ROOT, IsolatorSetupError, LaunchInfo, PermanentError
from reconciler.launch_spec import Mount
from reconciler.linux import syscalls
from reconciler.linux.mountinfo import read_mountinfo
from reconciler.linux.mounts import remount_flags

if TYPE_CHECKING:
    from reconciler.container import ContainerConfig
    from reconciler.models import Volume


def check_mount_namespaces(isolator: str) -> None:
    """IsolatorSetupError, naming `isolator`, unless the agent can make mount namespaces and bind mounts."""
    if os.geteuid() != 0:
        raise IsolatorSetupError(f"flag --isolation: {isolator} needs root privileges "
                                 "(it creates mount namespaces and bind mounts)")
    if not os.path.exists("/proc/self/ns/mnt"):
        raise IsolatorSetupError(f"flag --isolation: {isolator} needs mount namespace support "
                                 "in the kernel (CONFIG_NAMESPACES), which this kernel lacks")


def shared_filesystem(config: ContainerConfig) -> LaunchInfo:
    """A private mount namespace over the host's filesystem, with the container's volumes bound in."""
    info = LaunchInfo(clone_namespaces=syscalls.CLONE_NEWNS, mounts=[PRIVATE_ROOT.copy()])
    container = config.spec.container
    if container is None:
        return info
    # A mount at, above or below the sandbox would hide it (and the command's stdout and
    # stderr in it) from the container; the work dir may be reached through a symlink.
    taken = list(dict.fromkeys([posixpath.normpath(config.sandbox), os.path.realpath(config.sandbox)]))
    for volume in container.volumes:
        info.mounts.extend(host_volume_mounts(volume, config.sandbox, taken))
    return info


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def under(inner: str, outer: str) -> bool:
    """Whether `inner` is `outer` or below it, component by component (/tmpx is not under /tmp)."""
    outer_parts = _components(outer)
    return _components(inner)[: len(outer_parts)] == outer_parts


def remount_read_only_flags(path: str) -> int:
    """The flags that make the mount at `path` read-only while keeping nosuid, nodev, noexec and atime."""
    return remount_flags(path, syscalls.MS_RDONLY)


def read_only_remounts(host_path: str, target: str) -> list[Mount]:
    """What makes the bind of `host_path` at `target` read-only: a bind mount takes the source's flags,
    MS_RDONLY only counts on a remount, and only for that one mount, so the mounts below it (taken
    along by MS_REC) are remounted too."""
    mounts: list[Mount] = [{"source": None, "target": target, "fstype": None,
                            "flags": remount_read_only_flags(host_path), "data": None}]
    real_host = os.path.realpath(host_path)
    for below in submounts(host_path):
        mounts.append({"source": None, "target": posixpath.join(target, posixpath.relpath(below, real_host)),
                       "fstype": None, "flags": remount_read_only_flags(below), "data": None})
    return mounts


def submounts(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points strictly below `path`, outermost first (each listed once)."""
    real = os.path.realpath(path)
    found: list[str] = []
    for entry in read_mountinfo(mountinfo):
        mountpoint = entry.mount_point
        if mountpoint != real and under(mountpoint, real) and mountpoint not in found:
            found.append(mountpoint)
    return sorted(found, key=lambda p: len(_components(p)))


def host_volume_mounts(volume: Volume, sandbox: str, taken: list[str]) -> list[Mount]:
    """The bind mounts of one volume over the host path `container_path`; `taken` (the sandbox's paths and
    the volumes before it) is checked against it, then extended with it."""
    container_path = volume.container_path
    # The filesystem is shared: a missing mount point would have to be created on the host.
    if not os.path.exists(container_path):
        raise PermanentError(f"Volume with container path '{container_path}' must exist on host "
                             "for shared filesystem isolator")
    if not volume.host_path:
        raise PermanentError(f"Volume with container path '{container_path}' must specify host path "
                             "for shared filesystem isolator")
    # Mesos compares strings; components (so /tmpfs is not under /tmp) and resolved symlinks
    # (so /var/run is under /run) say what the mounts would really hide.
    forms = list(dict.fromkeys([posixpath.normpath(container_path), os.path.realpath(container_path)]))
    for other in taken:
        for form in forms:
            if under(form, other):
                raise PermanentError(
                    f"Cannot mount volume to '{container_path}' because it is under volume '{other}'")
            if under(other, form):
                raise PermanentError(
                    f"Cannot mount volume to '{other}' because it is under volume '{container_path}'")
    taken.extend(forms)

    if volume.host_path.startswith("/"):
        host_path = volume.host_path
        if not os.path.exists(host_path):
            raise PermanentError(f"Volume with container path '{container_path}' must have host path "
                                 f"'{host_path}' present on host for shared filesystem isolator")
    else:
        host_path = _sandbox_directory(volume.host_path, container_path, sandbox)

    if os.path.isdir(host_path) != os.path.isdir(container_path):
        kind = "a directory" if os.path.isdir(container_path) else "not a directory"
        raise PermanentError(f"Volume with container path '{container_path}' ({kind} on the host) cannot "
                             f"be bound from host path '{host_path}', which is "
                             f"{'not ' if os.path.isdir(container_path) else ''}a directory")

    mounts: list[Mount] = [{"source": host_path, "target": container_path, "fstype": None,
                            "flags": syscalls.MS_BIND | syscalls.MS_REC, "data": None}]
    if volume.mode == "RO":
        mounts.extend(read_only_remounts(host_path, container_path))
    return mounts


def _sandbox_directory(relative: str, container_path: str, sandbox: str) -> str:
    """<sandbox>/<relative>, made a directory with the mode and owner the container expects at container_path."""
    host_path = posixpath.join(sandbox, relative)
    if any(part in (".", "..") for part in _components(relative)):
        raise PermanentError(f"Relative host path '{host_path}' cannot contain relative components")
    try:
        os.makedirs(host_path, exist_ok=True)
    except OSError as exc:
        raise PermanentError(f"Failed to create host_path '{host_path}' for mount to '{container_path}': "
                             f"{exc.strerror}") from None
    # The sandbox belongs to the container: a symbolic link it left there (a restarted
    # container reusing its sandbox) must not make us chown something outside it.
    real_sandbox = os.path.realpath(sandbox)
    if not under(os.path.realpath(host_path), real_sandbox) or not os.path.isdir(host_path):
        raise PermanentError(f"Relative host path '{host_path}' for mount to '{container_path}' must be a "
                             "directory inside the sandbox (not a symbolic link out of it)")
    # Bind mounts show the host path's mode and owner: copy the container path's, so the
    # container sees what it would without the volume (1777 for /tmp).
    try:
        st = os.stat(container_path)
    except OSError as exc:
        raise PermanentError(f"Failed to get permissions on '{container_path}': {exc.strerror}") from None
    try:
        os.chmod(host_path, st.st_mode & 0o7777)
    except OSError as exc:
        raise PermanentError(f"Failed to chmod hostPath '{host_path}': {exc.strerror}") from None
    try:
        os.chown(host_path, st.st_uid, st.st_gid)
    except OSError as exc:
        raise PermanentError(f"Failed to chown hostPath '{host_path}': {exc.strerror}") from None
    return host_path
