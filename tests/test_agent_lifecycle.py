"""A container's life as a user sees it through status files and the host's /proc: launch, sandbox,
exit codes, restart policies, graceful stops, updates in place and replacements, destroy without
leftovers; and what bad manifests must (not) do to running containers.

The key tests run on both launchers: linux (pid and ipc namespaces, a cgroup per container) and posix
(a session per container, no isolation).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.linux import cgroups

from tests.conftest import CONFIGS, alive, running, wait_dead

pytestmark = pytest.mark.root

# helpers ------------------------------------------------------------------------------------------

def write_doc(env, name: str, spec: dict[str, Any], filename: str | None = None) -> Path:
    """A manifest with a spec given whole (command included), written atomically."""
    doc = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name}, "spec": spec}
    path = env.manifests / (filename or f"{name}.yaml")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.rename(tmp, path)
    return path


def command_pids(init_pid: int, timeout: float = 5.0, at_least: int = 1) -> list[int]:
    """The container's processes below its init (the command and what it started)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            children = psutil.Process(init_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if len(children) >= at_least or time.monotonic() > deadline:
            return [c.pid for c in children]
        time.sleep(0.02)


def find_process(init_pid: int, cmdline: list[str], timeout: float = 5.0) -> list[int]:
    """Pids below the init running `cmdline` (waiting for them to have exec'd)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        try:
            for child in psutil.Process(init_pid).children(recursive=True):
                try:
                    if child.cmdline() == cmdline:
                        found.append(child.pid)
                except psutil.Error:
                    pass
        except psutil.NoSuchProcess:
            pass
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def cgroup_dir(env, container_id: str) -> Path:
    mounts = cgroups.find_mounts()
    hierarchy = cgroups.unified_hierarchy(mounts) if mounts.unified else cgroups.freezer_hierarchy(mounts)
    return Path(hierarchy.path(f"{env.cgroups_root}/{container_id}"))


def parse_iso(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


# launch, sandbox, environment, fds ------------------------------------------------------------------

def test_launch_running_with_live_pid_sandbox_env_and_logs(env):
    write_doc(env, "web", {
        "kill_grace_period": "1secs",
        "command": {
            "value": 'echo "sandbox=$MESOS_SANDBOX|$RECONCILER_SANDBOX|cwd=$(pwd)|mode=$MODE|tier=$TIER"; '
                     'echo to-stderr >&2; exec sleep 300',
            "environment": {"variables": [{"name": "MODE", "value": "prod"}, {"name": "TIER", "value": "a b"}]},
        },
    })
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    status = env.status("web")
    assert running(status), status
    assert Path(f"/proc/{status['pid']}").exists()
    assert alive(status["pid"])
    assert status["restarts"] == 0 and status["exit_code"] is None
    assert status["manifest"] == str(env.manifests / "web.yaml")
    assert status["container_id"]
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] is True

    sandbox = env.sandbox(status)
    assert sandbox.is_dir()
    deadline = time.monotonic() + 5
    while "tier" not in (sandbox / "stdout").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    out = (sandbox / "stdout").read_text()
    assert out.strip() == f"sandbox={sandbox}|{sandbox}|cwd={sandbox}|mode=prod|tier=a b", out
    assert (sandbox / "stderr").read_text().strip() == "to-stderr"
    assert "RECONCILER_" not in out


def test_status_pid_is_the_init_and_command_runs_under_it(linux_env):
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    status = env.status("web")
    assert find_process(status["pid"], ["sleep", "300"])
    children = command_pids(status["pid"])
    assert len(children) == 1, children
    if env.launcher == "linux":
        # PID 1 of its own pid namespace, and the command sees itself under it
        init_ns = os.readlink(f"/proc/{status['pid']}/ns/pid")
        assert init_ns != os.readlink("/proc/self/ns/pid")
        assert os.readlink(f"/proc/{children[0]}/ns/pid") == init_ns
        nspid = [line for line in Path(f"/proc/{status['pid']}/status").read_text().splitlines()
                 if line.startswith("NSpid:")][0].split()
        assert nspid[-1] == "1", nspid
        assert cgroup_dir(env, status["container_id"]).is_dir()


def test_no_agent_fd_leaks_into_the_command(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    # The daemon, not only `once`: it holds watches, sockets and pipes a command must not inherit.
    env.start()
    status = env.wait_status("web", running)
    [command] = find_process(status["pid"], ["sleep", "300"])
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{command}/fd"))
    targets = {fd: os.readlink(f"/proc/{command}/fd/{fd}") for fd in fds}
    assert fds == [0, 1, 2], targets
    sandbox = env.sandbox(status)
    assert targets == {0: "/dev/null", 1: str(sandbox / "stdout"), 2: str(sandbox / "stderr")}


# exit codes and restart policies -------------------------------------------------------------------

def test_exit_code_captured_never(env):
    env.write_manifest("fail", "exit 3", restart_policy="Never")
    env.write_manifest("ok", "exit 0", restart_policy="Never")
    env.start()
    fail = env.wait_status("fail", lambda s: s["phase"] in ("Failed", "Succeeded"))
    ok = env.wait_status("ok", lambda s: s["phase"] in ("Failed", "Succeeded"))
    assert fail["phase"] == "Failed" and fail["exit_code"] == 3 and fail["exit_signal"] is None, fail
    assert fail["pid"] is None
    assert "3" in fail["message"]
    assert ok["phase"] == "Succeeded" and ok["exit_code"] == 0, ok
    time.sleep(0.5)  # and they stay so: Never restarts
    assert env.status("fail")["restarts"] == 0 and env.status("fail")["container_id"] == fail["container_id"]
    assert env.status("ok")["restarts"] == 0 and env.status("ok")["phase"] == "Succeeded"


def test_on_failure_restarts_a_failing_container_but_not_a_succeeding_one(linux_env):
    env = linux_env
    env.write_manifest("flaky", "exit 1", restart_policy="OnFailure")
    env.write_manifest("done", "exit 0", restart_policy="OnFailure")
    env.start()
    flaky = env.wait_status("flaky", lambda s: s["restarts"] >= 1, timeout=10)
    done = env.wait_status("done", lambda s: s["phase"] == "Succeeded")
    assert done["exit_code"] == 0 and done["restarts"] == 0
    time.sleep(0.5)
    again = env.status("done")
    assert again["phase"] == "Succeeded" and again["restarts"] == 0 and again["container_id"] == done["container_id"]
    assert flaky["restarts"] >= 1


def test_always_restarts_immediately_then_backs_off(env):
    env.write_manifest("crash", "exit 1", restart_policy="Always")
    env.start()
    # immediate: well before the 10 s of the first backoff
    first = env.wait_status("crash", lambda s: s["restarts"] >= 1, timeout=4)
    backoff = env.wait_status("crash", lambda s: s["phase"] == "BackOff", timeout=10)
    now = time.time()
    assert backoff["restarts"] == 1, backoff  # the first restart was immediate, the second waits
    assert backoff["exit_code"] == 1
    assert first["restarts"] == 1
    # "message says until when": an ISO timestamp about 10 s ahead
    stamps = [word.rstrip(".,;)") for word in backoff["message"].split() if word[:2] == "20" and "T" in word]
    assert stamps, backoff["message"]
    until = parse_iso(stamps[-1])
    assert now + 5 < until < now + 12, (backoff["message"], now)
    # still backing off a little later: no busy restart loop
    time.sleep(1.0)
    later = env.status("crash")
    assert later["phase"] == "BackOff" and later["restarts"] == 1, later


def test_always_restarts_a_succeeding_container_too(linux_env):
    env = linux_env
    env.write_manifest("loop", "exit 0", restart_policy="Always")
    env.start()
    env.wait_status("loop", lambda s: s["restarts"] >= 1, timeout=10)


def test_killed_by_a_signal_reports_exit_signal(linux_env):
    env = linux_env
    env.write_manifest("sig", "kill -9 $$", restart_policy="Never")
    env.start()
    status = env.wait_status("sig", lambda s: s["phase"] in ("Failed", "Succeeded"))
    assert status["phase"] == "Failed", status
    assert status["exit_signal"] == 9 and status["exit_code"] is None, status
    assert "SIGKILL" in status["message"], status["message"]


def test_container_killed_from_outside_is_restarted(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs", restart_policy="Always")
    env.start()
    before = env.wait_status("web", running)
    os.kill(before["pid"], 9)
    after = env.wait_status("web", lambda s: running(s) and s["restarts"] == 1, timeout=5)
    assert after["pid"] != before["pid"] and after["container_id"] != before["container_id"]
    wait_dead([before["pid"]])


def test_exec_command_without_shell(linux_env):
    env = linux_env
    write_doc(env, "direct", {"kill_grace_period": "1secs",
                              "command": {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "300"]}})
    write_doc(env, "missing", {"restart_policy": "Never",
                               "command": {"shell": False, "value": "/no/such/binary", "arguments": ["x"]}})
    env.start()
    direct = env.wait_status("direct", running)
    assert find_process(direct["pid"], ["sleep", "300"])
    missing = env.wait_status("missing", lambda s: s["phase"] in ("Failed", "Succeeded"))
    assert missing["phase"] == "Failed", missing
    assert "/no/such/binary" in missing["message"], missing["message"]


def test_documents_of_one_file_are_separate_containers(linux_env):
    env = linux_env
    path = env.manifests / "pair.yaml"

    def write(*names: str) -> None:
        docs = [{"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": n},
                 "spec": {"kill_grace_period": "1secs", "command": {"value": "exec sleep 300"}}} for n in names]
        tmp = path.with_name(".pair.yaml.tmp")
        tmp.write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
        os.rename(tmp, path)

    write("one", "two")
    assert env.once().returncode == 0
    one, two = env.status("one"), env.status("two")
    assert running(one) and running(two) and one["manifest"] == two["manifest"] == str(path)
    write("two")
    assert env.once().returncode == 0
    assert env.status("one") is None
    wait_dead([one["pid"]])
    assert env.status("two")["pid"] == two["pid"]


def test_spec_change_resets_crash_loop_backoff(linux_env):
    env = linux_env
    env.write_manifest("crash", "exit 1", restart_policy="Always", kill_grace_period="1secs")
    env.start()
    env.wait_status("crash", lambda s: s["phase"] == "BackOff", timeout=10)
    t0 = time.monotonic()
    env.write_manifest("crash", "exec sleep 300", restart_policy="Always", kill_grace_period="1secs")
    fixed = env.wait_status("crash", running, timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert fixed["restarts"] == 0


# graceful stop -------------------------------------------------------------------------------------

def test_sigterm_then_sigkill_after_grace_period(env):
    marker = env.tmp / "term.log"
    grace = 2.0
    env.write_manifest(
        "stubborn", f"trap 'echo TERM >> {marker}' TERM; while :; do sleep 0.05; done",
        kill_grace_period="2secs")
    env.start()
    status = env.wait_status("stubborn", running)
    pids = [status["pid"], *command_pids(status["pid"])]
    time.sleep(0.2)  # the trap is set
    started = time.monotonic()
    (env.manifests / "stubborn.yaml").unlink()
    env.wait_gone("stubborn", timeout=grace + 5)
    took = time.monotonic() - started
    assert marker.exists() and "TERM" in marker.read_text(), "the command never got SIGTERM"
    assert took >= grace, f"killed after {took:.2f}s, before the {grace}s grace period"
    assert took < grace + 1.5, f"took {took:.2f}s for a {grace}s grace period"
    wait_dead(pids, timeout=2)


def test_a_command_that_obeys_sigterm_stops_without_waiting_for_the_grace_period(linux_env):
    env = linux_env
    env.write_manifest("polite", "exec sleep 300", kill_grace_period="10secs")
    env.start()
    status = env.wait_status("polite", running)
    started = time.monotonic()
    (env.manifests / "polite.yaml").unlink()
    env.wait_gone("polite", timeout=12)
    assert time.monotonic() - started < 2.0
    wait_dead([status["pid"]], timeout=2)


# update in place vs replace -------------------------------------------------------------------------

def test_resources_change_updates_in_place(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs", resources={"cpus": 0.1, "mem": 32})
    env.start()
    before = env.wait_status("web", running)
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs", resources={"cpus": 0.2, "mem": "64Mi"})
    after = env.wait_status("web", lambda s: s["spec_hash"] != before["spec_hash"], timeout=5)
    assert after["phase"] == "Running"
    assert after["pid"] == before["pid"] and after["container_id"] == before["container_id"], (before, after)
    assert after["restarts"] == 0
    assert alive(before["pid"])
    stats = env.wait_status("web", lambda s: s.get("statistics", {}).get("mem_limit_bytes") == 64 * 1024 * 1024,
                            timeout=5)["statistics"]
    assert stats["cpus_limit"] == 0.2


def test_any_other_spec_change_replaces_the_container(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    env.start()
    before = env.wait_status("web", running)
    env.write_manifest("web", "exec sleep 301", kill_grace_period="1secs")
    after = env.wait_status("web", lambda s: running(s) and s["container_id"] != before["container_id"], timeout=5)
    assert after["pid"] != before["pid"]
    assert after["restarts"] == 0
    wait_dead([before["pid"]], timeout=2)
    assert find_process(after["pid"], ["sleep", "301"])
    # the old container's sandbox and checkpoint are gone
    assert not (env.work_dir / "sandboxes" / before["container_id"]).exists()
    assert not (env.work_dir / "containers" / before["container_id"]).exists()


def test_metadata_labels_change_does_not_restart(linux_env):
    env = linux_env
    write_doc(env, "web", {"kill_grace_period": "1secs", "command": {"value": "exec sleep 300"}})
    assert env.once().returncode == 0
    before = env.status("web")
    doc = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web", "labels": {"team": "infra"}},
           "spec": {"kill_grace_period": "1secs", "command": {"value": "exec sleep 300"}}}
    (env.manifests / "web.yaml").write_text(json.dumps(doc))
    assert env.once().returncode == 0
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["container_id"] == before["container_id"]


def test_node_selector_matches_attributes(linux_env):
    env = linux_env
    env.write_manifest("rack1", "exec sleep 300", kill_grace_period="1secs", node_selector={"rack": "r1"})
    env.write_manifest("anywhere", "exec sleep 300", kill_grace_period="1secs")
    result = env.once(attributes="rack:r2;zone:a")
    assert result.returncode == 0, result.stdout + result.stderr
    assert env.status("anywhere")["phase"] == "Running"
    assert env.status("rack1") is None or env.status("rack1")["pid"] is None
    result = env.once(attributes="rack:r1;zone:a")
    assert result.returncode == 0, result.stdout + result.stderr
    assert running(env.status("rack1"))
    pid = env.status("rack1")["pid"]
    # the node stops matching: the container goes
    result = env.once(attributes="rack:r2")
    assert env.status("rack1") is None or env.status("rack1")["pid"] is None
    wait_dead([pid])


# destroy leaves nothing ------------------------------------------------------------------------------

def test_removing_the_manifest_destroys_everything(env):
    env.write_manifest("web", "sleep 300 & exec sleep 301", kill_grace_period="1secs")
    env.start()
    status = env.wait_status("web", running)
    pids = [status["pid"], *command_pids(status["pid"], at_least=2)]
    assert len(pids) == 3, pids
    (env.manifests / "web.yaml").unlink()
    env.wait_gone("web", timeout=5)
    wait_dead(pids, timeout=3)
    cid = status["container_id"]
    assert not (env.work_dir / "sandboxes" / cid).exists()
    assert not (env.work_dir / "containers" / cid).exists()
    if env.launcher == "linux":
        assert not cgroup_dir(env, cid).exists()


def test_background_grandchild_of_an_exited_command_is_killed(env):
    """`sleep 300 &` then exit: the command is over, the grandchild must not outlive the container."""
    env.write_manifest("bg", "sleep 300 & sleep 0.5; exit 0", restart_policy="Never")
    env.start()
    status = env.wait_status("bg", running)
    sleepers = find_process(status["pid"], ["sleep", "300"])
    assert sleepers
    done = env.wait_status("bg", lambda s: s["phase"] in ("Succeeded", "Failed"), timeout=5)
    assert done["phase"] == "Succeeded" and done["exit_code"] == 0, done
    wait_dead([status["pid"], *sleepers], timeout=3)
    if env.launcher == "linux":
        assert not cgroup_dir(env, status["container_id"]).exists()
    (env.manifests / "bg.yaml").unlink()
    env.wait_gone("bg", timeout=5)
    assert not (env.work_dir / "sandboxes" / status["container_id"]).exists()


def test_daemonised_grandchild_is_killed_on_destroy(env):
    """A double-forked grandchild (re-parented away from the shell) is still the container's."""
    env.write_manifest("daemon", "(sleep 300 &) ; exec sleep 301", kill_grace_period="1secs")
    env.start()
    status = env.wait_status("daemon", running)
    sleepers = find_process(status["pid"], ["sleep", "300"])
    assert sleepers
    assert find_process(status["pid"], ["sleep", "301"])
    descendants = command_pids(status["pid"])
    (env.manifests / "daemon.yaml").unlink()
    env.wait_gone("daemon", timeout=5)
    wait_dead([status["pid"], *descendants], timeout=3)


