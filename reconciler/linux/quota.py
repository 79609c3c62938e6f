"""XFS project quotas through the kernel's own interfaces: the FS_IOC_FSGETXATTR/FSSETXATTR ioctls
for a directory's project id, quotactl(2) for limits and usage. No xfs_quota output is parsed.

What Mesos's isolators/xfs/utils.cpp does with xfsctl() and libblkid, done with ctypes:

- a directory joins project P by FS_IOC_FSSETXATTR with fsx_projid = P and FS_XFLAG_PROJINHERIT, so
  every file later created below it is charged to P by the kernel;
- limits and usage of P are read and set with quotactl(Q_XGETQUOTA / Q_XSETQLIM, PRJQUOTA), in
  512-byte "basic blocks"; the filesystem is named by an open fd (quotactl_fd, Linux 5.14) or, on
  older kernels, by its block device;
- whether project quotas are on is Q_XGETQSTATV's FS_QUOTA_PDQ_ACCT / FS_QUOTA_PDQ_ENFD bits.

The struct layouts below are the kernel ABI of <linux/fs.h> and <linux/dqblk_xfs.h>, the same on
every Linux architecture (fixed-width fields, natural alignment); tests/test_linux_quota.py checks
each size and offset, and against the C headers where a compiler is at hand.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import os
import stat as stat_module
from dataclasses import dataclass

from reconciler.linux.mountinfo import read_mountinfo
from reconciler.linux.syscalls import syscall_number

# --- ioctl numbers ---------------------------------------------------------------------------

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    """The kernel's _IOC(dir, type, nr, size) (asm-generic/ioctl.h: nr 8 bits, type 8, size 14, dir 2)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


# --- struct fsxattr (<linux/fs.h>) -------------------------------------------------------------

class FsXattr(ctypes.Structure):
    """struct fsxattr, 28 bytes:

        off  size  field
          0     4  fsx_xflags      FS_XFLAG_* (PROJINHERIT = 0x200)
          4     4  fsx_extsize
          8     4  fsx_nextents    (get only)
         12     4  fsx_projid      the project id: 0 = none
         16     4  fsx_cowextsize
         20     8  fsx_pad
    """
    _fields_ = [
        ("fsx_xflags", ctypes.c_uint32),
        ("fsx_extsize", ctypes.c_uint32),
        ("fsx_nextents", ctypes.c_uint32),
        ("fsx_projid", ctypes.c_uint32),
        ("fsx_cowextsize", ctypes.c_uint32),
        ("fsx_pad", ctypes.c_ubyte * 8),
    ]


FS_IOC_FSGETXATTR = _ioc(_IOC_READ, "X", 31, ctypes.sizeof(FsXattr))    # 0x801c581f
FS_IOC_FSSETXATTR = _ioc(_IOC_WRITE, "X", 32, ctypes.sizeof(FsXattr))   # 0x401c5820
FS_XFLAG_PROJINHERIT = 0x00000200

# --- struct fs_disk_quota (<linux/dqblk_xfs.h>) -----------------------------------------------

class FsDiskQuota(ctypes.Structure):
    """struct fs_disk_quota (fs_disk_quota_t), 112 bytes; block counts are 512-byte basic blocks:

        off  size  field
          0     1  d_version        FS_DQUOT_VERSION (1)
          1     1  d_flags          FS_PROJ_QUOTA (2) for a project
          2     2  d_fieldmask      FS_DQ_* bits: which limits Q_XSETQLIM sets
          4     4  d_id             the project id
          8     8  d_blk_hardlimit
         16     8  d_blk_softlimit
         24     8  d_ino_hardlimit
         32     8  d_ino_softlimit
         40     8  d_bcount         blocks in use
         48     8  d_icount         inodes in use
         56     4  d_itimer
         60     4  d_btimer
         64     2  d_iwarns
         66     2  d_bwarns
         68     1  d_itimer_hi
         69     1  d_btimer_hi
         70     1  d_rtbtimer_hi
         71     1  d_padding2
         72     8  d_rtb_hardlimit
         80     8  d_rtb_softlimit
         88     8  d_rtbcount
         96     4  d_rtbtimer
        100     2  d_rtbwarns
        102     2  d_padding3
        104     8  d_padding4
    """
    _fields_ = [
        ("d_version", ctypes.c_int8),
        ("d_flags", ctypes.c_int8),
        ("d_fieldmask", ctypes.c_uint16),
        ("d_id", ctypes.c_uint32),
        ("d_blk_hardlimit", ctypes.c_uint64),
        ("d_blk_softlimit", ctypes.c_uint64),
        ("d_ino_hardlimit", ctypes.c_uint64),
        ("d_ino_softlimit", ctypes.c_uint64),
        ("d_bcount", ctypes.c_uint64),
        ("d_icount", ctypes.c_uint64),
        ("d_itimer", ctypes.c_int32),
        ("d_btimer", ctypes.c_int32),
        ("d_iwarns", ctypes.c_uint16),
        ("d_bwarns", ctypes.c_uint16),
        ("d_itimer_hi", ctypes.c_int8),
        ("d_btimer_hi", ctypes.c_int8),
        ("d_rtbtimer_hi", ctypes.c_int8),
        ("d_padding2", ctypes.c_int8),
        ("d_rtb_hardlimit", ctypes.c_uint64),
        ("d_rtb_softlimit", ctypes.c_uint64),
        ("d_rtbcount", ctypes.c_uint64),
        ("d_rtbtimer", ctypes.c_int32),
        ("d_rtbwarns", ctypes.c_uint16),
        ("d_padding3", ctypes.c_int16),
        ("d_padding4", ctypes.c_char * 8),
    ]


