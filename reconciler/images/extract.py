"""Safe extraction of one image layer (an untrusted tar stream) into a fresh directory.

Every write goes through directory file descriptors opened with O_NOFOLLOW, one path component at a
time, and every file is created with O_EXCL after removing what was there: a member can never make a
later one write through a symlink (`a -> /etc` then `a/passwd` is refused), whatever order they come
in. Symlinks themselves are kept whatever their target: absolute ones (`/bin/busybox`) and relative
ones that climb above the layer (`usr/lib/foo -> ../../../../lib/foo`, which Docker and Mesos accept)
resolve inside the container's root, where `..` stops at `/`; on the host nothing is ever written or
read through them. Refused, each with an UnsafeArchive error naming the archive, the layer and the
member: absolute member names, `..` components, hard links to anything outside the layer or not yet in
it, block and character devices, unknown member types, and a layer that expands past its limit.

Sizes are counted by what the members expand to, not by the tar stream: a sparse file (GNU tar's old
'S' members and its PAX 0.0, 0.1 and 1.0 formats, as tarfile reads them: `TarInfo.size` is the full
size, the stream holds only the data segments of `TarInfo.sparse`) counts at its full size, and is
written with its holes, so it takes on disk only what its data takes. The layer's uncompressed tar
stream is counted too (so a gzip bomb stops at the limit), and the headers of one member (PAX records,
GNU long names, sparse maps) may take at most MAX_HEADER_BYTES, as Go's archive/tar bounds them: tarfile
would read them into memory whatever their size. FIFOs are kept, as Docker keeps them.

Docker's whiteouts become overlayfs's at extraction, as Mesos's convertWhiteouts does after untar:
`.wh.<name>` → a 0/0 character device `<name>`, `.wh..wh..opq` → `trusted.overlay.opaque=y` on the
directory. Modes (setuid included), owners, mtimes and the `security.capability` and `user.*` xattrs
are kept; other xattrs (`trusted.*` could steer overlayfs) are dropped.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable, cast

from reconciler.images.errors import ArchiveError, DigestMismatch, ImageError, UnsafeArchive

DEFAULT_MAX_LAYER_BYTES = 8 << 30
MAX_HEADER_BYTES = 1 << 20   # all the headers of one member: PAX records, GNU long names, sparse maps
MAX_HEADER_CHAIN = 32        # extended headers before one member (a PAX header, a long name, ...)
WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
KEPT_XATTRS = ("security.capability", "user.")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


@dataclass
class LayerStats:
    diff_id: str        # "sha256:<hex>" of the uncompressed tar stream
    entries: int        # members written (whiteouts included, the root entry not)
    bytes: int          # bytes the regular files expand to (a sparse file at its full size)


class HeadersTooLarge(Exception):
    """A member's headers go past MAX_HEADER_BYTES or MAX_HEADER_CHAIN; the caller names the archive."""


class _HeaderBudget:
    """tarfile's stream while it parses one member's headers: a read past `left` bytes raises
    HeadersTooLarge before anything is read, and one at the end of the stream raises ReadError (tarfile's
    PAX 1.0 map reader would fail on it with a bare ValueError)."""

    def __init__(self, f: Any, left: int) -> None:
        self.f, self.left = f, left

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise HeadersTooLarge()
        data = self.f.read(size)
        self.left -= len(data)
        if size and not data:
            raise tarfile.ReadError("unexpected end of data in a member's headers")
        return data

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, *whence: int) -> int:
        return self.f.seek(pos, *whence)


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo with the headers of each member bounded (pass it as `tarinfo=` to tarfile.open).

    tarfile reads a PAX header or a GNU long name whole, whatever size it declares, reads every extension
    block of an old GNU sparse map and every line of a PAX 1.0 map, and follows extended headers by
    recursion: all that one member's header processing reads is bounded here by MAX_HEADER_BYTES, and
    the recursion by MAX_HEADER_CHAIN. Member data is read by the caller, outside this."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        depth = getattr(tarfile, "_header_depth", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise HeadersTooLarge()
        real = tarfile.fileobj
        if depth == 0:
            tarfile.fileobj = _HeaderBudget(real, MAX_HEADER_BYTES)  # type: ignore[assignment]
        tarfile._header_depth = depth + 1  # type: ignore[attr-defined]
        try:
            return super()._proc_member(tarfile)  # type: ignore[misc]
        finally:
            tarfile._header_depth = depth  # type: ignore[attr-defined]
            tarfile.fileobj = real


