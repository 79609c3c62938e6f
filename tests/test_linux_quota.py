"""The ctypes layer of XFS project quotas: struct layouts (the kernel ABI, byte for byte), ioctl and
quotactl numbers, and the calls against real filesystems of this machine.

The project-id ioctls are exercised on a loop-mounted XFS image (needs root and mkfs.xfs from
xfsprogs), which works on any kernel with XFS. quotactl needs XFS quota support in the kernel: where
it is missing (this machine: CONFIG_XFS_QUOTA is not set) the tests check the one-line error that
says so, and the tests that need real limits are skipped with the kernel's own reason.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.linux import quota
from reconciler.linux.quota import FsDiskQuota, FsQfileStatv, FsQuotaStatv, FsXattr

IS_ROOT = os.geteuid() == 0


# --- a loop-mounted XFS image (shared with test_isolator_disk_xfs.py) ---------------------------

@dataclass
class XfsMount:
    mountpoint: Path
    image: Path


def _kernel_reason(device_hint: str = "XFS") -> str:
    """Why the kernel refused a quota mount: its own log line if readable, else its build config."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        log = []
    lines = [line.split("] ", 1)[-1] for line in log if device_hint in line and "quota" in line.lower()]
    if lines:
        return f"the kernel says: {lines[-1]}"
    value = quota.kernel_config("CONFIG_XFS_QUOTA")
    if value == "n":
        return "this kernel has no XFS quota support (CONFIG_XFS_QUOTA is not set)"
    return "mount(8) failed; see dmesg"


def mount_xfs(directory: Path, options: str = "") -> XfsMount:
    """mkfs.xfs a sparse 320 MB image in `directory` and loop-mount it; skip with the precise reason if
    this machine cannot. The caller unmounts (umount_xfs), even on failure."""
    if not IS_ROOT:
        pytest.skip("needs root to loop-mount an XFS image")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is missing: apt-get install -y xfsprogs")
    image, mountpoint = directory / "xfs.img", directory / "mnt"
    mountpoint.mkdir(exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(320 * 1024 * 1024)   # mkfs.xfs 6.x wants at least 300 MB
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True, capture_output=True)
    argv = ["mount", "-o", f"loop{',' + options if options else ''}", str(image), str(mountpoint)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        image.unlink()
        reason = _kernel_reason() if "quota" in options else result.stderr.strip()
        pytest.skip(f"cannot mount XFS with -o {options or 'defaults'}: {reason}")
    return XfsMount(mountpoint, image)


def umount_xfs(mount: XfsMount) -> None:
    # A loop device set up by mount(8) is released by the unmount (autoclear); lazily if still busy.
    if subprocess.run(["umount", str(mount.mountpoint)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount.mountpoint)], capture_output=True)
    if mount.image.exists():
        mount.image.unlink()


# --- layouts --------------------------------------------------------------------------------------

def offsets(structure: type[ctypes.Structure]) -> dict[str, int]:
    return {name: getattr(structure, name).offset for name, *_ in structure._fields_}


def test_fsxattr_is_the_28_byte_kernel_struct() -> None:
    assert ctypes.sizeof(FsXattr) == 28
    assert offsets(FsXattr) == {"fsx_xflags": 0, "fsx_extsize": 4, "fsx_nextents": 8, "fsx_projid": 12,
                                "fsx_cowextsize": 16, "fsx_pad": 20}


def test_fs_disk_quota_is_the_112_byte_kernel_struct() -> None:
    assert ctypes.sizeof(FsDiskQuota) == 112
    assert offsets(FsDiskQuota) == {
        "d_version": 0, "d_flags": 1, "d_fieldmask": 2, "d_id": 4, "d_blk_hardlimit": 8, "d_blk_softlimit": 16,
        "d_ino_hardlimit": 24, "d_ino_softlimit": 32, "d_bcount": 40, "d_icount": 48, "d_itimer": 56,
        "d_btimer": 60, "d_iwarns": 64, "d_bwarns": 66, "d_itimer_hi": 68, "d_btimer_hi": 69, "d_rtbtimer_hi": 70,
        "d_padding2": 71, "d_rtb_hardlimit": 72, "d_rtb_softlimit": 80, "d_rtbcount": 88, "d_rtbtimer": 96,
        "d_rtbwarns": 100, "d_padding3": 102, "d_padding4": 104,
    }


