"""Issue 10, escapes 1-3: what a container reaches through its PID 1 (the init).

1. /proc/1/fd/N/../.. walked up a host directory the init held open: to the host's files, the
   checkpoints, another container's sandbox, the host's /proc; /proc/1/ns/* to enter the host's
   mount, uts, ipc and net namespaces.
2. /proc/1/map_files and /proc/1/exe: the host's interpreter and libraries, writable.
3. /proc/1/environ and the init's memory: the agent's environment, other containers' secrets.
And the moment before the init becomes pid1: a command that attaches to PID 1 as it starts must not
find a fork of the agent's launch helper there.
Each in the three settings of conftest.py (root, only CAP_SYS_PTRACE granted, command.user).
"""

from __future__ import annotations

from tests.security.conftest import Scenario, succeeded


def test_no_canary_reaches_any_container(scenario: Scenario) -> None:
    """Whatever path the attacks took (fds, root, cwd, environ, memory, setns, handles, devices), no
    secret of the host, the work dir, the checkpoints, the agent or another container shows in anything
    a container printed."""
    leaked = [name for name, canary in scenario.canaries.items() if canary in scenario.text()]
    assert leaked == [], f"{scenario.setting}: canaries leaked into the containers' output: {leaked}"


def test_the_host_s_files_are_unchanged(scenario: Scenario) -> None:
    """The canary files, the host's python3 and libpython (what the old init mapped), the read-only
    volume and the disk image: byte for byte as before the attacks."""
    changed = [path for path, digest in scenario.files_before.items() if scenario.files_after[path] != digest]
    assert changed == [], f"changed by the attacks: {changed}"


def test_pid1_holds_no_directory_of_the_host(scenario: Scenario) -> None:
    # Nothing was read by walking up any of its descriptors (each hit would print a canary line).
    assert scenario.sections["traversal"] == []
    targets = [line.split(" -> ", 1)[1] for line in scenario.sections["fd"] if " -> " in line]
    directories = [line for line in scenario.sections["fd"] if line.startswith("directory:")]
    assert directories == [], f"PID 1 holds directories open: {directories} (targets: {targets})"
    if scenario.setting == "sys-ptrace":
        assert targets, scenario.sections["fd"]        # listed: CAP_SYS_PTRACE is enough to see them
    else:
        assert targets == [] and any("Permission denied" in line for line in scenario.sections["fd"]), \
            scenario.sections["fd"]


def test_pid1_root_and_cwd_lead_nowhere(scenario: Scenario) -> None:
    lines = scenario.sections["root"]
    assert len(lines) == 2 and all("can't open" in line for line in lines), lines


def test_setns_through_pid1_enters_no_host_namespace(scenario: Scenario) -> None:
    lines = scenario.sections["ns"]
    assert succeeded([line for line in lines if " setns: " in line]) == [], lines
    assert not any(line.startswith("read:") for line in lines), lines
    for kind in ("mnt", "uts", "ipc"):
        host = scenario.host_namespaces[kind]
        ours = [line.split(": ", 1)[1] for line in lines if line.startswith((f"{kind} before:", f"{kind} after:"))]
        assert len(ours) == 2 and host not in ours, f"{kind}: the container is in the host's namespace {host}"


def test_pid1_maps_no_host_file_and_nothing_of_it_opens_for_writing(scenario: Scenario) -> None:
    mapped = [line.split(": ", 1)[1] for line in scenario.sections["map_files"] if line.startswith("maps: ")]
    assert all(target.startswith("/memfd:reconciler-init") for target in mapped), mapped
    exe = scenario.sections["exe"]
    opened = [line for line in succeeded(scenario.sections["map_files"] + exe) if line.startswith("open-write")]
    assert opened == [], opened
    assert all(line.startswith(("/memfd:reconciler-init", "open-write")) or "denied" in line for line in exe), exe


def test_pid1_environment_is_empty(scenario: Scenario) -> None:
    environ = scenario.sections["environ"]
    # Its size in bytes when it can be read (CAP_SYS_PTRACE), else the shell's refusal; no canary line.
    if scenario.setting == "sys-ptrace":
        assert environ[0] == "0", environ
    else:
        assert "Permission denied" in environ[0], environ
    assert environ[1:] == [], environ
    assert scenario.sections["env"] == []          # nor did the command's own environment get the agent's


def test_pid1_memory_holds_no_secret(scenario: Scenario) -> None:
    mem = scenario.sections["mem"]
    assert not any(line.startswith("found:") for line in mem), mem
    if scenario.setting == "sys-ptrace":
        assert "ptrace-attach: ok" in mem and "open-mem: ok" in mem     # it read it all, and found nothing
    else:
        assert "ptrace-attach: EPERM" in mem and "open-mem: ok" not in mem, mem


def test_no_command_catches_the_init_before_it_is_pid1(scenario: Scenario) -> None:
    """The kit as the command itself attaches to PID 1 from its first instruction: it must never find
    the init still a fork of the launch helper (host python3 mapped, root's capabilities, the helper's
    memory with other containers' specs in it)."""
    for output in scenario.racers:
        assert output.startswith("race:"), output[:3000]          # it ran, and raced
        assert "attached to the init before pid1" not in output, output[:3000]
        assert not any(line.startswith("found:") for line in output.splitlines()), output[:3000]