class ReadStream(io.RawIOBase):
    """A raw stream defined by its read(n), which returns what it has (never copied to fill a buffer);
    readinto, which BufferedReader and RawIOBase.read use, goes through it."""

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer: Any) -> int:
        if not len(buffer):
            return 0               # (read(0) may mean "what you have" to a subclass)
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Counted(ReadStream):
    """Hashes and counts what passes through; past `limit` bytes it raises `over_limit()`."""

    def __init__(self, f: IO[bytes], limit: int | None = None, over_limit: object = None, hashing: bool = True) -> None:
        self.f, self.limit, self.over_limit = f, limit, over_limit
        self.sha = hashlib.sha256()
        self.hashing = hashing
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        """What the stream gives, as it gives it (RawIOBase.read would copy it twice)."""
        data = self.f.read(-1 if n is None else n)
        if not data:
            return b""
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise self.over_limit()  # type: ignore[operator]
        if self.hashing:
            self.sha.update(data)
        return data


_GZIP_FEXTRA, _GZIP_FNAME, _GZIP_FCOMMENT, _GZIP_FHCRC = 4, 8, 16, 2
_GZIP_MAX_FIELD = 64 << 10     # of a member's file name or comment


class _Gunzip(ReadStream):
    """gzip members one after the other (RFC 1952, NUL padding after the last tolerated, as gzip does),
    inflated by zlib without the CRC-32 of each member: the layer's sha256 digests (of the blob, and of
    the tar, its diff_id) are what vouch for its bytes, and the CRC took as long as inflating. Each
    member's length (ISIZE) is still checked. Errors are gzip.BadGzipFile, EOFError or zlib.error."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.pending = b""           # read ahead: what follows a member's end (its trailer, the next header)
        self.at = 0                  # how much of `pending` was consumed (no copy of the rest per read)
        self.inflater: Any = None
        self.size = 0
        self.done = False

    def _fill(self) -> bool:
        """Something unconsumed in `pending`; False at the end of the stream."""
        if self.at < len(self.pending):
            return True
        self.pending, self.at = self.f.read(_GZIP_READ), 0
        return bool(self.pending)

    def _read(self, n: int) -> bytes:
        if not self._fill():
            return b""
        data = self.pending[self.at:self.at + n]
        self.at += len(data)
        return data

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self._read(n - len(data))
            if not more:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            data += more
        return data

    def _zero_terminated(self) -> None:
        seen = 0
        while self._fill():
            end = self.pending.find(b"\0", self.at)
            if end >= 0:
                seen += end - self.at
                self.at = end + 1
                if seen > _GZIP_MAX_FIELD:
                    break
                return
            seen += len(self.pending) - self.at
            self.at = len(self.pending)
            if seen > _GZIP_MAX_FIELD:
                break
        else:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        raise gzip.BadGzipFile(f"a gzip header field is longer than {_GZIP_MAX_FIELD} bytes")

    def _start_member(self) -> bool:
        while self._fill():          # NUL padding after the last member, skipped in bulk
            self.at = _NULS.match(self.pending, self.at).end()   # type: ignore[union-attr]
            if self.at < len(self.pending):
                break
        magic = self._read(1)
        if not magic:
            return False
        magic += self._exact(1)
        if magic != b"\x1f\x8b":
            raise gzip.BadGzipFile(f"Not a gzipped file ({magic!r})")
        method, flags = self._exact(2)
        if method != 8:
            raise gzip.BadGzipFile("Unknown compression method")
        self._exact(6)              # mtime, extra flags, OS
        if flags & _GZIP_FEXTRA:
            self._exact(int.from_bytes(self._exact(2), "little"))
        if flags & _GZIP_FNAME:
            self._zero_terminated()
        if flags & _GZIP_FCOMMENT:
            self._zero_terminated()
        if flags & _GZIP_FHCRC:
            self._exact(2)
        self.inflater, self.size = zlib.decompressobj(-zlib.MAX_WBITS), 0
        return True

    def _end_member(self) -> None:
        self.pending, self.at = self.inflater.unused_data + self.pending[self.at:], 0
        trailer = self._exact(8)
        if int.from_bytes(trailer[4:], "little") != self.size & 0xFFFFFFFF:
            raise gzip.BadGzipFile("Incorrect length of data produced")
        self.inflater = None

    def read(self, n: int | None = -1) -> bytes:
        """Up to n inflated bytes (any positive number when n is -1 or None), b"" at the end."""
        n = n if n is not None and n > 0 else _CHUNK
        while not self.done:
            if self.inflater is None and not self._start_member():
                self.done = True
                break
            inflater = self.inflater
            if inflater.eof:
                self._end_member()
                continue
            if inflater.unconsumed_tail:
                data = inflater.decompress(inflater.unconsumed_tail, n)
            else:
                chunk = self._read(_GZIP_READ)
                data = inflater.decompress(chunk, n)
                if not chunk and not data:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            if data:
                self.size += len(data)
                return data
        return b""


_GZIP_READ = 256 << 10
_NULS = re.compile(rb"\0*")


class _Prepended(ReadStream):
    """`head` (read to see the format), then the rest of the stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int | None = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.rest.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.rest.read(-1 if n is None else n)


