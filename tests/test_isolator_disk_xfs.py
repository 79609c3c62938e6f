"""disk/xfs: the refusal at start where work_dir cannot have XFS project quotas (tested for real on this
machine), the project-id allocator, and the isolator's policies, recovery and reclaim.

This machine's kernel has no XFS quota support (CONFIG_XFS_QUOTA is not set): XFS mounts, but not
with -o prjquota. So the isolator's logic runs here on a loop-mounted XFS image with the real
project-id ioctls, and quotactl replaced by a recording stand-in; the end-to-end tests that need the
kernel to enforce limits mount an XFS image with prjquota and are skipped, with the kernel's own
words, where that mount fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig, ConfigError, load
from reconciler.isolators.base import ContainerConfig, ContainerState, IsolatorSetupError, Limitation
from reconciler.isolators.disk_xfs import (
    ACCOUNTING,
    ACTIVE,
    PASSIVE,
    DiskXfsIsolator,
    KernelQuota,
    ProjectIdAllocator,
    ProjectIdExhausted,
)
from reconciler.linux import quota
from reconciler.models import ContainerSpec, Resources
from tests.test_linux_quota import XfsMount, mount_xfs, umount_xfs

IS_ROOT = os.geteuid() == 0
MB = 1024 * 1024
root_only = pytest.mark.root


# --- the allocator ------------------------------------------------------------------------------------

def test_lowest_free_id_first_and_exhaustion(tmp_path: Path) -> None:
    allocator = ProjectIdAllocator(5000, 5002)
    dirs = [tmp_path / f"s{i}" for i in range(4)]
    for d in dirs:
        d.mkdir()
    assert [allocator.allocate(str(d)) for d in dirs[:3]] == [5000, 5001, 5002]
    assert allocator.free == 0 and allocator.total == 3
    with pytest.raises(ProjectIdExhausted, match=r"^Failed to assign project ID, range exhausted$"):
        allocator.allocate(str(dirs[3]))


def test_an_id_is_reclaimed_only_once_no_directory_carries_it(tmp_path: Path) -> None:
    allocator = ProjectIdAllocator(5000, 5009)
    sandbox, volume = tmp_path / "sandbox", tmp_path / "ephemeral"
    sandbox.mkdir()
    volume.mkdir()
    project = allocator.allocate(str(sandbox))
    allocator.add_root(project, str(volume))                # a second directory with the same id
    other = allocator.allocate(str(tmp_path))
    assert (project, other) == (5000, 5001)
    assert allocator.reclaim() == []
    shutil.rmtree(sandbox)
    assert allocator.reclaim() == [] and allocator.free == 8      # the volume still carries 5000
    shutil.rmtree(volume)
    assert allocator.reclaim() == [5000] and allocator.free == 9
    assert allocator.allocate(str(tmp_path)) == 5000             # the lowest free again


def test_recovered_ids_outside_a_narrowed_range_are_kept_but_not_counted(tmp_path: Path) -> None:
    allocator = ProjectIdAllocator(5000, 5001)
    allocator.add_root(4000, str(tmp_path))       # found on disk, from an older, wider range
    allocator.add_root(5001, str(tmp_path))
    assert allocator.free == 1
    assert allocator.allocate(str(tmp_path)) == 5000


# --- refusals at start, for real -----------------------------------------------------------------------

def agent_config(work_dir: Path, **flags: Any) -> AgentConfig:
    return AgentConfig(work_dir=str(work_dir), isolation=["disk/xfs"], launcher="posix" if not IS_ROOT else "linux",
                       **flags)


@root_only
def test_work_dir_not_on_xfs_is_refused_with_one_line(tmp_path: Path) -> None:
    if quota.is_xfs(str(tmp_path)):
        pytest.skip("the temporary directory is on XFS here")
    work_dir = tmp_path / "work"
    with pytest.raises(IsolatorSetupError) as info:
        DiskXfsIsolator(agent_config(work_dir))
    message = str(info.value)
    fstype = quota.mount_of(str(tmp_path)).fstype
    assert message.startswith(f"flag --work_dir: disk/xfs: '{work_dir}' is not an XFS filesystem (it is on {fstype}")
    assert "\n" not in message


@root_only
def test_the_agent_refuses_to_start_exit_2_naming_the_flag(tmp_path: Path) -> None:
    if quota.is_xfs(str(tmp_path)):
        pytest.skip("the temporary directory is on XFS here")
    (tmp_path / "manifests").mkdir()
    result = subprocess.run([sys.executable, "-m", "reconciler", "once", f"--manifests={tmp_path / 'manifests'}",
                             f"--work_dir={tmp_path / 'work'}", "--isolation=disk/xfs",
                             f"--cgroups_root=reconciler-test-{uuid.uuid4().hex[:12]}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reconciler: flag --work_dir: disk/xfs: ") and "is not an XFS filesystem" in lines[0]
    assert not (tmp_path / "work" / "containers").exists()       # nothing was started


@root_only
def test_xfs_without_project_quotas_is_refused_with_the_kernels_reason(xfs: XfsMount) -> None:
    work_dir = xfs.mountpoint / "work-refused"
    with pytest.raises(IsolatorSetupError) as info:
        DiskXfsIsolator(agent_config(work_dir))
    message = str(info.value)
    assert message.startswith(f"flag --work_dir: disk/xfs: XFS project quotas are not enabled on '{work_dir}' "
                              f"(mounted at {xfs.mountpoint})")
    if quota.kernel_config("CONFIG_XFS_QUOTA") == "n":
        assert "this kernel has no XFS quota support (CONFIG_XFS_QUOTA is not set)" in message
    else:
        assert "remount" in message
    assert "\n" not in message


def test_flag_values_mesos_refuses_are_refused() -> None:
    # ROOT_XFS_QuotaTest.IsolatorFlags: a range with 0, more than 32 bits, not a range at all.
    for bad in ("[0-10]", "foo", "100"):
        with pytest.raises(ConfigError, match=r"^flag --xfs_project_range \(from command line\): "):
            load(argparse.Namespace(xfs_project_range=bad), environ={})
    with pytest.raises(IsolatorSetupError, match=r"^flag --xfs_project_range: Project ID 1099511627776 is out of range"):
        DiskXfsIsolator(AgentConfig(xfs_project_range="[100-1099511627776]", isolation=[], launcher="posix"))


# --- the isolator on a real XFS, with quotactl recorded ----------------------------------------------------

class RecordingQuota(KernelQuota):
    """Real project-id ioctls; quotactl replaced: limits are recorded, usage is what the test says."""

    def __init__(self, enforcing: bool = True) -> None:
        self.limits: dict[int, tuple[int, int]] = {}
        self.used: dict[int, int] = {}
        self.cleared: list[int] = []
        self.enforcing_now = enforcing
        self.enabled = False

    def check(self, work_dir: str) -> None:
        assert quota.is_xfs(work_dir if os.path.exists(work_dir) else os.path.dirname(work_dir))

    def enforcing(self, path: str) -> bool:
        return self.enforcing_now

    def enable_enforcement(self, path: str) -> None:
        self.enabled = self.enforcing_now = True

    def get(self, path: str, project_id: int) -> quota.QuotaInfo | None:
        soft, hard = self.limits.get(project_id, (0, 0))
        return quota.QuotaInfo(soft, hard, self.used.get(project_id, 0))

    def set(self, path: str, project_id: int, soft_limit: int, hard_limit: int) -> None:
        self.limits[project_id] = (soft_limit, hard_limit)

    def clear(self, path: str, project_id: int) -> None:
        self.limits.pop(project_id, None)
        self.cleared.append(project_id)


def container(cid: str, work_dir: Path, **resources: Any) -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"}, "resources": resources})
    sandbox = work_dir / "sandboxes" / cid
    sandbox.mkdir(parents=True, exist_ok=True)
    return ContainerConfig(container_id=cid, name=cid, manifest=f"{cid}.yaml", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox=str(sandbox))


@pytest.fixture
def work_dir(xfs: XfsMount) -> Iterator[Path]:
    path = xfs.mountpoint / f"work-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@root_only
@pytest.mark.parametrize("enforce, kill, policy, limits", [
    (False, False, ACCOUNTING, None),
    (True, False, PASSIVE, (MB, MB)),
    (True, True, ACTIVE, (MB, MB + 10 * MB)),
])
def test_prepare_puts_the_sandbox_in_the_lowest_free_project_with_the_policys_limits(
        work_dir: Path, enforce: bool, kill: bool, policy: str, limits: tuple[int, int] | None) -> None:
    backend = RecordingQuota()
    isolator = DiskXfsIsolator(agent_config(work_dir, enforce_container_disk_quota=enforce, xfs_kill_containers=kill,
                                            xfs_quota_headroom=10, xfs_project_range="[6000-6001]"), backend=backend)
    assert isolator.policy == policy
    first = container("c1", work_dir, disk=1)
    isolator.prepare("c1", first)
    assert quota.get_project_id(first.sandbox) == 6000
    (Path(first.sandbox) / "written-later").write_text("x")     # the kernel charges new files to the project
    assert quota.get_project_id(str(Path(first.sandbox) / "written-later")) == 6000
    assert backend.limits.get(6000) == limits
    isolator.prepare("c1", first)                                 # prepare twice: harmless, same project
    isolator.prepare("c2", container("c2", work_dir))
    assert quota.get_project_id(str(work_dir / "sandboxes" / "c2")) == 6001
    assert 6001 not in backend.limits                             # no disk resource: accounting only
    assert isolator.agent_status()["project_ids_free"] == 0
    with pytest.raises(ProjectIdExhausted, match="range exhausted"):
        isolator.prepare("c3", container("c3", work_dir))
    # Destroyed: the id stays with the sandbox until the sandbox is removed, then comes back.
    isolator.cleanup("c1")
    isolator._reclaim()
    assert isolator.allocator.free == 0
    shutil.rmtree(first.sandbox)
    isolator.prepare("c3", container("c3", work_dir))             # a launch that needs an id reclaims first
    assert quota.get_project_id(str(work_dir / "sandboxes" / "c3")) == 6000
    assert 6000 in backend.cleared


@root_only
def test_passive_enforcement_is_turned_on_when_the_mount_only_accounts(work_dir: Path) -> None:
    backend = RecordingQuota(enforcing=False)
    DiskXfsIsolator(agent_config(work_dir, enforce_container_disk_quota=True), backend=backend)
    assert backend.enabled


@root_only
def test_active_policy_reports_a_container_past_its_soft_limit(work_dir: Path) -> None:
    backend = RecordingQuota()
    isolator = DiskXfsIsolator(agent_config(work_dir, enforce_container_disk_quota=True, xfs_kill_containers=True,
                                            xfs_quota_headroom=10, container_disk_watch_interval="10ms"),
                               backend=backend)
    isolator.prepare("c1", container("c1", work_dir, disk=1))
    project = quota.get_project_id(str(work_dir / "sandboxes" / "c1"))
    limitations: list[Limitation] = []

    async def scenario() -> None:
        isolator.watch("c1").add_done_callback(lambda f: limitations.append(f.result()))
        backend.used[project] = 512 * 1024
        await asyncio.sleep(0.1)
        assert limitations == []
        assert isolator.status("c1")["disk"] == {"used_bytes": 512 * 1024, "limit_bytes": MB,
                                                 "checked_at": isolator.status("c1")["disk"]["checked_at"],
                                                 "enforced": True}
        backend.used[project] = 2 * MB + 4096
        for _ in range(100):
            if limitations:
                break
            await asyncio.sleep(0.01)
    asyncio.run(scenario())
    assert len(limitations) == 1
    assert limitations[0].reason == "DiskLimitation"
    assert limitations[0].message == "Disk usage (2052KB) exceeded quota (1MB)"
    assert limitations[0].resources == {"disk": 2.0}
    assert isolator.usage("c1") == {"disk_limit_bytes": MB, "disk_used_bytes": 2 * MB + 4096}
    isolator.update("c1", Resources(disk=8))
    assert backend.limits[project] == (8 * MB, 18 * MB)


@root_only
def test_recovery_rereads_project_ids_and_gives_old_containers_one(work_dir: Path) -> None:
    backend = RecordingQuota()
    flags = dict(enforce_container_disk_quota=True, xfs_project_range="[7000-7009]")
    first = DiskXfsIsolator(agent_config(work_dir, **flags), backend=backend)
    live, gone = container("live", work_dir, disk=2), container("gone", work_dir)
    first.prepare("live", live)
    first.prepare("gone", container("gone", work_dir))
    old = container("old", work_dir, disk=3)               # launched before disk/xfs was enabled: no project
    # The agent restarts: a new isolator learns from the sandboxes on disk.
    backend.limits.clear()
    second = DiskXfsIsolator(agent_config(work_dir, **flags), backend=backend)
    second.recover([ContainerState(live, 1), ContainerState(old, 2)], orphans=set())
    assert second.infos["live"].project_id == 7000 and backend.limits[7000] == (2 * MB, 2 * MB)
    assert second.infos["old"].project_id == 7002            # 7001 still carried by the other sandbox
    assert quota.get_project_id(old.sandbox) == 7002 and backend.limits[7002] == (3 * MB, 3 * MB)
    assert "gone" not in second.infos and second.allocator.free == 7
    shutil.rmtree(gone.sandbox)
    second._reclaim()
    assert second.allocator.free == 8 and 7001 in backend.cleared


# --- end to end, where the kernel has XFS project quotas ---------------------------------------------------

@pytest.fixture
def quota_work_dir(tmp_path: Path) -> Iterator[Path]:
    mount = mount_xfs(tmp_path, "prjquota")      # skipped here, with the kernel's reason
    try:  # requested before agent_env, so torn down after it: the containers are gone before the unmount
        yield mount.mountpoint / "work"
    finally:
        umount_xfs(mount)


WRITE_2MB = "dd if=/dev/zero of=file bs=1048576 count=2 && exec sleep 1000"


@root_only
def test_passive_enforcement_fails_writes_beyond_the_quota(quota_work_dir: Path, agent_env: Any) -> None:
    # ROOT_XFS_QuotaEnforcement.DiskUsageExceedsQuota: the write fails with EDQUOT, nobody is killed.
    agent_env.work_dir = quota_work_dir
    agent_env.write_manifest("writer", WRITE_2MB, restart_policy="Never", resources={"disk": 1})
    result = agent_env.once("--enforce_container_disk_quota", isolation="disk/xfs")
    assert result.returncode in (0, 1), result.stderr
    status = agent_env.wait_status("writer", lambda s: s["phase"] == "Failed", timeout=30)
    assert status["message"] == "Command exited with status 1" and status["reason"] == ""
    stderr = (agent_env.sandbox(status) / "stderr").read_text()
    assert re.search(r"Disk quota exceeded", stderr), stderr


@root_only
def test_active_enforcement_destroys_with_a_disk_limitation(quota_work_dir: Path, agent_env: Any) -> None:
    # ROOT_XFS_QuotaEnforcement.DiskUsageExceedsQuotaWithKill.
    agent_env.work_dir = quota_work_dir
    agent_env.write_manifest("writer", WRITE_2MB, restart_policy="Never", resources={"disk": 1})
    agent = agent_env.start("--enforce_container_disk_quota", "--xfs_kill_containers", isolation="disk/xfs",
                            xfs_quota_headroom="10", container_disk_watch_interval="10ms")
    status = agent_env.wait_status("writer", lambda s: s["phase"] == "Failed", timeout=30)
    agent_env.stop(agent)
    assert status["reason"] == "DiskLimitation"
    assert re.fullmatch(r"Disk usage \(\d+(KB|MB)\) exceeded quota \(1MB\)", status["message"])


@root_only
def test_measure_unmeasured_reads_every_quota_at_once_for_once(work_dir: Path) -> None:
    """`once` ends long before the watcher thread's first reading: it asks for one now."""
    backend = RecordingQuota()
    isolator = DiskXfsIsolator(agent_config(work_dir, enforce_container_disk_quota=True, xfs_kill_containers=True,
                                            xfs_quota_headroom=10, container_disk_watch_interval="1hrs"),
                               backend=backend)
    isolator.prepare("c1", container("c1", work_dir, disk=1))
    isolator.prepare("c2", container("c2", work_dir))
    over = quota.get_project_id(str(work_dir / "sandboxes" / "c1"))
    backend.used[over] = 2 * MB
    limitations: list[Limitation] = []

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        isolator.infos["c1"].on_limitation, isolator.infos["c1"].loop = limitations.append, loop
        first = await isolator.measure_unmeasured()
        await asyncio.sleep(0)   # the limitation is delivered on the loop
        return first, await isolator.measure_unmeasured()
    first, second = asyncio.run(scenario())
    assert (first, second) == (2, 0)
    assert isolator.status("c1")["disk"]["used_bytes"] == 2 * MB and isolator.status("c2")["disk"]["used_bytes"] == 0
    assert [limitation.reason for limitation in limitations] == ["DiskLimitation"]
