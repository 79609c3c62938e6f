"""Network namespaces that outlive the agent: each is its nsfs file bind-mounted on an empty file
`<directory>/<name>`, as `ip netns add` keeps them under /run/netns and Mesos's network/cni isolator
under its root dir. The mount holds the namespace: no process has to live in it, and an agent that
restarts finds it again by name. remove() unmounts and unlinks; the kernel frees the namespace (and
the veths in it) once nothing else refers to it.

Threads. The agent runs threads, and a namespace belongs to a thread, not a process: unshare(2) and
setns(2) with CLONE_NEWNET switch only the calling thread (the kernel requires no single-threaded
caller for the network namespace, unlike for a user namespace). So every call here that must be
inside a namespace runs in a new, dedicated thread that starts, does that one thing and exits: no
thread of the agent, the caller included, ever changes namespace, and no pooled thread is ever left
in one (CPython never reuses an OS thread for another threading.Thread). A forked child would do as
well, but forking a threaded Python process can deadlock the child on a lock held by another thread,
and exec'ing a helper costs tens of milliseconds per container; a thread costs a fraction of one.
The thread's own namespace is /proc/self/task/<tid>/ns/net: /proc/self/ns/net is the namespace of
the process's main thread, which is not the one that unshared.

Mount propagation, as iproute2 does for /run/netns and Mesos for its CNI root dir: the directory is
made a mount point of its own (a recursive self bind mount if it is not one) and a *shared* mount in
a peer group of its own. Every container's mount namespace starts as a copy of the agent's, netns
mounts included, and a copy holds the namespace as well as the original does. Shared, so that the
unmount in remove() propagates to the copies in namespaces that are peers or slaves of the agent's;
the unlink that follows detaches the mounts on that file in every other mount namespace, private
copies included (Linux >= 3.18), so remove() frees the namespace whatever propagation a launcher
chose. In its own peer group, because a self bind mount of a directory on a shared mount (systemd
makes / shared) joins the peer group of that mount, and each netns mount would then be propagated
onto the directory underneath as well, a second mount for every namespace.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from ipaddress import IPv4Interface, IPv6Interface, ip_interface
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from reconciler.fsutil import describe_type
from reconciler.linux import syscalls
from reconciler.linux.mountinfo import MOUNTINFO, parse_mountinfo, read_mountinfo

T = TypeVar("T")

NAME_MAX_LENGTH = 64
# A letter or digit first: no '.', '..', hidden or temporary file (fsutil's) is ever a name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_UNMOUNT_ATTEMPTS = 16   # a name mounted over and over by hand; ours is mounted once
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


class NetworkNamespaceError(OSError):
    """A namespace that cannot be created, removed or entered; the message says which and why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


# --- names and paths ---------------------------------------------------------------------------

def check_name(name: str) -> str:
    """`name`, if it can name a namespace file: letters, digits, '_', '.', '-', a letter or digit first."""
    if not isinstance(name, str) or not name:
        raise ValueError("a network namespace needs a name")
    if len(name) > NAME_MAX_LENGTH:
        raise ValueError(f"network namespace name {name[:NAME_MAX_LENGTH]!r}... is longer than "
                         f"{NAME_MAX_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise ValueError(f"network namespace name {name!r} is not valid: use letters, digits, '_', '.' "
                         "and '-', starting with a letter or digit (no '/', '.' or '..')")
    return name


def path_of(directory: str, name: str) -> str:
    """Where the namespace `name` is (or would be) mounted: what CNI plugins get as CNI_NETNS."""
    return os.path.join(directory, check_name(name))


# --- the directory: a shared mount in its own peer group ---------------------------------------

@dataclass(frozen=True)
class _Mount:
    mount_point: str
    peer_group: int | None   # the N of "shared:N"; None for a mount that is not shared


def _mount_table() -> list[_Mount]:
    """The mounts of this mount namespace with their peer groups (read_mountinfo drops those fields)."""
    with open(MOUNTINFO, "rb") as f:
        lines = f.read().splitlines()
    table = []
    for line in lines:
        parsed = parse_mountinfo(line)
        if not parsed:
            continue
        optional = line.partition(b" - ")[0].split(b" ")[6:]
        group = next((int(field[7:]) for field in optional if field.startswith(b"shared:")), None)
        table.append(_Mount(parsed[0].mount_point, group))
    return table


_directory_lock = threading.Lock()