def test_posix_destroy_does_not_wait_for_zombies_it_cannot_reap(agent_env):
    """The agent as PID 1 of a container image (or under any child subreaper that is not a reaping
    init): a posix container's orphans are re-parented to the agent and, once killed, stay zombies
    until someone reaps them. They are dead: destroy must not wait for them (let alone fail)."""
    env = agent_env
    env.launcher, env.isolation = CONFIGS["posix"]
    # Become a child subreaper, as PID 1 is, then exec the agent (the flag survives execve).
    wrapper = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(36, 1, 0, 0, 0); "
               "os.execv(sys.executable, [sys.executable, '-m', 'reconciler', *sys.argv[1:]])")
    agent = subprocess.Popen([sys.executable, "-c", wrapper, "run", *env.flags()], cwd=env.tmp,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.agents.append(agent)
    env.write_manifest("web", "sleep 300 & exec sleep 301", kill_grace_period="1secs")
    status = env.wait_status("web", running)
    assert find_process(status["pid"], ["sleep", "300"])
    started = time.monotonic()
    (env.manifests / "web.yaml").unlink()
    env.wait_gone("web", timeout=5)
    took = time.monotonic() - started
    out = env.stop(agent)
    assert took < 1.5, f"removing the manifest took {took:.2f}s"
    assert "Failed to kill" not in out, out


# bad input never touches running containers ----------------------------------------------------------

def condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == kind), None)


