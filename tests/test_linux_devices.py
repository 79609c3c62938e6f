"""Device rules on a real cgroup (reconciler/linux/devices.py): the v1 devices controller, and the cgroup v2
BPF device program, on this kernel's (empty) unified hierarchy at /sys/fs/cgroup/unified.

A shell moved into the test's own cgroup opens /dev/null, makes nodes, and tries to read a node of a
"host disk" (a loop device over a file of the test's, holding a secret: the real disk is closed even to
root on these machines) and of the hardware random generator: the kernel's answer under the rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from reconciler.linux import cgroups, devices
from reconciler.linux.devices import DEFAULT_RULES, DeviceRule
from tests.conftest import IS_ROOT

pytestmark = pytest.mark.root


def hierarchies() -> dict[str, cgroups.Hierarchy]:
    if not IS_ROOT:
        return {}
    mounts = cgroups.find_mounts()
    found = {}
    if "devices" in mounts.v1:
        found["v1"] = mounts.v1["devices"]
    if mounts.v2 is not None:
        found["v2"] = mounts.v2
    return found


@pytest.fixture(params=["v1", "v2"])
def cgroup(request: pytest.FixtureRequest) -> Iterator[tuple[cgroups.Hierarchy, str]]:
    hierarchy = hierarchies().get(request.param)
    if hierarchy is None:
        pytest.skip(f"no cgroup {request.param} device support mounted on this host")
    name = f"reconciler-test-{uuid.uuid4().hex[:12]}"
    hierarchy.create(name)
    try:
        yield hierarchy, name
    finally:
        hierarchy.remove(name)      # its shells have exited


@pytest.fixture
def nodes() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="reconciler-test-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def disk(nodes: Path) -> Iterator[tuple[int, int]]:
    """(major, minor) of a block device whose first bytes are SECRET."""
    backing = nodes / "disk.img"
    backing.write_bytes(SECRET + bytes(1 << 20))
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if device.returncode != 0:
        pytest.skip(f"no loop device: {device.stderr.strip()}")
    path = device.stdout.strip()
    try:
        rdev = os.stat(path).st_rdev
        yield os.major(rdev), os.minor(rdev)
    finally:
        subprocess.run(["losetup", "-d", path], capture_output=True)


SECRET = b"reconciler-test-disk-secret"
HWRNG = (10, 183)


def restrict(hierarchy: cgroups.Hierarchy, name: str, rules: tuple[DeviceRule, ...] | list[DeviceRule]) -> None:
    if hierarchy.version == 1:
        devices.write_v1_rules(hierarchy.path(name), rules)
    else:
        devices.restrict_v2(hierarchy.path(name), rules)


def run_inside(hierarchy: cgroups.Hierarchy, name: str, script: str) -> list[str]:
    """Lines printed by `script`, run by a shell that first moves itself into the cgroup."""
    procs = os.path.join(hierarchy.path(name), "cgroup.procs")
    result = subprocess.run(["sh", "-c", f"echo $$ > {procs} && {script}"], capture_output=True, text=True,
                            timeout=10)
    return result.stdout.split()


def try_read(path: str) -> str:
    return f"head -c 16 {path} >/dev/null 2>&1 && echo read || echo refused"


def read_node(kind: str, major: int, minor: int, path: Path) -> str:
    return f"mknod {path} {kind} {major} {minor} && echo made || echo not-made; {try_read(str(path))}"


def test_the_default_rules_let_a_root_shell_open_only_the_usual_devices(cgroup: tuple, nodes: Path,
                                                                      disk: tuple[int, int]) -> None:
    hierarchy, name = cgroup
    restrict(hierarchy, name, DEFAULT_RULES)
    script = "; ".join([try_read("/dev/null"), try_read("/dev/zero"), try_read("/dev/urandom"),
                        read_node("b", *disk, nodes / "disk"), read_node("c", *HWRNG, nodes / "rng")])
    assert run_inside(hierarchy, name, script) == ["read", "read", "read", "made", "refused", "made", "refused"]
    if hierarchy.version == 2:
        assert devices.attached_device_programs(hierarchy.path(name)) == 1


def test_without_rules_the_same_reads_succeed(cgroup: tuple, nodes: Path, disk: tuple[int, int]) -> None:
    """The control: the refusals above are the rules', not something else on this host."""
    hierarchy, name = cgroup
    script = "; ".join([read_node("b", *disk, nodes / "disk"), read_node("c", *HWRNG, nodes / "rng"),
                        f"head -c 64 {nodes}/disk | grep -ac {SECRET.decode()}"])
    assert run_inside(hierarchy, name, script) == ["made", "read", "made", "read", "1"]


def test_access_letters_are_honoured(cgroup: tuple, nodes: Path) -> None:
    hierarchy, name = cgroup
    restrict(hierarchy, name, [DeviceRule("c", 1, 3, "r"), DeviceRule("c", 1, 5, "w")])   # null: read; zero: write
    out = nodes / "out"      # not /dev/null: this shell may not write there
    script = "; ".join([
        f"head -c1 /dev/null >{out} 2>&1 && echo r-null || echo no-r-null",
        f"(echo x > /dev/null) 2>{out} && echo w-null || echo no-w-null",
        f"(echo x > /dev/zero) 2>{out} && echo w-zero || echo no-w-zero",
        f"mknod {nodes}/n c 1 3 2>{out} && echo m || echo no-m",
    ])
    assert run_inside(hierarchy, name, script) == ["r-null", "no-w-null", "w-zero", "no-m"]


def test_rules_read_as_runc_writes_them() -> None:
    assert [str(rule) for rule in DEFAULT_RULES[:3]] == ["c *:* m", "b *:* m", "c 1:3 rwm"]
    assert str(DeviceRule("c", 136, None, "rwm")) == "c 136:* rwm"
