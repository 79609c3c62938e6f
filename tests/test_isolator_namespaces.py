"""namespaces/pid and namespaces/ipc: what a command inside can see and reach, and what destroy leaves
(NamespacesIsolatorTest: ROOT_PidNamespace, ROOT_SharePidNamespace, ROOT_SharePidNamespaceWhenDisallow,
ROOT_IPCNamespaceWithIPCModePrivate, ROOT_ShareIPCNamespace...).

Real kernel, as root, through the agent. Host processes used as targets are the test's own.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.test_isolator_filesystem_shared import wait_for_text

pytestmark = pytest.mark.root
ISOLATION = "namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"


@pytest.fixture
def env(agent_env: Any) -> Any:
    agent_env.isolation = ISOLATION
    return agent_env


@pytest.fixture
def host_process() -> Iterator[subprocess.Popen]:
    """A process of the host's (the test's own child) for containers to try to see and signal."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def launch(env: Any, name: str, command: str, *flags: str, **spec: Any) -> dict[str, Any]:
    env.write_manifest(name, command, **spec)
    result = env.once(*flags)
    assert result.returncode == 0, result.stdout + result.stderr
    status = env.status(name)
    assert status is not None and status["phase"] == "Running", status
    return status


def ns_inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def in_namespace_of(pid: int, kind: str = "pid") -> set[int]:
    """Host pids of every process in `pid`'s namespace of `kind`, read from the host's /proc."""
    target = ns_inode(pid, kind)
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if ns_inode(entry, kind) == target:
                    members.add(int(entry))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return members


def queue_keys(ipcs_output: str) -> set[str]:
    return {line.split()[0] for line in ipcs_output.splitlines() if line.startswith("0x")}


def host_queue_keys() -> set[str]:
    return queue_keys(subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=True).stdout)


def destroy_all(env: Any) -> None:
    for manifest in env.manifests.iterdir():
        manifest.unlink()
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr


# --- namespaces/pid --------------------------------------------------------------------------------

def test_command_sees_only_its_container_with_the_init_as_pid_1(env: Any) -> None:
    listing = 'for p in /proc/[0-9]*; do echo "${p#/proc/} $(cat $p/comm)"; done; ' \
              'stat -Lc %i /proc/self/ns/pid; echo done; exec sleep 300'
    status = launch(env, "ps", listing)
    lines = wait_for_text(env.sandbox(status) / "stdout").splitlines()
    processes = dict(line.split(" ", 1) for line in lines[:-2])
    assert processes["1"] == "reconciler-init"
    assert set(processes.values()) <= {"reconciler-init", "sh", "cat", "sleep"}, processes
    assert all(int(pid) < 10 for pid in processes), processes   # a fresh numbering, not the host's
    # Its own namespace is the init's (PID 1's /proc/1/ns is closed to it: the init is not dumpable).
    assert int(lines[-2]) == ns_inode(status["pid"], "pid") != ns_inode("self", "pid")
    # From the host: the init is the status file's pid, and the namespace holds the init and the command.
    assert len(in_namespace_of(status["pid"])) == 2
    # /proc inside is a fresh one, mounted nosuid,nodev,noexec.
    init = status["pid"]
    # The last mount at /proc is the visible one (the host's is underneath, in the copied mount tree).
    proc_mount = [line for line in Path(f"/proc/{init}/mountinfo").read_text().splitlines()
                  if line.split()[4] == "/proc"][-1]
    assert {"nosuid", "nodev", "noexec"} <= set(proc_mount.split()[5].split(","))
    assert str(init) not in processes


def test_command_cannot_see_or_signal_a_host_process(env: Any, host_process: subprocess.Popen) -> None:
    pid = host_process.pid
    status = launch(env, "blind", f"test -e /proc/{pid} && echo seen || echo unseen; "
                                  f"kill -0 {pid}; echo kill0=$?; kill -9 {pid}; echo kill9=$?; echo done")
    out = wait_for_text(env.sandbox(status) / "stdout").splitlines()
    assert out[:3] == ["unseen", "kill0=1", "kill9=1"]
    assert "No such process" in (env.sandbox(status) / "stderr").read_text()
    assert host_process.poll() is None   # still alive


def test_share_pid_namespace_sees_and_reaches_the_hosts_processes(env: Any, host_process: subprocess.Popen) -> None:
    pid = host_process.pid
    status = launch(env, "shared", f"stat -Lc %i /proc/self/ns/pid; test -e /proc/{pid} && echo seen; "
                                   f"kill -0 {pid}; echo kill0=$?; echo done; exec sleep 300",
                    container={"linux_info": {"share_pid_namespace": True}})
    out = wait_for_text(env.sandbox(status) / "stdout").splitlines()
    assert int(out[0]) == ns_inode("self", "pid")
    assert out[1:3] == ["seen", "kill0=0"]


def test_sharing_the_agents_pid_namespace_can_be_disallowed(env: Any) -> None:
    env.write_manifest("shared", "sleep 300", container={"linux_info": {"share_pid_namespace": True}})
    result = env.once("--disallow_sharing_agent_pid_namespace")
    assert result.returncode == 1
    status = env.status("shared")
    assert status["phase"] == "Failed" and status["reason"] == "LaunchFailed", status
    assert status["message"] == "Sharing agent pid namespace with containers is disallowed"
    assert status["pid"] is None
    # Without the flag the same manifest runs.
    assert env.once().returncode == 0
    assert env.status("shared")["phase"] == "Running"