def test_garbage_yaml_keeps_the_running_container(linux_env):
    env = linux_env
    path = env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    before = env.status("web")
    path.write_text("apiVersion: reconciler/v1\nkind: Container\nmetadata: {name: web\nspec: [[[\n")
    result = env.once()
    assert result.returncode == 1
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["container_id"] == before["container_id"]
    assert after["phase"] == "Running" and alive(before["pid"])
    valid = condition(after, "ManifestValid")
    assert valid is not None and valid["status"] is False, after["conditions"]
    assert valid["message"].startswith(f"{path}: document "), valid["message"]
    assert after["message"] == valid["message"]


def test_invalid_manifest_keeps_the_running_container_and_names_the_field(linux_env):
    env = linux_env
    path = env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    before = env.status("web")
    env.write_manifest("web", "exec sleep 999", kill_grace_period="1secs", resources={"mem": "lots"})
    assert env.once().returncode == 1
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["phase"] == "Running"
    assert after["spec_hash"] == before["spec_hash"]  # the last good spec stays in force
    valid = condition(after, "ManifestValid")
    assert valid["status"] is False
    assert valid["message"].startswith(f"{path}: document 0: spec.resources.mem: "), valid["message"]
    assert after["message"] == valid["message"]
    # fixing it brings the condition back (and applies the new spec)
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    fixed = env.status("web")
    assert fixed["pid"] == before["pid"]
    assert condition(fixed, "ManifestValid")["status"] is True and fixed["message"] == ""


