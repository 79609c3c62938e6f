"""posix/rlimits: container.rlimit_info is what the command sees, and a limit the kernel refuses ends the
container with Mesos's "Failed to set <TYPE> limit" message (PosixRLimitsIsolatorTest).

Real kernel, as root, through the agent (`reconciler once`).
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import ContainerConfig
from reconciler.isolators.rlimits import PosixRLimitsIsolator
from reconciler.models import RLIMIT_NUMBERS, ContainerSpec
from tests.test_isolator_filesystem_shared import wait_for_text

ISOLATION = "posix/rlimits,namespaces/pid,cgroups/cpu,cgroups/mem"


def limits_of(proc_limits: str) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits as {"Max open files": (soft, hard)}."""
    table = {}
    for line in proc_limits.splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        table[name] = (soft, hard)
    return table


def run_to_end(env: Any, name: str, command: str, rlimits: list[dict[str, Any]]) -> dict[str, Any]:
    """Launch with restart_policy Never under a running agent; the status once the command ended."""
    env.write_manifest(name, command, restart_policy="Never", container={"rlimit_info": {"rlimits": rlimits}})
    agent = env.start()
    try:
        return env.wait_status(name, lambda s: s["phase"] in ("Succeeded", "Failed"), timeout=30)
    finally:
        env.stop(agent)


@pytest.fixture
def env(agent_env: Any) -> Any:
    agent_env.isolation = ISOLATION
    return agent_env


# --- through the agent ---------------------------------------------------------------------------

@pytest.mark.root
def test_lowered_limits_are_what_the_command_and_its_children_see(env: Any) -> None:
    status = run_to_end(env, "low", "ulimit -Sn; ulimit -Hn; ulimit -St; cat /proc/self/limits; echo done", [
        {"type": "RLMT_NOFILE", "soft": 64, "hard": 128},
        {"type": "RLMT_CPU", "soft": 300, "hard": 600},
    ])
    assert status["phase"] == "Succeeded", status
    out = wait_for_text(env.sandbox(status) / "stdout")
    lines = out.splitlines()
    assert lines[:3] == ["64", "128", "300"]
    limits = limits_of("\n".join(lines[3:-1]))
    assert limits["Max open files"] == ("64", "128")
    assert limits["Max cpu time"] == ("300", "600")


def test_limits_apply_with_the_posix_launcher_too(agent_env: Any) -> None:
    # posix/rlimits needs neither root nor namespaces (as in Mesos): it works wherever the init runs.
    agent_env.launcher, agent_env.isolation = "posix", "posix/rlimits,posix/cpu"
    status = run_to_end(agent_env, "posix", "ulimit -Sn; ulimit -Hn; echo done",
                        [{"type": "RLMT_NOFILE", "soft": 32, "hard": 48}])
    assert status["phase"] == "Succeeded", status
    assert wait_for_text(agent_env.sandbox(status) / "stdout").splitlines()[:2] == ["32", "48"]


@pytest.mark.root
def test_a_limit_without_soft_and_hard_is_unlimited(env: Any) -> None:
    # RLMT_CORE: its hard limit is unlimited for root here, so raising it needs no privilege.
    if resource.getrlimit(resource.RLIMIT_CORE)[1] != resource.RLIM_INFINITY:
        pytest.skip("the agent's own RLIMIT_CORE hard limit is not unlimited: raising it needs CAP_SYS_RESOURCE")
    status = run_to_end(env, "core", "ulimit -Sc; ulimit -Hc; echo done", [{"type": "RLMT_CORE"}])
    assert status["phase"] == "Succeeded", status
    assert wait_for_text(env.sandbox(status) / "stdout").splitlines()[:2] == ["unlimited", "unlimited"]


@pytest.mark.root
def test_limits_are_per_container_and_leave_the_agent_alone(env: Any) -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    a = run_to_end(env, "a", "ulimit -n; echo done", [{"type": "RLMT_NOFILE", "soft": 100, "hard": 100}])
    b = run_to_end(env, "b", "ulimit -n; echo done", [{"type": "RLMT_NOFILE", "soft": 200, "hard": 200}])
    c = run_to_end(env, "c", "ulimit -n; echo done", [])
    assert wait_for_text(env.sandbox(a) / "stdout").splitlines()[0] == "100"
    assert wait_for_text(env.sandbox(b) / "stdout").splitlines()[0] == "200"
    # Without rlimit_info the command inherits the agent's limits.
    assert wait_for_text(env.sandbox(c) / "stdout").splitlines()[0] == str(before[0])
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


