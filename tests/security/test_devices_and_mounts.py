"""Issue 10, escape 4: what root in a container did with devices and mounts.

- `mknod b MAJ MIN` + read: the host's disk (no devices cgroup rules: `a *:* rwm`). Tried on a loop
  device whose first bytes are a canary, and (read only, 512 bytes, never printed) on the disk that
  holds /var/tmp (some machines refuse even the host's root that disk: the loop device is the proof
  everywhere); and a node left in the sandbox for a host user to open.
- `mount -o remount,bind,rw /proc/sys` undoing the read-only mask, then a sysctl written.
- cgroupfs mounted to raise the container's own memory limit.
- a `mode: RO` volume remounted read-write.
- the cover over `/mnt/mesos/sandbox/.rootfs` unmounted, showing the overlay's directories.
"""

from __future__ import annotations

import os
import stat

from tests.security.conftest import MEM_MB, Scenario


def test_the_host_disk_cannot_be_read_through_a_node_made_inside(scenario: Scenario) -> None:
    lines = scenario.sections["disk"]
    assert not any(line.startswith("read-dev:") for line in lines), lines         # the disk holding /var/tmp
    assert scenario.canaries["disk"] not in scenario.stdout                        # the canary disk
    refusals = [line for line in lines if "not permitted" in line or "denied" in line or "EPERM" in line]
    assert len(refusals) >= 4, lines      # each of the two nodes, in /dev and in /tmp: not made, or not opened


def test_a_device_node_left_in_the_sandbox_opens_nothing_for_a_host_user(scenario: Scenario) -> None:
    got = scenario.host_user["device-node"]
    assert scenario.canaries["disk"] not in got and not got.endswith("exit 0"), got
    sandbox = scenario.env.agent.sandbox(scenario.attacker)
    assert os.statvfs(sandbox).f_flag & os.ST_NODEV, "the sandbox is not mounted nodev"
    node = sandbox / "disk"
    if os.path.lexists(node):        # made by root in the container (MKNOD is in Docker's set)
        assert stat.S_ISBLK(os.lstat(node).st_mode)


def test_proc_sys_stays_read_only(scenario: Scenario) -> None:
    assert "remounted-sys" not in scenario.stdout and "sysctl-written" not in scenario.stdout, \
        scenario.sections["sysctl"]


def test_cgroupfs_cannot_raise_the_memory_limit(scenario: Scenario) -> None:
    for done in ("mounted-cgroup", "raised-limit"):
        assert done not in scenario.stdout, scenario.sections["cgroupfs"]
    assert scenario.memory_limit == MEM_MB * 1024 * 1024, scenario.memory_limit


def test_a_read_only_volume_stays_read_only(scenario: Scenario) -> None:
    lines = scenario.sections["rovol"]
    assert "remounted-rw" not in lines and "wrote-ro" not in lines, lines
    ro_data = next(path for path in scenario.files_before if path.endswith("/ro-vol/data"))
    assert scenario.files_after[ro_data] == scenario.files_before[ro_data]


def test_the_cover_over_the_rootfs_stays(scenario: Scenario) -> None:
    lines = scenario.sections["cover"]
    assert "unmounted-cover" not in lines, lines
    # Nothing of the overlay's directories listed: the umount's refusal, and an empty (or closed) cover.
    assert all("umount" in line or "Permission denied" in line for line in lines), lines
