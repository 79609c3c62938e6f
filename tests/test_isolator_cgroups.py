"""cgroups/cpu and cgroups/mem: limits a user can read back from the kernel, usage in the status file,
in-place updates, OOM → MemoryLimit, and nothing left behind.

The agent tests run the real agent (`reconciler once` / `run`) as root against this kernel, each in its
own cgroups root; the fixtures kill and remove everything even when a test fails. A few tests drive
the isolators directly against a fake cgroup v2 tree (plain files) because this host's cgroup v2
hierarchy offers neither cpu nor memory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import ContainerConfig, IsolatorSetupError, Limitation, PermanentError
from reconciler.isolators.cgroups import (
    CgroupsCpuIsolator,
    CgroupsMemIsolator,
    cfs_quota_us,
    cpu_shares,
    cpu_weight,
    memory_limit_bytes,
)
from reconciler.linux import cgroups
from reconciler.linux.cgroups import CgroupMounts, Hierarchy
from reconciler.models import ContainerSpec, Resources

IS_ROOT = os.geteuid() == 0
MB = 1024 * 1024
ISOLATION = "cgroups/cpu,cgroups/mem,posix/cpu"
root_only = pytest.mark.root


# --- helpers -------------------------------------------------------------------------------------

def hierarchy(controller: str) -> Hierarchy:
    found = cgroups.hierarchy_for(cgroups.find_mounts(), controller)
    if found is None:
        pytest.skip(f"the {controller} cgroup controller is not mounted on this host")
    return found


def control(controller: str, env: Any, cid: str, name: str) -> str:
    return hierarchy(controller).read(f"{env.cgroups_root}/{cid}", name).strip()


def container_cgroups_left(env: Any) -> dict[str, list[str]]:
    """Container cgroups still under the test's root, per hierarchy (the root itself may stay, as in Mesos)."""
    mounts = cgroups.find_mounts()
    left = {}
    for name in ("cpu", "cpuacct", "memory", "freezer"):
        h = mounts.v1.get(name) or mounts.v2
        if h is not None and h.exists(env.cgroups_root) and h.children(env.cgroups_root):
            left[name] = h.children(env.cgroups_root)
    return left


def destroy_all(env: Any) -> None:
    """Remove every manifest, converge, and check the agent left no container cgroup behind."""
    for manifest in env.manifests.iterdir():
        manifest.unlink()
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert container_cgroups_left(env) == {}


def running(env: Any, name: str) -> dict[str, Any]:
    status = env.status(name)
    assert status is not None and status["phase"] == "Running", status
    return status


def once_ok(env: Any) -> None:
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr


# --- Mesos's numbers -------------------------------------------------------------------------------

@pytest.mark.parametrize("cpus, shares, quota", [
    (0.5, 512, 50_000), (1, 1024, 100_000), (2.5, 2560, 250_000),
    (0.001, 2, 1_000),            # the minimums: 2 shares, 1 ms of quota
    (None, 1024, -1),             # no cpus: the kernel's default weight, no quota
])
def test_cpu_numbers_are_mesos_numbers(cpus: float | None, shares: int, quota: int) -> None:
    assert cpu_shares(cpus) == shares
    assert cfs_quota_us(cpus) == quota


def test_cpu_weight_converts_shares_as_runc() -> None:
    assert cpu_weight(2) == 1
    assert cpu_weight(1024) == 39
    assert cpu_weight(262144) == 10000


def test_memory_limit_has_a_32mb_minimum() -> None:
    assert memory_limit_bytes(16) == 32 * MB
    assert memory_limit_bytes(64) == 64 * MB
    assert memory_limit_bytes(None) is None


