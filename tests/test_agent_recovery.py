"""Containers outlive the agent: stopping or killing it leaves them running, the next start adopts them
without a restart, learns how the ones that ended meanwhile ended, destroys what is no longer declared,
and cleans up orphans (cgroups and sandboxes no checkpoint owns) under its own roots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from reconciler.linux import cgroups

from tests.conftest import alive, running, wait_agent, wait_dead

pytestmark = pytest.mark.root

def descendants(pid: int, at_least: int = 1, timeout: float = 5.0) -> list[int]:
    """The processes below a container's init (waiting until the command has started `at_least`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def freezer(env) -> cgroups.Hierarchy:
    mounts = cgroups.find_mounts()
    return cgroups.unified_hierarchy(mounts) if mounts.unified else cgroups.freezer_hierarchy(mounts)


def same_container(before: dict, after: dict) -> None:
    for key in ("pid", "container_id", "restarts", "started_at"):
        assert after[key] == before[key], (key, before, after)
    assert after["phase"] == "Running"
    assert alive(before["pid"])


# the agent goes away: containers stay --------------------------------------------------------------

@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_containers_outlive_the_daemon_and_are_adopted(env, how):
    env.write_manifest("web", "sleep 300 & exec sleep 301", kill_grace_period="1secs")
    env.write_manifest("api", "exec sleep 300", kill_grace_period="1secs", restart_policy="OnFailure")
    agent = env.start()
    web = env.wait_status("web", running)
    api = env.wait_status("api", running)
    processes = [web["pid"], api["pid"], *descendants(web["pid"], 2), *descendants(api["pid"])]
    assert len(processes) == 5, processes
    env.stop(agent, how)
    assert agent.returncode == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    time.sleep(0.3)
    assert all(alive(p) for p in processes), "stopping the agent killed container processes"

    # a fresh `once` adopts them
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    same_container(web, env.status("web"))
    same_container(api, env.status("api"))
    assert all(alive(p) for p in processes)
    assert sorted(os.listdir(env.work_dir / "containers")) == sorted([web["container_id"], api["container_id"]])

    # and so does a fresh daemon, which then still manages them (a spec change replaces)
    agent = env.start()
    wait_agent(env, agent)
    same_container(web, env.status("web"))
    same_container(api, env.status("api"))
    env.write_manifest("api", "exec sleep 302", kill_grace_period="1secs")
    replaced = env.wait_status("api", lambda s: running(s) and s["container_id"] != api["container_id"])
    assert replaced["restarts"] == 0
    wait_dead([api["pid"]], timeout=3)
    same_container(web, env.status("web"))
    env.stop(agent)


def test_adopted_container_exit_is_still_watched(env):
    marker = env.tmp / "go"
    env.write_manifest("job", f"while [ ! -e {marker} ]; do sleep 0.05; done; exit 5", restart_policy="Never")
    agent = env.start()
    before = env.wait_status("job", running)
    env.stop(agent, signal.SIGKILL)
    wait_agent(env, env.start())
    same_container(before, env.status("job"))
    marker.touch()
    after = env.wait_status("job", lambda s: s["phase"] in ("Failed", "Succeeded"), timeout=5)
    assert after["phase"] == "Failed" and after["exit_code"] == 5, after


def test_exit_code_of_a_container_that_ended_while_the_agent_was_down(env):
    env.write_manifest("job", "sleep 1; exit 7", restart_policy="Never")
    agent = env.start()
    before = env.wait_status("job", running)
    env.stop(agent)
    time.sleep(2)
    assert not alive(before["pid"])
    env.start()
    after = env.wait_status("job", lambda s: s["phase"] in ("Failed", "Succeeded"), timeout=5)
    assert after["phase"] == "Failed", after
    assert after["exit_code"] == 7 and after["exit_signal"] is None, after
    assert after["container_id"] == before["container_id"] and after["restarts"] == 0


def test_on_failure_container_that_failed_while_down_is_restarted(linux_env):
    env = linux_env
    env.write_manifest("job", "sleep 0.5; exit 7", restart_policy="OnFailure")
    agent = env.start()
    before = env.wait_status("job", running)
    env.stop(agent, signal.SIGKILL)
    time.sleep(1)
    env.start()
    after = env.wait_status("job", lambda s: s["restarts"] >= 1, timeout=5)
    assert after["container_id"] != before["container_id"]


