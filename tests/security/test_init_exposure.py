"""Issue 10, escapes 1-3: what a container reaches through its PID 1 (the init).

1. /proc/1/fd/N/../.. walked up a host directory the init held open: to the host's files, the
   checkpoints, another container's sandbox; /proc/1/ns/* to enter the host's namespaces.
2. /proc/1/map_files and /proc/1/exe: the host's interpreter and libraries, writable.
3. /proc/1/environ and the init's memory: the agent's environment and other containers' secrets.
Each in the three settings of conftest.py (root, CAP_SYS_PTRACE granted, command.user).
"""

from __future__ import annotations

from tests.security.conftest import Scenario


def test_no_canary_reaches_the_container(scenario: Scenario) -> None:
    """Whatever path the attacks took (fds, root, cwd, environ, memory, setns), no secret of the host,
    the checkpoints, the agent or another container shows in anything the attacker printed."""
    for name, canary in scenario.canaries.items():
        assert canary not in scenario.text(), f"{scenario.setting}: the {name} canary leaked"


def test_pid1_holds_no_directory_of_the_host(scenario: Scenario) -> None:
    fds = [line for line in scenario.sections["fd"] if " -> " in line]
    if scenario.setting == "sys-ptrace":
        # With CAP_SYS_PTRACE the fds can be listed: /dev/null and the container's own status file.
        targets = sorted(line.split(" -> ", 1)[1] for line in fds)
        # (/dev/null was opened before the container's root was entered: shown relative to its own mount.)
        assert len(targets) == 4 and all(t.endswith("/null") for t in targets[:3]) and targets[3].endswith("/status"), \
            targets
        assert any("Not a directory" in line for line in scenario.sections["fd"])
    else:
        assert fds == [] and any("Permission denied" in line for line in scenario.sections["fd"])


def test_setns_through_pid1_enters_nothing(scenario: Scenario) -> None:
    lines = scenario.sections["setns"]
    assert "setns: ok" not in lines and not any(line.startswith("read:") for line in lines), lines


def test_pid1_maps_no_host_file_and_nothing_of_it_opens_for_writing(scenario: Scenario) -> None:
    maps = [line.split(": ", 1)[1] for line in scenario.sections["map_files"] if line.startswith("maps: ")]
    assert all(target.startswith("/memfd:reconciler-init") for target in maps), maps
    exe = scenario.sections["exe"]
    opened = [line for line in scenario.sections["map_files"] + exe if line.startswith("open-write") and line.endswith(": ok")]
    assert opened == [], opened
    assert all(line.startswith("/memfd:reconciler-init") or "open-write" in line or "denied" in line
               for line in exe), exe
    assert scenario.hashes_after == scenario.hashes_before     # the host's python3 and libpython


def test_pid1_environment_is_empty_and_its_memory_holds_no_secret(scenario: Scenario) -> None:
    environ = scenario.sections["environ"]
    assert not any(line.startswith("RECONCILER_TEST_CANARY") or line.startswith("VICTIM_SECRET") for line in environ)
    mem = scenario.sections["mem"]
    assert not any(line.startswith("found:") for line in mem), mem
    if scenario.setting == "sys-ptrace":
        assert "open-mem: ok" in mem          # it could read it all, and found nothing
    else:
        assert "ptrace-attach: EPERM" in mem and "open-mem: ok" not in mem