def test_name_first_seen_invalid_is_phase_invalid(linux_env):
    env = linux_env
    path = env.write_manifest("newbie", "exec sleep 300", restart_policy="Sometimes")
    result = env.once()
    assert result.returncode == 1
    status = env.status("newbie")
    assert status is not None
    assert status["phase"] == "Invalid" and status["pid"] is None, status
    assert status["message"].startswith(f"{path}: document 0: spec.restart_policy"), status["message"]
    assert condition(status, "ManifestValid")["status"] is False
    assert not (env.work_dir / "sandboxes").exists() or not any((env.work_dir / "sandboxes").iterdir())
    # the broken file removed: the Invalid status goes with it
    path.unlink()
    assert env.once().returncode == 0
    assert env.status("newbie") is None


def test_unparseable_file_is_listed_in_agent_json_and_destroys_nothing(linux_env):
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    before = env.status("web")
    garbage = env.manifests / "zz-garbage.yaml"
    garbage.write_text(": : [ not yaml\n\t-")
    assert env.once().returncode == 1
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["phase"] == "Running"
    assert condition(after, "ManifestValid")["status"] is True  # web's own file is fine
    agent = env.agent_status()
    files = {entry["file"]: entry["error"] for entry in agent["invalid_files"]}
    assert str(garbage) in files, agent["invalid_files"]
    assert files[str(garbage)]


