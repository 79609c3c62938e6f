"""Files the agent writes and reads in directories someone else may also write: never through a link.

Atomic replacement is what checkpoints (durable) and status files (atomic for readers) are written
with; the opening helpers are what every reader of a directory the agent does not own alone uses
(a container's sandbox, a status directory an operator made group-writable).

The rules, each closing an attack seen on this machine:
- A temp file has a name nobody can guess (128 random bits), is created O_EXCL|O_NOFOLLOW in the
  target's own directory (an fd, so a renamed directory cannot redirect it) and stays 0600 until it
  holds the whole content: a name planted in advance, a link included, is never opened, and nobody
  reads a half-written file. The rename replaces whatever the target name is, a link included,
  without following it.
- A reader opens a name O_NOFOLLOW|O_NONBLOCK and reads it only when fstat says it is a regular
  file: a link planted at the name is refused, a FIFO never blocks the reader, a device is never read.
- A reader bounds what it reads: a file grown to gigabytes is an error, not an out-of-memory.

Configuration an operator names (a manifest, a CNI configuration: read_config_file) is the one
exception to the first reader's rule: a link there is followed, as a ConfigMap's files are links
into its `..data` directory. The rest holds: never a FIFO or a device, never more than a bound.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import time
from typing import Any, Callable

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer (it is refused right after).
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
MAX_JSON_BYTES = 16 * 1024 * 1024    # a checkpoint or status document is a few KiB; a launch info tens


class UnsafeFileError(OSError, ValueError):
    """A name that is not a plain regular file (a link, a FIFO, a device) or a file too large to be ours.

    An OSError (EPERM), as a file that cannot be opened, for code that reads files; and a ValueError
    for readers of documents, which already treat a document they cannot parse as corrupt.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NotRegularFileError(UnsafeFileError):
    """A link, a FIFO, a device or a directory where a regular file was expected."""


class FileTooLargeError(UnsafeFileError):
    """A file larger than its reader takes: `size` as fstat said, None when it grew past `limit` as it was read."""

    def __init__(self, name: str, limit: int, size: int | None = None) -> None:
        self.limit, self.size = limit, size
        super().__init__(f"{name} is larger than {limit} bytes" if size is None
                         else f"{name} is {size} bytes, larger than {limit}")


def open_dir(path: str, *, dir_fd: int | None = None, follow: bool = True) -> int:
    """An fd of the directory `path`; with follow=False a link at its last component is refused (ELOOP)."""
    return os.open(path, DIR_FLAGS | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)


def open_regular(name: str, *, dir_fd: int | None = None, flags: int = os.O_RDONLY,
                 single_link: bool = False) -> int:
    """An fd of `name` (relative to `dir_fd`), only if it is a regular file reached without a link.

    The lstat before the open keeps a planted FIFO or device from ever being opened (opening a device
    can act: a tape rewinds, a tty becomes the controlling one); the fstat after it is the check that
    counts, made on what was really opened, so a swap in between cannot win. single_link refuses a
    hard link too (a writer must not reach another file through it). Raises UnsafeFileError, or the
    OSError of the open (FileNotFoundError for a missing name).
    """
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    _check_regular(name, before, single_link)
    try:
        fd = os.open(name, flags | FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:   # became a link since the lstat
            raise NotRegularFileError(f"{name} is a symbolic link, not a regular file") from None
        raise
    try:
        _check_regular(name, os.fstat(fd), single_link)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(name: str, st: os.stat_result, single_link: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{name} is {describe_type(st.st_mode)}, not a regular file")
    if single_link and st.st_nlink != 1:
        raise UnsafeFileError(f"{name} has {st.st_nlink} hard links; a regular file with a single link was expected")


def describe_type(mode: int) -> str:
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "of an unknown type"


def read_fd(fd: int, limit: int, name: str) -> bytes:
    """All of `fd` from its current offset, at most `limit` bytes (UnsafeFileError beyond)."""
    chunks, size = [], 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FileTooLargeError(name, limit)
    return b"".join(chunks)


def read_config_file(path: str, *, limit: int,
                     check: Callable[[int, os.stat_result], None] | None = None) -> tuple[os.stat_result, bytes]:
    """The content of the regular file an operator names at `path`, links followed, and its fstat.

    O_NONBLOCK: a FIFO at the name must not hang the reader in open(); it is refused right after.
    Every check is made on the opened fd, so whatever the name pointed to when it was looked at, this
    is what is read. `check(fd, st)` may refuse the file by raising, before any of it is read.

    Raises NotRegularFileError, FileTooLargeError (a file over `limit`, or grown past it while read),
    or the OSError of the open or the read (FileNotFoundError for a missing name).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _check_regular(path, st, single_link=False)
        if check is not None:
            check(fd, st)
        if st.st_size > limit:
            raise FileTooLargeError(path, limit, st.st_size)
        return st, read_fd(fd, limit, path)
    finally:
        os.close(fd)


def create_temp(dir_fd: int, name: str, mode: int = 0o600) -> tuple[int, str]:
    """A new file in `dir_fd` named `.<name>.<random>.tmp`, created O_EXCL|O_NOFOLLOW; returns (fd, its name).

    The name is unpredictable, so no one can plant anything at it; O_EXCL|O_NOFOLLOW still refuse
    whatever is there should someone guess it.
    """
    for _ in range(8):
        temp = f".{name}.{secrets.token_hex(16)}.tmp"
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE_FLAGS, mode, dir_fd=dir_fd), temp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"cannot create a temp file for {name}: every random name was taken")


_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
STALE_TEMP_SECS = 60.0   # no write of ours takes a minute between create_temp and its rename


def remove_stale_temps(directory: str, older_than: float = STALE_TEMP_SECS) -> int:
    """Remove what create_temp left in `directory` when its process was killed before the rename.
    Only its own names, only regular files, and only old ones: another process may be writing now."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def fsync_dir(path: str | int) -> None:
    fd = open_dir(path) if isinstance(path, str) else path
    try:
        os.fsync(fd)
    finally:
        if isinstance(path, str):
            os.close(fd)


def atomic_write(path: str, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, never a part.

    The new file gets exactly `mode` (not masked by the umask), once complete. durable=True
    (checkpoints) also fsyncs the file and its directory, so the write survives a power loss; status
    files, which the agent regenerates at start, skip that cost.
    """
    directory = open_dir(os.path.dirname(path) or ".")
    try:
        name = os.path.basename(path)
        fd, temp = create_temp(directory, name)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=directory)
            except FileNotFoundError:
                pass
            raise
        if durable:
            fsync_dir(directory)
    finally:
        os.close(directory)


def atomic_write_json(path: str, doc: Any, *, durable: bool = True, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode(), durable=durable, mode=mode)


def read_bytes(path: str, *, limit: int, dir_fd: int | None = None) -> bytes | None:
    """The content of the regular file `path`, never through a link at its last component; None when missing.

    Raises UnsafeFileError for a link, a non-regular file or one larger than `limit`.
    """
    try:
        fd = open_regular(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        return read_fd(fd, limit, path)
    finally:
        os.close(fd)


def read_json(path: str, *, limit: int = MAX_JSON_BYTES) -> Any | None:
    """The document at `path`, or None when the file is missing or empty (a write never completed).

    For files only the agent writes (checkpoints, status files): a link or a non-regular file there
    was planted, and is refused (UnsafeFileError, a ValueError, as a document that does not parse).
    """
    data = read_bytes(path, limit=limit)
    if data is None or not data.strip():
        return None
    return json.loads(data)
