"""disk/du: sandbox usage as GNU du counts it, measured in the background, in the status file, and
enforced as a DiskLimitation with Mesos's message.

The measurement tests build real trees (sparse files, hard links, symlinks) and compare with
`du -s -B1`; mount exclusion is checked inside a private mount namespace (unshare), so nothing is
mounted on the host. The agent tests run the real agent as root in their own roots.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.diskusage import process, schedule, walk
from reconciler.diskusage.mounts import MountTable
from reconciler.diskusage.schedule import DiskUsageCollector
from reconciler.diskusage.walk import Cancelled, DiskUsage, du_measure, measure
from reconciler.diskusage.watch import Inotify, TreeUsage
from reconciler.isolators.base import ContainerConfig, Limitation
from reconciler.isolators.disk_du import DiskDuIsolator, _Tracked
from reconciler.models import ContainerSpec, Resources
from reconciler.units import format_bytes
from tests.conftest import alive

IS_ROOT = os.geteuid() == 0
KB, MB = 1024, 1024 * 1024
root_only = pytest.mark.root


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


# --- Mesos's Bytes formatting ---------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (0, "0B"), (1, "1B"), (1023, "1023B"), (1024, "1KB"), (2052 * KB, "2052KB"), (MB, "1MB"),
    (1536 * KB, "1536KB"), (3 * 1024 * MB, "3GB"), (1024 * 1024 * MB, "1TB"), (5 * 1024 * 1024 * MB, "5TB"),
    (MB + 1, "1048577B"),
])
def test_bytes_are_formatted_as_stout_formats_them(value: int, text: str) -> None:
    assert format_bytes(value) == text


# --- the measurement (DiskUsageCollectorTest, disk_quota_tests.cpp) ------------------------------------

def test_a_file_counts_at_least_its_size(tmp_path: Path) -> None:
    write(tmp_path / "file", 8 * KB)
    assert measure(str(tmp_path / "file")).used_bytes >= 8 * KB


def test_a_directory_tree_counts_every_file(tmp_path: Path) -> None:
    write(tmp_path / "1", 8 * KB)
    write(tmp_path / "2" / "2", 4 * KB)
    write(tmp_path / "2" / "3" / "3", 1 * KB)
    write(tmp_path / "2" / "3" / "4", 2 * KB)
    usage = measure(str(tmp_path))
    assert usage.used_bytes >= 15 * KB
    assert usage.entries == 7          # the top, two directories, four files


def test_symbolic_links_are_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    write(directory / "file", 64 * KB)
    (tmp_path / "link").symlink_to(directory)
    assert 64 * KB <= measure(str(directory)).used_bytes < 128 * KB
    assert measure(str(tmp_path / "link")).used_bytes < 64 * KB
    (directory / "loop").symlink_to(tmp_path)                     # a cycle, if it were followed
    assert measure(str(tmp_path)).used_bytes < 128 * KB


def test_hard_links_count_once(tmp_path: Path) -> None:
    write(tmp_path / "a" / "big", 256 * KB)
    (tmp_path / "b").mkdir()
    os.link(tmp_path / "a" / "big", tmp_path / "b" / "big-again")
    assert measure(str(tmp_path)).used_bytes < 2 * 256 * KB
    assert measure(str(tmp_path)).used_bytes == du_bytes(tmp_path)


def test_the_figure_is_gnu_du_s_figure_on_a_mixed_tree(tmp_path: Path) -> None:
    for d in range(20):
        for f in range(30):
            write(tmp_path / f"d{d}" / f"s{f % 3}" / f"f{f}", (d * 131 + f * 977) % 20000)
    with open(tmp_path / "sparse", "wb") as f:
        f.seek(50 * MB)
        f.write(b"end")                      # 50 MB apparent, a few KB allocated
    os.link(tmp_path / "d0" / "s1" / "f1", tmp_path / "hardlink")
    (tmp_path / "symlink").symlink_to("/usr")
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    os.mkfifo(tmp_path / "fifo")
    ours, theirs = measure(str(tmp_path)).used_bytes, du_bytes(tmp_path)
    assert ours == theirs                    # not just within 1 %: the same count
    assert ours < 10 * MB                    # allocated blocks, not apparent sizes


def test_the_periodic_full_walk_runs_gnu_du_with_mount_points_excluded(tmp_path: Path) -> None:
    # The full walk is du itself; excluded paths (volumes' mount points) go to it as --exclude patterns,
    # escaped, so a name with glob characters excludes itself and nothing else.
    write(tmp_path / "kept" / "f", 64 * KB)
    write(tmp_path / "vol[1]" / "big", 512 * KB)
    write(tmp_path / "vol1" / "f", 32 * KB)                  # would match an unescaped "vol[1]"
    os.link(tmp_path / "kept" / "f", tmp_path / "kept" / "g")
    (tmp_path / "symlink").symlink_to("/usr")
    excludes = [str(tmp_path / "vol[1]")]
    assert du_measure(str(tmp_path)).used_bytes == measure(str(tmp_path)).used_bytes == du_bytes(tmp_path)
    assert du_measure(str(tmp_path), excludes).used_bytes == measure(str(tmp_path), excludes).used_bytes
    assert du_measure(str(tmp_path), excludes).used_bytes < du_bytes(tmp_path) - 500 * KB
    assert du_measure(str(tmp_path), [str(tmp_path)]).used_bytes == 0
    with pytest.raises(FileNotFoundError):
        du_measure(str(tmp_path / "missing"))


def test_the_du_full_walk_is_cancelled_by_killing_du(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_du = tmp_path / "du"
    slow_du.write_text("#!/bin/sh\nexec sleep 30\n")
    slow_du.chmod(0o755)
    monkeypatch.setattr(walk, "_GNU_DU", [str(slow_du)])
    asked = []
    started = time.monotonic()
    with pytest.raises(Cancelled):
        du_measure(str(tmp_path), cancelled=lambda: asked.append(1) or len(asked) > 2)
    assert time.monotonic() - started < 5 and len(asked) == 3


def test_without_gnu_du_the_full_walk_is_our_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "f", 64 * KB)
    monkeypatch.setattr(walk, "_GNU_DU", [None])
    assert du_measure(str(tmp_path), entries=7) == measure(str(tmp_path))


def test_a_vanished_or_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        measure(str(tmp_path / "missing"))


def test_cancellation_stops_between_directories(tmp_path: Path) -> None:
    for d in range(5):
        write(tmp_path / f"d{d}" / "f", 10)
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 2
    with pytest.raises(Cancelled):
        measure(str(tmp_path), cancelled=cancelled)


EXCLUDE_SCRIPT = r"""
import json, os, subprocess, sys
from reconciler.diskusage.mounts import MountTable
from reconciler.diskusage.walk import measure
sandbox, volume = sys.argv[1], sys.argv[2]
# The mount points themselves are skipped too, as du --exclude skips them: leave their directories out.
before = measure(sandbox).used_bytes - sum(os.lstat(os.path.join(sandbox, d)).st_blocks * 512 for d in ("vol", "tmp"))
# Same filesystem: only the mount table tells the bind mount apart.
subprocess.run(["mount", "--bind", volume, os.path.join(sandbox, "vol")], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", os.path.join(sandbox, "tmp")], check=True)
with open(os.path.join(sandbox, "tmp", "f"), "wb") as f:
    f.write(b"x" * 1048576)
table = MountTable()
excludes = table.below(sandbox)
print(json.dumps({"before": before, "with_mounts_excluded": measure(sandbox, excludes).used_bytes,
                  "device_check_only": measure(sandbox).used_bytes, "excludes": excludes}))
"""


@root_only
def test_volumes_bound_into_the_sandbox_are_not_counted(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    sandbox, volume = tmp_path / "sandbox", tmp_path / "volume"
    write(sandbox / "own", 64 * KB)
    (sandbox / "vol").mkdir()
    (sandbox / "tmp").mkdir()
    write(volume / "big", 4 * MB)
    # A private mount namespace: the mounts vanish with the process, the host never sees them.
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", EXCLUDE_SCRIPT,
                             str(sandbox), str(volume)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert sorted(doc["excludes"]) == [str(sandbox / "tmp"), str(sandbox / "vol")]
    assert doc["with_mounts_excluded"] == doc["before"]          # neither the bind mount nor the tmpfs
    assert doc["device_check_only"] >= doc["before"] + 4 * MB    # a same-device bind is only seen in mountinfo
    assert doc["device_check_only"] < doc["before"] + 5 * MB     # the tmpfs (another device) is skipped anyway


def test_mount_table_is_reread_only_after_a_change(tmp_path: Path) -> None:
    table = MountTable()
    assert "/proc" in table._mountpoints
    reads = []
    original = table._read
    table._read = lambda: (reads.append(1), original())[1]  # type: ignore[method-assign]
    table.below("/")
    table.below("/")
    assert reads == []
    table.close()


# --- the incremental measurement (inotify) -------------------------------------------------------------

@pytest.fixture
def inotify() -> Any:
    instance = Inotify()
    try:
        yield instance
    finally:
        instance.close()


def test_incremental_figures_follow_every_kind_of_change(tmp_path: Path, inotify: Inotify) -> None:
    root = tmp_path / "sandbox"
    for d in range(5):
        write(root / f"d{d}" / "sub" / "f", 10 * KB)
    tree = TreeUsage(str(root), inotify, full_every=1000)
    assert tree.measure() == measure(str(root))
    changes = [
        lambda: write(root / "d0" / "new", 64 * KB),                                   # a new file
        lambda: open(root / "d1" / "sub" / "f", "ab").write(b"y" * 100 * KB),          # a file grows
        lambda: os.truncate(root / "d2" / "sub" / "f", 0),                             # and shrinks
        lambda: shutil.rmtree(root / "d3"),                                            # a subtree goes
        lambda: os.rename(root / "d4", root / "d0" / "moved"),                         # and moves
        lambda: write(root / "d0" / "moved" / "sub" / "deeper" / "g", 32 * KB),        # inside the moved one
        lambda: os.link(root / "d0" / "new", root / "d1" / "second-name"),             # a new hard link
        lambda: os.unlink(root / "d0" / "new"),                                        # its first name goes
        lambda: (root / "d1" / "dir").mkdir() or [write(root / "d1" / "dir" / f"x{i}", KB) for i in range(300)],
    ]
    for change in changes:
        change()
        assert tree.measure() == measure(str(root)), change
        assert tree.measure().used_bytes == du_bytes(root)
    watched = sorted(d.path for d in inotify.watches.values())
    assert watched == sorted(dirpath for dirpath, _, _ in os.walk(root))       # one watch per directory, no leak
    tree.close()
    assert inotify.watches == {}


def test_an_unchanged_tree_is_not_walked_again(tmp_path: Path, inotify: Inotify, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in range(20):
        write(tmp_path / f"d{d}" / "f", KB)
    tree = TreeUsage(str(tmp_path), inotify, full_every=1000)
    first = tree.measure()
    scanned: list[str] = []
    real_scan = TreeUsage._scan
    monkeypatch.setattr(TreeUsage, "_scan", lambda self, d, skip, cancelled: (scanned.append(d.path),
                                                                              real_scan(self, d, skip, cancelled))[1])
    assert tree.measure() == first and scanned == []
    write(tmp_path / "d7" / "g", 8 * KB)
    assert tree.measure() == measure(str(tmp_path))
    assert scanned == [str(tmp_path / "d7")]                 # only the directory that changed
    tree.close()


def test_writes_no_event_reports_are_caught_by_the_periodic_full_walk(tmp_path: Path, inotify: Inotify) -> None:
    import mmap
    path = tmp_path / "mapped"
    with open(path, "wb") as f:
        f.truncate(4 * MB)                                   # a hole: nothing allocated yet
    tree = TreeUsage(str(tmp_path), inotify, full_every=3, full_min_secs=0)
    empty = tree.measure()
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 4 * MB) as mapped:        # page faults raise no inotify event
            mapped[:] = b"z" * (4 * MB)
            mapped.flush()
    figures = [tree.measure().used_bytes for _ in range(3)]      # the third since the first (full) walk
    assert figures[-1] == du_bytes(tmp_path) >= empty.used_bytes + 4 * MB
    tree.close()


# --- the collector: in the background, one walk at a time, cancelled by cleanup ------------------------

def test_collector_measures_each_sandbox_repeatedly_one_walk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    active, peak, walks = [0], [0], []
    lock = threading.Lock()
    real = schedule.du_measure

    def slow_measure(path: str, excludes: Any = (), cancelled: Any = None) -> DiskUsage:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        try:
            return real(path, excludes, cancelled)
        finally:
            with lock:
                active[0] -= 1
                walks.append(path)
    monkeypatch.setattr(schedule, "du_measure", slow_measure)
    results: dict[str, list[int]] = {}
    collector = DiskUsageCollector(0.05, lambda t, u: results.setdefault(t.container_id, []).append(u.used_bytes))
    tracked = []
    for i in range(3):
        write(tmp_path / f"s{i}" / "f", (i + 1) * 8 * KB)
        t = _Tracked(f"c{i}", str(tmp_path / f"s{i}"), None)
        collector.add(t)
        collector.add(t)                    # twice: still one schedule entry
        tracked.append(t)
    deadline = time.monotonic() + 10
    while min((len(results.get(f"c{i}", [])) for i in range(3)), default=0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    collector.stop()
    assert peak[0] == 1                                     # never two walks at once
    assert all(len(results[f"c{i}"]) >= 3 for i in range(3))
    assert results["c0"][0] < results["c2"][0]


def test_removing_a_sandbox_cancels_its_walk_under_way_and_drops_the_result(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()

    def blocking_measure(self: DiskUsageCollector, tracked: _Tracked) -> DiskUsage:
        started.set()
        release.wait(5)
        if tracked.cancelled:
            raise Cancelled(tracked.sandbox)
        return DiskUsage(4096, 1)
    monkeypatch.setattr(DiskUsageCollector, "_measure", blocking_measure)
    results: list[DiskUsage] = []
    collector = DiskUsageCollector(0.01, lambda tracked, usage: results.append(usage))
    tracked = _Tracked("c1", str(tmp_path), None)
    collector.add(tracked)
    assert started.wait(5)
    collector.remove(tracked)
    release.set()
    time.sleep(0.1)
    collector.stop()
    assert results == [] and collector.measurements == 0


def test_the_measuring_process_speaks_json_lines(tmp_path: Path) -> None:
    write(tmp_path / "a" / "data", 64 * KB)
    commands_r, commands_w = os.pipe()
    results_r, results_w = os.pipe()
    with os.fdopen(commands_r) as commands, os.fdopen(results_w, "w") as results, \
            os.fdopen(commands_w, "w") as to_serve, os.fdopen(results_r) as from_serve:
        server = threading.Thread(target=process.serve, args=(0.05, commands, results, 0.02))
        server.start()
        to_serve.write(json.dumps({"add": "c1", "path": str(tmp_path / "a")}) + "\n")
        to_serve.flush()
        first = json.loads(from_serve.readline())
        second = json.loads(from_serve.readline())            # measured again, an interval later
        to_serve.write(json.dumps({"remove": "c1"}) + "\n")
        to_serve.close()                                      # end of input: it stops
        server.join(10)
        assert not server.is_alive()
    assert first["id"] == "c1" and first["used"] == du_bytes(tmp_path / "a") and first["entries"] == 2
    assert second["at"] - first["at"] >= 0.04


def config(cid: str, sandbox: str, **resources: Any) -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"}, "resources": resources})
    return ContainerConfig(container_id=cid, name=cid, manifest=f"{cid}.yaml", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox=sandbox)


def test_status_is_absent_until_measured_then_reports_usage_and_enforces(tmp_path: Path) -> None:
    isolator = DiskDuIsolator(AgentConfig(launcher="posix", isolation=[], container_disk_watch_interval="20ms",
                                          enforce_container_disk_quota=True))
    write(tmp_path / "data", 2 * MB)
    isolator.prepare("c1", config("c1", str(tmp_path), disk=1))
    assert isolator.status("c1") == {}
    assert isolator.usage("c1") == {"disk_limit_bytes": MB}
    limitations: list[Limitation] = []
    loop_lag: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        isolator.watch("c1").add_done_callback(lambda f: limitations.append(f.result()))
        deadline = loop.time() + 10
        while not limitations and loop.time() < deadline:
            before = loop.time()
            await asyncio.sleep(0.005)
            loop_lag.append(loop.time() - before - 0.005)
        await asyncio.sleep(0.1)             # later measurements do not report it again
    asyncio.run(scenario())
    assert len(limitations) == 1
    limitation = limitations[0]
    assert limitation.reason == "DiskLimitation"
    assert re.fullmatch(r"Disk usage \(\d+KB\) exceeds quota \(1MB\)", limitation.message), limitation.message
    assert limitation.resources == {"disk": 1.0}
    block = isolator.status("c1")["disk"]
    assert block["used_bytes"] >= 2 * MB and block["limit_bytes"] == MB and block["enforced"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", block["checked_at"])
    assert isolator.usage("c1") == {"disk_limit_bytes": MB, "disk_used_bytes": block["used_bytes"]}
    assert max(loop_lag) < 0.1               # the loop kept running while sandboxes were walked
    assert isolator.agent_status()["measuring_pid"] != os.getpid()        # walked in another process
    isolator.update("c1", Resources(disk=16))
    assert isolator.usage("c1")["disk_limit_bytes"] == 16 * MB
    isolator.cleanup("c1")
    assert isolator.status("c1") == {}
    isolator.close()


def test_without_enforcement_or_without_a_disk_resource_nothing_is_limited(tmp_path: Path) -> None:
    isolator = DiskDuIsolator(AgentConfig(launcher="posix", isolation=[], container_disk_watch_interval="10ms"))
    write(tmp_path / "a" / "data", 2 * MB)
    write(tmp_path / "b" / "data", 2 * MB)
    isolator.prepare("a", config("a", str(tmp_path / "a"), disk=1))
    isolator.prepare("b", config("b", str(tmp_path / "b")))
    limitations: list[Limitation] = []

    async def scenario() -> None:
        for cid in ("a", "b"):
            isolator.watch(cid).add_done_callback(lambda f: limitations.append(f.result()))
        for _ in range(200):
            if isolator.status("a") and isolator.status("b"):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    asyncio.run(scenario())
    assert limitations == []
    assert isolator.status("a")["disk"]["enforced"] is False
    assert isolator.status("a")["disk"]["used_bytes"] > MB
    assert isolator.status("b")["disk"]["limit_bytes"] is None
    assert "disk_limit_bytes" not in isolator.usage("b") and isolator.usage("b")["disk_used_bytes"] > MB
    isolator.close()


def test_measure_unmeasured_gives_each_new_sandbox_a_figure_at_once_and_enforces(tmp_path: Path) -> None:
    # What `reconciler once` asks for: it ends long before the measuring process's first figure.
    isolator = DiskDuIsolator(AgentConfig(launcher="posix", isolation=[], container_disk_watch_interval="1hrs",
                                          enforce_container_disk_quota=True))
    write(tmp_path / "hog" / "data", 2 * MB)
    (tmp_path / "small").mkdir()
    isolator.prepare("hog", config("hog", str(tmp_path / "hog"), disk=1))
    isolator.prepare("small", config("small", str(tmp_path / "small"), disk=16))
    isolator.prepare("unwatched", config("unwatched", str(tmp_path / "small")))
    limitations: list[Limitation] = []

    async def scenario() -> tuple[int, int]:
        for cid in ("hog", "small"):
            isolator.watch(cid).add_done_callback(lambda f: limitations.append(f.result()))
        return await isolator.measure_unmeasured(), await isolator.measure_unmeasured()
    try:
        assert asyncio.run(asyncio.wait_for(scenario(), timeout=30)) == (2, 0)    # each once, then nothing new
    finally:
        isolator.close()
    assert [(lim.reason, lim.resources) for lim in limitations] == [("DiskLimitation", {"disk": 1.0})]
    hog, small = isolator.status("hog")["disk"], isolator.status("small")["disk"]
    assert hog["used_bytes"] == du_bytes(tmp_path / "hog") and hog["enforced"] is True
    assert small["used_bytes"] == du_bytes(tmp_path / "small") and small["limit_bytes"] == 16 * MB
    assert isolator.status("unwatched") == {}       # not watched: not a running container's sandbox


# --- the agent, as root -------------------------------------------------------------------------------

WRITE_2MB = "dd if=/dev/zero of=file bs=1048576 count=2 2>/dev/null && exec sleep 1000"


@root_only
def test_a_container_over_its_disk_quota_fails_with_a_disk_limitation(agent_env: Any) -> None:
    # DiskQuotaEnforcement.DiskUsageExceedsQuota: disk:1, 2 MB written, 1 ms watch interval.
    agent_env.write_manifest("hog", WRITE_2MB, restart_policy="Never", resources={"disk": 1})
    agent = agent_env.start("--enforce_container_disk_quota", isolation="disk/du",
                            container_disk_watch_interval="1ms")
    status = agent_env.wait_status("hog", lambda s: s["phase"] == "Failed", timeout=30)
    agent_env.stop(agent)
    assert status["reason"] == "DiskLimitation"
    assert re.fullmatch(r"Disk usage \(\d+KB\) exceeds quota \(1MB\)", status["message"]), status["message"]
    assert status["exit_signal"] == 9


@root_only
def test_a_new_figure_reaches_the_status_file_without_waiting_for_a_statistics_pass(agent_env: Any) -> None:
    agent_env.write_manifest("writer", "exec sleep 1000")
    agent = agent_env.start(isolation="disk/du", container_disk_watch_interval="100ms", resync_interval="1hrs")
    status = agent_env.wait_status("writer", lambda s: "disk" in s, timeout=10)
    (agent_env.sandbox(status) / "data").write_bytes(b"d" * 3 * MB)
    agent_env.wait_status("writer", lambda s: s["disk"]["used_bytes"] >= 3 * MB, timeout=10)
    agent_env.stop(agent)


@root_only
def test_without_enforcement_usage_is_reported_and_the_container_keeps_running(agent_env: Any) -> None:
    # DiskQuotaEnforcement.NoQuotaEnforcement, and the status file's disk block.
    agent_env.write_manifest("hog", WRITE_2MB, resources={"disk": 1})
    agent_env.write_manifest("small", "exec sleep 1000")
    agent = agent_env.start(isolation="disk/du", container_disk_watch_interval="100ms", resync_interval="500ms")
    status = agent_env.wait_status("hog", lambda s: (s.get("disk") or {}).get("used_bytes", 0) > MB
                                   and (s.get("statistics") or {}).get("disk_used_bytes", 0) > MB, timeout=30)
    assert status["phase"] == "Running"
    assert status["disk"]["limit_bytes"] == MB and status["disk"]["enforced"] is False
    assert status["statistics"]["disk_limit_bytes"] == MB
    assert status["statistics"]["disk_used_bytes"] > status["statistics"]["disk_limit_bytes"]
    small = agent_env.wait_status("small", lambda s: "disk" in s)
    assert small["disk"]["limit_bytes"] is None and small["disk"]["used_bytes"] < MB
    figure = status["disk"]["used_bytes"]
    assert abs(figure - du_bytes(agent_env.sandbox(status))) <= 64 * KB    # stdout/stderr may have grown
    # The agent restarts: the same sandbox (not the checkpoint directory) is measured again (MESOS-2452).
    agent_env.stop(agent)
    agent = agent_env.start(isolation="disk/du", container_disk_watch_interval="100ms", resync_interval="500ms")
    again = agent_env.wait_status("hog", lambda s: (s.get("disk") or {}).get("checked_at", "") > status["disk"]["checked_at"],
                                  timeout=30)
    assert again["container_id"] == status["container_id"] and again["disk"]["used_bytes"] > MB
    agent_env.stop(agent)
    assert "disk/du" in agent_env.agent_status()["isolator_status"]


@root_only
def test_once_measures_publishes_and_enforces_disk_usage(agent_env: Any) -> None:
    # `once` ends long before the first periodic measurement: it measures every sandbox itself, publishes
    # the disk block, and enforces the quota as the daemon does.
    env = agent_env
    env.write_manifest("hog", "until [ -e go ]; do sleep 0.02; done; " + WRITE_2MB, restart_policy="Never",
                       resources={"disk": 1}, kill_grace_period="1secs")
    env.write_manifest("small", "exec sleep 1000", resources={"disk": 16}, kill_grace_period="1secs")
    flags = {"isolation": "disk/du,posix/cpu,posix/mem", "container_disk_watch_interval": "1hrs"}
    first = env.once("--enforce_container_disk_quota", **flags)
    assert first.returncode == 0, first.stderr
    for name, limit in (("hog", MB), ("small", 16 * MB)):
        status = env.status(name)
        assert status["phase"] == "Running", status
        disk = status["disk"]
        assert disk["limit_bytes"] == limit and disk["enforced"] is True, disk
        assert 0 < disk["used_bytes"] < MB, disk
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", disk["checked_at"]), disk
        assert status["statistics"]["disk_used_bytes"] == disk["used_bytes"]

    hog = env.status("hog")
    (env.sandbox(hog) / "go").touch()
    written = env.sandbox(hog) / "file"
    deadline = time.monotonic() + 10
    while not (written.exists() and written.stat().st_blocks * 512 >= 2 * MB):
        assert time.monotonic() < deadline, "the container never wrote its 2 MB"
        time.sleep(0.02)
    second = env.once("--enforce_container_disk_quota", **flags)
    assert second.returncode == 1, second.stderr        # hog ended Failed: not converged
    ended = env.status("hog")
    assert ended["container_id"] == hog["container_id"] and ended["phase"] == "Failed", ended
    assert ended["reason"] == "DiskLimitation"
    assert re.fullmatch(r"Disk usage \(\d+KB\) exceeds quota \(1MB\)", ended["message"]), ended["message"]
    assert ended["exit_signal"] == 9
    assert not alive(hog["pid"])
    small = env.status("small")
    assert small["phase"] == "Running" and small["disk"]["used_bytes"] < MB
    assert "Traceback" not in first.stderr + second.stderr
