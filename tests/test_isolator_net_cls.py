"""cgroups/net_cls: Mesos's NetClsHandleManager (its four tests, ported, and its exact messages), and the
isolator as a user sees it: the classid in the kernel and in the status file, handles in _agent.json,
exhaustion, recovery across agent restarts, a narrowed range, and packets counted by iptables under
the container's classid.

The agent tests run the real agent as root, each in its own cgroups root (the fixtures kill and remove
everything, also in the net_cls hierarchy). The first of them mounts the net_cls hierarchy at
/sys/fs/cgroup/net_cls when the kernel has it and it is mounted nowhere, as Mesos does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import IsolatorSetupError
from reconciler.isolators.net_cls import (
    NET_CLS_MOUNTPOINT,
    NetClsError,
    NetClsHandle,
    NetClsHandleManager,
    NetClsIsolator,
)
from reconciler.linux import cgroups, syscalls
from reconciler.linux.cgroups import CgroupMounts, Hierarchy

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.root


# --- NetClsHandleManager: Mesos's tests (cgroups_isolator_tests.cpp), ported ------------------------

def test_allocate_free_handles() -> None:
    manager = NetClsHandleManager([(0x0002, 0x0003)])
    handle = manager.alloc(0x0003)
    assert manager.is_used(handle)
    manager.free(handle)
    assert not manager.is_used(handle)


def test_allocate_invalid_primary() -> None:
    manager = NetClsHandleManager([(0x0002, 0x0003)])
    with pytest.raises(NetClsError, match=r"^Primary handle 0x1 not present in primary handle range$"):
        manager.alloc(0x0001)


def test_reserve_handles() -> None:
    manager = NetClsHandleManager([(0x0002, 0x0003)])
    handle = NetClsHandle(0x0003, 0xFFFF)
    manager.reserve(handle)
    assert manager.is_used(handle)


def test_secondary_handle_range() -> None:
    manager = NetClsHandleManager([(0x0002, 0x0003)], [(0xFFFF, 0xFFFF)])
    handle = manager.alloc(0x0003)
    assert handle == NetClsHandle(0x0003, 0xFFFF)
    assert manager.is_used(handle)
    with pytest.raises(NetClsError, match=r"^No free handles remaining for primary handle 0x3$"):
        manager.alloc(0x0003)
    manager.free(handle)
    manager.reserve(handle)
    assert manager.is_used(handle)
    with pytest.raises(NetClsError, match=r"^Secondary handle 0x1 not present in secondary handle range $"):
        manager.reserve(NetClsHandle(0x0003, 0x0001))


# --- the rest of the manager's semantics --------------------------------------------------------

def test_lowest_free_secondary_first_and_reused_after_free() -> None:
    manager = NetClsHandleManager([(0x12, 0x12)], [(0x0011, 0x0014)])
    assert [manager.alloc().secondary for _ in range(3)] == [0x11, 0x12, 0x13]
    manager.free(NetClsHandle(0x12, 0x12))
    assert manager.alloc() == NetClsHandle(0x12, 0x12)      # the lowest free, not the next unused
    assert manager.alloc() == NetClsHandle(0x12, 0x14)
    assert manager.total == 4 and manager.used_count(0x12) == 4


def test_default_secondary_range_is_1_to_ffff() -> None:
    manager = NetClsHandleManager([(0x10, 0x10)])
    assert manager.alloc() == NetClsHandle(0x10, 0x0001)
    assert manager.total == 0xFFFF
    manager.reserve(NetClsHandle(0x10, 0xFFFF))
    with pytest.raises(NetClsError, match=r"^Secondary handle 0x0 not present in secondary handle range $"):
        manager.reserve(NetClsHandle(0x10, 0))


def test_double_allocation_and_double_free_are_refused_with_mesos_messages() -> None:
    manager = NetClsHandleManager([(0x10, 0x10)], [(1, 10)])
    with pytest.raises(NetClsError, match=r"^No secondary handles have been allocated from this primary handle 0x10$"):
        manager.free(NetClsHandle(0x10, 1))
    handle = manager.alloc()
    with pytest.raises(NetClsError, match=r"^The secondary handle 0x1, for the primary handle 0x10 has already been allocated$"):
        manager.reserve(handle)
    manager.free(handle)
    with pytest.raises(NetClsError, match=r"^Secondary handle 0x1 is not allocated for primary handle 0x10$"):
        manager.free(handle)
    with pytest.raises(NetClsError, match=r"^Primary handle 0x11 not present in primary handle range$"):
        manager.free(NetClsHandle(0x11, 1))
    with pytest.raises(NetClsError, match=r"^Primary handle: 0x11 is not within the primary's range$"):
        manager.is_used(NetClsHandle(0x11, 1))
    with pytest.raises(NetClsError, match=r"^Not Implemented$"):
        manager.alloc_primary()


def test_handle_is_printed_as_mesos_prints_it_and_as_spec_shows_it() -> None:
    handle = NetClsHandle.from_classid(0x00100001)
    assert (handle.primary, handle.secondary, handle.classid) == (0x10, 0x1, 1048577)
    assert str(handle) == "0x100001"
    assert handle.status() == {"classid": "0x00100001", "classid_int": 1048577, "primary": "0x0010",
                               "secondary": "0x0001"}


# --- setup refusals, without touching the host ------------------------------------------------------

def test_cgroup_v2_only_host_is_refused_with_one_line(tmp_path: Path) -> None:
    v2 = Hierarchy(2, str(tmp_path), frozenset())
    with pytest.raises(IsolatorSetupError) as info:
        NetClsIsolator(AgentConfig(launcher="posix", isolation=[]), mounts=CgroupMounts(v2=v2, unified=True),
                       mountpoint=str(tmp_path / "net_cls"))
    message = str(info.value)
    assert message.startswith("flag --isolation: cgroups/net_cls needs the cgroup v1 net_cls controller")
    assert "only cgroup v2" in message and "\n" not in message
    assert not (tmp_path / "net_cls").exists()       # nothing was created in the v2 tree


def test_an_existing_net_cls_hierarchy_is_used_where_it_is(tmp_path: Path) -> None:
    existing = Hierarchy(1, str(tmp_path / "net_cls,net_prio"), frozenset({"net_cls", "net_prio"}))
    isolator = NetClsIsolator(AgentConfig(launcher="posix", isolation=[]), mounts=CgroupMounts(v1={"net_cls": existing}),
                              mountpoint=str(tmp_path / "elsewhere"))
    assert isolator.hierarchy is existing and not isolator.mounted_by_agent
    assert isolator.agent_status() == {"hierarchy": existing.mountpoint, "mounted_by_agent": False, "managed": False}


# --- the agent, as root -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def net_cls_mount_left_as_found() -> Iterator[None]:
    """The agent mounts net_cls where the kernel has it unmounted (as Mesos does) and leaves it mounted:
    that is its job. These tests put the host back as they found it, once no cgroup is left in it."""
    before = cgroups.find_mounts().v1.get("net_cls") if IS_ROOT else None
    yield
    if not IS_ROOT or before is not None:
        return
    after = cgroups.find_mounts().v1.get("net_cls")
    if after is None or after.mountpoint != NET_CLS_MOUNTPOINT or after.children(""):
        return     # not ours, or someone is using it now
    syscalls.umount2(after.mountpoint)
    try:
        os.rmdir(after.mountpoint)
    except OSError:
        pass


def net_cls_hierarchy() -> Hierarchy:
    found = cgroups.find_mounts().v1.get("net_cls")
    assert found is not None, "the agent should have mounted (or found) the net_cls hierarchy"
    return found


def launch(env: Any, names: list[str], *flags: str, command: str = "sleep 1000") -> dict[str, dict[str, Any]]:
    for name in names:
        env.write_manifest(name, command, restart_policy="Never")
    result = env.once(*flags, isolation="cgroups/net_cls")
    assert result.returncode in (0, 1), result.stderr
    return {name: env.status(name) for name in names}


def classid_of(env: Any, status: dict[str, Any]) -> int:
    return int(net_cls_hierarchy().read(f"{env.cgroups_root}/{status['container_id']}", "net_cls.classid"))


@root_only
def test_classid_is_written_and_pid_placed_as_mesos_isolate_test(agent_env: Any) -> None:
    # ROOT_CGROUPS_NET_CLS_Isolate: primary 18 given in decimal, secondaries 0xffff,0xffff.
    statuses = launch(agent_env, ["web"], "--cgroups_net_cls_primary_handle=18",
                      "--cgroups_net_cls_secondary_handles=0xffff,0xffff")
    status = statuses["web"]
    assert status["phase"] == "Running", status
    cgroup = f"{agent_env.cgroups_root}/{status['container_id']}"
    hierarchy = net_cls_hierarchy()
    assert status["pid"] in hierarchy.procs(cgroup)
    classid = classid_of(agent_env, status)
    assert classid >> 16 == 0x12 and classid & 0xFFFF == 0xFFFF
    assert status["net_cls"] == {"classid": "0x0012ffff", "classid_int": 0x12FFFF, "primary": "0x0012",
                                 "secondary": "0xffff"}
    (agent_env.manifests / "web.yaml").unlink()
    assert agent_env.once(isolation="cgroups/net_cls", cgroups_net_cls_primary_handle="18",
                          cgroups_net_cls_secondary_handles="0xffff,0xffff").returncode == 0
    assert not hierarchy.exists(cgroup)


@root_only
def test_lowest_free_handle_is_reported_and_agent_json_counts_handles(agent_env: Any) -> None:
    # ROOT_CGROUPS_NET_CLS_ContainerStatus: secondaries 0x0011,0x0012 → the first container gets 0x0011.
    flags = ("--cgroups_net_cls_primary_handle=0x0012", "--cgroups_net_cls_secondary_handles=0x0011,0x0012")
    first = launch(agent_env, ["a"], *flags)["a"]
    assert first["net_cls"]["secondary"] == "0x0011" and first["net_cls"]["primary"] == "0x0012"
    agent = agent_env.agent_status()["isolator_status"]["cgroups/net_cls"]
    assert agent["handles_used"] == 1 and agent["handles_free"] == 1 and agent["handles_total"] == 2
    assert agent["primary"] == "0x0012" and agent["secondary_handles"] == "0x0011,0x0012"
    second = launch(agent_env, ["a", "b"], *flags)["b"]       # the agent restarted: a's handle was reserved
    assert second["net_cls"]["secondary"] == "0x0012"
    assert classid_of(agent_env, second) == 0x120012
    assert agent_env.agent_status()["isolator_status"]["cgroups/net_cls"]["handles_free"] == 0


@root_only
def test_exhaustion_fails_the_launch_and_it_is_retried_once_a_handle_is_freed(agent_env: Any) -> None:
    flags = ["--cgroups_net_cls_primary_handle=0x10", "--cgroups_net_cls_secondary_handles=1,1"]
    agent_env.write_manifest("one", "sleep 1000")
    agent_env.write_manifest("two", "sleep 1000")
    agent = agent_env.start(*flags, isolation="cgroups/net_cls", resync_interval="1hrs")
    statuses = {name: agent_env.wait_status(name, lambda s: s["phase"] in ("Running", "Failed"))
                for name in ("one", "two")}
    running = [n for n, s in statuses.items() if s["phase"] == "Running"]
    failed = [n for n, s in statuses.items() if s["phase"] == "Failed"]
    assert len(running) == 1 and len(failed) == 1, statuses
    assert statuses[failed[0]]["reason"] == "NetClsHandlesExhausted"
    assert statuses[failed[0]]["message"].startswith(
        "Failed to allocate a net_cls handle: No free handles remaining for primary handle 0x10")
    (agent_env.manifests / f"{running[0]}.yaml").unlink()       # its destroy frees the only handle
    started = time.monotonic()
    status = agent_env.wait_status(failed[0], lambda s: s["phase"] == "Running", timeout=30)
    assert time.monotonic() - started < 5                       # at once: not a backoff timer, not a resync
    assert status["net_cls"]["classid"] == "0x00100001"
    agent_env.stop(agent)


@root_only
def test_handles_survive_an_agent_restart_and_a_narrowed_range_is_reported(agent_env: Any) -> None:
    wide = ("--cgroups_net_cls_primary_handle=0x20", "--cgroups_net_cls_secondary_handles=1,3")
    statuses = launch(agent_env, ["a", "b", "c"], *wide)
    classids = sorted(s["net_cls"]["classid_int"] for s in statuses.values())
    assert classids == [0x200001, 0x200002, 0x200003]
    # The range shrinks to 1-2 while c (0x200003) runs: c keeps its handle and it is reported.
    narrow = ("--cgroups_net_cls_primary_handle=0x20", "--cgroups_net_cls_secondary_handles=1,2")
    result = agent_env.once(*narrow, isolation="cgroups/net_cls")
    assert "keeps its net_cls handle 0x200003, which the handle manager does not hold" in result.stderr
    by_classid = {agent_env.status(n)["net_cls"]["classid_int"]: n for n in ("a", "b", "c")}
    assert set(by_classid) == set(classids) and all(agent_env.status(n)["phase"] == "Running" for n in "abc")
    report = agent_env.agent_status()["isolator_status"]["cgroups/net_cls"]
    unreserved = report["unreserved_handles"]
    assert [u["classid"] for u in unreserved] == ["0x00200003"]
    assert unreserved[0]["container_id"] == agent_env.status(by_classid[0x200003])["container_id"]
    assert "Secondary handle 0x3 not present in secondary handle range" in unreserved[0]["reason"]
    assert report["handles_used"] == 2 and report["handles_free"] == 0
    # A new container is never given a handle a recovered one holds: the range is full.
    statuses = launch(agent_env, ["a", "b", "c", "d"], *narrow)
    assert statuses["d"]["phase"] == "Failed" and statuses["d"]["reason"] == "NetClsHandlesExhausted"
    assert "No free handles remaining for primary handle 0x20" in statuses["d"]["message"]


@root_only
def test_without_a_primary_handle_containers_are_only_placed_in_net_cls_cgroups(agent_env: Any) -> None:
    status = launch(agent_env, ["plain"])["plain"]
    assert status["phase"] == "Running"
    assert "net_cls" not in status
    assert classid_of(agent_env, status) == 0
    assert status["pid"] in net_cls_hierarchy().procs(f"{agent_env.cgroups_root}/{status['container_id']}")
    assert agent_env.agent_status()["isolator_status"]["cgroups/net_cls"]["managed"] is False


# --- end to end: packets counted by iptables under the container's classid --------------------------

class IptablesCounters:
    """A chain of our own, jumped to from OUTPUT for loopback only, with one counting rule per classid.
    Every rule carries a comment naming this test run; all of it is deleted afterwards."""

    def __init__(self) -> None:
        self.chain = f"RECONCILER-T-{uuid.uuid4().hex[:8].upper()}"
        self.tag = f"reconciler-test {self.chain}"
        self.jump = ["OUTPUT", "-o", "lo", "-m", "comment", "--comment", self.tag, "-j", self.chain]

    def run(self, *args: str) -> str:
        result = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def create(self, classids: list[int], port: int) -> None:
        self.run("-N", self.chain)
        for classid in classids:
            self.run("-A", self.chain, "-p", "udp", "--dport", str(port), "-m", "cgroup", "--cgroup", hex(classid),
                     "-m", "comment", "--comment", self.tag)
        self.run("-I", *self.jump)

    def packets(self) -> dict[int, int]:
        counts = {}
        for line in self.run("-L", self.chain, "-v", "-x", "-n").splitlines():
            match = re.search(r"^\s*(\d+)\s+\d+.*\bcgroup (\d+)\b", line)
            if match:
                counts[int(match.group(2))] = int(match.group(1))
        return counts

    def delete(self) -> None:
        for args in (["-D", *self.jump], ["-F", self.chain], ["-X", self.chain]):
            subprocess.run(["iptables", "-w", *args], capture_output=True)


@pytest.fixture
def iptables() -> Iterator[IptablesCounters]:
    if not IS_ROOT:
        pytest.skip("needs root")
    if shutil.which("iptables") is None:
        pytest.skip("iptables is missing: apt-get install -y iptables")
    counters = IptablesCounters()
    try:
        yield counters
    finally:
        counters.delete()


SENDER = ("python3 -c \"import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
          "[s.sendto(b'x', ('127.0.0.1', {port})) for _ in range({count})]\" && exec sleep 1000")


@root_only
def test_packets_are_counted_by_iptables_under_the_senders_classid(agent_env: Any, iptables: IptablesCounters) -> None:
    port = 20000 + uuid.uuid4().int % 20000      # nothing listens: the datagrams are dropped after OUTPUT
    flags = ("--cgroups_net_cls_primary_handle=0x30", "--cgroups_net_cls_secondary_handles=1,2")
    # Handles are handed out lowest first, in the order the loop launches: read them back from the status.
    agent_env.write_manifest("quiet", "exec sleep 1000", restart_policy="Never")
    first = agent_env.once(*flags, isolation="cgroups/net_cls")
    assert first.returncode == 0, first.stderr
    quiet = agent_env.status("quiet")["net_cls"]["classid_int"]
    talker_classid = 0x300001 if quiet == 0x300002 else 0x300002
    iptables.create([quiet, talker_classid], port)
    agent_env.write_manifest("talker", SENDER.format(port=port, count=25), restart_policy="Never")
    second = agent_env.once(*flags, isolation="cgroups/net_cls")
    assert second.returncode == 0, second.stderr
    talker = agent_env.status("talker")
    assert talker["net_cls"]["classid_int"] == talker_classid
    deadline = time.monotonic() + 10
    while iptables.packets().get(talker_classid, 0) < 25 and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = iptables.packets()
    assert counts[talker_classid] == 25          # every datagram the container sent, tagged from the first
    assert counts[quiet] == 0                    # and none under the other container's handle
    assert talker["phase"] == "Running"
