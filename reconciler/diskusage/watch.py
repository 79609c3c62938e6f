"""A tree's `du -s` kept current between measurements by inotify (`TreeUsage`), so that measuring a
sandbox again costs what changed in it, not a walk of all of it.

An inotify watch on each directory of the tree says which directories changed since the last
measurement, and only those are listed again: an unchanged sandbox costs one read of the event queue
and one lstat. What raises no event (writes through mmap) is caught by a periodic full walk by GNU du
(walk.du_measure), whose figure is then reported.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
import time
from typing import Callable, Iterable

from reconciler.diskusage.walk import Cancelled, DiskUsage, du_measure
from reconciler.fsutil import open_dir
from reconciler.linux import inotify

log = logging.getLogger(__name__)

# Everything that can change what a directory's entries occupy: writes and truncations (MODIFY),
# link counts (ATTRIB), entries coming and going (CREATE, DELETE, MOVED_*). Files already unlinked
# do not count for du, so their writes are not wanted (EXCL_UNLINK).
_WATCH_MASK = (inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO | inotify.IN_CREATE
               | inotify.IN_DELETE | inotify.IN_ONLYDIR | inotify.IN_DONT_FOLLOW | inotify.IN_EXCL_UNLINK)
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
                if mask & inotify.IN_Q_OVERFLOW:
                    for tree in self.trees:
                        tree.rebuild = True       # events were lost: trust nothing
                    continue
                d = self.watches.get(wd)
                if d is None:
                    continue
                if mask & inotify.IN_IGNORED:             # the directory is gone (or unmounted)
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
            fd = open_dir(d.path, follow=False)
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
