"""filesystem/shared: private /tmp, host binds, read-only volumes, mount isolation, and Mesos's refusals.

Real kernel, as root, through the agent (`reconciler once`). The sandbox must not sit under a volume
(a mount there would hide it, with the command's stdout and stderr), and pytest's tmp_path is under
/tmp: the tests that mount over /tmp move the work dir to /var/tmp.
"""

from __future__ import annotations

import os
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import ContainerConfig, PermanentError
from reconciler.isolators.filesystem_shared import SharedFilesystemIsolator
from reconciler.isolators.volumes import remount_read_only_flags, submounts
from reconciler.linux import cgroups, syscalls
from reconciler.models import ContainerInfo, ContainerSpec, Volume

pytestmark = pytest.mark.root
ISOLATION = "filesystem/shared,cgroups/cpu,cgroups/mem,posix/cpu"


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture
def env(outside_tmp_env: Any) -> Any:
    outside_tmp_env.isolation = ISOLATION
    return outside_tmp_env


def host_mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def assert_no_mounts_under(path: Path) -> None:
    """No mount under `path` but the agent's own nosuid,nodev bind of `<work_dir>/sandboxes`."""
    points = [line.split()[4] for line in host_mountinfo().splitlines() if str(path) in line]
    assert all(point.endswith("/work/sandboxes") for point in points), points


def destroy_all(env: Any) -> None:
    """Remove every manifest and converge: no container cgroup and no mount may be left."""
    for manifest in env.manifests.iterdir():
        manifest.unlink()
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    mounts = cgroups.find_mounts()
    for name in ("cpu", "cpuacct", "memory", "freezer"):
        h = mounts.v1.get(name) or mounts.v2
        if h is not None and h.exists(env.cgroups_root):
            assert h.children(env.cgroups_root) == [], name
    assert_no_mounts_under(env.tmp)
    assert_no_mounts_under(env.work_dir)


def launch(env: Any, name: str, command: str, **spec: Any) -> dict[str, Any]:
    env.write_manifest(name, command, **spec)
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    status = env.status(name)
    assert status is not None and status["phase"] == "Running", status
    return status