def test_fs_quota_statv_is_the_160_byte_kernel_struct() -> None:
    assert ctypes.sizeof(FsQfileStatv) == 24
    assert offsets(FsQfileStatv) == {"qfs_ino": 0, "qfs_nblks": 8, "qfs_nextents": 16, "qfs_pad": 20}
    assert ctypes.sizeof(FsQuotaStatv) == 160
    assert offsets(FsQuotaStatv) == {
        "qs_version": 0, "qs_pad1": 1, "qs_flags": 2, "qs_incoredqs": 4, "qs_uquota": 8, "qs_gquota": 32,
        "qs_pquota": 56, "qs_btimelimit": 80, "qs_itimelimit": 84, "qs_rtbtimelimit": 88, "qs_bwarnlimit": 92,
        "qs_iwarnlimit": 94, "qs_rtbwarnlimit": 96, "qs_pad3": 98, "qs_pad4": 100, "qs_pad2": 104,
    }


def test_ioctl_and_quotactl_numbers_are_the_kernels() -> None:
    assert quota.FS_IOC_FSGETXATTR == 0x801C581F        # _IOR('X', 31, struct fsxattr)
    assert quota.FS_IOC_FSSETXATTR == 0x401C5820        # _IOW('X', 32, struct fsxattr)
    assert quota.FS_XFLAG_PROJINHERIT == 0x200
    assert quota.qcmd(quota.Q_XGETQUOTA, quota.PRJQUOTA) == 0x580302
    assert quota.qcmd(quota.Q_XSETQLIM, quota.PRJQUOTA) == 0x580402
    assert quota.qcmd(quota.Q_XGETQSTATV, quota.PRJQUOTA) == 0x580802
    assert (quota.FS_QUOTA_PDQ_ACCT, quota.FS_QUOTA_PDQ_ENFD) == (0x10, 0x20)
    assert quota.XFS_SUPER_MAGIC == 0x58465342