# --- struct fs_quota_statv (<linux/dqblk_xfs.h>) ----------------------------------------------

class FsQfileStatv(ctypes.Structure):
    """struct fs_qfilestatv, 24 bytes: qfs_ino @0 (8), qfs_nblks @8 (8), qfs_nextents @16 (4), qfs_pad @20 (4)."""
    _fields_ = [
        ("qfs_ino", ctypes.c_uint64),
        ("qfs_nblks", ctypes.c_uint64),
        ("qfs_nextents", ctypes.c_uint32),
        ("qfs_pad", ctypes.c_uint32),
    ]


class FsQuotaStatv(ctypes.Structure):
    """struct fs_quota_statv, 160 bytes (Q_XGETQSTATV; qs_version must be set to 1 on input):

        off  size  field
          0     1  qs_version       FS_QSTATV_VERSION1
          1     1  qs_pad1
          2     2  qs_flags         FS_QUOTA_* (PDQ_ACCT = 0x10, PDQ_ENFD = 0x20)
          4     4  qs_incoredqs
          8    24  qs_uquota
         32    24  qs_gquota
         56    24  qs_pquota
         80     4  qs_btimelimit
         84     4  qs_itimelimit
         88     4  qs_rtbtimelimit
         92     2  qs_bwarnlimit
         94     2  qs_iwarnlimit
         96     2  qs_rtbwarnlimit
         98     2  qs_pad3
        100     4  qs_pad4
        104    56  qs_pad2[7]
    """
    _fields_ = [
        ("qs_version", ctypes.c_int8),
        ("qs_pad1", ctypes.c_uint8),
        ("qs_flags", ctypes.c_uint16),
        ("qs_incoredqs", ctypes.c_uint32),
        ("qs_uquota", FsQfileStatv),
        ("qs_gquota", FsQfileStatv),
        ("qs_pquota", FsQfileStatv),
        ("qs_btimelimit", ctypes.c_int32),
        ("qs_itimelimit", ctypes.c_int32),
        ("qs_rtbtimelimit", ctypes.c_int32),
        ("qs_bwarnlimit", ctypes.c_uint16),
        ("qs_iwarnlimit", ctypes.c_uint16),
        ("qs_rtbwarnlimit", ctypes.c_uint16),
        ("qs_pad3", ctypes.c_uint16),
        ("qs_pad4", ctypes.c_uint32),
        ("qs_pad2", ctypes.c_uint64 * 7),
    ]


# --- quotactl commands (<linux/quota.h>, <linux/dqblk_xfs.h>) ----------------------------------

def _xqm_cmd(number: int) -> int:
    return (ord("X") << 8) + number


Q_XQUOTAON = _xqm_cmd(1)
Q_XGETQUOTA = _xqm_cmd(3)      # 0x5803
Q_XSETQLIM = _xqm_cmd(4)       # 0x5804
Q_XGETQSTAT = _xqm_cmd(5)
Q_XGETQSTATV = _xqm_cmd(8)     # 0x5808
PRJQUOTA = 2
SUBCMDSHIFT = 8
SUBCMDMASK = 0xFF


def qcmd(command: int, quota_type: int) -> int:
    """QCMD(cmd, type) of <sys/quota.h>."""
    return (command << SUBCMDSHIFT) | (quota_type & SUBCMDMASK)


FS_DQUOT_VERSION = 1
FS_QSTATV_VERSION1 = 1
FS_PROJ_QUOTA = 1 << 1
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
FS_QUOTA_PDQ_ACCT = 1 << 4
FS_QUOTA_PDQ_ENFD = 1 << 5