def test_the_file_a_container_came_from_turning_to_garbage_keeps_it(linux_env):
    """Its name can no longer be read, but the file may still declare it: nothing is destroyed."""
    env = linux_env
    path = env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    before = env.status("web")
    path.write_text("\x00\x01garbage")
    assert env.once().returncode == 1
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["phase"] == "Running"
    assert str(path) in [entry["file"] for entry in env.agent_status()["invalid_files"]]


def test_duplicate_name_lexically_first_file_wins(linux_env):
    env = linux_env
    write_doc(env, "dup", {"kill_grace_period": "1secs", "command": {"value": "echo from-b; exec sleep 300"}},
              filename="b.yaml")
    write_doc(env, "dup", {"kill_grace_period": "1secs", "command": {"value": "echo from-a; exec sleep 300"}},
              filename="a.yaml")
    result = env.once()
    assert result.returncode == 1  # a duplicate is an invalid document
    status = env.status("dup")
    assert status["phase"] == "Running" and status["manifest"] == str(env.manifests / "a.yaml"), status
    deadline = time.monotonic() + 3
    while not (env.sandbox(status) / "stdout").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (env.sandbox(status) / "stdout").read_text().strip() == "from-a"
    invalid = env.agent_status()["invalid_documents"]
    messages = [d["error"] for d in invalid if d["file"] == str(env.manifests / "b.yaml")]
    assert messages and "duplicate name, declared in" in messages[0] and "a.yaml" in messages[0], invalid
    # only one container exists for the name
    assert len(list((env.work_dir / "containers").iterdir())) == 1