C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/fs.h>
#include <linux/dqblk_xfs.h>
#include <linux/quota.h>
#define O(s, f) printf("%s.%s %zu\n", #s, #f, offsetof(struct s, f))
int main(void) {
  printf("fsxattr %zu\nfs_disk_quota %zu\nfs_quota_statv %zu\n", sizeof(struct fsxattr),
         sizeof(struct fs_disk_quota), sizeof(struct fs_quota_statv));
  O(fsxattr, fsx_projid); O(fsxattr, fsx_pad);
  O(fs_disk_quota, d_id); O(fs_disk_quota, d_blk_hardlimit); O(fs_disk_quota, d_blk_softlimit);
  O(fs_disk_quota, d_bcount); O(fs_disk_quota, d_rtbtimer); O(fs_disk_quota, d_padding4);
  O(fs_quota_statv, qs_flags); O(fs_quota_statv, qs_pquota); O(fs_quota_statv, qs_pad2);
  printf("FS_IOC_FSGETXATTR %lu\nFS_IOC_FSSETXATTR %lu\nQ_XGETQUOTA %d\nQ_XSETQLIM %d\nQ_XGETQSTATV %d\n",
         (unsigned long)FS_IOC_FSGETXATTR, (unsigned long)FS_IOC_FSSETXATTR, Q_XGETQUOTA, Q_XSETQLIM, Q_XGETQSTATV);
  return 0;
}
"""


def test_layouts_agree_with_the_c_headers(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/linux/dqblk_xfs.h").exists():
        pytest.skip("no C compiler or kernel headers (gcc, linux-libc-dev) to check the layouts against")
    source = tmp_path / "layout.c"
    source.write_text(C_PROGRAM)
    subprocess.run([compiler, "-o", str(tmp_path / "layout"), str(source)], check=True, capture_output=True)
    printed = dict(line.rsplit(" ", 1) for line in
                   subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout.splitlines())
    ours = {
        "fsxattr": ctypes.sizeof(FsXattr), "fs_disk_quota": ctypes.sizeof(FsDiskQuota),
        "fs_quota_statv": ctypes.sizeof(FsQuotaStatv),
        "fsxattr.fsx_projid": FsXattr.fsx_projid.offset, "fsxattr.fsx_pad": FsXattr.fsx_pad.offset,
        "fs_disk_quota.d_id": FsDiskQuota.d_id.offset, "fs_disk_quota.d_blk_hardlimit": FsDiskQuota.d_blk_hardlimit.offset,
        "fs_disk_quota.d_blk_softlimit": FsDiskQuota.d_blk_softlimit.offset,
        "fs_disk_quota.d_bcount": FsDiskQuota.d_bcount.offset, "fs_disk_quota.d_rtbtimer": FsDiskQuota.d_rtbtimer.offset,
        "fs_disk_quota.d_padding4": FsDiskQuota.d_padding4.offset,
        "fs_quota_statv.qs_flags": FsQuotaStatv.qs_flags.offset, "fs_quota_statv.qs_pquota": FsQuotaStatv.qs_pquota.offset,
        "fs_quota_statv.qs_pad2": FsQuotaStatv.qs_pad2.offset,
        "FS_IOC_FSGETXATTR": quota.FS_IOC_FSGETXATTR, "FS_IOC_FSSETXATTR": quota.FS_IOC_FSSETXATTR,
        "Q_XGETQUOTA": quota.Q_XGETQUOTA, "Q_XSETQLIM": quota.Q_XSETQLIM, "Q_XGETQSTATV": quota.Q_XGETQSTATV,
    }
    assert {k: int(v) for k, v in printed.items()} == ours


def test_a_limit_request_is_in_basic_blocks_at_the_kernels_offsets() -> None:
    request = quota.project_quota_request(5001, soft_limit=1024 * 1024, hard_limit=11 * 1024 * 1024 + 100)
    raw = bytes(request)
    assert len(raw) == 112
    version, flags, fieldmask, ident = struct.unpack_from("=bbHI", raw, 0)
    hard, soft = struct.unpack_from("=QQ", raw, 8)
    assert (version, flags, ident) == (1, quota.FS_PROJ_QUOTA, 5001)
    assert fieldmask == quota.FS_DQ_BSOFT | quota.FS_DQ_BHARD
    assert soft == 2048                   # 1 MB in 512-byte blocks
    assert hard == 22528                  # rounded down to whole blocks


def test_invalid_ids_and_limits_are_refused_before_any_call(tmp_path: Path) -> None:
    with pytest.raises(quota.QuotaError, match=r"^Invalid project ID '0'$"):
        quota.get_project_quota(str(tmp_path), 0)
    with pytest.raises(quota.QuotaError, match=r"^Quota limit must be >= 512B$"):
        quota.set_project_quota(str(tmp_path), 5000, 100, 100)
    with pytest.raises(ValueError, match="out of range"):
        quota.set_project_id(str(tmp_path), 1 << 32)


# --- real filesystems -----------------------------------------------------------------------------

def test_filesystem_type_and_mount_of_this_machines_root() -> None:
    mount = quota.mount_of("/proc/self")
    assert mount is not None and mount.fstype == "proc" and mount.mountpoint == "/proc"
    assert not quota.is_xfs("/proc")


def test_quota_status_on_a_filesystem_without_project_quotas_is_a_one_line_error(tmp_path: Path) -> None:
    if quota.is_xfs(str(tmp_path)):
        pytest.skip("the temporary directory is on XFS here")
    with pytest.raises(quota.QuotaError) as info:
        quota.quota_status(str(tmp_path))
    assert str(info.value).startswith(f"Failed to get quota status for '{tmp_path}': ")
    assert "\n" not in str(info.value) and "[Errno" not in str(info.value)


@pytest.mark.root
def test_project_ids_are_set_inherited_and_cleared_on_xfs(xfs: XfsMount) -> None:
    top = xfs.mountpoint / "sandbox-ids"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "old").write_text("before")
    (top / "link").symlink_to("sub/old")
    try:
        assert quota.is_xfs(str(top))
        assert quota.get_project_id(str(top)) == 0
        quota.set_project_id(str(top), 5001)
        for path in (top, top / "sub", top / "sub" / "old"):
            assert quota.get_project_id(str(path)) == 5001, path
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert quota.get_fsxattr(fd).fsx_xflags & quota.FS_XFLAG_PROJINHERIT
        finally:
            os.close(fd)
        # What the container creates afterwards is charged to the project by the kernel itself.
        (top / "sub" / "new").write_text("after")
        (top / "newdir").mkdir()
        assert quota.get_project_id(str(top / "sub" / "new")) == 5001
        assert quota.get_project_id(str(top / "newdir")) == 5001
        with pytest.raises(quota.QuotaError, match="symbolic link"):
            quota.get_project_id(str(top / "link"))
        quota.clear_project_id(str(top))
        assert quota.get_project_id(str(top / "sub" / "new")) == 0
    finally:
        shutil.rmtree(top)


@pytest.mark.root
def test_project_ids_cannot_be_set_where_the_filesystem_has_no_projects(tmp_path: Path) -> None:
    if quota.is_xfs(str(tmp_path)):
        pytest.skip("the temporary directory is on XFS here")
    mount = quota.mount_of(str(tmp_path))
    if mount is not None and mount.fstype == "tmpfs":
        pytest.skip("tmpfs has no fsxattr project ids")
    with pytest.raises(quota.QuotaError) as info:
        quota.set_project_id(str(tmp_path), 5000)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL)
    assert str(info.value).startswith(f"Failed to set XFS attributes for '{tmp_path}': ")


@pytest.mark.root
def test_quotactl_on_xfs_without_kernel_quota_support_says_so(xfs: XfsMount) -> None:
    if quota.kernel_config("CONFIG_XFS_QUOTA") not in ("n", None):
        pytest.skip("this kernel has XFS quota support; the image is merely mounted without quotas")
    with pytest.raises(quota.QuotaError) as info:
        quota.quota_status(str(xfs.mountpoint))
    assert info.value.errno == errno.ENOSYS
    assert str(info.value) == (f"Failed to get quota status for '{xfs.mountpoint}': this kernel has no XFS quota "
                               "support (CONFIG_XFS_QUOTA is not set)")
    with pytest.raises(quota.QuotaError, match=r"^Failed to get quota for project ID 5000: this kernel has no XFS"):
        quota.get_project_quota(str(xfs.mountpoint), 5000)


@pytest.mark.root
def test_limits_and_usage_round_trip_through_quotactl(tmp_path: Path) -> None:
    mount = mount_xfs(tmp_path, "prjquota")     # skipped, with the kernel's reason, where it cannot be
    try:
        top = mount.mountpoint / "p"
        top.mkdir()
        assert quota.quota_status(str(top)) == quota.QuotaStatus(accounting=True, enforcing=True)
        quota.set_project_id(str(top), 5002)
        quota.set_project_quota(str(top), 5002, 1024 * 1024, 2 * 1024 * 1024)
        (top / "data").write_bytes(b"x" * 512 * 1024)
        os.sync()
        info = quota.get_project_quota(str(top), 5002)
        assert info is not None
        assert (info.soft_limit, info.hard_limit) == (1024 * 1024, 2 * 1024 * 1024)
        assert 512 * 1024 <= info.used <= 600 * 1024
        quota.clear_project_quota(str(top), 5002)
        cleared = quota.get_project_quota(str(top), 5002)
        assert cleared is None or (cleared.soft_limit, cleared.hard_limit) == (0, 0)
    finally:
        umount_xfs(mount)