BASIC_BLOCK_SIZE = 512          # quotactl counts space in 512-byte basic blocks
XFS_SUPER_MAGIC = 0x58465342    # "XFSB", statfs f_type
NON_PROJECT_ID = 0              # no project: Mesos's sentinel too
MAX_PROJECT_ID = 0xFFFFFFFF     # prid_t is 32 bits


_libc = ctypes.CDLL(None, use_errno=True)
_libc.quotactl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
_libc.quotactl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class QuotaError(OSError):
    """A quota call failed; str() is one line saying which call, on what, and why (errno in .errno)."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class QuotaStatus:
    """Project quota state of a filesystem (Q_XGETQSTATV)."""
    accounting: bool
    enforcing: bool


@dataclass(frozen=True)
class QuotaInfo:
    """A project's quota record, in bytes. A zero limit means no limit."""
    soft_limit: int
    hard_limit: int
    used: int


# --- project ids ---------------------------------------------------------------------------

def _open(path: str) -> int:
    """Open without following a final symlink (a symlink cannot carry a project id through the ioctl)."""
    st = os.lstat(path)
    if stat_module.S_ISLNK(st.st_mode):
        raise QuotaError(errno.ELOOP, f"'{path}' is a symbolic link, which cannot carry a project id")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if stat_module.S_ISDIR(st.st_mode):
        flags |= os.O_DIRECTORY
    return os.open(path, flags)


def get_fsxattr(fd: int) -> FsXattr:
    attr = FsXattr()
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, attr)   # ctypes structures are writable buffers: filled in place
    return attr


def set_fsxattr(fd: int, attr: FsXattr) -> None:
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, attr)


def get_project_id(path: str) -> int:
    """The project id of `path` (0 when it has none). Raises QuotaError."""
    try:
        fd = _open(path)
    except QuotaError:
        raise
    except OSError as exc:
        raise QuotaError(exc.errno, f"Failed to open '{path}': {exc.strerror}") from None
    try:
        return int(get_fsxattr(fd).fsx_projid)
    except OSError as exc:
        raise QuotaError(exc.errno, f"Failed to get XFS attributes for '{path}': {exc.strerror}") from None
    finally:
        os.close(fd)


def _set_project_id_fd(fd: int, path: str, project_id: int) -> None:
    try:
        attr = get_fsxattr(fd)
    except OSError as exc:
        raise QuotaError(exc.errno, f"Failed to get XFS attributes for '{path}': {exc.strerror}") from None
    attr.fsx_projid = project_id
    if project_id == NON_PROJECT_ID:
        attr.fsx_xflags &= ~FS_XFLAG_PROJINHERIT
    else:
        attr.fsx_xflags |= FS_XFLAG_PROJINHERIT
    try:
        set_fsxattr(fd, attr)
    except OSError as exc:
        raise QuotaError(exc.errno, f"Failed to set XFS attributes for '{path}': {exc.strerror}") from None


def set_project_id(directory: str, project_id: int) -> None:
    """Put `directory` and every directory and regular file below it into `project_id`, with the
    inherit flag, so that whatever is created there later is charged to it too. 0 takes them out.

    Like Mesos (fts with FTS_PHYSICAL | FTS_XDEV): symlinks are neither followed nor changed (the
    ioctl cannot reach them), and other filesystems mounted below are left alone.
    """
    if not 0 <= project_id <= MAX_PROJECT_ID:
        raise ValueError(f"project id {project_id} is out of range (0-{MAX_PROJECT_ID})")
    st = os.lstat(directory)
    if not stat_module.S_ISDIR(st.st_mode):
        raise QuotaError(errno.ENOTDIR, f"{directory} is not a directory")
    device = st.st_dev
    stack = [directory]
    while stack:
        path = stack.pop()
        fd = _open(path)
        try:
            _set_project_id_fd(fd, path, project_id)
            with os.scandir(fd) as entries:
                for entry in entries:
                    child = os.path.join(path, entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        if entry.stat(follow_symlinks=False).st_dev == device:
                            stack.append(child)
                    elif entry.is_file(follow_symlinks=False):
                        child_fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                                           dir_fd=fd)
                        try:
                            _set_project_id_fd(child_fd, child, project_id)
                        finally:
                            os.close(child_fd)
        finally:
            os.close(fd)


def clear_project_id(directory: str) -> None:
    set_project_id(directory, NON_PROJECT_ID)


# --- filesystems ---------------------------------------------------------------------------

