"""The container's PID 1 once its command runs (reconciler/launcher/pid1.c), seen from the host.

Issue 10, "The init exposes nothing of the host": it is a static program exec'd from a sealed memfd
(neither the host's interpreter nor a file anyone can rewrite), with an empty environment, CAP_KILL
only, no_new_privs and a seccomp filter, holding only /dev/null and the container's own status file.
It still does the init's job: signals reach the command, its exit status is written for the agent,
and that status survives an agent restart. tests/security/ attacks it from inside containers.

Real kernel, as root, through the agent.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.launcher.base import PID1_PATH
from tests.conftest import wait_agent
from tests.test_isolator_namespaces import launch

pytestmark = pytest.mark.root
ISOLATION = "namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"
CAP_KILL = 5


@pytest.fixture
def env(agent_env: Any) -> Any:
    agent_env.isolation = ISOLATION
    return agent_env


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def test_pid1_holds_nothing_of_the_host(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_TEST_AGENT_SECRET", "agent-secret-value")   # the agent's env, not the container's
    status = launch(env, "quiet", "exec sleep 300")
    pid = status["pid"]
    facts = proc_status(pid)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "reconciler-init"
    # A sealed memfd, not the host's python3 nor the installed pid1 file.
    exe = os.readlink(f"/proc/{pid}/exe")
    assert exe.startswith("/memfd:reconciler-init"), exe
    with pytest.raises(OSError) as refused:
        os.open(f"/proc/{pid}/exe", os.O_WRONLY)     # even host root cannot change it (sealed, and running)
    assert refused.value.errno in (errno.EPERM, errno.ETXTBSY)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "python" not in maps and "libc" not in maps, maps
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    # CAP_KILL only (to pass signals on to a command of another user), no_new_privs, a seccomp filter.
    assert int(facts["CapEff"], 16) == int(facts["CapPrm"], 16) == int(facts["CapBnd"], 16) == 1 << CAP_KILL
    assert int(facts["CapInh"], 16) == int(facts["CapAmb"], 16) == 0
    assert facts["NoNewPrivs"].strip() == "1" and facts["Seccomp"].strip() == "2"
    # Its descriptors: /dev/null three times and its own status file (a file, never a directory).
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    checkpoint = env.work_dir / "containers" / status["container_id"]
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: "/dev/null", 3: str(checkpoint / "status")}, fds
    assert stat.S_ISREG(os.stat(f"/proc/{pid}/fd/3").st_mode)


def test_pid1_passes_signals_on_and_writes_the_exit_status(env: Any) -> None:
    env.write_manifest("trapper", "trap 'exit 7' TERM; echo trapped; while true; do sleep 0.05; done",
                       restart_policy="Never")
    agent = env.start()
    status = env.wait_status("trapper", lambda s: s["phase"] == "Running")
    stdout = env.sandbox(status) / "stdout"
    deadline = time.monotonic() + 10
    while "trapped" not in stdout.read_text() and time.monotonic() < deadline:   # the trap is set
        time.sleep(0.01)
    os.kill(status["pid"], signal.SIGTERM)
    ended = env.wait_status("trapper", lambda s: s["phase"] in ("Succeeded", "Failed"))
    assert (ended["phase"], ended["exit_code"], ended["exit_signal"]) == ("Failed", 7, None)
    env.stop(agent)


def test_an_exit_status_written_while_the_agent_was_away_is_read_by_the_next(env: Any) -> None:
    env.write_manifest("job", "sleep 1; exit 3", restart_policy="Never")
    agent = env.start()
    running = env.wait_status("job", lambda s: s["phase"] == "Running")
    env.stop(agent)
    written = env.work_dir / "containers" / running["container_id"] / "status"
    deadline = time.monotonic() + 10
    while not written.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(written.read_text())["exit_code"] == 3    # pid1 wrote it, no agent running
    agent = env.start()
    wait_agent(env, agent)
    ended = env.wait_status("job", lambda s: s["phase"] in ("Succeeded", "Failed"))
    assert (ended["phase"], ended["exit_code"]) == ("Failed", 3)
    env.stop(agent)


def test_the_installed_pid1_is_static(env: Any) -> None:
    with open(PID1_PATH, "rb") as f:
        head = f.read(4096)
    assert head[:4] == b"\x7fELF"
    assert b"/lib64/ld-linux" not in head and b"ld-linux-aarch64" not in head   # no program interpreter


def test_the_launch_helper_imports_only_the_standard_library_and_its_own_modules() -> None:
    """Every init is a fork of the helper and pays for what it imported: nothing of the agent's (pydantic,
    reconciler.linux) belongs there, nor in reconciler.launch_spec, the types the init's spec is read with."""
    package_root = str(Path(__file__).resolve().parent.parent)
    program = ("import sys; before = set(sys.modules); sys.path.insert(0, sys.argv[1]); "
               "import reconciler.launcher.helper, reconciler.launch_spec; "
               "print('\\n'.join(sorted(set(sys.modules) - before)))")
    loaded = subprocess.run([sys.executable, "-I", "-S", "-c", program, package_root], check=True,
                            capture_output=True, text=True).stdout.split()
    ours = {name for name in loaded if name.split(".")[0] not in sys.stdlib_module_names}
    assert ours == {"reconciler", "reconciler.launch_spec", "reconciler.launcher", "reconciler.launcher.helper",
                    "reconciler.launcher.init", "reconciler.launcher.image_user",
                    "reconciler.launcher.seccomp_filter"}, ours


@pytest.mark.parametrize("wait_for_the_answer", [True, False])
def test_the_launch_helper_of_a_killed_agent_ends_quietly(capfd, wait_for_the_answer) -> None:
    """Issue 11 #12: an agent killed with an answer unread (ECONNRESET at the helper's next recv) or
    before its answer (EPIPE at the helper's send) made the helper print a traceback into the log."""
    from reconciler.launcher.base import LaunchHelper
    helper = LaunchHelper()
    helper.start()
    process = helper._proc
    assert process is not None and helper._sock is not None
    helper._sock.send(b'{"op": "ping"}')
    if wait_for_the_answer:
        deadline = time.monotonic() + 5
        while not select.select([helper._sock], [], [], 0.05)[0]:
            assert time.monotonic() < deadline
    helper._sock.close()   # as the kernel closes a killed agent's socket
    helper._sock = None
    assert process.wait(timeout=10) == 0
    helper._proc = None
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
