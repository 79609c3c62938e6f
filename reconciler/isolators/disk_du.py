"""disk/du (Mesos isolators/posix/disk.cpp, "posix/disk"): each sandbox's disk usage, measured the way
`du -s` counts it, every --container_disk_watch_interval; over its `disk` resource, a container is
destroyed with a DiskLimitation when --enforce_container_disk_quota is on.

What is counted (`measure`): st_blocks × 512 of every entry of the tree, the sandbox itself included,
and a file with several hard links once, exactly as GNU du counts; the figure equals `du -s -B1`.
Symbolic links are counted, never followed. A volume bound into the sandbox is not the sandbox's
usage: mount points below it (from /proc/self/mountinfo, re-read only when the mount table changed)
and anything on another device are skipped.

How: a full walk is os.scandir on directory fds with one fstatat per entry (DirEntry.stat), as du's
fts does; Python spends about 1.7x du's time on it. So after the first walk the collector measures
a sandbox incrementally (`TreeUsage`): an inotify watch on each of its directories says which ones
changed since the last measurement, and only those are listed again. An unchanged sandbox costs one
read of the event queue and one lstat; every 10th measurement (at most one a minute) is a plain
full walk again, which catches what raises no event (writes through mmap). That walk is GNU
`du -s -x -B1` itself (`du_measure`, Mesos's way of measuring every time), so it costs du's time,
not Python's; our own walk stands in where GNU du is missing.

When (`DiskUsageCollector`): one thread measures one sandbox at a time, earliest due first; a
sandbox is measured again `interval` after its last measurement ended (Mesos runs one `du` at a
time too). That thread lives in a child process of the agent (`python3 -m
reconciler.isolators.disk_du`, niced, killed with the agent), not in the agent: a walk that held the
agent's GIL while the kernel preempted it would stall the reconcile loop, and on a busy two-CPU
machine that doubled the time from manifest to Running. Results come back as JSON lines, handed over
once a second in one write (each hand-over wakes the loop), and the limit is checked there. A container's cleanup drops it
from the schedule and cancels a walk of its sandbox under way (checked between directories).

Unlike Mesos, every sandbox is measured, not only those of containers with a `disk` resource:
usage is worth seeing without a limit. Nothing is reported until the first measurement ends.

`reconciler once` ends long before the measuring process's first figure: it has every sandbox without a
figure measured at once (`measure_unmeasured`: one full walk each, in a thread of the agent), so that
the one-shot pass publishes the `disk` block and enforces the limit as the daemon does.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from reconciler.isolators.base import ContainerConfig, ContainerState, Isolator, LaunchInfo, Limitation, LimitationCallback
from reconciler.linux import inotify, syscalls
from reconciler.linux.mountinfo import parse_mountinfo
from reconciler.status import iso
from reconciler.units import format_bytes, megabytes_to_bytes

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import Resources

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MB = 1024 * 1024


# --- the status block -------------------------------------------------------------------------------

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


# --- the walk -------------------------------------------------------------------------------------

class Cancelled(Exception):
    """The measurement was abandoned (its container is being destroyed)."""


@dataclass(frozen=True)
class DiskUsage:
    used_bytes: int
    entries: int          # names walked: files, directories, links (a hard-linked file under each name)


def measure(path: str, excludes: Iterable[str] = (), cancelled: Callable[[], bool] | None = None) -> DiskUsage:
    """Bytes allocated to `path` and everything below it, as `du -s -B1 path` reports them.

    `excludes` are absolute paths (mount points) skipped with everything below them; entries on
    another device than `path` are skipped too. A file or directory that vanishes during the walk is
    simply not counted. Raises FileNotFoundError if `path` itself is missing, Cancelled if
    `cancelled()` turns true.
    """
    root = os.path.abspath(path)
    skip_by_parent: dict[str, set[str]] = {}
    for excluded in excludes:
        parent, name = os.path.split(os.path.abspath(excluded).rstrip("/"))
        skip_by_parent.setdefault(parent, set()).add(name)
    if root in {os.path.join(p, n) for p, names in skip_by_parent.items() for n in names}:
        return DiskUsage(0, 0)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        return DiskUsage(st.st_blocks * 512, 1)   # a file or a symlink: itself, not its target
    device = st.st_dev
    total_blocks = st.st_blocks
    entries = 1
    seen: set[int] = set()              # inodes with several links, counted once
    stack: list[tuple[int, str]] = [(os.open(root, _DIR_FLAGS), root)]
    try:
        while stack:
            fd, dir_path = stack.pop()
            try:
                if cancelled is not None and cancelled():
                    raise Cancelled(root)
                skip = skip_by_parent.get(dir_path)
                try:
                    scanner = os.scandir(fd)
                except OSError:
                    continue
                with scanner:
                    for entry in scanner:
                        if skip is not None and entry.name in skip:
                            continue
                        try:
                            est = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue     # gone since it was listed
                        if est.st_dev != device:
                            continue     # another filesystem mounted (or a file bound) here
                        entries += 1
                        if est.st_nlink > 1 or entry.is_dir(follow_symlinks=False):
                            if entry.is_dir(follow_symlinks=False):
                                try:
                                    child_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                                except OSError:
                                    continue
                                stack.append((child_fd, os.path.join(dir_path, entry.name)))
                            elif est.st_ino in seen:
                                continue
                            else:
                                seen.add(est.st_ino)
                        total_blocks += est.st_blocks
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return DiskUsage(total_blocks * 512, entries)


_GNU_DU: list[str | None] = []


def _gnu_du() -> str | None:
    """GNU du's path, or None where du is missing or is not GNU's (busybox's knows no -B1)."""
    if not _GNU_DU:
        path = shutil.which("du")
        if path is not None:
            try:
                version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                version = ""
            if "GNU coreutils" not in version:
                path = None
        _GNU_DU.append(path)
    return _GNU_DU[0]


def _fnmatch_escape(path: str) -> str:
    return re.sub(r"([][*?\\])", r"\\\1", path)


def du_measure(path: str, excludes: Iterable[str] = (), cancelled: Callable[[], bool] | None = None,
               entries: int = 0) -> DiskUsage:
    """The full walk, by GNU `du -s -x -B1` itself (Mesos runs du for every measurement), so it costs
    what du costs: Python's own walk (`measure`) spends ~1.6x du's time on per-entry work. Mount points
    in `excludes` go to du as --exclude patterns (matched against the whole path). `entries` is passed
    through (du does not count names). Falls back to `measure` where GNU du is missing."""
    du = _gnu_du()
    if du is None:
        return measure(path, excludes, cancelled)
    root = os.path.abspath(path)
    excluded = [os.path.abspath(e).rstrip("/") for e in excludes]
    if root in excluded:
        return DiskUsage(0, 0)
    os.lstat(root)                                    # FileNotFoundError: the sandbox is gone
    argv = [du, "-s", "-x", "-B1"] + [f"--exclude={_fnmatch_escape(e)}" for e in excluded] + ["--", root]
    out = b""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          close_fds=True) as child:
        assert child.stdout is not None
        # Wait on the pipe, not with Popen.wait(timeout), which polls in sleeps of up to 50 ms: du's
        # output and end are seen at once, and `cancelled` is asked every 50 ms meanwhile.
        poller = select.poll()
        poller.register(child.stdout.fileno(), select.POLLIN)
        while True:
            if poller.poll(50):
                chunk = os.read(child.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
            elif cancelled is not None and cancelled():
                child.kill()
                child.wait()
                raise Cancelled(root)
        child.wait()
    # Exit 1 with a figure: some entry vanished while du walked (not counted, as in `measure`).
    try:
        return DiskUsage(int(out.split()[0]), entries)
    except (IndexError, ValueError):
        os.lstat(root)
        log.debug("disk/du: du gave no figure for %s (exit %s): walking it ourselves", root, child.returncode)
        return measure(root, excluded, cancelled)


# --- mount points under a sandbox ------------------------------------------------------------------

class MountTable:
    """Mount points of this mount namespace, re-read only after the kernel says the table changed
    (/proc/self/mountinfo polls POLLPRI on every mount and unmount)."""

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - kept open: it is what poll() watches
        self._poll = select.poll()
        self._poll.register(self._file.fileno(), select.POLLPRI | select.POLLERR)
        self._mountpoints: list[str] = []
        self._below: dict[str, list[str]] = {}
        self._read()

    def _read(self) -> None:
        self._file.seek(0)
        self._mountpoints = [entry.mount_point for entry in parse_mountinfo(self._file.read())]
        self._below = {}

    def below(self, directory: str) -> list[str]:
        """Mount points strictly below `directory`."""
        if self._poll.poll(0):
            self._read()
        found = self._below.get(directory)
        if found is None:
            prefix = directory.rstrip("/") + "/"
            found = self._below[directory] = [p for p in self._mountpoints if p.startswith(prefix)]
            if len(self._below) > 4096:
                self._below = {directory: found}
        return found

    def close(self) -> None:
        self._file.close()


# --- the incremental measurement -------------------------------------------------------------------

IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = inotify.IN_MODIFY, inotify.IN_ATTRIB, inotify.IN_MOVED_FROM, \
    inotify.IN_MOVED_TO
IN_CREATE, IN_DELETE, IN_Q_OVERFLOW, IN_IGNORED = inotify.IN_CREATE, inotify.IN_DELETE, inotify.IN_Q_OVERFLOW, \
    inotify.IN_IGNORED
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = inotify.IN_ONLYDIR, inotify.IN_DONT_FOLLOW, inotify.IN_EXCL_UNLINK
# Everything that can change what a directory's entries occupy: writes and truncations (MODIFY),
# link counts (ATTRIB), entries coming and going (CREATE, DELETE, MOVED_*). Files already unlinked
# do not count for du, so their writes are not wanted (EXCL_UNLINK).
_WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
               | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = inotify.EVENT


class Inotify:
    """One inotify instance for every tracked sandbox; a watch descriptor maps to the directory it watches."""

    def __init__(self) -> None:
        self.fd = inotify.init()
        self.watches: dict[int, _Dir] = {}
        self.trees: set[TreeUsage] = set()

    def add(self, d: "_Dir") -> bool:
        try:
            wd = inotify.add_watch(self.fd, d.path, _WATCH_MASK)
        except OSError:
            return False
        # The kernel returns the same wd for a directory watched already (moved here from elsewhere in
        # the tree): it now belongs to this entry, and removing the old entry must leave it alone.
        self.watches[wd] = d
        d.wd = wd
        return True

    def remove(self, d: "_Dir") -> None:
        if d.wd is not None and self.watches.get(d.wd) is d:
            del self.watches[d.wd]
            inotify.rm_watch(self.fd, d.wd)
        d.wd = None

    def drain(self) -> None:
        """Read every pending event: each marks its directory for a rescan."""
        while True:
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    for tree in self.trees:
                        tree.rebuild = True       # events were lost: trust nothing
                    continue
                d = self.watches.get(wd)
                if d is None:
                    continue
                if mask & IN_IGNORED:             # the directory is gone (or unmounted)
                    del self.watches[wd]
                    d.wd = None
                if not d.dropped:
                    d.tree.dirty.add(d)

    def close(self) -> None:
        os.close(self.fd)


class _Rebuild(Exception):
    """The incremental state cannot be trusted: walk everything again."""


class _Dir:
    """What one directory contributes: its entries' blocks (hard-linked files apart), kept per directory so
    that an event in it costs a rescan of it alone."""
    __slots__ = ("tree", "path", "parent", "wd", "own", "single", "multi", "count", "children", "dropped")

    def __init__(self, tree: "TreeUsage", path: str, parent: "_Dir | None", own: int) -> None:
        self.tree, self.path, self.parent = tree, path, parent
        self.wd: int | None = None
        self.own = own                      # this directory's blocks, counted in its parent's `single`
        self.single = 0                     # blocks of its entries (directories included), links apart
        self.multi: list[tuple[int, int]] = []     # (inode, blocks) of entries with several links
        self.count = 0
        self.children: dict[str, _Dir] = {}
        self.dropped = False


class TreeUsage:
    """`du -s` of one tree, kept current between measurements by inotify: a measurement rescans only the
    directories that saw an event since the last one (and their parents' view of them), so measuring an
    unchanged 100,000-file sandbox costs a read of the event queue and one lstat.

    Every `full_every`-th measurement (at most one a `full_min_secs`) is checked against a plain full
    walk, whose figure is reported:
    writes through mmap() raise no event, so they are counted at the latest then (and a difference
    starts the incremental view over). A lost event, a mount change, a new hard link, or a watch that
    could not be added rebuild it at once.
    """

    def __init__(self, root: str, inotify: Inotify, full_every: int = 10, full_min_secs: float = 60.0) -> None:
        self.root_path = os.path.abspath(root)
        self.inotify = inotify
        self.full_every = full_every
        self.full_min_secs = full_min_secs
        self.since_full = 0
        self.last_full = time.monotonic()
        self.root: _Dir | None = None
        self.device = 0
        self.root_ino = 0
        self.single = 0
        self.entries = 0
        self.multi: dict[int, list[int]] = {}     # inode -> [blocks, references]
        self.multi_blocks = 0
        self.dirty: set[_Dir] = set()
        self.rebuild = True
        self.incremental = True
        self.excludes: frozenset[str] = frozenset()
        self.measurements = 0
        self.updating = False
        inotify.trees.add(self)

    # accounting --------------------------------------------------------------------------------
    def _ref(self, ino: int, blocks: int) -> None:
        slot = self.multi.get(ino)
        if slot is None:
            self.multi[ino] = [blocks, 1]
            self.multi_blocks += blocks
        else:
            self.multi_blocks += blocks - slot[0]
            slot[0] = blocks
            slot[1] += 1

    def _unref(self, ino: int) -> None:
        slot = self.multi[ino]
        slot[1] -= 1
        if slot[1] == 0:
            self.multi_blocks -= slot[0]
            del self.multi[ino]

    # structure ---------------------------------------------------------------------------------
    def _drop(self, d: _Dir) -> None:
        stack = [d]
        while stack:
            current = stack.pop()
            current.dropped = True
            self.single -= current.single
            self.entries -= current.count
            for ino, _blocks in current.multi:
                self._unref(ino)
            self.inotify.remove(current)
            self.dirty.discard(current)
            stack.extend(current.children.values())

    def _scan(self, d: _Dir, skip: set[str], cancelled: Callable[[], bool] | None) -> list[tuple[str, int]]:
        """Recount `d`'s entries; drop children that went away; return the new child directories."""
        if cancelled is not None and cancelled():
            raise Cancelled(self.root_path)
        single = count = 0
        multi: list[tuple[int, int]] = []
        found: dict[str, int] = {}
        try:
            fd = os.open(d.path, _DIR_FLAGS)
        except OSError:
            fd = -1                       # gone: its parent's rescan (it had an event too) drops it
        if fd >= 0:
            try:
                with os.scandir(fd) as scanner:
                    for entry in scanner:
                        if skip and entry.name in skip:
                            continue
                        try:
                            est = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if est.st_dev != self.device:
                            continue
                        count += 1
                        if entry.is_dir(follow_symlinks=False):
                            found[entry.name] = est.st_blocks
                            single += est.st_blocks
                        elif est.st_nlink > 1:
                            multi.append((est.st_ino, est.st_blocks))
                        else:
                            single += est.st_blocks
            finally:
                os.close(fd)
        if self.updating and any(ino not in self.multi for ino, _blocks in multi):
            # A file that gained a link: its other names may be counted as single-link files elsewhere,
            # and link() raises no event in their directories. Only a full walk knows.
            raise _Rebuild()
        self.single += single - d.single
        self.entries += count - d.count
        for ino, _blocks in d.multi:
            self._unref(ino)
        for ino, blocks in multi:
            self._ref(ino, blocks)
        d.single, d.multi, d.count = single, multi, count
        for name in list(d.children):
            if name not in found:
                self._drop(d.children.pop(name))
        for name, child in d.children.items():
            child.own = found[name]
        return [(name, blocks) for name, blocks in found.items() if name not in d.children]

    def _grow(self, start: list[_Dir], skip_by_parent: dict[str, set[str]],
              cancelled: Callable[[], bool] | None, pending: list[tuple[_Dir, str, int]] | None = None) -> None:
        """Watch, then scan, each directory (so no change between the two is missed), depth first."""
        stack: list[tuple[_Dir, str, int]] = list(pending or [])
        for d in start:
            self._watch_and_scan(d, skip_by_parent, cancelled, stack)
        while stack:
            parent, name, blocks = stack.pop()
            if parent.dropped:
                continue
            child = _Dir(self, os.path.join(parent.path, name), parent, blocks)
            parent.children[name] = child
            self._watch_and_scan(child, skip_by_parent, cancelled, stack)

    def _watch_and_scan(self, d: _Dir, skip_by_parent: dict[str, set[str]], cancelled: Callable[[], bool] | None,
                        stack: list[tuple[_Dir, str, int]]) -> None:
        if self.incremental and not self.inotify.add(d):
            err = ctypes.get_errno()
            log.warning("disk/du: cannot watch %s (%s): measuring %s with full walks from now on",
                        d.path, os.strerror(err), self.root_path)
            self.incremental = False
        for name, blocks in self._scan(d, skip_by_parent.get(d.path, set()), cancelled):
            stack.append((d, name, blocks))

    # measuring ---------------------------------------------------------------------------------
    def measure(self, excludes: Iterable[str] = (), cancelled: Callable[[], bool] | None = None,
                drain: bool = True) -> DiskUsage:
        """The tree's usage now. `drain=False` when the caller has just read the event queue itself."""
        excludes = frozenset(os.path.abspath(e).rstrip("/") for e in excludes) if excludes else frozenset()
        if self.root_path in excludes:
            return DiskUsage(0, 0)
        st = os.lstat(self.root_path)                 # FileNotFoundError: the sandbox is gone
        if not stat.S_ISDIR(st.st_mode):
            return DiskUsage(st.st_blocks * 512, 1)
        skip_by_parent: dict[str, set[str]] = {}
        for excluded in excludes:
            parent, name = os.path.split(excluded)
            skip_by_parent.setdefault(parent, set()).add(name)
        if drain:
            self.inotify.drain()
        self.measurements += 1
        self.since_full += 1
        if (self.rebuild or not self.incremental or excludes != self.excludes or st.st_ino != self.root_ino
                or st.st_dev != self.device or self.root is None):
            self._rebuild(st, excludes, skip_by_parent, cancelled)
        else:
            try:
                self._update(skip_by_parent, cancelled)
            except _Rebuild:
                self._rebuild(st, excludes, skip_by_parent, cancelled)
        assert self.root is not None
        self.root.own = st.st_blocks
        usage = DiskUsage((st.st_blocks + self.single + self.multi_blocks) * 512, 1 + self.entries)
        if self.since_full >= self.full_every and time.monotonic() - self.last_full >= self.full_min_secs:
            self.since_full, self.last_full = 0, time.monotonic()
            # What no event reports (writes through mmap, a hard link's other name outside the sandbox):
            # a plain walk now and then. Its figure wins, and a difference means starting over.
            walked = du_measure(self.root_path, excludes, cancelled, usage.entries)
            if walked.used_bytes != usage.used_bytes:
                log.debug("disk/du: %s drifted by %d bytes since its last full walk", self.root_path,
                          walked.used_bytes - usage.used_bytes)
                self.rebuild = True
            return walked
        return usage

    def _rebuild(self, st: os.stat_result, excludes: frozenset[str], skip_by_parent: dict[str, set[str]],
                 cancelled: Callable[[], bool] | None) -> None:
        if self.root is not None:
            self._drop(self.root)
        self.single = self.entries = self.multi_blocks = 0
        self.multi.clear()
        self.dirty.clear()
        self.device, self.root_ino, self.excludes = st.st_dev, st.st_ino, excludes
        self.incremental = True
        self.root = _Dir(self, self.root_path, None, st.st_blocks)
        try:
            self._grow([self.root], skip_by_parent, cancelled)
        except Cancelled:
            self.rebuild = True
            raise
        self.rebuild = False
        self.since_full, self.last_full = 0, time.monotonic()

    def _update(self, skip_by_parent: dict[str, set[str]], cancelled: Callable[[], bool] | None) -> None:
        dirty, self.dirty = self.dirty, set()
        pending: list[tuple[_Dir, str, int]] = []
        self.updating = True
        try:
            # Shallow first: a rescan may drop a subtree whose directories are in the set too.
            for d in sorted(dirty, key=lambda x: x.path.count("/")):
                if d.dropped:
                    continue
                if d.parent is not None:
                    # The directory's own size may have changed (entries added): its parent counts it.
                    try:
                        own = os.lstat(d.path).st_blocks
                    except OSError:
                        continue                  # gone: the parent's own event drops it
                    d.parent.single += own - d.own
                    self.single += own - d.own
                    d.own = own
                for name, blocks in self._scan(d, skip_by_parent.get(d.path, set()), cancelled):
                    pending.append((d, name, blocks))
            self._grow([], skip_by_parent, cancelled, pending)
        except Cancelled:
            self.rebuild = True
            raise
        finally:
            self.updating = False

    def close(self) -> None:
        if self.root is not None:
            self._drop(self.root)
            self.root = None
        self.inotify.trees.discard(self)


# --- the collector ------------------------------------------------------------------------------

@dataclass
class _Tracked:
    container_id: str
    sandbox: str
    limit_bytes: int | None
    used_bytes: int | None = None
    checked_at: float | None = None
    entries: int = 0
    last_duration: float = 0.0
    limited: bool = False
    cancelled: bool = False
    scheduled: bool = False
    on_limitation: LimitationCallback | None = None
    loop: asyncio.AbstractEventLoop | None = None
    tree: TreeUsage | None = None          # the collector thread's incremental view of the sandbox
    shown: DiskStatus | None = None        # what the status file's `disk` block says


class DiskUsageCollector:
    """One thread; each tracked sandbox is measured again `interval` after its last measurement ended.

    With `inotify`, a sandbox is measured incrementally (TreeUsage); without, by a full walk each time.
    """

    def __init__(self, interval: float, on_measured: Callable[[_Tracked, DiskUsage], None],
                 mounts: MountTable | None = None, inotify: Inotify | None = None) -> None:
        self.interval = interval
        self.on_measured = on_measured
        self.mounts = mounts
        self.inotify = inotify
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Tracked]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.current: _Tracked | None = None     # under measurement now
        self.measurements = 0

    def add(self, tracked: _Tracked, delay: float = 0.0) -> None:
        with self._cond:
            if tracked.scheduled or tracked.cancelled:
                return
            tracked.scheduled = True
            self._push(tracked, time.monotonic() + delay)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disk-du", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, tracked: _Tracked) -> None:
        """Never measured again; a walk of it under way stops at its next directory."""
        with self._cond:
            tracked.cancelled = True
            self._cond.notify()

    def _push(self, tracked: _Tracked, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, tracked))

    def _next_batch(self) -> list[_Tracked] | None:
        """Wait for the earliest due sandbox; take it with every other one due within `slack`, so that
        200 sandboxes on a 1 s interval wake the thread a few times a second, not 200."""
        with self._cond:
            while not self._stopped:
                while self._heap and self._heap[0][2].cancelled:
                    self._forget(heapq.heappop(self._heap)[2])
                if not self._heap:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if self._heap[0][0] > now:
                    self._cond.wait(self._heap[0][0] - now)
                    continue
                horizon = now + min(0.1, self.interval / 10)
                batch = []
                while self._heap and self._heap[0][0] <= horizon:
                    tracked = heapq.heappop(self._heap)[2]
                    if tracked.cancelled:
                        self._forget(tracked)
                    else:
                        batch.append(tracked)
                if batch:
                    return batch
        return None

    @staticmethod
    def _forget(tracked: _Tracked) -> None:
        tracked.scheduled = False
        if tracked.tree is not None:
            tracked.tree.close()           # its watches go
            tracked.tree = None

    def _measure(self, tracked: _Tracked) -> DiskUsage:
        excludes = self.mounts.below(tracked.sandbox) if self.mounts is not None else []
        cancelled = lambda: tracked.cancelled  # noqa: E731
        if self.inotify is None:
            return du_measure(tracked.sandbox, excludes, cancelled)
        if tracked.tree is None:
            tracked.tree = TreeUsage(tracked.sandbox, self.inotify)
        return tracked.tree.measure(excludes, cancelled, drain=False)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if self.inotify is not None:
                self.inotify.drain()       # once for the whole batch
            for tracked in batch:
                self._measure_one(tracked)

    def _measure_one(self, tracked: _Tracked) -> None:
        with self._cond:
            if tracked.cancelled:
                self._forget(tracked)
                return
            self.current = tracked
        started = time.monotonic()
        try:
            usage: DiskUsage | None = self._measure(tracked)
        except Cancelled:
            usage = None
        except FileNotFoundError:
            usage = None     # not created yet, or already removed
        except Exception as exc:  # noqa: BLE001 - one bad sandbox must not stop the others
            log.warning("Failed to measure the disk usage of %s: %s", tracked.sandbox, exc)
            usage = None
        tracked.last_duration = time.monotonic() - started
        with self._cond:
            self.current = None
            if usage is not None and not tracked.cancelled:
                self.measurements += 1
                try:
                    self.on_measured(tracked, usage)
                except Exception:  # noqa: BLE001
                    log.exception("disk/du: handling the measurement of %s failed", tracked.sandbox)
            if not tracked.cancelled:
                self._push(tracked, time.monotonic() + self.interval)
            else:
                self._forget(tracked)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


