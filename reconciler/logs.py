"""Container logs: the sandbox's `stdout` and `stderr`, rotated at a size limit, and read back (`reconciler logs`).

Rotation follows Mesos's logrotate container logger (src/slave/container_loggers/logrotate.cpp):
`--container_logger_max_stdout_size` / `--container_logger_max_stderr_size` (10MB by default, as
Mesos's `max_stdout_size`, at least one page; 0 turns rotation off) and
`--container_logger_keep N` (logrotate's `rotate N`: `stdout.1` is the newest rotated file,
`stdout.N` the oldest; older ones are deleted).

Mesos pipes the container's output through one `mesos-logrotate-logger` process per stream, which
writes the file and rotates exactly at the limit. Here that would cost a process per container and
tie each container's output to a process that must stay alive; instead the command writes straight
into the sandbox files (opened O_APPEND by the init), and the agent rotates them when its
statistics timer (every `--resync_interval`, in a thread) finds one over its limit. The agent can
restart at any time without the containers noticing, and a container's logs cost no process.

Rotation moves the live file's content to `.1` without the writer's help: the whole blocks before
the end are copied, then cut off the front with fallocate(FALLOC_FL_COLLAPSE_RANGE), atomic against
the writer's appends, so nothing is lost (ext4, XFS). Where that is not supported it falls back to
copy-then-truncate, which loses what the command writes between the last copy and the truncation
(microseconds, unless the agent is descheduled right then). Because the writer appends, its next
write lands at the new end either way: no hole, no sparse file.

The price: a file can pass its limit by what the command writes in one interval, and rotated files
end on a block boundary rather than a line's (`reconciler logs` joins them seamlessly).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from reconciler import fsutil

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")
DEFAULT_MAX_SIZE = 10 * 1024 * 1024       # Mesos: Megabytes(10)
DEFAULT_KEEP = 5
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CATCH_UP_ROUNDS = 8
_LAST_STEP_BYTES = 256 * 1024    # at most this much is copied while holding the GIL

# PyDLL: these calls keep the GIL (see _copy_to_end_and_truncate).
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.copy_file_range.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                  ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, ctypes.c_uint]
_libc.copy_file_range.restype = ctypes.c_ssize_t
_libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_int64]
_libc.ftruncate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
FALLOC_FL_COLLAPSE_RANGE = 0x08
TRUNCATION_GRACE = 1.0    # seconds a follower waits for the `.1` of a truncation it saw

def rotated(path: str, index: int) -> str:
    return f"{path}.{index}"


# Rotation ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RotationPolicy:
    max_stdout_size: int = DEFAULT_MAX_SIZE    # 0: never rotated
    max_stderr_size: int = DEFAULT_MAX_SIZE
    keep: int = DEFAULT_KEEP

    def limit(self, stream: str) -> int:
        return self.max_stdout_size if stream == "stdout" else self.max_stderr_size

    @property
    def enabled(self) -> bool:
        return bool(self.max_stdout_size or self.max_stderr_size)


def rotate_if_needed(sandbox: str, policy: RotationPolicy) -> list[str]:
    """Rotate each of the sandbox's streams that is over its limit; returns the files rotated.

    Blocking (a copy of up to a few limits' worth of bytes): run it in a thread. A sandbox removed
    meanwhile is not an error.
    """
    done: list[str] = []
    try:
        directory = open_sandbox(sandbox)
    except FileNotFoundError:
        return done
    try:
        for stream in STREAMS:
            limit = policy.limit(stream)
            try:
                if limit and os.stat(stream, dir_fd=directory, follow_symlinks=False).st_size > limit:
                    _rotate_at(directory, stream, policy.keep)
                    done.append(os.path.join(sandbox, stream))
            except FileNotFoundError:
                continue
            except OSError as exc:   # one stream that can't be rotated must not stop the other
                log.warning("Failed to rotate %s in %s: %s", stream, sandbox, exc)
    finally:
        os.close(directory)
    return done


def rotate(path: str, keep: int) -> int:
    """Move the content of `path` to `path.1` (shifting older ones up, dropping `path.<keep>`).

    Returns the bytes moved. With keep == 0 the content is dropped (logrotate's `rotate 0`).

    Where the filesystem can (ext4, XFS), nothing is lost: the whole blocks before the end are
    copied, then cut off the front of the live file with fallocate(FALLOC_FL_COLLAPSE_RANGE), which
    the kernel does under the same inode lock as an append; the live file keeps the last partial
    block (so rotated files end on a block boundary, not a line's; `reconciler logs` joins them).
    Elsewhere (tmpfs, overlayfs) it is copy-then-truncate, and what the command writes between the
    final copy and the truncation is lost (see _copy_to_end_and_truncate).

    Order: the copy goes to a temp file, the live file is cut, then the older files shift and the copy
    becomes `.1` by a rename, so `.1` never goes missing and a reader that saw the cut finds the copy.

    The sandbox is the container's: every name in it is opened relative to the directory, never
    through a symbolic link, and only a regular file with one link is rotated (a container that put a
    link to a host file there must not get the agent, as root, to cut or overwrite that file).
    """
    directory = open_sandbox(os.path.dirname(path) or ".")
    try:
        return _rotate_at(directory, os.path.basename(path), keep)
    finally:
        os.close(directory)


def open_sandbox(sandbox: str) -> int:
    """The fd of a sandbox directory, from the path the agent built for it: a link there is refused
    (ENOTDIR, or ELOOP).

    Every name in it is then opened relative to this fd (fsutil.open_regular): the container owns
    the directory's content, not the path to it.
    """
    return fsutil.open_dir(sandbox, follow=False)


def _rotate_at(directory: int, name: str, keep: int) -> int:
    # Writable: ftruncate and fallocate need it. A single link: a hard link would cut another file.
    src = fsutil.open_regular(name, dir_fd=directory, flags=os.O_RDWR, single_link=True)
    try:
        st = os.fstat(src)
        if keep <= 0:
            os.ftruncate(src, 0)
            return st.st_size
        _remove_leftover_temps(directory, name)
        fd, tmp = fsutil.create_temp(directory, f"{name}.rotating", st.st_mode & 0o777)
        try:
            copied = _copy_and_cut(src, fd, os.fstatvfs(src).f_bsize)
            try:
                os.fchown(fd, st.st_uid, st.st_gid)   # the container's user reads its own logs
            except PermissionError:
                pass
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=directory)
            raise
        os.close(fd)
    finally:
        os.close(src)
    _shift(directory, name, keep)
    # Replaces `.1` (hard-linked to `.2` by the shift) atomically; rename never follows a link.
    os.rename(tmp, f"{name}.1", src_dir_fd=directory, dst_dir_fd=directory)
    return copied


def _remove_leftover_temps(directory: int, name: str) -> None:
    """The copies a rotation interrupted by a crash left (unlink never follows a link)."""
    prefix = f".{name}.rotating."
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            try:
                os.unlink(entry, dir_fd=directory)
            except OSError:   # gone meanwhile, or a directory the container made: not ours to clear
                pass


def _copy_and_cut(src: int, dst: int, block: int) -> int:
    size = os.fstat(src).st_size
    whole = ((size - 1) // block) * block if size > 0 else 0   # a collapse must end before EOF
    copied = 0
    if whole > 0:
        copied = _copy_range(src, dst, 0, whole)
        if copied == whole and _libc.fallocate(src, FALLOC_FL_COLLAPSE_RANGE, 0, whole) == 0:
            return copied
        err = ctypes.get_errno()
        if copied == whole and err not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(err, f"fallocate(FALLOC_FL_COLLAPSE_RANGE): {os.strerror(err)}")
    # Copy-then-truncate: the bulk with the GIL released (the agent's loop runs on); what a busy
    # writer adds meanwhile is left for the last step.
    for _ in range(_CATCH_UP_ROUNDS):
        size = os.fstat(src).st_size
        if size - copied < _LAST_STEP_BYTES:
            break
        copied += _copy_range(src, dst, copied, size - copied)
    return copied + _copy_to_end_and_truncate(src, dst, copied)


def _shift(directory: int, stream: str, keep: int) -> None:
    """`.k` → `.k+1` for k < keep (the oldest, and any beyond keep, dropped); `.1` stays, also linked as `.2`."""
    existing = sorted((i for i in _rotated_indexes(directory, stream)), reverse=True)
    for index in existing:
        if index >= keep:
            os.unlink(f"{stream}.{index}", dir_fd=directory)
        elif index >= 2:
            os.rename(f"{stream}.{index}", f"{stream}.{index + 1}", src_dir_fd=directory, dst_dir_fd=directory)
    if keep >= 2 and 1 in existing:
        os.link(f"{stream}.1", f"{stream}.2", src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)


def _rotated_indexes(directory: str | int, stream: str) -> list[int]:
    indexes = []
    for entry in os.listdir(directory):
        prefix, _, suffix = entry.rpartition(".")
        if prefix == stream and suffix.isdigit() and not suffix.startswith("0"):
            indexes.append(int(suffix))
    return indexes


def _copy_to_end_and_truncate(src: int, dst: int, offset: int) -> int:
    """Copy from `offset` to the end, then truncate `src`, without letting go of the GIL in between.

    Python would release the GIL around each syscall, and another thread of the agent could then
    hold it for up to a switch interval (5 ms) between the copy and the truncation: everything the
    command wrote in that time would be lost. Called through PyDLL, the two syscalls follow each
    other within microseconds. Returns the bytes copied.
    """
    off_in, off_out = ctypes.c_int64(offset), ctypes.c_int64(offset)
    while True:
        n = _libc.copy_file_range(src, ctypes.byref(off_in), dst, ctypes.byref(off_out), 1 << 30, 0)
        if n < 0:
            err = ctypes.get_errno()
            if err not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or off_in.value != offset:
                raise OSError(err, os.strerror(err))
            # No in-kernel copy on this filesystem: the plain way, with a wider window.
            done = _copy_range(src, dst, offset, os.fstat(src).st_size - offset)
            os.ftruncate(src, 0)
            return done
        if n == 0:
            break
    if _libc.ftruncate(src, 0) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return off_in.value - offset


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Copy in the kernel (copy_file_range, else sendfile); returns the bytes copied."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src, dst, count - done, offset + done, offset + done)
        except OSError:
            os.lseek(dst, offset + done, os.SEEK_SET)
            n = os.sendfile(dst, src, offset + done, count - done)
        if n == 0:
            break   # the file shrank under us (someone else truncated it)
        done += n
    return done


# Reading -------------------------------------------------------------------------------------------
#
# The container writes its sandbox: any name in it may be a link to a host file (`stderr.7 ->
# /etc/shadow`), a FIFO that would block a reader forever, or a device. `reconciler logs` runs as
# root, so every name is opened relative to the sandbox's fd and read only if it is a regular file
# reached without a link (fsutil.open_regular); anything else is skipped, and said so.

def files_of(directory: int, stream: str) -> list[str]:
    """The stream's file names in the sandbox `directory` (an fd), oldest first: stdout.N … stdout.1, stdout."""
    return [rotated(stream, i) for i in sorted(_rotated_indexes(directory, stream), reverse=True)] + [stream]


@contextmanager
def _sandbox_fd(sandbox: str | int) -> Iterator[int]:
    """`sandbox` as an fd: the caller's own, or opened (O_NOFOLLOW) and closed around the block."""
    if isinstance(sandbox, int):
        yield sandbox
        return
    fd = open_sandbox(sandbox)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_log(directory: int, name: str, skipped: list[str] | None = None) -> int | None:
    """An fd of the log file `name`, or None when it is missing or not a regular file (noted in `skipped`)."""
    try:
        return fsutil.open_regular(name, dir_fd=directory)
    except FileNotFoundError:
        return None
    except fsutil.UnsafeFileError as exc:
        if skipped is not None and str(exc) not in skipped:
            skipped.append(str(exc))
        return None


class History:
    """What a stream holds now, oldest first; `live_offset` is where the live file was read up to,
    so a follower takes over exactly there. `sandbox` is the sandbox's path or an fd of it; names that
    are not regular files are not read, and listed in `skipped` ("stderr.7 is a symbolic link, …")."""

    def __init__(self, sandbox: str | int, stream: str) -> None:
        self.sandbox, self.stream = sandbox, stream
        self.live_offset = 0
        self.skipped: list[str] = []

    def all(self) -> Iterator[bytes]:
        with _sandbox_fd(self.sandbox) as directory:
            names = files_of(directory, self.stream)
            for name in names:
                fd = _open_log(directory, name, self.skipped)
                if fd is None:
                    continue
                try:
                    while chunk := os.read(fd, 1 << 16):
                        if name == self.stream:
                            self.live_offset += len(chunk)
                        yield chunk
                finally:
                    os.close(fd)

    def tail(self, count: int) -> bytes:
        """The last `count` lines across the rotated files and the live one."""
        pieces: list[bytes] = []
        with _sandbox_fd(self.sandbox) as directory:
            for name in reversed(files_of(directory, self.stream)):
                data = _read_from(directory, name, 0, self.skipped)
                if data is None:
                    continue
                if name == self.stream:
                    self.live_offset = len(data)
                pieces.insert(0, data)
                if b"".join(pieces).count(b"\n") > count:
                    break
        if count <= 0:
            return b""
        return b"".join(b"".join(pieces).splitlines(keepends=True)[-count:])


class Follower:
    """Follows a live log file like `tail -F`. A rotation (a new `.1`) means the live file was copied
    there and truncated: what we had not read yet is read from `.1`, and we go on from 0. A replaced
    live file (another inode) is read from its start.

    `sandbox` is the sandbox's path (opened O_NOFOLLOW, closed by close()) or an fd of it (the
    caller's); every name is looked up in it, never through a link, and only regular files count.
    """

    def __init__(self, sandbox: str | int, stream: str, offset: int | None = None) -> None:
        self._own_directory = isinstance(sandbox, str)
        self.directory = open_sandbox(sandbox) if isinstance(sandbox, str) else sandbox
        self.stream = stream
        self.skipped: list[str] = []
        self._file: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None
        self._rotated_identity = self._identity_of(rotated(stream, 1))
        self._truncated_at = 0.0
        self.offset = 0
        self._open()
        if offset is not None:
            self.offset = offset
        elif self._file is not None:
            self.offset = os.fstat(self._file.fileno()).st_size

    def _open(self) -> None:
        fd = _open_log(self.directory, self.stream, self.skipped)
        if fd is None:
            self._file, self._identity = None, None
            return
        self._file = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._own_directory and self.directory >= 0:
            os.close(self.directory)
            self.directory = -1

    def read(self) -> bytes:
        """What was appended since the last call, across rotations."""
        out = b""
        rotated_identity = self._identity_of(rotated(self.stream, 1))
        if rotated_identity is not None and rotated_identity != self._rotated_identity:
            # Each rotation since the last read moved the first bytes of the live file to a new `.1`
            # (older ones shifted up, the `.1` we knew among them): take them in order.
            for name in self._rotated_since(self._rotated_identity):
                moved = self._size_of(name)
                if self.offset <= moved:
                    out += _read_from(self.directory, name, self.offset, self.skipped) or b""
                    self.offset = 0
                else:
                    self.offset -= moved
            self._truncated_at = 0.0
        self._rotated_identity = rotated_identity
        if self._file is None:
            self._open()
            self.offset = 0
        elif self._identity_of(self.stream) not in (None, self._identity):
            out += self._drain()      # the rest of the old file, then the new one from its start
            self._file.close()
            self._file = None
            self._open()
            self.offset = 0
        if self._file is None:
            return out
        if os.fstat(self._file.fileno()).st_size < self.offset:
            # Truncated, and no new `.1` yet: the rotation installs it right after; wait for it a
            # little, then take it for a truncation that kept nothing (--container_logger_keep 0).
            now = time.monotonic()
            self._truncated_at = self._truncated_at or now
            if now - self._truncated_at < TRUNCATION_GRACE:
                return out
            self.offset = 0
        self._truncated_at = 0.0
        return out + self._drain()

    def _rotated_since(self, known: tuple[int, int] | None) -> list[str]:
        """The rotated files newer than the `.1` we knew (found by inode), oldest first."""
        newer = []
        index = 1
        while True:
            identity = self._identity_of(rotated(self.stream, index))
            if identity is None or identity == known:
                break
            newer.append(rotated(self.stream, index))
            index += 1
        return newer[::-1]

    def _drain(self) -> bytes:
        assert self._file is not None
        self._file.seek(self.offset)
        data = self._file.read()
        self.offset += len(data)
        return data

    def _stat(self, name: str) -> os.stat_result | None:
        """The regular file `name` (lstat: a link or a FIFO is no log file), or None."""
        try:
            st = os.stat(name, dir_fd=self.directory, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def _identity_of(self, name: str) -> tuple[int, int] | None:
        st = self._stat(name)
        return None if st is None else (st.st_dev, st.st_ino)

    def _size_of(self, name: str) -> int:
        st = self._stat(name)
        return 0 if st is None else st.st_size


def _read_from(directory: int, name: str, offset: int, skipped: list[str] | None = None) -> bytes | None:
    """The regular file `name` from `offset` on; None when it is missing or not a regular file."""
    fd = _open_log(directory, name, skipped)
    if fd is None:
        return None
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def follow(follower: Follower, still_running: Callable[[], bool], interval: float = 0.2) -> Iterator[bytes]:
    """Yield what is appended until `still_running()` says the container is gone (then a last drain)."""
    try:
        while True:
            running = still_running()
            data = follower.read()
            if data:
                yield data
            if not running:
                return
            if not data:
                time.sleep(interval)
    finally:
        follower.close()


# The agent's side ----------------------------------------------------------------------------------

class LogRotator:
    """On each statistics pass, rotate what is over its limit, in a thread (never blocks the loop)."""

    def __init__(self, policy: RotationPolicy) -> None:
        self.policy = policy
        self._task: asyncio.Future[None] | None = None
        self.rotations = 0

    def check(self, sandboxes: list[str]) -> None:
        """Start a pass unless one is still under way."""
        if not self.policy.enabled or not sandboxes or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.ensure_future(asyncio.to_thread(self._pass, list(sandboxes)))

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def _pass(self, sandboxes: list[str]) -> None:
        for sandbox in sandboxes:
            try:
                for path in rotate_if_needed(sandbox, self.policy):
                    self.rotations += 1
                    log.debug("Rotated %s", path)
            except OSError as exc:
                log.warning("Failed to rotate the logs in %s: %s", sandbox, exc)
