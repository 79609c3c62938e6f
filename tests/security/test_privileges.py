"""Issue 10, escapes 4-6: what root in a container could do with the capabilities and calls it held.

4. Every capability of the agent: mknod + read of the host's disk, remount of /proc/sys read-write,
   cgroupfs mounted to raise its own limits, a `mode: RO` volume remounted read-write, the cover
   over `.rootfs` unmounted.
5. With no capability granted, still: the kernel keyrings of host root; with only CAP_SYS_PTRACE,
   escape 1 again (tests/security/test_init_exposure.py); a setuid-root shell left in the sandbox
   for any host user.
6. `command.user: nobody` and a setuid-root program in the image: root again.
Plus the calls the default seccomp profile refuses, and the status showing the profile.
"""

from __future__ import annotations

import os
import stat

from reconciler.models import CAPABILITY_NUMBERS
from tests.security.conftest import DOCKER_DEFAULT_CAPS, Scenario


def mask(*names: str) -> int:
    return sum(1 << CAPABILITY_NUMBERS[name] for name in names)


def status_field(scenario: Scenario, field: str) -> str:
    for line in scenario.sections["status"]:
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    raise AssertionError(f"{field} not in {scenario.sections['status']}")


def test_the_command_holds_the_profile_s_capabilities_only(scenario: Scenario) -> None:
    effective = int(status_field(scenario, "CapEff"), 16)
    expected = {"root": mask(*DOCKER_DEFAULT_CAPS), "sys-ptrace": mask("SYS_PTRACE"), "user": 0}[scenario.setting]
    assert effective == expected, hex(effective)
    assert status_field(scenario, "Seccomp") == "2"
    assert status_field(scenario, "NoNewPrivs") == ("1" if scenario.setting == "user" else "0")


def test_the_host_disk_cannot_be_read_through_a_node_made_inside(scenario: Scenario) -> None:
    disk = scenario.sections["disk"]
    assert any("Operation not permitted" in line or "Permission denied" in line for line in disk), disk
    assert scenario.canaries["disk"].encode() == scenario.disk_after[:len(scenario.canaries["disk"])]


def test_kernel_knobs_cgroups_and_mounts_stay_out_of_reach(scenario: Scenario) -> None:
    text = scenario.stdout
    for done in ("remounted-sys", "sysctl-written", "mounted-cgroup", "remounted-rw", "wrote-ro", "unmounted-cover"):
        assert done not in text, done
    assert scenario.ro_data_after == b"original\n"
    # The sandbox's own .rootfs (the overlay's directories) stays hidden: nothing listed.
    assert all("umount" in line or "Permission denied" in line for line in scenario.sections["cover"]), \
        scenario.sections["cover"]


def test_the_seccomp_profile_refuses_keyrings_handles_bpf_and_user_namespaces(scenario: Scenario) -> None:
    for section in ("keyring", "handle", "bpf", "userns"):
        lines = scenario.sections[section]
        assert lines and all(line.endswith(": EPERM") for line in lines), (section, lines)


def test_a_setuid_root_program_in_the_image_gives_a_user_nothing(scenario: Scenario) -> None:
    """A setuid-root program of the image (the kit, which drops nothing, unlike busybox): root stays root,
    and a command user gains nothing (no_new_privs)."""
    expected = {"root": "uids: 0 0 0", "sys-ptrace": "uids: 0 0 0", "user": "uids: 65534 65534 65534"}
    assert scenario.sections["suid-image"] == [expected[scenario.setting]]


def test_a_setuid_shell_left_in_the_sandbox_gives_a_host_user_nothing(scenario: Scenario) -> None:
    assert scenario.sections["suid-sandbox"] == ["planted"]
    # The host user cannot even reach it; were it reachable, the mount would not honour its setuid bit.
    assert "uids:" not in scenario.host_suid_output and "Permission denied" in scenario.host_suid_output, \
        scenario.host_suid_output
    sandbox = scenario.env.agent.sandbox(scenario.attacker)
    assert not stat.S_IMODE(os.stat(sandbox).st_mode) & 0o007
    assert os.statvfs(sandbox).f_flag & os.ST_NOSUID and os.statvfs(sandbox).f_flag & os.ST_NODEV


def test_the_status_shows_the_effective_profile(scenario: Scenario) -> None:
    security = scenario.victim["security"]
    assert security["privileged"] is False
    assert security["seccomp"] == "default" and security["devices"] == "default"
    assert set(security["bounding_capabilities"]) == set(DOCKER_DEFAULT_CAPS)
    assert "/proc/keys" in security["masked_paths"] and "/proc/sys" in security["read_only_paths"]