# --- the measuring process ----------------------------------------------------------------------

def _collector_for_this_process(interval: float, on_measured: Callable[[_Tracked, DiskUsage], None]) -> DiskUsageCollector:
    try:
        mounts: MountTable | None = MountTable()
    except OSError as exc:
        log.warning("disk/du: cannot watch the mount table (%s): volumes bound into sandboxes are excluded "
                    "only when they are on another device", exc)
        mounts = None
    try:
        inotify: Inotify | None = Inotify()
    except OSError as exc:
        log.warning("disk/du: %s: every measurement is a full walk of the sandbox", exc)
        inotify = None
    return DiskUsageCollector(interval, on_measured, mounts, inotify)


# How often the measuring process hands its results to the agent. Each hand-over wakes the agent's loop
# (and makes it take the GIL from the threads it shares it with); once a second keeps that to one
# wake-up however many sandboxes there are, and is soon enough for a status file or a limitation.
RESULTS_EVERY = 1.0


def serve(interval: float, commands: Any = None, results: Any = None, results_every: float = RESULTS_EVERY) -> None:
    """The measuring process: JSON lines in ({"add": id, "path": sandbox} or {"remove": id}); out, every
    `results_every` seconds, one JSON line per measurement made since ({"id", "used", "entries", "at",
    "secs"}), in a single write. Ends when its input ends."""
    commands = commands if commands is not None else sys.stdin
    results = results if results is not None else sys.stdout
    lock = threading.Lock()
    pending: list[str] = []
    done = threading.Event()

    def measured(tracked: _Tracked, usage: DiskUsage) -> None:
        line = json.dumps({"id": tracked.container_id, "used": usage.used_bytes, "entries": usage.entries,
                           "at": time.time(), "secs": round(tracked.last_duration, 6)})
        with lock:
            pending.append(line)

    def hand_over() -> None:
        while not done.wait(results_every):
            with lock:
                if not pending:
                    continue
                text = "\n".join(pending) + "\n"
                pending.clear()
            try:
                results.write(text)
                results.flush()
            except (BrokenPipeError, ValueError):
                return                   # the agent is gone

    collector = _collector_for_this_process(interval, measured)
    writer = threading.Thread(target=hand_over, name="disk-du-results", daemon=True)
    writer.start()
    tracked: dict[str, _Tracked] = {}
    for line in commands:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "add" in doc:
            old = tracked.get(doc["add"])
            if old is not None:
                collector.remove(old)
            tracked[doc["add"]] = entry = _Tracked(doc["add"], doc["path"], None)
            collector.add(entry, delay=float(doc.get("delay", 0.0)))
        elif "remove" in doc:
            entry = tracked.pop(doc["remove"], None)
            if entry is not None:
                collector.remove(entry)
    collector.stop()
    done.set()
    writer.join()


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    syscalls.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(0)


