"""Issue 10, escapes 4 and 5: the capabilities and calls root in a container held.

4. Every capability of the agent (40 of 41): the default must be no larger than Docker's set.
5. With no capability granted, still: the kernel keyrings of host root, readable and writable.
Plus the calls the default seccomp profile refuses whatever the capabilities (the "shocker"
open_by_handle_at, bpf, CPU-wide perf events, user namespaces), and the status document's
`security` block showing the effective profile.
"""

from __future__ import annotations

from reconciler.models import CAPABILITY_NUMBERS
from tests.security.conftest import DOCKER_DEFAULT_CAPS, Scenario, proc_status_field, succeeded


def mask(*names: str) -> int:
    return sum(1 << CAPABILITY_NUMBERS[name] for name in names)


def names(bits: int) -> list[str]:
    return sorted(name for name, number in CAPABILITY_NUMBERS.items() if bits >> number & 1)


def test_the_command_holds_the_profile_s_capabilities_only(scenario: Scenario) -> None:
    effective = int(proc_status_field(scenario, "CapEff"), 16)
    permitted = int(proc_status_field(scenario, "CapPrm"), 16)
    bounding = int(proc_status_field(scenario, "CapBnd"), 16)
    expected = {"root": mask(*DOCKER_DEFAULT_CAPS), "sys-ptrace": mask("SYS_PTRACE"), "user": 0}[scenario.setting]
    assert effective == expected, f"holds {names(effective)}, extra: {names(effective & ~expected)}"
    assert permitted == expected, names(permitted)
    assert bounding & ~mask(*DOCKER_DEFAULT_CAPS, "SYS_PTRACE") == 0, f"bounding set beyond Docker's: {names(bounding)}"
    assert proc_status_field(scenario, "Seccomp") == "2"
    assert proc_status_field(scenario, "NoNewPrivs") == ("1" if scenario.setting == "user" else "0")


def test_the_kernel_keyrings_shared_with_the_host_are_neither_read_nor_written(scenario: Scenario) -> None:
    """Keyrings are not namespaced: the container's uid has the same user keyring as that uid on the
    host (`_uid.0` for root). Nothing of it is described, listed or added to."""
    lines = scenario.sections["keyring"]
    assert len(lines) == 3 and succeeded(lines) == [], lines
    assert not any(line.startswith("keyring:") for line in lines), lines
    assert "reconciler-test-key" not in scenario.host_keys


def test_the_seccomp_profile_refuses_handles_bpf_perf_and_user_namespaces(scenario: Scenario) -> None:
    for section, attempts in (("shocker", ["open-by-handle"]), ("bpf", ["bpf-prog-load"]),
                              ("perf", ["perf-event-open-cpu-wide"]), ("userns", ["unshare-user"])):
        lines = scenario.sections[section]
        done = [line.partition(": ")[0] for line in lines if line.partition(": ")[0] in attempts]
        assert done == attempts and not [line for line in succeeded(lines) if not line.startswith("open-mount")], \
            (section, lines)
        assert not any(line.startswith("read:") for line in lines), (section, lines)


def test_runc_s_masked_paths_read_empty(scenario: Scenario) -> None:
    sizes = dict(line.rsplit(" ", 1) for line in scenario.sections["masked"])
    assert sizes and all(size == "0" for size in sizes.values()), sizes


def test_kernel_knobs_do_not_open_for_writing(scenario: Scenario) -> None:
    """core_pattern, sysrq-trigger, uevent_helper, modprobe: each one write away from running a program
    as host root. Only opened, never written."""
    lines = scenario.sections["knobs"]
    assert len(lines) == 5 and succeeded(lines) == [], lines


def test_the_status_shows_the_effective_profile(scenario: Scenario) -> None:
    security = scenario.attacker["security"]
    assert security["privileged"] is False
    assert security["seccomp"] == "default" and security["devices"] == "default"
    if scenario.setting == "sys-ptrace":
        assert security["effective_capabilities"] == ["SYS_PTRACE"]
        assert security["bounding_capabilities"] == ["SYS_PTRACE"]
    else:
        assert set(security["bounding_capabilities"]) == set(DOCKER_DEFAULT_CAPS)
    if scenario.setting == "user":
        assert security["no_new_privs"] is True
    assert "/proc/keys" in security["masked_paths"] and "/proc/sys" in security["read_only_paths"]
    # The victim (no setting of its own) shows the plain default.
    assert set(scenario.victim["security"]["bounding_capabilities"]) == set(DOCKER_DEFAULT_CAPS)