def prepare_directory(directory: str) -> str:
    """Create `directory` and make it a shared mount in its own peer group; returns its real path.

    Idempotent, and cheap once done: a mount already shared on its own keeps its peer group, so the
    mount namespaces of running containers stay its peers or slaves.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    real = os.path.realpath(directory)
    try:
        with _directory_lock:
            table = _mount_table()
            if not any(m.mount_point == real for m in table):
                syscalls.mount(real, real, None, syscalls.MS_BIND | syscalls.MS_REC)
                table = _mount_table()
            ours = [m for m in table if m.mount_point == real][-1]   # the top one, if stacked
            shared_with_others = sum(m.peer_group == ours.peer_group for m in table) > 1
            if ours.peer_group is None or shared_with_others:
                syscalls.mount(None, real, None, syscalls.MS_PRIVATE)
                syscalls.mount(None, real, None, syscalls.MS_SHARED)
    except OSError as exc:
        raise NetworkNamespaceError(exc.errno or errno.EIO,
                                    f"cannot make {real} a shared mount for network namespaces: "
                                    f"{exc.strerror}") from exc
    return real


# --- create, remove, list ----------------------------------------------------------------------

# Creating or removing one name is serialized (two creates must not stack two mounts); different
# names rarely share a stripe, and the stripes bound what the locks cost however many names come.
_name_locks = [threading.Lock() for _ in range(64)]


def _lock_for(path: str) -> threading.Lock:
    return _name_locks[zlib.crc32(os.fsencode(path)) % len(_name_locks)]


def create(directory: str, name: str) -> str:
    """A new network namespace with `lo` up, held by a bind mount at `<directory>/<name>`; its path.

    Idempotent: a namespace already mounted there is returned as it is. A file left there without
    a mount (an agent killed halfway) is reused. On failure nothing is left behind.
    """
    check_name(name)
    path = os.path.join(prepare_directory(directory), name)
    with _lock_for(path):
        if is_mounted(path):
            return path
        _create_mount_point(path)
        try:
            in_new_thread(f"netns-create-{name}", lambda: _unshare_and_mount(path))
        except BaseException as exc:
            _unlink_unmounted(path)
            if not isinstance(exc, (OSError, NetlinkError)):
                raise
            raise NetworkNamespaceError(_errno_of(exc), f"cannot create the network namespace "
                                        f"'{name}' at {path}: {_reason(exc)}") from exc
    return path


def _create_mount_point(path: str) -> None:
    """The empty file the namespace is mounted on; one left by a create cut short is reused. Whatever
    else is at the name (a directory, a link, a FIFO) is refused before it is ever opened."""
    problem = _describe_existing(path)
    if problem is None:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o444))
            return
        except OSError as exc:
            problem = _describe_existing(path) or exc.strerror
            code = exc.errno or errno.EIO
    else:
        code = errno.EEXIST
    raise NetworkNamespaceError(code, f"cannot create the network namespace file {path}: {problem}")


def _describe_existing(path: str) -> str | None:
    """What is at `path` when it is something other than a regular file (or nothing), in words."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return f"{describe_type(mode)} is there, not a namespace file; remove it"


def _unshare_and_mount(path: str) -> None:
    """In a dedicated thread: a new namespace for this thread, lo up in it, then the mount that keeps
    it. The mount comes last, so a namespace that is mounted is always complete; anything that fails
    before leaves a namespace that dies with this thread."""
    syscalls.unshare(syscalls.CLONE_NEWNET)
    _bring_up_loopback()
    syscalls.mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, None, syscalls.MS_BIND)


def _bring_up_loopback() -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="lo"):
            ipr.link("set", index=index, state="up")


def remove(directory: str, name: str) -> None:
    """Unmount the namespace at `<directory>/<name>` and remove the file. Idempotent: a missing name,
    or a file with no namespace mounted on it (a create cut short), is fine."""
    path = path_of(directory, name)
    with _lock_for(os.path.join(os.path.realpath(directory), name)):
        try:
            _unmount_all(path)
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise NetworkNamespaceError(exc.errno or errno.EIO, f"cannot remove the network namespace "
                                        f"'{name}' at {path}: {_describe_existing(path) or exc.strerror}") from exc