class _StatFs(ctypes.Structure):
    # struct statfs of the 64-bit ABI (f_type first, as a long); only f_type is read. The buffer is
    # generously sized so that every architecture's layout fits.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def filesystem_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding `path` (XFS_SUPER_MAGIC for XFS)."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return buf.f_type & 0xFFFFFFFF


def is_xfs(path: str) -> bool:
    return filesystem_type(path) == XFS_SUPER_MAGIC


@dataclass(frozen=True)
class Mount:
    """One /proc/self/mountinfo line, the fields a quota check needs."""
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]       # mount options and super options together


def mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> Mount | None:
    """The mount `path` lives on: the entry with its device and the longest mountpoint above it."""
    real = os.path.realpath(path)
    device = os.stat(real).st_dev
    wanted = f"{os.major(device)}:{os.minor(device)}"
    best: Mount | None = None
    for entry in read_mountinfo(mountinfo):
        mountpoint = entry.mount_point
        if entry.device != wanted or not (real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")):
            continue
        if best is None or len(mountpoint) >= len(best.mountpoint):
            best = Mount(mountpoint, entry.fstype, entry.source, entry.options | entry.super_options)
    return best


PROJECT_QUOTA_OPTIONS = frozenset({"prjquota", "pquota", "pqnoenforce", "pqnoquota"})


def has_project_quota_option(mount: Mount) -> bool:
    """Whether the mount options ask for XFS project quotas (XFS shows them as prjquota or pqnoenforce)."""
    return bool(mount.options & PROJECT_QUOTA_OPTIONS)


# --- quotactl ------------------------------------------------------------------------------

def _machine() -> str:
    return os.uname().machine


def _quotactl(path: str, command: int, quota_type: int, ident: int, addr: ctypes.c_void_p | None) -> None:
    """quotactl_fd(2) on an fd of `path`; on kernels older than 5.14, quotactl(2) on its block device."""
    cmd = qcmd(command, quota_type)
    number = syscall_number("quotactl_fd", _machine())
    if number is not None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(fd), ctypes.c_uint(cmd),
                                   ctypes.c_int(ident), addr)
            err = ctypes.get_errno()
        finally:
            os.close(fd)
        if result == 0:
            return
        if not (err == errno.ENOSYS and not _has_quotactl_fd()):
            raise OSError(err, os.strerror(err))
    mount = mount_of(path)
    if mount is None or not mount.source.startswith("/"):
        raise OSError(errno.ENODEV, f"no block device found for '{path}'")
    if _libc.quotactl(cmd, os.fsencode(mount.source), ident, addr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_QUOTACTL_FD_PROBED: bool | None = None


def _has_quotactl_fd() -> bool:
    """Whether the syscall exists at all (ENOSYS from it may also mean "no quota in this filesystem")."""
    global _QUOTACTL_FD_PROBED
    if _QUOTACTL_FD_PROBED is None:
        number = syscall_number("quotactl_fd", _machine())
        if number is None:
            _QUOTACTL_FD_PROBED = False
        else:
            # An invalid fd: EBADF when the syscall exists, ENOSYS when it does not.
            _libc.syscall(ctypes.c_long(number), ctypes.c_int(-1), ctypes.c_uint(0), ctypes.c_int(0), None)
            _QUOTACTL_FD_PROBED = ctypes.get_errno() != errno.ENOSYS
    return _QUOTACTL_FD_PROBED


def kernel_config(option: str) -> str | None:
    """The value of a kernel build option from /proc/config.gz ("y", "m", "n" when `# ... is not set`),
    or None when the kernel does not publish its configuration."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(f"{option}="):
                    return line.strip().split("=", 1)[1]
                if line.strip() == f"# {option} is not set":
                    return "n"
    except OSError:
        return None
    return None


def explain_enosys(fstype: str = "xfs") -> str:
    """Why quotactl says ENOSYS: the filesystem has no quota operations in this kernel."""
    option = {"xfs": "CONFIG_XFS_QUOTA", "ext4": "CONFIG_QUOTA"}.get(fstype, "")
    value = kernel_config(option) if option else None
    if value == "n":
        return f"this kernel has no {fstype.upper()} quota support ({option} is not set)"
    return f"this kernel has no {fstype.upper()} quota support (quotactl: Function not implemented)"


def quota_status(path: str) -> QuotaStatus:
    """Project quota accounting/enforcement on the filesystem of `path` (Q_XGETQSTATV). Raises QuotaError."""
    statv = FsQuotaStatv()
    statv.qs_version = FS_QSTATV_VERSION1
    try:
        _quotactl(path, Q_XGETQSTATV, PRJQUOTA, 0, ctypes.cast(ctypes.byref(statv), ctypes.c_void_p))
    except OSError as exc:
        reason = explain_enosys() if exc.errno == errno.ENOSYS else exc.strerror
        raise QuotaError(exc.errno, f"Failed to get quota status for '{path}': {reason}") from None
    return QuotaStatus(bool(statv.qs_flags & FS_QUOTA_PDQ_ACCT), bool(statv.qs_flags & FS_QUOTA_PDQ_ENFD))


def enable_project_enforcement(path: str) -> None:
    """Turn project quota enforcement on (a filesystem mounted with pqnoenforce), as Mesos's enableQuota."""
    flags = ctypes.c_uint(FS_QUOTA_PDQ_ENFD)
    try:
        _quotactl(path, Q_XQUOTAON, PRJQUOTA, 0, ctypes.cast(ctypes.byref(flags), ctypes.c_void_p))
    except OSError as exc:
        raise QuotaError(exc.errno, f"Failed to enable project quota enforcement on '{path}': {exc.strerror}") from None


def get_project_quota(path: str, project_id: int) -> QuotaInfo | None:
    """Limits and usage of `project_id` on the filesystem of `path`; None when it has no quota record."""
    if project_id == NON_PROJECT_ID:
        raise QuotaError(errno.EINVAL, "Invalid project ID '0'")
    quota = FsDiskQuota()
    quota.d_version = FS_DQUOT_VERSION
    quota.d_id = project_id
    quota.d_flags = FS_PROJ_QUOTA
    try:
        _quotactl(path, Q_XGETQUOTA, PRJQUOTA, project_id, ctypes.cast(ctypes.byref(quota), ctypes.c_void_p))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None    # no record: the id was never used, or its record was removed
        reason = explain_enosys() if exc.errno == errno.ENOSYS else exc.strerror
        raise QuotaError(exc.errno, f"Failed to get quota for project ID {project_id}: {reason}") from None
    if quota.d_blk_hardlimit == 0 and quota.d_blk_softlimit == 0 and quota.d_bcount == 0:
        return None
    return QuotaInfo(soft_limit=quota.d_blk_softlimit * BASIC_BLOCK_SIZE,
                     hard_limit=quota.d_blk_hardlimit * BASIC_BLOCK_SIZE,
                     used=quota.d_bcount * BASIC_BLOCK_SIZE)


def project_quota_request(project_id: int, soft_limit: int, hard_limit: int) -> FsDiskQuota:
    """The fs_disk_quota that Q_XSETQLIM takes: both block limits, in basic blocks (rounded down)."""
    quota = FsDiskQuota()
    quota.d_version = FS_DQUOT_VERSION
    quota.d_id = project_id
    quota.d_flags = FS_PROJ_QUOTA
    quota.d_fieldmask = FS_DQ_BSOFT | FS_DQ_BHARD
    quota.d_blk_softlimit = soft_limit // BASIC_BLOCK_SIZE
    quota.d_blk_hardlimit = hard_limit // BASIC_BLOCK_SIZE
    return quota


def set_project_quota(path: str, project_id: int, soft_limit: int, hard_limit: int) -> None:
    """Set both block limits of `project_id` (bytes). A limit below one basic block would delete the record."""
    if project_id == NON_PROJECT_ID:
        raise QuotaError(errno.EINVAL, "Invalid project ID '0'")
    if soft_limit < BASIC_BLOCK_SIZE or hard_limit < BASIC_BLOCK_SIZE:
        raise QuotaError(errno.EINVAL, f"Quota limit must be >= {BASIC_BLOCK_SIZE}B")
    _set_limits(path, project_id, soft_limit, hard_limit)


def clear_project_quota(path: str, project_id: int) -> None:
    """Remove the limits of `project_id` (usage is still accounted while files carry the id)."""
    if project_id == NON_PROJECT_ID:
        raise QuotaError(errno.EINVAL, "Invalid project ID '0'")
    _set_limits(path, project_id, 0, 0)


def _set_limits(path: str, project_id: int, soft_limit: int, hard_limit: int) -> None:
    quota = project_quota_request(project_id, soft_limit, hard_limit)
    try:
        _quotactl(path, Q_XSETQLIM, PRJQUOTA, project_id, ctypes.cast(ctypes.byref(quota), ctypes.c_void_p))
    except OSError as exc:
        reason = explain_enosys() if exc.errno == errno.ENOSYS else exc.strerror
        raise QuotaError(exc.errno, f"Failed to set quota for project ID {project_id}: {reason}") from None
