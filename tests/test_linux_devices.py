"""Device rules on real cgroups (reconciler/linux/devices.py): the v1 devices controller, and the BPF
device program on this kernel's cgroup v2 hierarchy (the empty /sys/fs/cgroup/unified of a hybrid host,
or /sys/fs/cgroup on a cgroup v2 host).

A process forked by the test moves itself into the test's own cgroup, then opens devices and makes
nodes in the test's own directory under /var/tmp; each step reports only "ok" or the errno's name
(and, for a read, whether the secret came back), never the bytes. The "host disks" are the disk that
holds /var/tmp (some machines refuse it even to the host's root: see the control) and a loop device
over a file of the test's whose first bytes are a secret, which root can read anywhere: the proof.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from reconciler.linux import cgroups, devices
from reconciler.linux.devices import DEFAULT_RULES, DeviceRule
from tests.conftest import IS_ROOT

pytestmark = pytest.mark.root

SECRET = b"reconciler-test-disk-secret"
HWRNG = (10, 183)        # /dev/hwrng: a character device no rule allows


def device_hierarchies() -> dict[str, cgroups.Hierarchy]:
    """Where device rules can be tried on this host: "v1" (the devices controller), "v2" (cgroup2)."""
    if not IS_ROOT:
        return {}
    mounts = cgroups.find_mounts()
    found = {}
    if "devices" in mounts.v1:
        found["v1"] = mounts.v1["devices"]
    if mounts.v2 is not None:
        found["v2"] = mounts.v2
    return found


def restrict(path: str, version: int, rules: tuple[DeviceRule, ...] | list[DeviceRule]) -> None:
    if version == 1:
        devices.write_v1_rules(path, rules)
    else:
        devices.restrict_v2(path, rules)


@contextlib.contextmanager
def loop_disk(directory: Path) -> Iterator[tuple[int, int]]:
    """(major, minor) of a loop device over a file in `directory` whose first bytes are SECRET."""
    backing = directory / "disk.img"
    backing.write_bytes(SECRET + bytes(1 << 20))
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device to stand for a disk (losetup: {made.stderr.strip()})")
    path = made.stdout.strip()
    try:
        rdev = os.stat(path).st_rdev
        yield os.major(rdev), os.minor(rdev)
    finally:
        subprocess.run(["losetup", "-d", path], capture_output=True)


def var_tmp_disk() -> tuple[int, int]:
    """(major, minor) of the block device that holds /var/tmp."""
    st_dev = os.stat("/var/tmp").st_dev
    return os.major(st_dev), os.minor(st_dev)


# ------------------------------------------------------------------ the process inside

def _outcome(step: list[Any]) -> str:
    action, path, *args = step
    try:
        if action == "mknod":
            kind, major, minor = args
            os.mknod(path, 0o600 | (0o60000 if kind == "b" else 0o20000), os.makedev(major, minor))
            return "ok"
        fd = os.open(path, os.O_RDONLY if action == "read" else os.O_WRONLY)
        try:
            if action == "read":
                return "read-secret" if SECRET in os.read(fd, 4096) else "read"
            return "ok"
        finally:
            os.close(fd)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def inside(cgroup_path: str, steps: list[list[Any]]) -> list[str]:
    """The outcome of each step ("read", "write", "mknod") in a forked child that first moves itself into
    the cgroup: "ok", "read", "read-secret" or an errno name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:        # the child: never returns into pytest
        try:
            os.close(read_end)
            with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            report: Any = [_outcome(step) for step in steps]
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report = {"error": repr(exc)}
        try:
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    report = json.loads(data)
    assert isinstance(report, list), report
    return report


# ------------------------------------------------------------------ fixtures