def _unmount_all(path: str) -> None:
    for _ in range(_UNMOUNT_ATTEMPTS):
        try:
            # MNT_DETACH: a process still inside keeps the namespace alive, not the mount; UMOUNT_NOFOLLOW:
            # a link planted at the name never makes us unmount what it points to.
            syscalls.umount2(path, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.EINVAL:   # not (or no longer) a mount point
                return
            raise
    raise OSError(errno.EBUSY, f"still mounted after {_UNMOUNT_ATTEMPTS} unmounts")


def _unlink_unmounted(path: str) -> None:
    if not is_mounted(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def list_names(directory: str) -> list[str]:
    """The names of the namespace files in `directory`, mounted or not (is_mounted tells which), sorted.
    An orphan is a name here that no container claims; remove() cleans either kind."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries
                  if _NAME.fullmatch(e.name) and len(e.name) <= NAME_MAX_LENGTH and e.is_file(follow_symlinks=False))


def is_mounted(path: str) -> bool:
    """Whether a network namespace is mounted at `path` (in the agent's mount namespace)."""
    real = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
    return any(entry.mount_point == real and entry.root.startswith("net:[") for entry in read_mountinfo())


# --- running code inside -----------------------------------------------------------------------

def run_in(path: str, fn: Callable[[], T]) -> T:
    """fn() run inside the namespace mounted at `path`, in a thread of its own; its result or its exception.

    Blocks the caller until fn returns. Sockets fn opens stay in the namespace wherever they are used
    afterwards (a socket belongs to the namespace it was made in).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise NetworkNamespaceError(exc.errno or errno.EIO,
                                    f"cannot open the network namespace {path}: {exc.strerror}") from exc
    try:
        return in_new_thread(f"netns-{os.path.basename(path)}", lambda: _setns_and_call(fd, path, fn))
    finally:
        os.close(fd)


def _setns_and_call(fd: int, path: str, fn: Callable[[], T]) -> T:
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNET)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise NetworkNamespaceError(errno.EINVAL, f"{path} is not a network namespace (nothing is "
                                        "mounted on it): create it again, or remove it") from exc
        raise NetworkNamespaceError(exc.errno or errno.EIO,
                                    f"cannot enter the network namespace {path}: {exc.strerror}") from exc
    return fn()


def in_new_thread(thread_name: str, fn: Callable[[], T]) -> T:
    """fn() in a thread of its own, its result or exception handed back: a namespace switch dies with the
    thread, and pyroute2's synchronous sockets (which run an asyncio loop) never meet the caller's."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - report whatever stopped the exec, then die
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=thread_name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --- interfaces and their counters -------------------------------------------------------------

@dataclass(frozen=True)
class InterfaceStatistics:
    """The kernel's counters of an interface (64-bit), or their sum over several."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0

    def __add__(self, other: InterfaceStatistics) -> InterfaceStatistics:
        return InterfaceStatistics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_resource_statistics(self) -> dict[str, int]:
        """Mesos's ResourceStatistics fields (net_rx_packets, ..., net_tx_dropped)."""
        return {f"net_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    up: bool            # administratively up (IFF_UP)
    loopback: bool
    mtu: int
    mac: str | None
    addresses: tuple[IPv4Interface | IPv6Interface, ...]
    statistics: InterfaceStatistics


def interfaces(path: str) -> list[Interface]:
    """The interfaces of the namespace at `path`, by index, with addresses and counters."""
    return run_in(path, _read_interfaces)


def statistics(path: str) -> InterfaceStatistics:
    """The counters of the namespace at `path`, summed over its interfaces but loopback (what Mesos's
    --network_cni_metrics reports for a container: its own traffic, not its talk to itself)."""
    total = InterfaceStatistics()
    for interface in interfaces(path):
        if not interface.loopback:
            total += interface.statistics
    return total


def _read_interfaces() -> list[Interface]:
    with IPRoute() as ipr:
        links = list(ipr.link("dump"))
        addresses: dict[int, list[IPv4Interface | IPv6Interface]] = {}
        for message in ipr.addr("dump"):
            address = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
            if address:
                addresses.setdefault(message["index"], []).append(ip_interface(f"{address}/{message['prefixlen']}"))
    result = [_interface(link, tuple(addresses.get(link["index"], ()))) for link in links]
    return sorted(result, key=lambda interface: interface.index)


def _interface(link: Any, addresses: tuple[IPv4Interface | IPv6Interface, ...]) -> Interface:
    counters = link.get("IFLA_STATS64") or link.get("IFLA_STATS") or {}
    return Interface(
        name=link.get("IFLA_IFNAME"), index=link["index"], up=bool(link["flags"] & IFF_UP),
        loopback=bool(link["flags"] & IFF_LOOPBACK), mtu=link.get("IFLA_MTU") or 0,
        mac=link.get("IFLA_ADDRESS"), addresses=addresses,
        statistics=InterfaceStatistics(**{f.name: int(counters.get(f.name, 0)) for f in fields(InterfaceStatistics)}))


# --- errors ------------------------------------------------------------------------------------

def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return getattr(exc, "code", 0) or errno.EIO


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetworkNamespaceError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, NetlinkError):
        return f"netlink: {os.strerror(exc.code) if exc.code else exc}"
    return str(exc)