def _decompressed(stream: IO[bytes], where: str) -> IO[bytes]:
    """The layer's tar stream, whatever compressed it. Its first bytes are read until there are six (a
    stream may hand them over one at a time: a download's first chunk), then put back in front."""
    magic = b""
    while len(magic) < 6:
        more = stream.read(6 - len(magic))
        if not more:
            break
        magic += more
    buffered = cast(IO[bytes], _Prepended(magic, stream))
    if magic[:2] == b"\x1f\x8b":
        return cast(IO[bytes], _Gunzip(buffered))
    if magic[:3] == b"BZh":
        return bz2.BZ2File(buffered)
    if magic[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered)
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        raise ArchiveError(f"{where} is zstd-compressed, which this store does not support "
                           "(re-save the image with gzip or uncompressed layers)")
    return buffered


class _Extractor:
    def __init__(self, root_fd: int, where: str, max_bytes: int, budget: int | None,
                 over_budget: Callable[[str, int], ImageError] | None,
                 charge: Callable[[str, int], None] | None = None) -> None:
        self.charge = charge
        self.root_fd = root_fd
        self.where = where
        self.max_bytes = max_bytes
        self.budget = budget
        self.over_budget = over_budget
        self.is_root = os.geteuid() == 0
        self.dir_times: list[tuple[list[str], int]] = []
        self.entries = 0
        self.bytes = 0
        self.name = ""

    def refuse(self, why: str) -> UnsafeArchive:
        return UnsafeArchive(f"Refusing {self.where}: member '{self.name}': {why}")

    def components(self, name: str, what: str = "path") -> list[str]:
        if name.startswith("/"):
            raise self.refuse(f"absolute {what} '{name}'")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(f"{what} '{name}' contains '..'")
        return parts

    def open_dir(self, parts: list[str], create: bool) -> int:
        """An fd of the directory `parts` under the root, never crossing a symlink; missing ones made 0755."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self.refuse(f"'{'/'.join(parts[:i + 1])}' is a symlink or not a directory, "
                                          "and the store never writes through one") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def remove(parent: int, base: str, keep_dir: bool = False) -> None:
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                shutil.rmtree(base, dir_fd=parent)
        else:
            os.unlink(base, dir_fd=parent)

    def owner_mode(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.is_root:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)  # after chown, which clears setuid
        self.xattrs(fd, m)

    def xattrs(self, fd: int, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr."):]
            if not attr.startswith(KEPT_XATTRS):
                continue
            os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))

    def count(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> list[tuple[int, int]] | None:
        """Add a regular member's expanded size to the layer's before a byte of it is written: refused past
        the layer's limit or the image's budget. Returns a sparse member's checked data segments."""
        spans = self.sparse_spans(tar, m) if m.sparse is not None else None
        if m.size < 0:
            raise self.refuse(f"negative size {m.size}")
        size = f"{m.size} bytes"
        if spans is not None:
            size += f" (a sparse file, {sum(n for _, n in spans)} bytes of it in the layer)"
        total = self.bytes + m.size
        if self.budget is not None and total > self.budget:
            raise (self.over_budget(m.name, total) if self.over_budget is not None else
                   self.refuse(f"{size} take the layer to {total} bytes, over its budget of {self.budget} bytes"))
        if m.size > self.max_bytes:
            raise self.refuse(f"{size} is over the layer size limit of {self.max_bytes} bytes")
        if total > self.max_bytes:
            raise self.refuse(f"{size} take the layer to {total} bytes, over its size limit of "
                              f"{self.max_bytes} bytes")
        if self.charge is not None:
            self.charge(m.name, m.size)     # the image's budget, shared with layers extracted beside this one
        self.bytes = total
        return spans

    def sparse_spans(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> list[tuple[int, int]]:
        """The map's data segments, ascending, apart and inside the file, holding no more than the stream has."""
        spans: list[tuple[int, int]] = []
        end = stored = 0
        for offset, length in cast("list[tuple[int, int]]", m.sparse or []):
            if offset < 0 or length < 0 or offset + length > m.size:
                raise self.refuse(f"sparse map segment of {length} bytes at {offset} lies outside the "
                                  f"file's {m.size} bytes")
            if not length:
                continue  # GNU tar's unused slots and end marker
            if offset < end:
                raise self.refuse("sparse map segments overlap or are out of order")
            spans.append((offset, length))
            end = offset + length
            stored += length
        in_stream = tar.offset - m.offset_data  # tarfile has set tar.offset to the next member's header
        if stored > in_stream:
            raise self.refuse(f"sparse map names {stored} bytes of data, the member holds {in_stream}")
        return spans

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.name = m.name
        parts = self.components(m.name)
        if not parts:  # the layer's root entry ('./')
            if m.isdir():
                self.owner_mode(self.root_fd, m)
                self.dir_times.append(([], _ns(m.mtime)))
            return
        if m.ischr() or m.isblk():
            raise self.refuse(f"device node ({'character' if m.ischr() else 'block'} "
                              f"{m.devmajor}:{m.devminor}) in an image layer")
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
            raise self.refuse(f"unsupported tar member type {m.type!r}")
        base = parts[-1]
        parent = self.open_dir(parts[:-1], create=True)
        try:
            self.entries += 1
            if base.startswith(WHITEOUT_PREFIX):
                self.whiteout(parent, base)
            elif m.isdir():
                self.directory(parent, base, parts, m)
            elif m.isreg():
                self.regular(tar, parent, base, m, self.count(tar, m))
            elif m.issym():
                self.symlink(parent, base, m)
            elif m.islnk():
                self.hardlink(parent, base, parts, m)
            else:
                self.remove(parent, base)
                os.mkfifo(base, 0o600, dir_fd=parent)
                fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                try:
                    self.owner_mode(fd, m)
                    os.utime(fd, ns=(_ns(m.mtime), _ns(m.mtime)))
                finally:
                    os.close(fd)
        finally:
            os.close(parent)

    def whiteout(self, parent: int, base: str) -> None:
        if base == WHITEOUT_OPAQUE:
            try:
                os.setxattr(parent, OPAQUE_XATTR, b"y")
            except OSError as e:
                raise ImageError(f"Failed to set extended attribute '{OPAQUE_XATTR}' for {self.where}, "
                                 f"member '{self.name}': {e.strerror} (this needs root)") from None
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # aufs's own metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to hide
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", ".."):
            raise self.refuse(f"whiteout of '{hidden}'")
        self.remove(parent, hidden)
        try:
            os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
        except OSError as e:
            raise ImageError(f"Failed to create character device for whiteout in {self.where}, "
                             f"member '{self.name}': {e.strerror} (this needs root)") from None

    def directory(self, parent: int, base: str, parts: list[str], m: tarfile.TarInfo) -> None:
        self.remove(parent, base, keep_dir=True)  # a directory already there is updated, not emptied
        try:
            os.mkdir(base, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
        try:
            self.owner_mode(fd, m)
        finally:
            os.close(fd)
        self.dir_times.append((parts, _ns(m.mtime)))

    def regular(self, tar: tarfile.TarFile, parent: int, base: str, m: tarfile.TarInfo,
                spans: list[tuple[int, int]] | None) -> None:
        self.remove(parent, base)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            if spans is None:
                src = tar.extractfile(m)
                assert src is not None
                while chunk := src.read(_CHUNK):
                    _write_at(fd, chunk, None)
            else:
                self.write_sparse(tar, fd, m, spans)
            self.owner_mode(fd, m)
            os.utime(fd, ns=(_ns(m.mtime), _ns(m.mtime)))
        finally:
            os.close(fd)

    @staticmethod
    def write_sparse(tar: tarfile.TarFile, fd: int, m: tarfile.TarInfo, spans: list[tuple[int, int]]) -> None:
        """Each data segment at its offset; the rest is left a hole by ftruncate, taking no disk. Read from
        tarfile's stream as TarFile.makefile does: its ExFileObject would hand us the holes as zeros."""
        source = tar.fileobj
        assert source is not None
        source.seek(m.offset_data)
        for offset, length in spans:
            done = 0
            while done < length:
                chunk = source.read(min(_CHUNK, length - done))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                _write_at(fd, chunk, offset + done)
                done += len(chunk)
        os.ftruncate(fd, m.size)

    def symlink(self, parent: int, base: str, m: tarfile.TarInfo) -> None:
        # Kept whatever it points at (see the module's docstring): open_dir never crosses it.
        target = m.linkname
        if not target:
            raise self.refuse("symlink with an empty target")
        self.remove(parent, base)
        os.symlink(target, base, dir_fd=parent)
        if self.is_root:
            os.chown(base, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        os.utime(base, ns=(_ns(m.mtime), _ns(m.mtime)), dir_fd=parent, follow_symlinks=False)

    def hardlink(self, parent: int, base: str, parts: list[str], m: tarfile.TarInfo) -> None:
        target = self.components(m.linkname, "hard link target")
        if not target:
            raise self.refuse("hard link to the layer root")
        if target == parts:
            return
        try:
            tparent = self.open_dir(target[:-1], create=False)
        except FileNotFoundError:
            raise self.refuse(f"hard link target '{m.linkname}' is not in the layer") from None
        try:
            try:
                st = os.stat(target[-1], dir_fd=tparent, follow_symlinks=False)
            except FileNotFoundError:
                raise self.refuse(f"hard link target '{m.linkname}' is not in the layer") from None
            if stat.S_ISDIR(st.st_mode):
                raise self.refuse(f"hard link to the directory '{m.linkname}'")
            self.remove(parent, base)
            os.link(target[-1], base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tparent)

    def finish(self) -> None:
        for parts, mtime in reversed(self.dir_times):
            try:
                fd = self.open_dir(parts, create=False)
            except (OSError, UnsafeArchive):
                continue  # replaced by a later member; nothing of ours to date
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


def _ns(mtime: float) -> int:
    return int(mtime * 1_000_000_000)


def _write_at(fd: int, data: bytes, offset: int | None) -> None:
    """All of `data`, at the file position (offset None) or at `offset`."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def extract_layer(stream: IO[bytes], rootfs: str, *, where: str, max_bytes: int = DEFAULT_MAX_LAYER_BYTES,
                  diff_id: str | None = None, digest: str | None = None, size: int | None = None,
                  budget: int | None = None,
                  over_budget: Callable[[str, int], ImageError] | None = None,
                  charge: Callable[[str, int], None] | None = None) -> LayerStats:
    """Unpack the layer tar (plain, gzip, bzip2 or xz) read from `stream` into the existing empty
    directory `rootfs`; verify the blob's `digest`/`size` and the uncompressed `diff_id` when given.

    `max_bytes` bounds both what the layer's files expand to and its uncompressed tar stream. `budget`:
    the bytes its files may expand to within the image; past it, `over_budget(member, bytes so far)` is
    raised. `charge(member, size)`: called before a member's bytes are written (the image's budget
    when layers are extracted side by side; it raises to refuse). `where` names the layer for messages
    ("layer 'x/layer.tar' of archive '/r/busybox.tar'"). On any error the directory is left half-written:
    the caller extracts into a staging directory and drops it.
    """
    def over() -> UnsafeArchive:
        return UnsafeArchive(f"Refusing {where}: the uncompressed layer is over the size limit of {max_bytes} bytes")

    raw = _Counted(stream, hashing=digest is not None)
    # A registry's stream is verified as it downloads (no digest or size given here): read as it is.
    raw_buf = stream if digest is None and size is None else io.BufferedReader(raw, _CHUNK)
    root_fd = os.open(rootfs, _DIR_FLAGS)
    ex = _Extractor(root_fd, where, max_bytes, budget, over_budget, charge)
    try:
        try:
            plain = _decompressed(raw_buf, where)
            # Counted below tarfile's buffer, which reads ahead by up to _CHUNK (1 MiB reads: a tenth of
            # the hashing and decompressing calls of its 10 KiB records): the stream may pass the limit by
            # that read-ahead, so that a member over the limit is refused by name, at its header, first.
            tar_stream = _Counted(plain, max_bytes + _CHUNK, over)
            with tarfile.open(fileobj=tar_stream, mode="r|", tarinfo=BoundedTarInfo, bufsize=_CHUNK) as tar:
                for m in tar:
                    ex.member(tar, m)
            while tar_stream.read(_CHUNK):  # the end-of-archive blocks and padding count in the digests
                pass
            while raw_buf.read(_CHUNK):
                pass
        except HeadersTooLarge:
            after = f" after member '{ex.name}'" if ex.name else ""
            raise UnsafeArchive(f"Refusing {where}: the headers of a member{after} (PAX records, GNU long names, "
                                f"sparse map) take more than {MAX_HEADER_BYTES} bytes or chain more than "
                                f"{MAX_HEADER_CHAIN} extended headers") from None
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, ValueError) as e:
            # ValueError: tarfile's own parsing of a malformed sparse map or number, or a NUL in a name.
            raise ArchiveError(f"Failed to read {where}: {e}") from None
        except OSError as e:
            name = f", member '{ex.name}'" if ex.name else ""
            raise ArchiveError(f"Failed to extract {where}{name}: {e.strerror or e}") from None
        ex.finish()
    finally:
        os.close(root_fd)
    if digest is not None and "sha256:" + raw.sha.hexdigest() != digest:
        raise DigestMismatch(f"{where[0].upper()}{where[1:]} has digest sha256:{raw.sha.hexdigest()}, "
                             f"expected {digest}")
    if size is not None and raw.count != size:
        raise DigestMismatch(f"{where[0].upper()}{where[1:]} is {raw.count} bytes, its descriptor says {size}")
    actual = "sha256:" + tar_stream.sha.hexdigest()
    if diff_id is not None and actual != diff_id:
        raise DigestMismatch(f"{where[0].upper()}{where[1:]} has diff_id {actual}, the image config says {diff_id}")
    return LayerStats(diff_id=actual, entries=ex.entries, bytes=ex.bytes)


def hash_layer(stream: IO[bytes], *, where: str, max_bytes: int = DEFAULT_MAX_LAYER_BYTES) -> tuple[str, int]:
    """(diff_id, uncompressed size) of a layer whose format does not state it (legacy docker save)."""
    def over() -> UnsafeArchive:
        return UnsafeArchive(f"Refusing {where}: the uncompressed layer is over the size limit of {max_bytes} bytes")

    raw_buf = io.BufferedReader(_Counted(stream), _CHUNK)
    try:
        counted = _Counted(_decompressed(raw_buf, where), max_bytes, over)
        while counted.read(_CHUNK):
            pass
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
        raise ArchiveError(f"Failed to read {where}: {e}") from None
    return "sha256:" + counted.sha.hexdigest(), counted.count