class _MeasuringProcess:
    """The agent's end of the measuring process: commands written without blocking, results read by
    the asyncio loop (add_reader). Walking sandboxes in another process keeps them off the agent's
    GIL: a walk preempted while holding it would stall the loop, on a busy machine for milliseconds."""

    def __init__(self, interval: float, loop: asyncio.AbstractEventLoop,
                 on_result: Callable[[dict[str, Any]], None], on_exit: Callable[[], None]) -> None:
        self.loop, self.on_result, self.on_exit = loop, on_result, on_exit
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler.isolators.disk_du", "--interval", repr(interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, preexec_fn=None,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin_fd, self.stdout_fd = self.process.stdin.fileno(), self.process.stdout.fileno()
        os.set_blocking(self.stdin_fd, False)
        os.set_blocking(self.stdout_fd, False)
        self.outgoing = bytearray()
        self.incoming = bytearray()
        self.closed = False
        loop.add_reader(self.stdout_fd, self._readable)

    def send(self, doc: dict[str, Any]) -> None:
        if self.closed:
            return
        self.outgoing += (json.dumps(doc) + "\n").encode()
        self._flush()

    def _flush(self) -> None:
        try:
            while self.outgoing:
                written = os.write(self.stdin_fd, self.outgoing)
                del self.outgoing[:written]
        except BlockingIOError:
            self.loop.add_writer(self.stdin_fd, self._writable)
            return
        except BrokenPipeError:
            self.outgoing.clear()      # it died: the reader sees EOF and restarts it

    def _writable(self) -> None:
        self.loop.remove_writer(self.stdin_fd)
        self._flush()

    def _readable(self) -> None:
        try:
            data = os.read(self.stdout_fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.close()
            self.on_exit()
            return
        self.incoming += data
        *lines, rest = self.incoming.split(b"\n")
        self.incoming = bytearray(rest)
        for line in lines:
            try:
                self.on_result(json.loads(line))
            except ValueError:
                continue

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for remove, fd in ((self.loop.remove_reader, self.stdout_fd), (self.loop.remove_writer, self.stdin_fd)):
            try:
                remove(fd)
            except Exception:  # noqa: BLE001 - the loop may be closed already
                pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()     # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- measuring now (`reconciler once`) --------------------------------------------------------------

def measure_sandboxes(sandboxes: list[str]) -> list[tuple[DiskUsage, float] | None]:
    """Each sandbox's usage now, by a full walk (GNU du, as Mesos measures), with the moment it ended; None for
    a sandbox that is gone or could not be measured. Blocking: run it in a thread."""
    try:
        mounts: MountTable | None = MountTable()
    except OSError:
        mounts = None            # volumes are then excluded only when they are on another device
    figures: list[tuple[DiskUsage, float] | None] = []
    try:
        for sandbox in sandboxes:
            try:
                usage = du_measure(sandbox, mounts.below(sandbox) if mounts is not None else [])
            except FileNotFoundError:
                usage = None
            except OSError as exc:
                log.warning("Failed to measure the disk usage of %s: %s", sandbox, exc)
                usage = None
            figures.append(None if usage is None else (usage, time.time()))
    finally:
        if mounts is not None:
            mounts.close()
    return figures


# --- the isolator -------------------------------------------------------------------------------

class DiskDuIsolator(Isolator):
    """Per container: what is measured (the sandbox), its limit and its last figure. The measuring itself
    happens in a child process (`serve`), started at the first watch; its results arrive in the loop."""

    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        self.enforce = config.enforce_container_disk_quota
        self.interval = config.container_disk_watch_interval
        self.tracked: dict[str, _Tracked] = {}
        self.helper: _MeasuringProcess | None = None
        self.measurements = 0
        self.helper_restarts = 0

    @staticmethod
    def _limit(config: ContainerConfig) -> int | None:
        disk = config.spec.resources.disk
        return megabytes_to_bytes(disk) if disk is not None else None

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        for state in states:
            config = state.config
            if config.container_id not in self.tracked:
                self.tracked[config.container_id] = _Tracked(config.container_id, config.sandbox, self._limit(config))

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        if container_id not in self.tracked:
            self.tracked[container_id] = _Tracked(container_id, config.sandbox, self._limit(config))
        return None

    def watch(self, container_id: str, on_limitation: LimitationCallback, loop: asyncio.AbstractEventLoop) -> None:
        tracked = self.tracked.get(container_id)
        if tracked is None or tracked.scheduled:
            return
        tracked.on_limitation, tracked.loop, tracked.scheduled = on_limitation, loop, True
        # Not at once: the container is starting (its sandbox is nearly empty), and the launches around
        # it are what the machine should be busy with now.
        self._helper(loop).send({"add": container_id, "path": tracked.sandbox, "delay": min(self.interval, 1.0)})

    def _helper(self, loop: asyncio.AbstractEventLoop) -> _MeasuringProcess:
        if self.helper is None or self.helper.closed:
            self.helper = _MeasuringProcess(self.interval, loop, self._result, self._helper_exited)
        return self.helper

    def _helper_exited(self) -> None:
        """It died (killed by hand, out of memory): start another, and give it every sandbox again."""
        self.helper_restarts += 1
        log.warning("disk/du: the measuring process exited; starting it again")
        watched = [t for t in self.tracked.values() if t.scheduled and t.loop is not None]
        if watched:
            loop = watched[0].loop
            assert loop is not None
            delay = min(30.0, 0.5 * 2 ** min(self.helper_restarts, 6))
            loop.call_later(delay, self._rewatch)

    def _rewatch(self) -> None:
        for tracked in self.tracked.values():
            if tracked.scheduled and tracked.loop is not None and not tracked.loop.is_closed():
                self._helper(tracked.loop).send({"add": tracked.container_id, "path": tracked.sandbox,
                                                 "delay": min(self.interval, 1.0)})

    def update(self, container_id: str, resources: "Resources") -> None:
        tracked = self.tracked.get(container_id)
        if tracked is None:
            return
        tracked.limit_bytes = megabytes_to_bytes(resources.disk) if resources.disk is not None else None
        tracked.limited = False          # judged again against the new limit at the next measurement
        self._show(tracked)

    def _result(self, doc: dict[str, Any]) -> None:
        """In the loop: one measurement arrived."""
        tracked = self.tracked.get(doc.get("id", ""))
        if tracked is None:
            return                       # cleaned up meanwhile
        self.measurements += 1
        tracked.last_duration = doc.get("secs", 0.0)
        self._measured(tracked, DiskUsage(int(doc["used"]), int(doc["entries"])), float(doc["at"]))

    def _measured(self, tracked: _Tracked, usage: DiskUsage, at: float) -> None:
        tracked.used_bytes, tracked.entries, tracked.checked_at = usage.used_bytes, usage.entries, at
        self._show(tracked)
        limit = tracked.limit_bytes
        if not self.enforce or limit is None or usage.used_bytes <= limit or tracked.limited:
            return
        tracked.limited = True
        message = f"Disk usage ({format_bytes(usage.used_bytes)}) exceeds quota ({format_bytes(limit)})"
        limitation = Limitation(reason="DiskLimitation", message=message, resources={"disk": round(limit / _MB, 6)})
        log.info("Container %s: %s", tracked.container_id, message)
        if tracked.on_limitation is not None:
            tracked.on_limitation(limitation)

    async def measure_unmeasured(self) -> int:
        """Measure now every watched sandbox that has no figure yet, and judge it against its limit as a
        periodic measurement would (status block, DiskLimitation); returns how many got a figure.

        For `reconciler once`, which ends long before the measuring process's first figure (a second
        after the watch at the soonest). In a thread: the loop keeps handling exits meanwhile."""
        due = [t for t in self.tracked.values() if t.scheduled and t.checked_at is None]
        if not due:
            return 0
        figures = await asyncio.to_thread(measure_sandboxes, [t.sandbox for t in due])
        measured = 0
        for tracked, figure in zip(due, figures):
            if figure is None or self.tracked.get(tracked.container_id) is not tracked:
                continue                 # gone, or cleaned up while it was measured
            usage, at = figure
            self.measurements += 1
            self._measured(tracked, usage, at)
            measured += 1
        return measured

    def usage(self, container_id: str) -> dict[str, float | int]:
        tracked = self.tracked.get(container_id)
        if tracked is None:
            return {}
        stats: dict[str, float | int] = {}
        if tracked.limit_bytes is not None:
            stats["disk_limit_bytes"] = tracked.limit_bytes
        if tracked.used_bytes is not None:
            stats["disk_used_bytes"] = tracked.used_bytes
        return stats

    def _show(self, tracked: _Tracked) -> None:
        if tracked.used_bytes is None or tracked.checked_at is None:
            return
        now = DiskStatus(tracked.used_bytes, tracked.limit_bytes, tracked.checked_at,
                         bool(self.enforce and tracked.limit_bytes is not None))
        if status_news(tracked.shown, now):
            tracked.shown = now
            self.status_changed(tracked.container_id)

    def status(self, container_id: str) -> dict[str, Any]:
        tracked = self.tracked.get(container_id)
        if tracked is None or tracked.shown is None:
            return {}
        return tracked.shown.block()

    def cleanup(self, container_id: str) -> None:
        tracked = self.tracked.pop(container_id, None)
        if tracked is not None and tracked.scheduled and self.helper is not None:
            self.helper.send({"remove": container_id})    # a walk of it under way stops at its next directory

    def agent_status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"watch_interval_secs": self.interval, "enforce_container_disk_quota": self.enforce,
                               "sandboxes_tracked": len(self.tracked), "measurements": self.measurements}
        if self.helper is not None and not self.helper.closed:
            doc["measuring_pid"] = self.helper.process.pid
        if self.helper_restarts:
            doc["measuring_restarts"] = self.helper_restarts
        return doc

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()


def main(argv: list[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python3 -m reconciler.isolators.disk_du",
                                     description="disk/du's measuring process (started by the agent)")
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    try:
        os.nice(10)          # measuring yields to the agent and to the containers
    except OSError:
        pass
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s reconciler.disk_du[measuring]: %(message)s")
    serve(args.interval)


if __name__ == "__main__":
    main()
