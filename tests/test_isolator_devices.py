"""linux/devices (reconciler/isolators/devices.py) on this host's real hierarchy: a container's cgroup gets
runc's rules before its init runs, a privileged one none, the status says which, and cleanup and
recovery leave no cgroup behind. The attack itself (a node of a host disk made and read inside a real
container) is in tests/security/test_devices_and_mounts.py."""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any, Iterator

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import ContainerConfig, ContainerState
from reconciler.isolators.devices import LinuxDevicesIsolator
from reconciler.models import ContainerSpec
from tests.conftest import remove_cgroup_root

pytestmark = pytest.mark.root


@pytest.fixture
def isolator() -> Iterator[LinuxDevicesIsolator]:
    root = f"reconciler-test-{uuid.uuid4().hex[:12]}"
    try:
        yield LinuxDevicesIsolator(AgentConfig(launcher="linux", cgroups_root=root, isolation=["namespaces/pid"],
                                               allow_privileged=True))
    finally:
        remove_cgroup_root(root)


def config(container_id: str, linux_info: dict[str, Any] | None = None) -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"},
                                         **({"container": {"linux_info": linux_info}} if linux_info else {})})
    return ContainerConfig(container_id, "x", "x.yaml", spec, "h", "h", "/var/tmp/unused")


def opens_null_and_zero(isolator: LinuxDevicesIsolator, container_id: str) -> str:
    """A shell moved into the container's cgroup by isolate() itself, reading two devices."""
    shell = subprocess.Popen(["sh", "-c", "read go; head -c1 /dev/zero >/dev/null && echo zero; "
                              "head -c1 /dev/kvm >/dev/null 2>&1 && echo kvm || echo no-kvm"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    isolator.isolate(container_id, shell.pid)
    out, _ = shell.communicate("go\n", timeout=10)
    return out


def test_a_container_gets_the_rules_before_its_init_runs_and_none_is_left(isolator: LinuxDevicesIsolator) -> None:
    isolator.prepare("c1", config("c1"))
    assert isolator.status("c1") == {"security": {"devices": "default"}}
    if os.path.exists("/dev/kvm"):
        assert opens_null_and_zero(isolator, "c1").split() == ["zero", "no-kvm"]
    isolator.cleanup("c1")
    assert isolator.status("c1") == {} and not isolator.hierarchy.exists(isolator.cgroup("c1"))
    isolator.cleanup("c1")     # twice, and for an unknown id: harmless


def test_a_privileged_container_is_unrestricted(isolator: LinuxDevicesIsolator) -> None:
    assert isolator.prepare("p1", config("p1", {"privileged": True})) is None
    assert isolator.status("p1") == {"security": {"devices": "unrestricted"}}
    assert not isolator.hierarchy.exists(isolator.cgroup("p1"))


def test_recovery_reads_what_the_kernel_enforces_and_removes_unknown_cgroups(isolator: LinuxDevicesIsolator) -> None:
    isolator.prepare("live", config("live"))
    isolator.hierarchy.create(isolator.cgroup("stray"))            # no checkpoint owns it
    fresh = LinuxDevicesIsolator(isolator.config)
    fresh.recover([ContainerState(config("live"), None)], set())
    assert fresh.status("live") == {"security": {"devices": "default"}}
    assert not fresh.hierarchy.exists(fresh.cgroup("stray"))
    assert fresh.hierarchy.exists(fresh.cgroup("live"))
    fresh.cleanup("live")
