"""filesystem/linux (Mesos isolators/filesystem/linux.cpp): a container with an image runs in its own
root filesystem; one without behaves as under filesystem/shared (volumes bound over host paths in a
private mount namespace).

The root filesystem is an overlay built by the init in the container's mount namespace, so the host
never sees it and it goes away with the namespace (nothing to unmount at destroy):
- lower: the image's layers, read-only, from the shared content-addressed store (provisioner);
- upper and work: `<sandbox>/.rootfs/{upper,work}`, so what the container writes to its root
  filesystem is sandbox usage (disk/du counts it) and is removed with the sandbox;
- mounted at `<sandbox>/.rootfs` itself, over the directories it keeps (one mkdir less per launch:
  each costs ~0.5 ms on a slow disk), then, inside it: /proc (its kernel knobs read-only and
  kcore, keys, timer_list masked, as runc does), /sys (read-only), a minimal /dev
  (a tmpfs with null, zero, full, random, urandom and tty bound from the host, a private devpts,
  the std* and fd links, and /dev/shm), the host's /etc/resolv.conf and /etc/hosts (read-only, as
  Mesos does for containers on the host network), the sandbox at /mnt/mesos/sandbox (MESOS_SANDBOX)
  with `.rootfs` hidden under an empty read-only tmpfs, and the volumes.
The init then pivots into it (pivot_root, the old root detached), as Mesos's `fs::chroot::enter`.

Volumes land inside the root filesystem: `container_path` is created in it when missing (a file
for a file, a directory otherwise); a relative `host_path` is a directory of the sandbox, an
absolute one a host path that must exist; `mode: RO` is honoured as under filesystem/shared.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import TYPE_CHECKING, Any, Unpack

from reconciler.container import CONTAINER_SANDBOX, ROOTFS_DIR, ContainerConfig, ContainerState
from reconciler.isolators.base import PRIVATE_ROOT, Isolator, IsolatorSetupError, LaunchInfo, PermanentError
from reconciler.isolators.masks import masking_mounts
from reconciler.isolators.volumes import (
    check_mount_namespaces,
    read_only_remounts,
    remount_read_only_flags,
    shared_filesystem,
    under,
)
from reconciler.launch_spec import Mount, MountOptions, MountStep
from reconciler.linux import syscalls

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import Volume

# Host devices a container gets (Mesos's default device whitelist, less the console).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts")
_NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


def overlay_supported(filesystems: str = "/proc/filesystems") -> bool:
    try:
        with open(filesystems) as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None,
           **extra: Unpack[MountOptions]) -> Mount:
    return {"source": source, "target": target, "fstype": fstype, "flags": flags, "data": data, **extra}


class LinuxFilesystemIsolator(Isolator):
    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        check_mount_namespaces("filesystem/linux")
        self._masked: dict[str, dict[str, list[str]]] = {}
        if config.image_providers and not overlay_supported():
            raise IsolatorSetupError("flag --isolation: filesystem/linux needs overlayfs for container images, "
                                     "and this kernel has none in /proc/filesystems (modprobe overlay)")

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        if config.image is None:
            return shared_filesystem(config)
        rootfs = config.rootfs
        assert rootfs is not None
        upper, work = os.path.join(rootfs, "upper"), os.path.join(rootfs, "work")
        os.makedirs(upper, mode=0o755, exist_ok=True)
        os.makedirs(work, mode=0o755, exist_ok=True)
        if not config.image.layers:
            raise PermanentError(f"Image '{config.image.reference}' has no layers")
        # overlayfs lists lower directories topmost first; the store gives them lowest first.
        lower = ":".join(reversed(config.image.layers))
        data = f"lowerdir={lower},upperdir={upper},workdir={work}"
        if len(data) >= 4096:
            raise PermanentError(f"Image '{config.image.reference}' has too many layers for one overlay mount "
                                 f"({len(config.image.layers)})")
        at = config.in_rootfs
        mounts: list[MountStep] = [
            PRIVATE_ROOT.copy(),
            _mount("overlay", rootfs, "overlay", 0, data),
            _mount("proc", at("/proc"), "proc", _NOSUID_NODEV_NOEXEC, mkdir=True),
            _mount("sysfs", at("/sys"), "sysfs", _NOSUID_NODEV_NOEXEC | syscalls.MS_RDONLY, mkdir=True),
        ]
        if not config.privileged:
            masks, self._masked[container_id] = masking_mounts(at)
            mounts += masks
        mounts.append(_mount("tmpfs", at("/dev"), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_STRICTATIME,
                             "mode=755,size=65536k", mkdir=True))
        for device in DEVICES:
            if os.path.exists(f"/dev/{device}"):
                mounts.append(_mount(f"/dev/{device}", at(f"/dev/{device}"), None, syscalls.MS_BIND, file=True))
        mounts.append(_mount("devpts", at("/dev/pts"), "devpts", syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
                             "newinstance,ptmxmode=0666,mode=0620", mkdir=True))
        mounts.append(_mount("tmpfs", at("/dev/shm"), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777",
                             mkdir=True))
        mounts.extend({"symlink": target, "target": at(f"/dev/{name}")} for name, target in DEV_LINKS)
        for host_file in HOST_FILES:
            if os.path.isfile(host_file):
                mounts.append(_mount(host_file, at(host_file), None, syscalls.MS_BIND, file=True))
                mounts.append(_mount(None, at(host_file), None, remount_read_only_flags(host_file)))
        sandbox_target = at(CONTAINER_SANDBOX)
        mounts.append(_mount(config.sandbox, sandbox_target, None, syscalls.MS_BIND, mkdir=True))
        # The overlay's own directories stay out of the container's reach.
        mounts.append(_mount("tmpfs", os.path.join(sandbox_target, ROOTFS_DIR), "tmpfs",
                             _NOSUID_NODEV_NOEXEC | syscalls.MS_RDONLY, "size=4k,mode=000"))
        container = config.spec.container
        taken = [CONTAINER_SANDBOX]
        for volume in container.volumes if container is not None else []:
            mounts.extend(self._rootfs_volume_mounts(volume, config, taken))
        # Its own UTS namespace, so that a container given CAP_SYS_ADMIN cannot rename the host; named
        # by container.hostname when given, else it keeps the host's name (as Mesos on the host network).
        return LaunchInfo(clone_namespaces=syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS, mounts=mounts, rootfs=rootfs,
                          hostname=container.hostname if container is not None else None)

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            if state.config.image is not None and not state.config.privileged:
                self._masked[state.config.container_id] = masking_mounts(state.config.in_rootfs)[1]

    def status(self, container_id: str) -> dict[str, Any]:
        masked = self._masked.get(container_id)
        return {"security": dict(masked)} if masked is not None else {}

    def cleanup(self, container_id: str) -> None:
        self._masked.pop(container_id, None)

    def _rootfs_volume_mounts(self, volume: "Volume", config: ContainerConfig, taken: list[str]) -> list[Mount]:
        container_path = posixpath.normpath(volume.container_path)
        for other in taken:
            if under(container_path, other):
                raise PermanentError(f"Cannot mount volume to '{container_path}' because it is under volume '{other}'")
            if under(other, container_path):
                raise PermanentError(f"Cannot mount volume to '{other}' because it is under volume '{container_path}'")
        taken.append(container_path)
        if not volume.host_path:
            raise PermanentError(f"Volume with container path '{container_path}' must specify host path")
        if volume.host_path.startswith("/"):
            host_path = volume.host_path
            if not os.path.exists(host_path):
                raise PermanentError(f"Volume with container path '{container_path}' must have host path "
                                     f"'{host_path}' present on host")
        else:
            if any(part in (".", "..") for part in volume.host_path.split("/")):
                raise PermanentError(f"Relative host path '{volume.host_path}' cannot contain relative components")
            host_path = posixpath.join(config.sandbox, volume.host_path)
            os.makedirs(host_path, exist_ok=True)
            if not under(os.path.realpath(host_path), os.path.realpath(config.sandbox)):
                raise PermanentError(f"Relative host path '{host_path}' for mount to '{container_path}' must be a "
                                     "directory inside the sandbox (not a symbolic link out of it)")
        is_file = not stat.S_ISDIR(os.stat(host_path).st_mode)
        target = config.in_rootfs(container_path)
        bind = syscalls.MS_BIND | syscalls.MS_REC
        mounts = [_mount(host_path, target, None, bind, file=True) if is_file
                  else _mount(host_path, target, None, bind, mkdir=True)]
        if volume.mode == "RO":
            mounts.extend(read_only_remounts(host_path, target))
        return mounts
