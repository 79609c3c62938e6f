"""Issue 10, escapes 5 and 6: setuid-root programs.

5. A root container copies a setuid-root program into its sandbox (0755 all the way down, no nosuid):
   any unprivileged host user ran it as root.
6. `command.user: nobody` plus a setuid-root program in the image: root again.
The program is the kit itself (`kit ids` prints its real, effective and saved uids): unlike busybox,
which drops a setuid bit for every applet not configured to keep it, it shows what the bit gives.
"""

from __future__ import annotations

import os
import stat

from tests.security.conftest import HOST_UID, Scenario


def test_a_setuid_root_program_in_the_image_gives_a_command_user_nothing(scenario: Scenario) -> None:
    """Root stays root, and a command user gains nothing (no_new_privs)."""
    expected = {"root": "uids: 0 0 0", "sys-ptrace": "uids: 0 0 0", "user": "uids: 65534 65534 65534"}
    assert scenario.sections["suid-image"] == [expected[scenario.setting]]


def test_a_setuid_program_left_in_the_sandbox_gives_a_host_user_nothing(scenario: Scenario) -> None:
    assert scenario.sections["suid-sandbox"] == ["planted"]
    # An unprivileged host user cannot even reach it...
    direct = scenario.host_user["suid-kit"]
    assert "uids:" not in direct and "Permission denied" in direct, direct
    # ...and reached anyway (setpriv walks the path with root's capabilities), the mount ignores the bit.
    through_setpriv = scenario.host_user["suid-kit-setpriv"]
    assert through_setpriv.startswith(f"uids: {HOST_UID} {HOST_UID} {HOST_UID}\n"), through_setpriv
    sandbox = scenario.env.agent.sandbox(scenario.attacker)
    assert not stat.S_IMODE(os.stat(sandbox).st_mode) & 0o007, oct(os.stat(sandbox).st_mode)
    assert os.statvfs(sandbox).f_flag & os.ST_NOSUID, "the sandbox is not mounted nosuid"