@pytest.mark.parametrize("cls, name, controller", [
    (CgroupsMemIsolator, "cgroups/mem", "memory"),
    (CgroupsCpuIsolator, "cgroups/cpu", "cpu"),
])
def test_missing_controller_refuses_to_start_with_one_line(cls: type, name: str, controller: str) -> None:
    with pytest.raises(IsolatorSetupError) as info:
        cls(AgentConfig(launcher="posix", isolation=[]), mounts=CgroupMounts())
    assert str(info.value) == f"flag --isolation: {name} needs the {controller} cgroup controller, which is not mounted"


# --- cgroup v2, against a fake tree -----------------------------------------------------------------

def fake_v2(tmp_path: Path, root: str, cid: str) -> Hierarchy:
    """Plain files standing in for a unified hierarchy offering cpu and memory."""
    top = tmp_path / "cgroup2"
    (top / root / cid).mkdir(parents=True)
    (top / "cgroup.controllers").write_text("cpu memory pids\n")
    for d in (top, top / root):
        (d / "cgroup.subtree_control").write_text("")
    files = {
        "cgroup.procs": "", "cgroup.threads": "", "cpu.weight": "100\n", "cpu.max": "max 100000\n",
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 40\n"
                    "nr_throttled 3\nthrottled_usec 125000\n",
        "memory.max": "max\n", "memory.current": str(40 * MB), "memory.peak": str(64 * MB),
        "memory.events": "low 0\nhigh 0\nmax 5\noom 0\noom_kill 0\n",
        "memory.stat": f"anon {6 * MB}\nfile {3 * MB}\nfile_mapped {MB}\nunevictable 0\n",
    }
    for name, text in files.items():
        (top / root / cid / name).write_text(text)
    return FakeHierarchy(2, str(top), frozenset())


class FakeHierarchy(Hierarchy):
    """Writes replace the file, as a write to a cgroup control file replaces its value."""

    def write(self, cgroup: str, control: str, value: str | int) -> None:
        Path(self.path(cgroup), control).write_text(str(value))

    def remove(self, cgroup: str) -> None:
        shutil.rmtree(self.path(cgroup), ignore_errors=True)


def container_config(cid: str, **resources: Any) -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"}, "resources": resources})
    return ContainerConfig(container_id=cid, name="c", manifest="c.yaml", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox="/nonexistent")


def test_v2_cpu_writes_weight_and_max_and_reads_cpu_stat(tmp_path: Path) -> None:
    cid = "c1"
    v2 = fake_v2(tmp_path, "rt", cid)
    isolator = CgroupsCpuIsolator(AgentConfig(cgroups_root="rt", launcher="posix", isolation=[]),
                                  mounts=CgroupMounts(v2=v2, unified=True))
    isolator.prepare(cid, container_config(cid, cpus=0.5))
    assert v2.read("rt/c1", "cpu.weight") == str(cpu_weight(512))
    assert v2.read("rt/c1", "cpu.max") == "50000 100000"
    assert v2.read("", "cgroup.subtree_control") == "+cpu"       # delegated down to the container
    isolator.update(cid, Resources(cpus=2))
    assert v2.read("rt/c1", "cpu.max") == "200000 100000"
    isolator.update(cid, Resources())
    assert v2.read("rt/c1", "cpu.max") == "max 100000"
    assert isolator.usage(cid) == {
        "cpus_user_time_secs": 2.0, "cpus_system_time_secs": 0.5, "cpus_nr_periods": 40,
        "cpus_nr_throttled": 3, "cpus_throttled_time_secs": 0.125, "processes": 0, "threads": 0,
    }
    assert isolator.usage("unknown") == {}


