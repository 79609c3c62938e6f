"""command.user: the command runs as that user (uid, primary gid, supplementary groups), owns its sandbox and
its stdout/stderr, and an unknown user fails the container for good with Mesos's message.

Real kernel, as root, through the agent; the work dir is where any user can reach a sandbox.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from reconciler import users
from reconciler.isolators.base import PermanentError
from tests.test_isolator_capabilities import launch, proc_caps, run_to_end, write_manifest
from tests.test_isolator_filesystem_shared import wait_for_text

ISOLATION = "filesystem/shared,namespaces/pid,cgroups/cpu,cgroups/mem"
ID = "id -u; id -g; id -G; echo done"


@pytest.fixture
def env(outside_tmp_env: Any) -> Any:
    outside_tmp_env.isolation = ISOLATION
    return outside_tmp_env


@pytest.fixture
def test_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway user with a primary group and one supplementary group (removed afterwards)."""
    if shutil.which("useradd") is None or shutil.which("groupadd") is None:
        pytest.skip("useradd/groupadd (passwd package) are not installed")
    name = f"rt{uuid.uuid4().hex[:8]}"
    extra = f"{name}x"
    subprocess.run(["groupadd", extra], check=True)
    try:
        subprocess.run(["useradd", "--no-create-home", "--user-group", "--groups", extra, "--shell", "/bin/sh", name],
                       check=True)
        try:
            yield pwd.getpwnam(name)
        finally:
            subprocess.run(["userdel", name], check=False)
    finally:
        subprocess.run(["groupdel", extra], check=False)


# --- through the agent -----------------------------------------------------------------------------

@pytest.mark.root
def test_command_runs_as_the_user_with_its_groups(env: Any, test_user: pwd.struct_passwd) -> None:
    status = run_to_end(env, "who", ID, user=test_user.pw_name)
    assert status["phase"] == "Succeeded", status
    uid, gid, groups, _ = wait_for_text(env.sandbox(status) / "stdout").splitlines()
    extra = grp.getgrnam(f"{test_user.pw_name}x").gr_gid
    assert int(uid) == test_user.pw_uid
    assert int(gid) == test_user.pw_gid
    assert sorted(map(int, groups.split())) == sorted({test_user.pw_gid, extra})   # none of root's groups


@pytest.mark.root
def test_nobody_owns_its_sandbox_and_output_files(env: Any) -> None:
    nobody = pwd.getpwnam("nobody")
    status = run_to_end(env, "nobody", f'{ID}; echo oops >&2; touch "$MESOS_SANDBOX/made"', user="nobody")
    assert status["phase"] == "Succeeded", status
    sandbox = env.sandbox(status)
    out = wait_for_text(sandbox / "stdout").splitlines()
    assert out[:2] == [str(nobody.pw_uid), str(nobody.pw_gid)]
    for path in (sandbox, sandbox / "stdout", sandbox / "stderr", sandbox / "made"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path


@pytest.mark.root
def test_the_user_cannot_do_what_root_could(env: Any) -> None:
    status = launch(env, "weak", "exec sleep 300", user="nobody")
    init = status["pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    command = int(children[0])
    assert os.stat(f"/proc/{command}").st_uid == pwd.getpwnam("nobody").pw_uid
    assert proc_caps(command)["CapEff"] == 0
    # The init stays root: it must reap, signal and write the checkpoint.
    assert os.stat(f"/proc/{init}").st_uid == 0


@pytest.mark.root
def test_without_a_user_the_command_runs_as_the_agents_user(env: Any) -> None:
    status = run_to_end(env, "me", ID)
    assert wait_for_text(env.sandbox(status) / "stdout").splitlines()[:2] == ["0", "0"]
    assert env.sandbox(status).stat().st_uid == 0


@pytest.mark.root
def test_an_unknown_user_fails_for_good_with_a_clear_message(env: Any) -> None:
    write_manifest(env, "ghost", "echo never", user="no-such-user-here")
    result = env.once()
    assert result.returncode == 1
    status = env.status("ghost")
    assert status["phase"] == "Failed", status
    assert status["reason"] == "LaunchFailed"
    assert status["message"] == "Failed to get user information for 'no-such-user-here': no such user on this host"
    assert status["pid"] is None and status["container_id"] is None
    # Permanent: nothing was left behind, and a second pass does not retry it.
    assert list((env.work_dir / "sandboxes").iterdir()) == []
    assert list((env.work_dir / "containers").iterdir()) == []
    env.once()
    assert env.status("ghost")["message"] == status["message"]


@pytest.mark.root
def test_a_user_that_cannot_execute_the_command_says_so(env: Any) -> None:
    script = env.work_dir.parent / "root-only.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o700)
    status = run_to_end(env, "denied", str(script), user="nobody")
    assert status["phase"] == "Failed", status
    assert status["exit_code"] == 126, status   # the shell found the file but could not execute it
    assert "Permission denied" in (env.sandbox(status) / "stderr").read_text()


# --- resolution alone ---------------------------------------------------------------------------------

def test_resolve_gives_uid_primary_gid_and_groups_primary_first() -> None:
    root = users.resolve("root")
    assert (root.uid, root.gid, root.groups[0], root.home) == (0, 0, 0, pwd.getpwnam("root").pw_dir)
    nobody = users.resolve("nobody")
    entry = pwd.getpwnam("nobody")
    assert (nobody.uid, nobody.gid) == (entry.pw_uid, entry.pw_gid)
    assert nobody.groups[0] == entry.pw_gid
    assert set(nobody.groups) == set(os.getgrouplist("nobody", entry.pw_gid))
    assert nobody.launch_spec() == {"name": "nobody", "uid": entry.pw_uid, "gid": entry.pw_gid,
                                    "groups": list(nobody.groups)}


def test_unknown_user_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="Failed to get user information for 'no-such-user-here'"):
        users.resolve("no-such-user-here")