def wait_for_text(path: Path, timeout: float = 15) -> str:
    """The file's text once the command wrote its last line ("done")."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if text.endswith("done\n"):
            return text
        assert time.monotonic() < deadline, f"{path} never finished; it has {text!r}; stderr: " + \
            (path.with_name("stderr").read_text() if path.with_name("stderr").exists() else "")
        time.sleep(0.05)


def failed(env: Any, name: str) -> dict[str, Any]:
    result = env.once()
    assert result.returncode == 1, result.stdout + result.stderr
    status = env.status(name)
    assert status is not None and status["phase"] == "Failed", status
    return status


# --- volumes ---------------------------------------------------------------------------------------

def test_relative_tmp_volume_is_a_private_1777_tmp(env: Any) -> None:
    marker = f"reconciler-test-{uuid.uuid4().hex}"
    tmp_volume = {"volumes": [{"container_path": "/tmp", "host_path": "tmp", "mode": "RW"}]}
    a = launch(env, "a", f"stat -c %a /tmp; echo secret > /tmp/{marker}; ls -a /tmp; echo done; exec sleep 300",
               container=tmp_volume)
    out_a = wait_for_text(env.sandbox(a) / "stdout")
    assert out_a.splitlines()[0] == "1777"
    assert marker in out_a
    # The file is in a's sandbox, not on the host's /tmp.
    private = env.sandbox(a) / "tmp"
    assert stat.S_IMODE(private.stat().st_mode) == 0o1777
    assert (private / marker).read_text() == "secret\n"
    assert not Path("/tmp", marker).exists()
    # Another container has its own /tmp and does not see a's file.
    b = launch(env, "b", "ls -a /tmp; echo done; exec sleep 300", container=tmp_volume)
    out_b = wait_for_text(env.sandbox(b) / "stdout")
    assert marker not in out_b
    assert out_b.splitlines()[:2] == [".", ".."] and len(out_b.splitlines()) == 3
    destroy_all(env)


def test_absolute_host_path_is_bound_read_write(env: Any) -> None:
    shared, target = env.tmp / "shared", env.tmp / "target"
    shared.mkdir()
    target.mkdir()
    (shared / "hello").write_text("from the host\n")
    status = launch(env, "w", f"cat {target}/hello; echo from the container > {target}/reply; echo done; exec sleep 300",
                    container={"volumes": [{"container_path": str(target), "host_path": str(shared)}]})
    assert wait_for_text(env.sandbox(status) / "stdout") == "from the host\ndone\n"
    assert (shared / "reply").read_text() == "from the container\n"
    assert list(target.iterdir()) == []            # the host's own target dir is untouched
    destroy_all(env)


def test_read_only_volume_refuses_writes(env: Any) -> None:
    shared, target = env.tmp / "shared", env.tmp / "target"
    shared.mkdir()
    target.mkdir()
    (shared / "hello").write_text("read me\n")
    status = launch(
        env, "ro", f"cat {target}/hello; echo nope > {target}/file; echo \"exit=$?\"; echo done; exec sleep 300",
        container={"volumes": [{"container_path": str(target), "host_path": str(shared), "mode": "RO"}]})
    assert wait_for_text(env.sandbox(status) / "stdout") == "read me\nexit=2\ndone\n"
    assert "Read-only file system" in (env.sandbox(status) / "stderr").read_text()
    assert not (shared / "file").exists()
    # Only the container's view is read-only: the host still writes there.
    (shared / "host-write").write_text("ok")
    destroy_all(env)


def test_read_only_volume_keeps_the_source_mounts_flags_and_covers_submounts(env: Any) -> None:
    """A bind remount must keep nosuid/nodev/noexec (the kernel refuses to drop locked ones, and
    dropping them would weaken the mount); a mount inside the volume turns read-only too."""
    source, target = env.tmp / "source", env.tmp / "target"
    source.mkdir()
    target.mkdir()
    mounted: list[Path] = []
    try:
        syscalls.mount("reconciler-test", str(source), "tmpfs",
                       syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, "size=1m")
        mounted.append(source)
        (source / "inner").mkdir()
        syscalls.mount("reconciler-test", str(source / "inner"), "tmpfs", 0, "size=1m")
        mounted.append(source / "inner")
        status = launch(
            env, "flags",
            f"grep ' {target}' /proc/self/mountinfo; echo x > {target}/a; echo x > {target}/inner/b; "
            "echo done; exec sleep 300",
            container={"volumes": [{"container_path": str(target), "host_path": str(source), "mode": "RO"}]})
        lines = wait_for_text(env.sandbox(status) / "stdout").splitlines()
        outer = next(line.split()[5].split(",") for line in lines if line.split()[4] == str(target))
        inner = next(line.split()[5].split(",") for line in lines if line.split()[4] == f"{target}/inner")
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(outer)
        assert "ro" in inner
        assert (env.sandbox(status) / "stderr").read_text().count("Read-only file system") == 2
    finally:
        for path in reversed(mounted):
            syscalls.umount2(str(path), syscalls.MNT_DETACH)
    destroy_all(env)


MOUNT_TMPFS = (
    "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "r = libc.mount(sys.argv[1].encode(), sys.argv[2].encode(), b'tmpfs', 0, None); "
    "print('mounted' if r == 0 else 'mount failed: %d' % ctypes.get_errno())"
)


def test_mounts_made_inside_do_not_reach_the_host(env: Any) -> None:
    """Without any volume, too: the container still gets a private mount namespace."""
    target = env.tmp / "mnt"
    target.mkdir()
    source = f"reconciler-test-{uuid.uuid4().hex[:8]}"
    # Mounting needs CAP_SYS_ADMIN, which the default profile leaves out: the manifest asks for it.
    status = launch(env, "mounter", f"{sys.executable} -c \"{MOUNT_TMPFS}\" {source} {target}; echo done; exec sleep 300",
                    container={"linux_info": {"effective_capabilities": {"capabilities": ["SYS_ADMIN"]}}})
    assert wait_for_text(env.sandbox(status) / "stdout") == "mounted\ndone\n"
    # The container's namespace has the mount; the host's does not.
    assert source in Path(f"/proc/{status['pid']}/mountinfo").read_text()
    assert source not in host_mountinfo()
    assert os.stat(target).st_dev == os.stat(env.tmp).st_dev
    destroy_all(env)


# --- refusals (Mesos's messages) -------------------------------------------------------------------

def test_missing_container_path_fails_the_launch(env: Any) -> None:
    missing = env.tmp / "does-not-exist"
    env.write_manifest("m", "exec sleep 300",
                       container={"volumes": [{"container_path": str(missing), "host_path": "data"}]})
    status = failed(env, "m")
    assert status["message"] == \
        f"Volume with container path '{missing}' must exist on host for shared filesystem isolator"
    assert status["reason"] == "LaunchFailed"
    destroy_all(env)


def test_missing_absolute_host_path_fails_the_launch(env: Any) -> None:
    target, missing = env.tmp / "target", env.tmp / "not-there"
    target.mkdir()
    env.write_manifest("m", "exec sleep 300",
                       container={"volumes": [{"container_path": str(target), "host_path": str(missing)}]})
    assert failed(env, "m")["message"] == (
        f"Volume with container path '{target}' must have host path '{missing}' present on host for shared "
        "filesystem isolator")
    destroy_all(env)


def test_volume_over_the_sandbox_fails_the_launch(agent_env: Any) -> None:
    """pytest's work dir is under /tmp here: a /tmp volume would hide the sandbox (Mesos refuses it too)."""
    agent_env.isolation = ISOLATION
    agent_env.write_manifest("m", "exec sleep 300",
                             container={"volumes": [{"container_path": "/tmp", "host_path": "tmp"}]})
    status = failed(agent_env, "m")
    assert status["message"].startswith(f"Cannot mount volume to '{agent_env.work_dir}/sandboxes/")
    assert status["message"].endswith("' because it is under volume '/tmp'")
    destroy_all(agent_env)