@pytest.mark.parametrize("counter", ["oom_kill", "oom"])
def test_v2_memory_limit_usage_and_oom_watch(tmp_path: Path, counter: str) -> None:
    cid = "c1"
    v2 = fake_v2(tmp_path, "rt", cid)
    isolator = CgroupsMemIsolator(AgentConfig(cgroups_root="rt", launcher="posix", isolation=[]),
                                  mounts=CgroupMounts(v2=v2, unified=True))
    isolator.prepare(cid, container_config(cid, mem=64))
    assert v2.read("rt/c1", "memory.max") == str(64 * MB)
    assert isolator.usage(cid) == {"mem_total_bytes": 40 * MB, "mem_rss_bytes": 6 * MB, "mem_cache_bytes": 3 * MB,
                                   "mem_mapped_file_bytes": MB, "mem_unevictable_bytes": 0}
    with pytest.raises(PermanentError, match="cannot lower the memory limit to 32MB: the container uses 40MB now"):
        isolator.update(cid, Resources(mem=8))   # 32 MB (the minimum) is below the 40 MB in use
    assert v2.read("rt/c1", "memory.max") == str(64 * MB)
    isolator.update(cid, Resources(mem=48))
    assert v2.read("rt/c1", "memory.max") == str(48 * MB)
    isolator.update(cid, Resources(mem=64))
    limitations: list[Limitation] = []

    async def scenario() -> None:
        isolator.watch(cid).add_done_callback(lambda f: limitations.append(f.result()))
        isolator.watch(cid).add_done_callback(lambda f: limitations.append(f.result()))     # idempotent
        await asyncio.sleep(0.15)
        assert limitations == []                           # "max 5" alone is not an OOM kill
        events = Path(v2.path("rt/c1"), "memory.events")
        events.write_text(events.read_text().replace(f"\n{counter} 0", f"\n{counter} 1"))
        for _ in range(100):
            if limitations:
                break
            await asyncio.sleep(0.02)
        isolator.cleanup(cid)

    asyncio.run(scenario())
    assert len(limitations) == 1
    assert limitations[0].reason == "MemoryLimit"
    assert limitations[0].message.startswith("Memory limit exceeded: Requested: 64MB Maximum Used: 64MB\n\n"
                                             "MEMORY STATISTICS: \nanon ")
    assert limitations[0].resources == {"mem": 64}


# --- the real kernel, through the agent ----------------------------------------------------------------

@root_only
def test_cpu_cgroup_gets_shares_and_cfs_quota(agent_env: Any) -> None:
    agent_env.isolation = ISOLATION
    agent_env.write_manifest("web", "exec sleep 300", resources={"cpus": 0.5, "mem": 64})
    once_ok(agent_env)
    status = running(agent_env, "web")
    cid = status["container_id"]
    cpu = hierarchy("cpu")
    if cpu.version == 1:
        assert control("cpu", agent_env, cid, "cpu.shares") == "512"
        assert control("cpu", agent_env, cid, "cpu.cfs_period_us") == "100000"
        assert control("cpu", agent_env, cid, "cpu.cfs_quota_us") == "50000"
        assert str(status["pid"]) in control("cpuacct", agent_env, cid, "cgroup.procs").split()
    else:
        assert control("cpu", agent_env, cid, "cpu.max") == "50000 100000"
    assert str(status["pid"]) in control("cpu", agent_env, cid, "cgroup.procs").split()
    assert str(status["pid"]) in control("memory", agent_env, cid, "cgroup.procs").split()
    destroy_all(agent_env)


@root_only
def test_cpu_statistics_come_from_the_cgroup(agent_env: Any) -> None:
    agent_env.isolation = ISOLATION
    busy = (f"exec {sys.executable} -c \"import threading, time\n"
            "def spin():\n    while time.thread_time() < 0.4:\n        for _ in range(100000): pass\n"
            "threads = [threading.Thread(target=spin) for _ in range(2)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]; time.sleep(300)\"")
    agent_env.write_manifest("busy", busy, resources={"cpus": 0.5})
    agent = agent_env.start()
    status = agent_env.wait_status(
        "busy", lambda s: s.get("statistics", {}).get("cpus_user_time_secs", 0) >= 0.5
        and s["statistics"].get("cpus_nr_throttled", 0) > 0, timeout=20)
    stats = status["statistics"]
    # 2 threads wanting 0.4 s of cpu each, under a 0.5 cpu quota: throttled.
    assert stats["cpus_nr_periods"] >= stats["cpus_nr_throttled"] > 0
    assert stats["cpus_throttled_time_secs"] > 0
    assert stats["processes"] == 2            # the init and python
    assert stats["threads"] >= 2
    assert stats["mem_total_bytes"] > 0 and stats["mem_rss_bytes"] > 0
    agent_env.stop(agent)
    destroy_all(agent_env)


