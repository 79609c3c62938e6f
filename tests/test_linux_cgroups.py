"""Real-kernel tests of the cgroups v1/v2 layer (run as root).

This machine also runs other people's processes: every test works only below its own
`reconciler-test-<uuid>` cgroup in each hierarchy it uses, and the fixtures remove those roots
(killing anything left, thawing anything frozen) even when the test fails.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.linux import cgroups, proc, syscalls
from reconciler.linux.cgroups import Hierarchy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups")

FREEZER = "/sys/fs/cgroup/freezer"
UNIFIED = "/sys/fs/cgroup/unified"
PIDS = "/sys/fs/cgroup/pids"
CPUSET = "/sys/fs/cgroup/cpuset"


# --- fixtures: private cgroup roots and processes, always cleaned up -----------------------


@dataclass
class Scope:
    """A test's own cgroup root in one hierarchy; tests only create cgroups below it."""

    hierarchy: Hierarchy
    root: str

    def cgroup(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root


def _force_cleanup(mountpoint: str, root: str) -> None:
    """Remove a test root without trusting the code under test: thaw, SIGKILL, rmdir."""
    top = os.path.join(mountpoint, root)
    deadline = time.monotonic() + 10
    while os.path.isdir(top):
        for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            for control, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0"), ("cgroup.kill", "1")):
                try:
                    Path(directory, control).write_text(value)
                except OSError:
                    pass
            try:
                pids = Path(directory, "cgroup.procs").read_text().split()
            except OSError:
                pids = []
            for pid in pids:  # members of our own test cgroup: ours to kill
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(directory)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not remove test cgroup {top}")
        time.sleep(0.02)


def _scope(mountpoint: str, version: int, controllers: frozenset[str], precreate: bool = True) -> Iterator[Scope]:
    if not os.path.isdir(mountpoint):
        pytest.skip(f"no cgroup hierarchy mounted at {mountpoint}")
    root = f"reconciler-test-{uuid.uuid4().hex[:12]}"
    if precreate:
        os.mkdir(os.path.join(mountpoint, root))
    try:
        yield Scope(Hierarchy(version, mountpoint, controllers), root)
    finally:
        _force_cleanup(mountpoint, root)


@pytest.fixture
def freezer() -> Iterator[Scope]:
    yield from _scope(FREEZER, 1, frozenset({"freezer"}))


@pytest.fixture
def unified() -> Iterator[Scope]:
    yield from _scope(UNIFIED, 2, frozenset())


@pytest.fixture
def pids_limit() -> Iterator[Scope]:
    """A v1 pids cgroup root: keeps fork loops in these tests from hurting the machine."""
    yield from _scope(PIDS, 1, frozenset({"pids"}))


@pytest.fixture
def cpuset() -> Iterator[Scope]:
    """A cpuset root the test creates itself (the cleanup still removes it)."""
    yield from _scope(CPUSET, 1, frozenset({"cpuset"}), precreate=False)


@pytest.fixture(params=["v1-freezer", "v2"])
def scope(request: pytest.FixtureRequest) -> Scope:
    return request.getfixturevalue("freezer" if request.param == "v1-freezer" else "unified")  # type: ignore[no-any-return]


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait()


def spawn_in(
    children: list[subprocess.Popen[bytes]], script: str, *cgroup_dirs: str, shell: str = "sh"
) -> subprocess.Popen[bytes]:
    """Start `<shell> -c script` already inside the given cgroups (it joins them before exec)."""

    def join() -> None:
        for directory in cgroup_dirs:
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    child = subprocess.Popen([shell, "-c", script], preexec_fn=join, stderr=subprocess.DEVNULL)
    children.append(child)
    return child


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def freezer_states(scope: Scope) -> dict[str, str]:
    top = scope.hierarchy.path(scope.root)
    return {
        os.path.relpath(directory, top): Path(directory, "freezer.state").read_text().strip()
        for directory, _, _ in os.walk(top)
    }


# --- finding hierarchies -------------------------------------------------------------------


def test_find_mounts_sees_this_machines_freezer_and_cgroup2() -> None:
    mounts = cgroups.find_mounts()
    freezer = cgroups.hierarchy_for(mounts, "freezer")
    assert freezer == Hierarchy(1, FREEZER, frozenset({"freezer"}))
    assert cgroups.freezer_hierarchy(mounts) == freezer
    assert cgroups.unified_hierarchy(mounts) == Hierarchy(2, UNIFIED, frozenset())
    assert not mounts.unified  # cgroup2 is at /sys/fs/cgroup/unified, not /sys/fs/cgroup
    assert mounts.v1["name=systemd"].mountpoint == "/sys/fs/cgroup/systemd"
    # net_cls is in this kernel; it is mounted only once the cgroups/net_cls isolator needed it, so
    # either way find_mounts must agree with the kernel's own mount table.
    net_cls = cgroups.hierarchy_for(mounts, "net_cls")
    with open("/proc/self/mountinfo") as f:
        mounted = any(" - cgroup " in line and "net_cls" in line.split(" - ")[1].split()[-1].split(",") for line in f)
    assert (net_cls is not None) == mounted


def test_find_mounts_reads_other_host_layouts(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:8 - cgroup cgroup rw,cpu,cpuacct\n"
        "34 30 0:30 / /sys/fs/cgroup/net\\040cls rw - cgroup cgroup rw,net_cls,net_prio,clone_children\n"
        "35 30 0:31 /kubepods/pod1 /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
    )
    mounts = cgroups.find_mounts(str(hybrid))
    assert mounts.v2 is None and not mounts.unified
    assert mounts.v1["cpu"] is mounts.v1["cpuacct"]
    assert mounts.v1["cpu"].controllers == {"cpu", "cpuacct"}
    assert mounts.v1["net_prio"].mountpoint == "/sys/fs/cgroup/net cls"
    assert mounts.v1["net_prio"].controllers == {"net_cls", "net_prio"}  # mount options are not controllers
    assert mounts.v1["freezer"].root == "/kubepods/pod1"
    assert len(mounts.v1_hierarchies) == 3

    pure_v2 = tmp_path / "v2"
    pure_v2.write_text("30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n")
    mounts = cgroups.find_mounts(str(pure_v2))
    assert mounts.unified
    assert mounts.v1 == {}
    assert cgroups.freezer_hierarchy(mounts) == Hierarchy(2, "/sys/fs/cgroup", frozenset())


# --- create / attach / procs / children / remove ---------------------------------------------


def test_create_attach_list_and_remove(scope: Scope, children: list[subprocess.Popen[bytes]]) -> None:
    h = scope.hierarchy
    leaf = scope.cgroup("task/sub")
    h.create(leaf)
    h.create(leaf)  # idempotent
    assert h.exists(leaf)
    assert h.children(scope.root) == ["task"]
    assert h.children(scope.cgroup("task")) == ["sub"]

    child = spawn_in(children, "exec sleep 30")
    h.attach(leaf, child.pid)

    assert h.procs(leaf) == [child.pid]
    assert h.procs(scope.root) == []
    assert h.procs(scope.root, recursive=True) == [child.pid]
    key = "freezer" if h.version == 1 else ""
    assert proc.cgroup_paths(child.pid)[key] == f"/{leaf}"

    h.kill(scope.root)
    h.remove(scope.root)
    assert not h.exists(scope.root)
    h.remove(scope.root)  # removing what is gone is fine
    child.wait(timeout=5)
    assert child.returncode == -signal.SIGKILL


def test_read_and_write_control_files(freezer: Scope) -> None:
    h = freezer.hierarchy
    cgroup = freezer.cgroup("c")
    h.create(cgroup)
    assert h.read(cgroup, "freezer.state").strip() == "THAWED"
    h.write(cgroup, "freezer.state", "FROZEN")
    wait_for(lambda: h.read(cgroup, "freezer.state").strip() == "FROZEN")
    h.write(cgroup, "freezer.state", "THAWED")
    with pytest.raises(OSError) as e:
        h.write(cgroup, "freezer.state", "MELTED")
    assert e.value.errno == errno.EINVAL
    assert e.value.filename == os.path.join(FREEZER, cgroup, "freezer.state")


def test_cgroup_names_cannot_escape_the_hierarchy(freezer: Scope) -> None:
    with pytest.raises(ValueError, match="no '..'"):
        freezer.hierarchy.path(f"{freezer.root}/../../etc")


def test_remove_refuses_a_cgroup_that_still_has_processes(
    scope: Scope, children: list[subprocess.Popen[bytes]]
) -> None:
    h = scope.hierarchy
    cgroup = scope.cgroup("busy")
    h.create(cgroup)
    child = spawn_in(children, "exec sleep 30", h.path(cgroup))
    with pytest.raises(OSError) as e:
        h.remove(cgroup)
    assert e.value.errno == errno.EBUSY
    assert h.procs(cgroup) == [child.pid]  # nothing was lost


def test_kill_and_remove_refuse_the_hierarchy_root(scope: Scope) -> None:
    for action in (scope.hierarchy.kill, scope.hierarchy.remove):
        with pytest.raises(ValueError, match="refusing to .* the root cgroup"):
            action("/")


def test_remove_of_a_missing_cgroup_is_a_no_op(scope: Scope) -> None:
    scope.hierarchy.remove(scope.cgroup("never-created"))


def test_v1_cpuset_cgroups_inherit_cpus_and_mems_so_processes_can_join(
    cpuset: Scope, children: list[subprocess.Popen[bytes]]
) -> None:
    h = cpuset.hierarchy
    leaf = cpuset.cgroup("task/sub")
    h.create(leaf)
    assert h.read(leaf, "cpuset.cpus") == h.read("", "cpuset.cpus")
    assert h.read(leaf, "cpuset.mems") == h.read("", "cpuset.mems")
    child = spawn_in(children, "exec sleep 30")
    h.attach(leaf, child.pid)  # an empty cpuset would refuse this with ENOSPC
    assert h.procs(leaf) == [child.pid]


def test_v2_create_with_controllers_the_host_does_not_offer_fails_before_writing(unified: Scope) -> None:
    # On this machine memory is bound to its v1 hierarchy, so cgroup2 cannot offer it.
    h = unified.hierarchy
    cgroup = unified.cgroup("limited")
    with pytest.raises(ValueError, match=r"does not offer controller\(s\) \['memory'\]"):
        h.create(cgroup, controllers={"memory"})
    assert not h.exists(cgroup)


# --- kill --------------------------------------------------------------------------------------


def test_kill_stops_a_fork_loop(scope: Scope, pids_limit: Scope, children: list[subprocess.Popen[bytes]]) -> None:
    h = scope.hierarchy
    cgroup = scope.cgroup("bomb")
    h.create(cgroup)
    # Bounded: at most 300 tasks (the pids cgroup), killed within a second. bash (unlike dash)
    # keeps retrying a failed fork, so the loop is still forking hard when it is killed.
    limit = pids_limit.hierarchy
    limit.create(pids_limit.cgroup("bomb"))
    limit.write(pids_limit.cgroup("bomb"), "pids.max", 300)
    shell = spawn_in(
        children, "while :; do sleep 1 & done", h.path(cgroup), limit.path(pids_limit.cgroup("bomb")), shell="bash"
    )
    wait_for(lambda: len(h.procs(cgroup)) > 250)

    h.kill(scope.root)

    assert h.procs(scope.root, recursive=True) == []
    assert shell.wait(timeout=5) == -signal.SIGKILL
    if h.version == 1:
        assert set(freezer_states(scope).values()) == {"THAWED"}


def test_kill_stops_a_process_that_ignores_sigterm(scope: Scope, children: list[subprocess.Popen[bytes]]) -> None:
    h = scope.hierarchy
    cgroup = scope.cgroup("stubborn")
    h.create(cgroup)
    child = spawn_in(children, "trap '' TERM; while :; do sleep 0.1; done", h.path(cgroup))
    time.sleep(0.2)  # let the trap be installed
    child.terminate()
    time.sleep(0.3)
    assert child.poll() is None, "the shell should have ignored SIGTERM"

    h.kill(cgroup)

    assert h.procs(cgroup) == []
    assert child.wait(timeout=5) == -signal.SIGKILL


def test_kill_of_an_empty_or_missing_cgroup_returns_at_once(scope: Scope) -> None:
    h = scope.hierarchy
    h.create(scope.cgroup("empty"))
    h.kill(scope.cgroup("empty"), timeout=0.5)
    h.kill(scope.cgroup("missing"), timeout=0.5)
    if h.version == 1:
        assert set(freezer_states(scope).values()) == {"THAWED"}


def test_v1_kill_reaches_a_subcgroup_someone_else_froze(
    freezer: Scope, children: list[subprocess.Popen[bytes]]
) -> None:
    h = freezer.hierarchy
    inner = freezer.cgroup("outer/inner")
    h.create(inner)
    child = spawn_in(children, "exec sleep 30", h.path(inner))
    h.write(inner, "freezer.state", "FROZEN")
    wait_for(lambda: h.read(inner, "freezer.state").strip() == "FROZEN")

    h.kill(freezer.cgroup("outer"), timeout=5)

    assert h.procs(freezer.cgroup("outer"), recursive=True) == []
    assert child.wait(timeout=5) == -signal.SIGKILL
    assert set(freezer_states(freezer).values()) == {"THAWED"}


def test_v1_kill_spares_listed_pids_that_left_the_cgroup_or_vanished(
    freezer: Scope, children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates the races kill() must survive: between listing cgroup.procs and signalling,
    # one listed process was moved out of the cgroup, another exited and was reaped.
    h = freezer.hierarchy
    cgroup = freezer.cgroup("c")
    h.create(cgroup)
    member = spawn_in(children, "exec sleep 30", h.path(cgroup))
    moved_out = spawn_in(children, "exec sleep 30")
    gone = spawn_in(children, "exit 0")
    gone.wait()
    real_procs = Hierarchy.procs

    def stale_procs(self: Hierarchy, name: str, recursive: bool = False) -> list[int]:
        pids = real_procs(self, name, recursive)
        if self.read(name, "freezer.state").strip() == "FROZEN":  # the listing kill() signals
            pids += [moved_out.pid, gone.pid]
        return pids

    monkeypatch.setattr(Hierarchy, "procs", stale_procs)
    h.kill(cgroup, timeout=5)

    assert member.wait(timeout=5) == -signal.SIGKILL
    assert moved_out.poll() is None, "a process outside the cgroup must not be killed"


def test_kill_times_out_clearly_and_leaves_nothing_frozen(
    scope: Scope, children: list[subprocess.Popen[bytes]]
) -> None:
    # Something (a racing launcher) keeps moving processes in: kill cannot finish.
    h = scope.hierarchy
    cgroup = scope.cgroup("refilled")
    h.create(cgroup)
    pool = [spawn_in(children, "exec sleep 30") for _ in range(100)]
    stop = threading.Event()

    def keep_refilling() -> None:
        while not stop.is_set():
            for process in pool:
                if stop.is_set():
                    return
                try:
                    h.attach(cgroup, process.pid)
                except OSError:
                    pass  # killed already
                time.sleep(0.001)

    refiller = threading.Thread(target=keep_refilling)
    refiller.start()
    try:
        wait_for(lambda: bool(h.procs(cgroup)))
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=f"cgroup {h.path(cgroup)} still has"):
            h.kill(cgroup, timeout=0.5)
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        refiller.join()
    if h.version == 1:
        assert set(freezer_states(scope).values()) == {"THAWED"}

    h.kill(cgroup)  # once the refilling stops, kill succeeds
    assert h.procs(cgroup) == []


def test_v1_kill_needs_the_freezer(pids_limit: Scope) -> None:
    h = pids_limit.hierarchy
    h.create(pids_limit.cgroup("c"))
    with pytest.raises(ValueError, match="needs the freezer hierarchy"):
        h.kill(pids_limit.cgroup("c"))


# --- mounting a v1 hierarchy ----------------------------------------------------------------


def test_mount_v1_hierarchy_of_an_unknown_controller_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no_such_controller' is not in this kernel"):
        cgroups.mount_v1_hierarchy("no_such_controller", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_mount_v1_hierarchy_points_to_an_existing_mount(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"already mounted at {FREEZER}"):
        cgroups.mount_v1_hierarchy("freezer", str(tmp_path / "freezer"))
    # Asking for the place it is already mounted is fine.
    assert cgroups.mount_v1_hierarchy("freezer", FREEZER) == Hierarchy(1, FREEZER, frozenset({"freezer"}))


def _controller_is_unmounted(controller: str) -> bool:
    rows = [line.split() for line in Path("/proc/cgroups").read_text().splitlines() if not line.startswith("#")]
    return any(row[0] == controller and row[1] == "0" and row[3] == "1" for row in rows)


def test_mount_v1_hierarchy_mounts_net_cls_in_a_private_namespace(tmp_path: Path) -> None:
    if not _controller_is_unmounted("net_cls"):
        pytest.skip("net_cls is not an enabled, unmounted controller on this kernel")
    base = str(tmp_path / "cg")
    os.mkdir(base)

    def child() -> tuple[str, bool]:
        # A private mount namespace: the mount dies with this child and the host never sees it.
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        syscalls.mount("tmpfs", base, "tmpfs", 0, "size=1m")
        hierarchy = cgroups.mount_v1_hierarchy("net_cls", os.path.join(base, "net_cls"))
        try:
            seen = cgroups.find_mounts().v1["net_cls"].mountpoint
            has_classid = os.path.exists(os.path.join(hierarchy.path(""), "net_cls.classid"))
        finally:
            syscalls.umount2(hierarchy.mountpoint)
        return seen, has_classid

    seen, has_classid = _run_in_child(child)
    assert seen == os.path.join(base, "net_cls")
    assert has_classid
    assert "net_cls" not in cgroups.find_mounts().v1


def _run_in_child(fn: Callable[[], Any]) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
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
        with os.fdopen(r, "rb") as f:
            status, value = pickle.loads(f.read())
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    if status == "error":
        raise value
    return value