def test_nested_volumes_are_refused(env: Any) -> None:
    outer, inner = env.tmp / "outer", env.tmp / "outer" / "inner"
    inner.mkdir(parents=True)
    volumes = [{"container_path": str(outer), "host_path": "a"}, {"container_path": str(inner), "host_path": "b"}]
    env.write_manifest("n", "exec sleep 300", container={"volumes": volumes})
    result = env.once()
    assert result.returncode == 1
    status = env.status("n")
    # The manifest validation catches it before any isolator runs.
    assert status["phase"] == "Invalid"
    assert "is nested under volumes[0]" in status["message"]
    # The isolator refuses it by itself too (e.g. for volumes merged from --default_container_info).
    isolator = SharedFilesystemIsolator(AgentConfig(isolation=[], launcher="posix"))
    container = ContainerInfo.model_construct(volumes=[Volume(**v) for v in volumes])
    spec = ContainerSpec.model_validate({"command": {"value": "true"}}).model_copy(update={"container": container})
    sandbox = env.tmp / "sandbox"
    sandbox.mkdir()
    with pytest.raises(PermanentError) as info:
        isolator.prepare("c", ContainerConfig("c", "n", "n.yaml", spec, "h", "h", str(sandbox)))
    assert str(info.value) == f"Cannot mount volume to '{inner}' because it is under volume '{outer}'"
    destroy_all(env)


# --- pieces ----------------------------------------------------------------------------------------

def test_read_only_remount_flags_keep_what_the_mount_has(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    syscalls.mount("reconciler-test", str(target), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC | syscalls.MS_NOATIME)
    try:
        flags = remount_read_only_flags(str(target))
        wanted = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_NOSUID | \
            syscalls.MS_NOEXEC | syscalls.MS_NOATIME
        assert flags == wanted
        assert submounts(str(tmp_path)) == [str(target)]
        assert submounts(str(target)) == []
    finally:
        syscalls.umount2(str(target), syscalls.MNT_DETACH)
    assert_no_mounts_under(tmp_path)


def test_relative_host_path_copies_mode_and_owner_of_the_container_path(tmp_path: Path) -> None:
    container_path = tmp_path / "shared-dir"
    container_path.mkdir()
    os.chmod(container_path, 0o1750)
    os.chown(container_path, 1234, 5678)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    spec = ContainerSpec.model_validate({"command": {"value": "true"}, "container": {
        "volumes": [{"container_path": str(container_path), "host_path": "a/b"}]}})
    info = SharedFilesystemIsolator(AgentConfig(isolation=[], launcher="posix")).prepare(
        "c", ContainerConfig("c", "n", "n.yaml", spec, "h", "h", str(sandbox)))
    assert info is not None
    created = (sandbox / "a" / "b").stat()
    assert (stat.S_IMODE(created.st_mode), created.st_uid, created.st_gid) == (0o1750, 1234, 5678)
    assert info.clone_namespaces & syscalls.CLONE_NEWNS
    assert info.mounts[0]["target"] == "/" and info.mounts[0]["flags"] == syscalls.MS_REC | syscalls.MS_PRIVATE
    assert info.mounts[1] == {"source": str(sandbox / "a" / "b"), "target": str(container_path), "fstype": None,
                              "flags": syscalls.MS_BIND | syscalls.MS_REC, "data": None}


def test_relative_host_path_may_not_leave_the_sandbox_through_a_symlink(tmp_path: Path) -> None:
    sandbox, elsewhere, container_path = tmp_path / "sandbox", tmp_path / "elsewhere", tmp_path / "cp"
    for d in (sandbox, elsewhere, container_path):
        d.mkdir()
    os.chmod(container_path, 0o777)
    (sandbox / "data").symlink_to(elsewhere)
    spec = ContainerSpec.model_validate({"command": {"value": "true"}, "container": {
        "volumes": [{"container_path": str(container_path), "host_path": "data"}]}})
    with pytest.raises(PermanentError, match="must be a directory inside the sandbox"):
        SharedFilesystemIsolator(AgentConfig(isolation=[], launcher="posix")).prepare(
            "c", ContainerConfig("c", "n", "n.yaml", spec, "h", "h", str(sandbox)))
    assert stat.S_IMODE(elsewhere.stat().st_mode) != 0o777    # nothing outside the sandbox was chmod'ed