@root_only
def test_cpu_update_in_place_keeps_the_process(agent_env: Any) -> None:
    agent_env.isolation = ISOLATION
    agent_env.write_manifest("web", "exec sleep 300", resources={"cpus": 0.5, "mem": 64})
    once_ok(agent_env)
    before = running(agent_env, "web")
    agent_env.write_manifest("web", "exec sleep 300", resources={"cpus": 1.5, "mem": 64})
    once_ok(agent_env)
    after = running(agent_env, "web")
    assert (after["container_id"], after["pid"], after["restarts"]) == \
        (before["container_id"], before["pid"], before["restarts"])
    cid = after["container_id"]
    if hierarchy("cpu").version == 1:
        assert control("cpu", agent_env, cid, "cpu.shares") == "1536"
        assert control("cpu", agent_env, cid, "cpu.cfs_quota_us") == "150000"
    else:
        assert control("cpu", agent_env, cid, "cpu.max") == "150000 100000"
    assert after["statistics"]["cpus_limit"] == 1.5
    destroy_all(agent_env)


def memory_limit(env: Any, cid: str) -> int:
    h = hierarchy("memory")
    return int(control("memory", env, cid, "memory.max" if h.version == 2 else "memory.limit_in_bytes"))


@root_only
@pytest.mark.parametrize("mem, expected", [(64, 64 * MB), (16, 32 * MB)])
def test_memory_limit_is_set_with_a_32mb_minimum(agent_env: Any, mem: int, expected: int) -> None:
    agent_env.isolation = ISOLATION
    agent_env.write_manifest("web", "exec sleep 300", resources={"mem": mem})
    once_ok(agent_env)
    cid = running(agent_env, "web")["container_id"]
    assert memory_limit(agent_env, cid) == expected
    if hierarchy("memory").version == 1:
        assert int(control("memory", agent_env, cid, "memory.soft_limit_in_bytes")) == expected
        assert control("memory", agent_env, cid, "memory.oom_control").startswith("oom_kill_disable 0")
    destroy_all(agent_env)


@root_only
def test_oom_ends_the_container_with_memory_limit(agent_env: Any) -> None:
    agent_env.isolation = ISOLATION
    agent_env.write_manifest(
        "hog", f"{sys.executable} -c \"b = bytearray(200 * 1024 * 1024); import time; time.sleep(30)\"",
        resources={"mem": 64}, restart_policy="Never")
    agent = agent_env.start()
    status = agent_env.wait_status("hog", lambda s: s["phase"] in ("Failed", "Succeeded"), timeout=30)
    assert status["phase"] == "Failed"
    assert status["reason"] == "MemoryLimit"
    assert status["message"].startswith("Memory limit exceeded: Requested: 64MB Maximum Used: ")
    assert "\n\nMEMORY STATISTICS: \n" in status["message"]
    assert "rss " in status["message"] or "anon " in status["message"]
    assert container_cgroups_left(agent_env) == {}
    agent_env.stop(agent)
    destroy_all(agent_env)


