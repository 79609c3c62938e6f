"""Real-kernel tests of the /proc readers: identities, cgroup membership, the process tree."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.linux import proc


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; all are killed and reaped afterwards, even if it fails."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait()


def spawn(children: list[subprocess.Popen[bytes]], argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    child: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)
    children.append(child)
    return child


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_start_time_is_later_for_a_later_process(children: list[subprocess.Popen[bytes]]) -> None:
    mine = proc.start_time_ticks(os.getpid())
    child = spawn(children, ["sleep", "30"])
    theirs = proc.start_time_ticks(child.pid)
    assert mine is not None and theirs is not None
    assert 0 < mine <= theirs


def test_start_time_of_a_missing_process_is_none() -> None:
    assert proc.start_time_ticks(2**22 + 1) is None  # above any pid_max


def test_stat_parsing_survives_spaces_and_parens_in_the_command_name(
    children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # comm is the executable's basename (first 15 bytes), chosen by whoever runs it.
    weird = tmp_path / ") 1 2 (x) Z 9"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", weird)
    child = spawn(children, [str(weird), "30"])
    wait_for(lambda: "(x)" in Path(f"/proc/{child.pid}/stat").read_text())

    identity = proc.ProcessIdentity.of(child.pid)
    assert identity is not None and identity.is_alive()
    stat = Path(f"/proc/{child.pid}/stat").read_text()
    assert identity.start_time == int(stat.rsplit(")", 1)[1].split()[19])


def test_identity_is_alive_until_the_process_exits(children: list[subprocess.Popen[bytes]]) -> None:
    child = spawn(children, ["sleep", "30"])
    identity = proc.ProcessIdentity.of(child.pid)
    assert identity is not None
    assert identity.is_alive()

    child.kill()
    wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    assert not identity.is_alive(), "an exited (zombie) process must not count as alive"

    child.wait()
    assert not identity.is_alive()


def test_identity_with_another_start_time_is_a_different_process(children: list[subprocess.Popen[bytes]]) -> None:
    # What a reused pid looks like: the pid exists, but it is not the process we recorded.
    child = spawn(children, ["sleep", "30"])
    identity = proc.ProcessIdentity.of(child.pid)
    assert identity is not None
    assert not proc.ProcessIdentity(child.pid, identity.start_time - 1).is_alive()


def test_boot_id_is_a_stable_uuid() -> None:
    first = proc.boot_id()
    assert str(uuid.UUID(first)) == first
    assert proc.boot_id() == first


def test_cgroup_paths_lists_every_hierarchy_of_this_machine() -> None:
    paths = proc.cgroup_paths(os.getpid())
    # This machine: each v1 controller in its own hierarchy, a named systemd one, and cgroup2.
    assert {"freezer", "memory", "name=systemd", ""} <= set(paths)
    assert all(path.startswith("/") for path in paths.values())


def test_cgroup_paths_shows_the_cgroup_a_process_was_moved_into(children: list[subprocess.Popen[bytes]]) -> None:
    freezer = "/sys/fs/cgroup/freezer"
    if not os.path.isdir(freezer):
        pytest.skip("the v1 freezer hierarchy is not mounted at /sys/fs/cgroup/freezer")
    name = f"reconciler-test-{uuid.uuid4().hex[:12]}"
    cgroup = os.path.join(freezer, name)
    os.mkdir(cgroup)
    try:
        child = spawn(children, ["sleep", "30"])
        Path(cgroup, "cgroup.procs").write_text(str(child.pid))
        assert proc.cgroup_paths(child.pid)["freezer"] == f"/{name}"
    finally:
        for child in children:
            child.kill()
            child.wait()
        os.rmdir(cgroup)


def test_cgroup_paths_of_a_missing_process_raises_process_lookup_error() -> None:
    with pytest.raises(ProcessLookupError):
        proc.cgroup_paths(2**22 + 1)


def test_process_table_reports_tree_and_usage_of_a_busy_child(children: list[subprocess.Popen[bytes]]) -> None:
    child = spawn(children, ["sh", "-c", "sleep 30 & echo $!; while :; do :; done"], stdout=subprocess.PIPE)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    grandchild_identity = proc.ProcessIdentity.of(grandchild)
    try:
        wait_for(lambda: proc.process_table()[child.pid].utime > 0)
        table = proc.process_table()
        entry = table[child.pid]
        assert entry.ppid == os.getpid()
        assert entry.session == table[os.getpid()].session  # not a session leader of its own
        assert entry.threads == 1
        assert entry.rss_pages > 0
        assert proc.descendants(table, child.pid) == {grandchild}
        assert {child.pid, grandchild} <= proc.descendants(table, os.getpid())
    finally:
        if grandchild_identity is not None and grandchild_identity.is_alive():
            os.kill(grandchild, signal.SIGKILL)
        child.stdout.close()


def test_mountinfo_is_read_whatever_bytes_a_mount_point_holds() -> None:
    """A host user may mount anything at any name: a path that is not UTF-8, or holds a space or a
    newline, is read as os.fsdecode reads file names, never refused (it stopped the listing)."""
    from reconciler.linux.mountinfo import parse_mountinfo
    line = (b"48 27 254:0 /a\\040b /srv/rack:\xff/x\\012y rw,nosuid,nodev,relatime shared:1 - ext4 /dev/vda "
            b"rw,discard\n36 25 0:32 / /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n")
    first, second = parse_mountinfo(line)
    assert first.root == "/a b" and first.mount_point == os.fsdecode(b"/srv/rack:\xff/x\ny")
    assert first.device == "254:0" and first.fstype == "ext4" and first.source == "/dev/vda"
    assert first.options == {"rw", "nosuid", "nodev", "relatime"} and first.super_options == {"rw", "discard"}
    assert first.writable and not second.writable and second.super_options == {"rw", "memory"}