def test_destroy_kills_everything_in_the_namespace_including_daemons(env: Any) -> None:
    # Two ways to escape a parent: a new session, and a double fork (re-parented to the namespace's init).
    command = "setsid sleep 1001 & sh -c 'sleep 1002 >/dev/null 2>&1 &'; echo done; exec sleep 300"
    status = launch(env, "daemons", command)
    init = status["pid"]
    wait_for_text(env.sandbox(status) / "stdout")
    deadline = time.monotonic() + 10
    while True:
        members = in_namespace_of(init)
        comms = sorted(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                       for p in members if Path(f"/proc/{p}").exists())
        if {"sleep 1001", "sleep 1002", "sleep 300"} <= set(comms):
            break
        assert time.monotonic() < deadline, comms
        time.sleep(0.05)
    daemon = next(p for p in members if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\x001002"))
    assert int(Path(f"/proc/{daemon}/stat").read_text().rsplit(")", 1)[1].split()[1]) == init   # re-parented to the init
    destroy_all(env)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in members):
        assert time.monotonic() < deadline, [p for p in members if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)
    assert env.status("daemons") is None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "X"


# --- namespaces/ipc --------------------------------------------------------------------------------

def test_ipc_objects_stay_in_their_container(env: Any) -> None:
    before = host_queue_keys()
    a = launch(env, "a", "ipcmk -Q >/dev/null; ipcs -q; echo done; exec sleep 300")
    keys_a = queue_keys(wait_for_text(env.sandbox(a) / "stdout"))
    assert len(keys_a) == 1, keys_a
    b = launch(env, "b", "ipcs -q; stat -Lc %i /proc/self/ns/ipc; echo done; exec sleep 300")
    out_b = wait_for_text(env.sandbox(b) / "stdout")
    assert queue_keys(out_b) == set()
    assert int(out_b.splitlines()[-2]) not in (ns_inode("self", "ipc"), ns_inode(a["pid"], "ipc"))
    assert host_queue_keys() == before
    assert not keys_a & host_queue_keys()
    destroy_all(env)
    assert host_queue_keys() == before   # the queue went with a's namespace


def test_private_ipc_mode_gives_a_private_1777_dev_shm_of_the_asked_size(env: Any) -> None:
    marker = f"reconciler-test-{os.getpid()}-{time.monotonic_ns()}"
    status = launch(env, "shm", f"stat -c %a /dev/shm; grep ' /dev/shm ' /proc/self/mountinfo | tail -n 1; "
                                f"touch /dev/shm/{marker}; echo done; exec sleep 300",
                    container={"linux_info": {"ipc_mode": "PRIVATE", "shm_size": 16}})
    lines = wait_for_text(env.sandbox(status) / "stdout").splitlines()
    assert lines[0] == "1777"
    mount = lines[1]
    assert " - tmpfs " in mount
    assert "size=16384k" in mount
    assert not Path("/dev/shm", marker).exists()   # the host's /dev/shm is untouched
    assert (Path(f"/proc/{status['pid']}/root/dev/shm") / marker).exists()
    destroy_all(env)


def test_private_ipc_mode_without_size_is_a_1777_tmpfs(env: Any) -> None:
    status = launch(env, "shm", "stat -c %a /dev/shm; grep ' /dev/shm ' /proc/self/mountinfo | tail -n 1; "
                                "echo done; exec sleep 300",
                    container={"linux_info": {"ipc_mode": "PRIVATE"}})
    lines = wait_for_text(env.sandbox(status) / "stdout").splitlines()
    assert lines[0] == "1777"
    assert " - tmpfs " in lines[1], lines[1]
    assert ns_inode(status["pid"], "ipc") != ns_inode("self", "ipc")


def test_share_parent_sees_the_hosts_ipc_objects(env: Any) -> None:
    created = subprocess.run(["ipcmk", "-Q"], capture_output=True, text=True, check=True).stdout
    qid = re.search(r"(\d+)\s*$", created).group(1)
    try:
        new = {line.split()[0] for line in subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout
               .splitlines() if line.startswith("0x") and line.split()[1] == qid}
        status = launch(env, "parent", "ipcs -q; stat -Lc %i /proc/self/ns/ipc; echo done; exec sleep 300",
                        container={"linux_info": {"ipc_mode": "SHARE_PARENT"}})
        out = wait_for_text(env.sandbox(status) / "stdout")
        assert new and new <= queue_keys(out)
        assert int(out.splitlines()[-2]) == ns_inode("self", "ipc")
    finally:
        subprocess.run(["ipcrm", "-q", qid], check=False)


def test_shm_size_without_private_mode_is_refused(env: Any) -> None:
    env.write_manifest("bad", "true", container={"linux_info": {"ipc_mode": "SHARE_PARENT", "shm_size": 64}})
    assert env.once().returncode == 1
    status = env.status("bad")
    assert status["phase"] == "Invalid"
    assert "shm_size is only allowed with ipc_mode PRIVATE" in status["message"]