@root_only
def test_oom_after_agent_restart_still_ends_with_memory_limit(agent_env: Any) -> None:
    """The OOM watch is armed again for a recovered container (the eventfd died with the old agent)."""
    agent_env.isolation = ISOLATION
    hog_on_go = (f"exec {sys.executable} -c \"import os, time\n"
                 "while not os.path.exists('go'): time.sleep(0.05)\n"
                 "b = bytearray(200 * 1024 * 1024); time.sleep(30)\"")
    agent_env.write_manifest("hog", hog_on_go, resources={"mem": 64}, restart_policy="Never")
    first = agent_env.start()
    before = agent_env.wait_status("hog", lambda s: s["phase"] == "Running")
    agent_env.stop(first)
    second = agent_env.start()
    deadline = time.monotonic() + 15
    while (agent_env.agent_status() or {}).get("pid") != second.pid:
        assert time.monotonic() < deadline, "the second agent never published _agent.json"
        time.sleep(0.05)
    assert running(agent_env, "hog")["pid"] == before["pid"]      # recovered, not restarted
    (agent_env.sandbox(before) / "go").touch()
    status = agent_env.wait_status("hog", lambda s: s["phase"] in ("Failed", "Succeeded"), timeout=30)
    assert (status["phase"], status["reason"]) == ("Failed", "MemoryLimit")
    assert status["message"].startswith("Memory limit exceeded: Requested: 64MB Maximum Used: ")
    agent_env.stop(second)
    destroy_all(agent_env)


HOLD_80MB = (f"exec {sys.executable} -c \"b = b'x' * (80 * 1024 * 1024); import time; "
             "open('ready', 'w').close(); time.sleep(300)\"")


def wait_file(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@root_only
def test_memory_update_in_place_raises_and_refuses_to_go_below_usage(agent_env: Any) -> None:
    agent_env.isolation = ISOLATION
    agent_env.write_manifest("hold", HOLD_80MB, resources={"mem": 128})
    once_ok(agent_env)
    first = running(agent_env, "hold")
    cid, pid = first["container_id"], first["pid"]
    wait_file(agent_env.sandbox(first) / "ready")

    # Raise: applied in place.
    agent_env.write_manifest("hold", HOLD_80MB, resources={"mem": 256})
    once_ok(agent_env)
    status = running(agent_env, "hold")
    assert (status["container_id"], status["pid"], status["restarts"]) == (cid, pid, 0)
    assert memory_limit(agent_env, cid) == 256 * MB
    assert status["message"] == ""

    # Below what it uses (80 MB and more): refused, said in the status, the container runs on.
    agent_env.write_manifest("hold", HOLD_80MB, resources={"mem": 48})
    agent_env.once()
    status = running(agent_env, "hold")
    assert (status["container_id"], status["pid"]) == (cid, pid)
    assert "cannot lower the memory limit to 48MB" in status["message"]
    assert "uses" in status["message"] and "set mem to at least" in status["message"]
    assert memory_limit(agent_env, cid) == 256 * MB

    # Lower, but above usage: applied.
    agent_env.write_manifest("hold", HOLD_80MB, resources={"mem": 160})
    once_ok(agent_env)
    status = running(agent_env, "hold")
    assert (status["container_id"], status["pid"]) == (cid, pid)
    assert memory_limit(agent_env, cid) == 160 * MB
    assert status["message"] == ""
    destroy_all(agent_env)


@root_only
def test_unknown_orphan_cgroups_are_killed_and_removed_on_recovery(agent_env: Any) -> None:
    """MESOS-2367: cgroups under the root that no checkpoint owns (e.g. left by a lost work_dir)."""
    agent_env.isolation = ISOLATION
    once_ok(agent_env)     # creates the roots
    orphan = f"{agent_env.cgroups_root}/{uuid.uuid4()}"
    memory, cpu = hierarchy("memory"), hierarchy("cpu")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        for h in dict.fromkeys([memory, cpu]):
            h.create(orphan)
            h.attach(orphan, sleeper.pid)
        once_ok(agent_env)
        assert sleeper.wait(timeout=15) == -signal.SIGKILL
        assert not memory.exists(orphan) and not cpu.exists(orphan)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    destroy_all(agent_env)
