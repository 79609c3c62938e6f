"""Real-kernel tests of the ctypes syscall wrappers (run as root).

Anything that changes namespaces, mounts or capabilities runs in a forked child, so the test
process itself is never altered; children are always killed and reaped.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.linux import syscalls
from reconciler.linux.syscalls import (
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_PRIVATE,
    MS_REC,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, mounts and capabilities")

CAP_NET_RAW = 13
CAP_NET_BIND_SERVICE = 10
CAP_SYS_TIME = 25


def run_in_child(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run `fn` in a forked child and return its result (or raise its exception) here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            try:
                payload = pickle.dumps(("ok", fn()))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                payload = pickle.dumps(("error", e))
            os.write(w, payload)
        finally:
            os._exit(0)
    os.close(w)
    try:
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("child did not finish")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _kill_and_reap(pid)
    status, value = pickle.loads(b"".join(chunks))
    if status == "error":
        raise value
    return value


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def mountpoints(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    with open(mountinfo) as f:
        return {line.split()[4] for line in f}


def make_mounts_private() -> None:
    # Without this, a mount in the new namespace could propagate back to the host's namespace.
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)


def status_mask(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise KeyError(field)


# --- mounts and namespaces ----------------------------------------------------------------


def test_private_tmpfs_in_new_mount_namespace_is_invisible_to_parent(tmp_path: Path) -> None:
    target = str(tmp_path / "mnt")
    os.mkdir(target)

    def child() -> tuple[bool, str]:
        syscalls.unshare(CLONE_NEWNS)
        make_mounts_private()
        syscalls.mount("tmpfs", target, "tmpfs", 0, "size=1m")
        Path(target, "inside").write_text("x")
        return target in mountpoints(), os.readlink("/proc/self/ns/mnt")

    visible_in_child, child_ns = run_in_child(child)

    assert visible_in_child
    assert target not in mountpoints()
    assert child_ns != os.readlink("/proc/self/ns/mnt")
    assert os.listdir(target) == []


def test_setns_joins_another_process_mount_and_uts_namespaces(tmp_path: Path) -> None:
    target = str(tmp_path / "mnt")
    os.mkdir(target)
    host_name = socket.gethostname()
    ready_r, ready_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # holds a mount + uts namespace open until killed
        try:
            syscalls.unshare(CLONE_NEWNS | CLONE_NEWUTS)
            make_mounts_private()
            syscalls.mount("tmpfs", target, "tmpfs", 0, "size=1m")
            socket.sethostname("reconciler-setns-test")
            os.write(ready_w, b"1")
            while True:
                time.sleep(60)
        finally:
            os._exit(1)
    try:
        os.close(ready_w)
        assert select.select([ready_r], [], [], 10)[0], "namespace holder did not start"
        assert os.read(ready_r, 1) == b"1"

        def child() -> tuple[str, bool]:
            for ns, flag in (("mnt", CLONE_NEWNS), ("uts", CLONE_NEWUTS)):
                fd = os.open(f"/proc/{holder}/ns/{ns}", os.O_RDONLY)
                try:
                    syscalls.setns(fd, flag)
                finally:
                    os.close(fd)
            return socket.gethostname(), target in mountpoints()

        name, sees_mount = run_in_child(child)
    finally:
        os.close(ready_r)
        _kill_and_reap(holder)

    assert name == "reconciler-setns-test"
    assert sees_mount
    assert socket.gethostname() == host_name
    assert target not in mountpoints()


def test_setns_with_wrong_namespace_type_is_refused() -> None:
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            syscalls.setns(fd, CLONE_NEWNS)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EINVAL
    assert str(e.value).startswith("[Errno 22] setns: Invalid argument")


def test_pivot_root_makes_a_tmpfs_the_new_root(tmp_path: Path) -> None:
    new_root = str(tmp_path / "root")
    os.mkdir(new_root)

    def child() -> tuple[list[str], bool]:
        syscalls.unshare(CLONE_NEWNS)
        make_mounts_private()
        syscalls.mount("tmpfs", new_root, "tmpfs", 0, "size=1m")
        os.mkdir(os.path.join(new_root, "old_root"))
        Path(new_root, "marker").write_text("new root")
        os.chdir(new_root)
        syscalls.pivot_root(".", "old_root")
        os.chdir("/")
        syscalls.umount2("/old_root", MNT_DETACH)
        return sorted(os.listdir("/")), os.path.exists("/proc/self")

    entries, has_proc = run_in_child(child)

    assert entries == ["marker", "old_root"]
    assert not has_proc  # the host's /proc is gone from the new root's view


def test_umount2_of_a_directory_that_is_not_a_mountpoint_raises_einval(tmp_path: Path) -> None:
    with pytest.raises(OSError) as e:
        syscalls.umount2(str(tmp_path))
    assert e.value.errno == errno.EINVAL
    assert e.value.filename == str(tmp_path)
    assert "umount2: Invalid argument" in str(e.value)


def test_mount_on_a_missing_target_names_the_target(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as e:
        syscalls.mount("tmpfs", missing, "tmpfs", 0)
    assert e.value.errno == errno.ENOENT
    assert e.value.filename == missing


# --- prctl and capabilities ---------------------------------------------------------------


def test_capget_reports_what_proc_status_shows() -> None:
    caps = syscalls.capget()
    assert caps.effective == status_mask("CapEff")
    assert caps.permitted == status_mask("CapPrm")
    assert caps.inheritable == status_mask("CapInh")
    assert caps.effective & (1 << 21)  # root has CAP_SYS_ADMIN, which these tests rely on


def test_capget_of_another_process() -> None:
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        assert syscalls.capget(pid).permitted == status_mask("CapPrm", str(pid))
    finally:
        _kill_and_reap(pid)


def test_capset_drops_an_effective_capability() -> None:
    def child() -> int:
        caps = syscalls.capget()
        syscalls.capset(syscalls.CapabilitySets(caps.effective & ~(1 << CAP_NET_RAW), caps.permitted, caps.inheritable))
        return status_mask("CapEff")

    assert not run_in_child(child) & (1 << CAP_NET_RAW)


def test_prctl_with_an_unknown_option_raises_einval() -> None:
    with pytest.raises(OSError) as e:
        syscalls.prctl(0x7FFF_FFFF)
    assert e.value.errno == errno.EINVAL
    assert "prctl: Invalid argument" in str(e.value)