@pytest.fixture(params=["v1", "v2"])
def cgroup(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """(path, version) of a new cgroup of the test's own; on v2, its programs detached before it goes."""
    hierarchy = device_hierarchies().get(request.param)
    if hierarchy is None:
        pytest.skip(f"this host mounts no cgroup {request.param} hierarchy for device rules")
    name = f"reconciler-test-{uuid.uuid4().hex[:12]}"
    hierarchy.create(name)
    try:
        yield hierarchy.path(name), hierarchy.version
    finally:
        if hierarchy.version == 2:
            devices.detach_device_programs(hierarchy.path(name))
            assert devices.device_program_ids(hierarchy.path(name)) == []
        hierarchy.remove(name)          # the forked children have exited
        assert not hierarchy.exists(name)


@pytest.fixture
def nodes() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="reconciler-test-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def disk(nodes: Path) -> Iterator[tuple[int, int]]:
    with loop_disk(nodes) as numbers:
        yield numbers


def attack(nodes: Path, disk: tuple[int, int]) -> list[list[Any]]:
    """Make nodes of both disks and of /dev/hwrng in the test's directory, and read each."""
    steps: list[list[Any]] = []
    for name, kind, numbers in (("loop", "b", disk), ("var-tmp-disk", "b", var_tmp_disk()), ("hwrng", "c", HWRNG)):
        steps += [["mknod", str(nodes / name), kind, *numbers], ["read", str(nodes / name)]]
    return steps


# ------------------------------------------------------------------ tests

def test_the_default_rules_open_the_usual_devices_and_no_disk(cgroup: tuple[str, int], nodes: Path,
                                                              disk: tuple[int, int]) -> None:
    path, version = cgroup
    restrict(path, version, DEFAULT_RULES)
    usual = [["write", "/dev/null"], ["read", "/dev/zero"], ["read", "/dev/urandom"], ["write", "/dev/full"]]
    got = inside(path, usual + attack(nodes, disk))
    assert got[:4] == ["ok", "read", "read", "ok"]
    # runc's rules let any node be made (`b *:* m`, `c *:* m`) and none of these be opened.
    assert got[4:] == ["ok", "EPERM", "ok", "EPERM", "ok", "EPERM"]
    if version == 2:
        assert len(devices.device_program_ids(path)) == 1
    else:
        assert devices.read_v1_rules(path) == [str(rule) for rule in DEFAULT_RULES]


def test_without_rules_root_reads_the_loop_disk(cgroup: tuple[str, int], nodes: Path, disk: tuple[int, int]) -> None:
    """The control: the refusals above are the rules', not this host's. (The disk holding /var/tmp may be
    refused to root here anyway: it is only ever asserted refused.)"""
    path, _ = cgroup
    got = inside(path, attack(nodes, disk))
    assert got[:2] == ["ok", "read-secret"], got
    assert got[4:] == ["ok", "read"], got


def test_without_mknod_in_the_rules_a_block_node_cannot_be_made(cgroup: tuple[str, int], nodes: Path,
                                                                disk: tuple[int, int]) -> None:
    path, version = cgroup
    restrict(path, version, [rule for rule in DEFAULT_RULES if rule.kind != "b"])
    got = inside(path, [["mknod", str(nodes / "disk"), "b", *disk], ["mknod", str(nodes / "null"), "c", 1, 3],
                        ["write", str(nodes / "null")]])
    assert got == ["EPERM", "ok", "ok"]
    assert not (nodes / "disk").exists()


def test_access_letters_are_honoured(cgroup: tuple[str, int], nodes: Path) -> None:
    path, version = cgroup
    restrict(path, version, [DeviceRule("c", 1, 3, "r"), DeviceRule("c", 1, 5, "w")])   # null: read; zero: write
    got = inside(path, [["read", "/dev/null"], ["write", "/dev/null"], ["write", "/dev/zero"], ["read", "/dev/zero"],
                        ["mknod", str(nodes / "null"), "c", 1, 3]])
    assert got == ["read", "EPERM", "ok", "EPERM", "EPERM"]


def test_a_device_program_needs_no_controller_and_goes_when_detached(nodes: Path, disk: tuple[int, int]) -> None:
    """On a cgroup2 directory with no controller at all (a child whose parent enables none), the program
    still refuses; restricting twice leaves one program; once detached the same process reads the disk."""
    hierarchy = device_hierarchies().get("v2")
    if hierarchy is None:
        pytest.skip("this host mounts no cgroup v2 hierarchy")
    parent = f"reconciler-test-{uuid.uuid4().hex[:12]}"
    leaf = f"{parent}/leaf"
    hierarchy.create(leaf)
    try:
        path = hierarchy.path(leaf)
        assert hierarchy.read(leaf, "cgroup.controllers").split() == []
        devices.restrict_v2(path, DEFAULT_RULES)
        devices.restrict_v2(path, DEFAULT_RULES)
        assert len(devices.device_program_ids(path)) == 1
        read_disk = [["mknod", str(nodes / "disk"), "b", *disk], ["read", str(nodes / "disk")]]
        assert inside(path, read_disk) == ["ok", "EPERM"]
        devices.detach_device_programs(path)
        assert devices.device_program_ids(path) == []
        os.unlink(nodes / "disk")
        assert inside(path, read_disk) == ["ok", "read-secret"]
    finally:
        devices.detach_device_programs(hierarchy.path(leaf))
        hierarchy.remove(parent)
    assert not hierarchy.exists(parent)


def test_errors_name_the_call_and_the_cgroup(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cgroup"
    with pytest.raises(FileNotFoundError) as v1:
        devices.write_v1_rules(str(missing), DEFAULT_RULES)
    assert str(v1.value).startswith(f"[Errno 2] writing 'a' to devices.deny of cgroup {missing}: ")
    with pytest.raises(OSError) as not_a_cgroup:
        devices.restrict_v2(str(tmp_path), DEFAULT_RULES)
    assert str(not_a_cgroup.value) == (f"[Errno 9] bpf(BPF_PROG_ATTACH, BPF_CGROUP_DEVICE) to cgroup {tmp_path}: "
                                       "Bad file descriptor (is it a cgroup v2 directory?)")
    with pytest.raises(FileNotFoundError) as gone:
        devices.device_program_ids(str(missing))
    assert f"bpf(BPF_PROG_QUERY, BPF_CGROUP_DEVICE) of cgroup {missing}: cannot open the cgroup" in str(gone.value)


def test_rules_read_as_runc_writes_them() -> None:
    assert [str(rule) for rule in DEFAULT_RULES[:3]] == ["c *:* m", "b *:* m", "c 1:3 rwm"]
    assert str(DeviceRule("c", 136, None, "rwm")) == "c 136:* rwm"
    for bad in (("x", 1, 3, "rwm"), ("c", 1, 3, "rwx"), ("c", 1, 3, ""), ("b", -1, 0, "r"), ("b", 0, 2**31, "r")):
        with pytest.raises(ValueError, match="device rule"):
            DeviceRule(*bad)