@pytest.mark.root
def test_exceeding_a_limit_is_the_kernels_business_not_a_limitation(env: Any) -> None:
    # Mesos TaskExceedingLimit: RLMT_CPU 1s and a busy loop -> the kernel kills it (SIGXCPU, then SIGKILL).
    status = run_to_end(env, "busy", "while :; do :; done", [{"type": "RLMT_CPU", "soft": 1, "hard": 1}])
    assert status["phase"] == "Failed", status
    assert status["exit_signal"] in (24, 9), status   # SIGXCPU at the soft limit, SIGKILL at the hard one
    assert status["reason"] == ""


@pytest.mark.root
def test_raising_a_hard_limit_without_cap_sys_resource_fails_with_a_clear_message(env: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The agent runs as root; the limit is refused only without CAP_SYS_RESOURCE (this machine's root
    # lacks it in its bounding set) or above fs.nr_open. Ask for more than both.
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    wanted = max(hard, nr_open) + 1
    status = run_to_end(env, "raise", "echo should not run", [{"type": "RLMT_NOFILE", "soft": wanted, "hard": wanted}])
    assert status["phase"] == "Failed", status
    assert status["reason"] == "LaunchFailed"
    assert "Failed to set RLMT_NOFILE limit: Operation not permitted" in status["message"], status
    stdout = env.sandbox(status) / "stdout"
    assert not stdout.exists() or stdout.read_text() == ""
    # The same message is in the sandbox's stderr, where a user of the container looks first.
    assert "Failed to set RLMT_NOFILE limit" in (env.sandbox(status) / "stderr").read_text()


@pytest.mark.root
def test_raising_a_hard_limit_above_the_agents_own_is_refused_without_cap_sys_resource(env: Any) -> None:
    if _has_cap_sys_resource():
        pytest.skip("the agent holds CAP_SYS_RESOURCE here, so the kernel lets it raise hard limits")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # the agent inherits the test's limits
    status = run_to_end(env, "nofile", "echo should not run",
                        [{"type": "RLMT_NOFILE", "soft": soft, "hard": hard + 1}])
    assert status["phase"] == "Failed", status
    assert status["message"] == (
        "Failed to launch container: Failed to set RLMT_NOFILE limit: Operation not permitted: raising a hard "
        f"limit above the agent's own ({hard}) needs CAP_SYS_RESOURCE, and RLMT_NOFILE cannot exceed "
        "/proc/sys/fs/nr_open")


@pytest.mark.root
def test_a_manifest_with_soft_above_hard_is_invalid_and_never_launched(env: Any) -> None:
    env.write_manifest("bad", "true", container={"rlimit_info": {"rlimits": [
        {"type": "RLMT_CPU", "soft": 100, "hard": 1}]}})
    result = env.once()
    assert result.returncode == 1
    status = env.status("bad")
    assert status["phase"] == "Invalid"
    assert "RLMT_CPU: soft limit 100 is greater than hard limit 1" in status["message"]
    assert "rlimit_info" in status["message"]


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


# --- the isolator alone ----------------------------------------------------------------------------

def _config(container: dict[str, Any] | None) -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"}, **({"container": container} if container else {})})
    return ContainerConfig(container_id="c", name="n", manifest="m", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox="/nonexistent")


def test_prepare_translates_names_and_unlimited() -> None:
    isolator = PosixRLimitsIsolator(AgentConfig())
    info = isolator.prepare("c", _config({"rlimit_info": {"rlimits": [
        {"type": "RLMT_NOFILE", "soft": 64, "hard": 128}, {"type": "RLMT_CORE"}, {"type": "RLMT_LOCKS", "soft": 1, "hard": 2},
    ]}}))
    assert info is not None
    assert info.rlimits == [
        {"name": "RLMT_NOFILE", "resource": resource.RLIMIT_NOFILE, "soft": 64, "hard": 128},
        {"name": "RLMT_CORE", "resource": resource.RLIMIT_CORE, "soft": resource.RLIM_INFINITY,
         "hard": resource.RLIM_INFINITY},
        {"name": "RLMT_LOCKS", "resource": RLIMIT_NUMBERS["RLMT_LOCKS"], "soft": 1, "hard": 2},
    ]


def test_prepare_without_rlimit_info_changes_nothing() -> None:
    isolator = PosixRLimitsIsolator(AgentConfig())
    assert isolator.prepare("c", _config(None)) is None
    assert isolator.prepare("c", _config({"hostname": "x"})) is None
    assert isolator.prepare("c", _config({"rlimit_info": {"rlimits": []}})) is None