def test_missing_manifest_directory_destroys_nothing(linux_env):
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    before = env.status("web")
    env.manifests.rename(env.tmp / "manifests-away")
    result = env.once()
    assert result.returncode == 1
    after = env.status("web")
    assert after is not None and after["pid"] == before["pid"] and alive(before["pid"])
    agent = env.agent_status()
    assert agent["source"]["error"], agent["source"]
    assert str(env.manifests) in agent["source"]["error"] and "does not exist" in agent["source"]["error"]
    assert agent["source"]["ready"] is False


def test_empty_manifest_directory_destroys_everything(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    env.write_manifest("api", "sleep 300 & exec sleep 301", kill_grace_period="1secs")
    assert env.once().returncode == 0
    statuses = [env.status("web"), env.status("api")]
    pids = [s["pid"] for s in statuses] + [p for s in statuses for p in command_pids(s["pid"])]
    for path in env.manifests.iterdir():
        path.unlink()
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert env.status("web") is None and env.status("api") is None
    wait_dead(pids, timeout=3)
    assert sorted(p.name for p in env.status_dir.iterdir()) == ["_agent.json"]
    assert not any((env.work_dir / "containers").iterdir())
    assert not any((env.work_dir / "sandboxes").iterdir())
    if env.launcher == "linux":
        for s in statuses:
            assert not cgroup_dir(env, s["container_id"]).exists()