def test_crash_loop_backoff_survives_an_agent_restart(linux_env):
    env = linux_env
    env.write_manifest("crash", "exit 1", restart_policy="Always")
    agent = env.start()
    before = env.wait_status("crash", lambda s: s["phase"] == "BackOff", timeout=10)
    env.stop(agent)
    agent = env.start()
    wait_agent(env, agent)
    time.sleep(0.5)
    after = env.status("crash")
    # A restarted agent must not turn a crash loop into a fast restart loop.
    assert after["phase"] == "BackOff" and after["restarts"] == before["restarts"], (before, after)
    assert after["container_id"] == before["container_id"]


def test_manifest_deleted_while_down_is_destroyed_on_start(env):
    env.write_manifest("web", "sleep 300 & exec sleep 301", kill_grace_period="1secs")
    env.write_manifest("keep", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web, keep = env.status("web"), env.status("keep")
    processes = [web["pid"], *descendants(web["pid"], 2)]
    (env.manifests / "web.yaml").unlink()
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert env.status("web") is None
    wait_dead(processes, timeout=3)
    assert not (env.work_dir / "containers" / web["container_id"]).exists()
    assert not (env.work_dir / "sandboxes" / web["container_id"]).exists()
    same_container(keep, env.status("keep"))


def test_missing_directory_at_start_destroys_nothing_until_it_is_back(linux_env):
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web = env.status("web")
    away = env.tmp / "away"
    env.manifests.rename(away)
    agent = env.start()
    doc = wait_agent(env, agent)
    assert doc["source"]["ready"] is False and "does not exist" in (doc["source"]["error"] or ""), doc["source"]
    same_container(web, env.status("web"))
    away.rename(env.manifests)
    deadline = time.monotonic() + 5
    while not (env.agent_status() or {}).get("source", {}).get("ready"):
        assert time.monotonic() < deadline, f"the directory's return was never noticed: {env.agent_status()}"
        time.sleep(0.02)
    time.sleep(0.2)
    same_container(web, env.status("web"))


def start_time_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def impersonate(env, container_id: str, pid: int, boot_id: str | None = None) -> None:
    """Point a checkpoint at another live process: same pid and start time, as a reused pid can be."""
    pid_file = env.work_dir / "containers" / container_id / "pid.json"
    doc = json.loads(pid_file.read_text())
    doc["pid"], doc["start_time"] = pid, start_time_ticks(pid)
    if boot_id is not None:
        doc["boot_id"] = boot_id
    pid_file.write_text(json.dumps(doc))


def test_checkpoint_from_another_boot_never_kills_the_process_now_holding_its_pid(env):
    """After a reboot, pids and start times (ticks since boot) repeat: early-boot processes get the
    same ones every time. A checkpoint of the previous boot names nobody alive now."""
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web = env.status("web")
    os.kill(web["pid"], signal.SIGKILL)  # "the reboot": the container is gone
    wait_dead([web["pid"]])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        impersonate(env, web["container_id"], bystander.pid, boot_id=str(uuid.uuid4()))
        result = env.once()
        assert result.returncode == 0, result.stdout + result.stderr
        assert env.status("web")["pid"] != bystander.pid
        time.sleep(0.2)
        assert bystander.poll() is None, "the agent killed a process of this boot that was never its container"
    finally:
        if bystander.poll() is None:
            bystander.kill()
        bystander.wait()


def test_a_reused_pid_outside_the_containers_cgroup_is_neither_adopted_nor_killed(linux_env):
    """Same boot, same pid and start time, but not in the container's cgroup: not the container's."""
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web = env.status("web")
    os.kill(web["pid"], signal.SIGKILL)  # the container dies while no agent runs
    wait_dead([web["pid"]])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        impersonate(env, web["container_id"], bystander.pid)
        result = env.once()
        assert result.returncode == 0, result.stdout + result.stderr
        assert env.status("web")["pid"] != bystander.pid
        time.sleep(0.2)
        assert bystander.poll() is None, "the agent killed a process that was not its container's"
    finally:
        if bystander.poll() is None:
            bystander.kill()
        bystander.wait()


# orphans -------------------------------------------------------------------------------------------

def test_orphan_cgroup_is_killed_and_removed(linux_env):
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web = env.status("web")
    hierarchy = freezer(env)
    orphan = f"{env.cgroups_root}/{uuid.uuid4()}"
    hierarchy.create(orphan)
    intruder = subprocess.Popen(["sleep", "300"])
    try:
        hierarchy.attach(orphan, intruder.pid)
        assert intruder.pid in hierarchy.procs(orphan)
        result = env.once()
        assert result.returncode == 0, result.stdout + result.stderr
        intruder.wait(timeout=5)
        assert intruder.returncode == -signal.SIGKILL
        assert not hierarchy.exists(orphan)
        assert not Path(hierarchy.path(orphan)).exists()
        same_container(web, env.status("web"))
        assert hierarchy.exists(f"{env.cgroups_root}/{web['container_id']}")
    finally:
        if intruder.poll() is None:
            intruder.kill()
            intruder.wait()


def test_orphan_sandbox_is_removed(linux_env):
    env = linux_env
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web = env.status("web")
    orphan = env.work_dir / "sandboxes" / str(uuid.uuid4())
    (orphan / "tmp").mkdir(parents=True)
    (orphan / "stdout").write_text("left over\n")
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not orphan.exists()
    assert env.sandbox(web).is_dir()  # the live one is untouched
    same_container(web, env.status("web"))


def test_checkpoint_without_pid_is_cleaned_up(linux_env):
    env = linux_env
    """The agent died between writing a config and forking: nothing ran; the leftovers go."""
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    web = env.status("web")
    stale_id = str(uuid.uuid4())
    stale = env.work_dir / "containers" / stale_id
    stale.mkdir()
    config = json.loads((env.work_dir / "containers" / web["container_id"] / "config.json").read_text())
    config["container_id"] = stale_id
    config["sandbox"] = str(env.work_dir / "sandboxes" / stale_id)
    (stale / "config.json").write_text(json.dumps(config))
    (env.work_dir / "sandboxes" / stale_id).mkdir()
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not stale.exists() and not (env.work_dir / "sandboxes" / stale_id).exists()
    same_container(web, env.status("web"))


def test_stale_status_file_of_an_unknown_name_is_removed(linux_env):
    env = linux_env
    env.status_dir.mkdir(parents=True)
    (env.status_dir / "ghost.json").write_text(json.dumps({"name": "ghost", "phase": "Running", "pid": 1}))
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    assert env.once().returncode == 0
    assert env.status("ghost") is None
    assert env.status("web")["phase"] == "Running"


# The agent killed between the fork of a container's init and its go-ahead (issue 11 #7): as a
# SIGKILL there would, the patched agent dies with the init forked, isolated and checkpointed.
_DIE_BEFORE_GO = """
import os, sys
from reconciler.launcher import base
def die(self):
    os.write(2, b"dying before the go-ahead\\n")
    os._exit(9)
base.Forked.go = die
from reconciler.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("policy", ["Never", "OnFailure"])
def test_a_job_whose_command_never_started_is_launched_again(env, policy):
    runs = env.tmp / "runs"
    env.write_manifest("job", f"echo ran >> {runs}; exit 0", restart_policy=policy)
    dying = subprocess.run(["python3", "-c", _DIE_BEFORE_GO, "run", *env.flags()], capture_output=True,
                           text=True, timeout=30, cwd=env.tmp)
    assert dying.returncode == 9 and "dying before the go-ahead" in dying.stderr, dying.stderr
    assert not runs.exists()
    agent = env.start()
    done = env.wait_status("job", lambda s: s["phase"] in ("Failed", "Succeeded"), timeout=10)
    assert done["phase"] == "Succeeded" and done["exit_code"] == 0 and done["exit_signal"] is None, done
    assert runs.read_text() == "ran\n", "the command ran other than exactly once"
    assert done["restarts"] == 0
    time.sleep(0.5)
    assert runs.read_text() == "ran\n"
    env.stop(agent)


def test_a_killed_agent_leaves_no_traceback_and_the_next_one_sweeps_its_temp_files(env):
    """Issue 11 #12: the launch helper of a killed agent printed ConnectionResetError and BrokenPipeError
    tracebacks; a killed agent's `.NAME.json.<random>.tmp` files stayed in the status dir for ever."""
    for i in range(12):
        env.write_manifest(f"job-{i}", "exec sleep 300", kill_grace_period="1secs")
    outputs = []
    for delay in (0.05, 0.15, 0.3, 0.6):   # killed at different points of the first launches
        agent = env.start()
        time.sleep(delay)
        agent.kill()
        out, _ = agent.communicate(timeout=20)   # until the helper, which shares the pipe, is gone too
        outputs.append(out)
    assert not [out for out in outputs if "Traceback" in out or "Error:" in out], outputs
    env.status_dir.mkdir(parents=True, exist_ok=True)
    stale = env.status_dir / f".job-0.json.{'0' * 32}.tmp"
    fresh = env.status_dir / f".job-1.json.{'1' * 32}.tmp"
    stale.write_text("{")
    fresh.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    agent = env.start()
    wait_agent(env, agent)
    for i in range(12):
        env.wait_status(f"job-{i}", running, timeout=30)
    assert not stale.exists(), "a temp file a killed agent left is still there"
    assert fresh.exists(), "a temp file someone may be writing now was removed"
    fresh.unlink()
    env.stop(agent)
