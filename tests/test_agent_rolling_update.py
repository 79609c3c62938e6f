"""An agent replaced as a Kubernetes DaemonSet rolling update replaces it adopts its containers.

What the kubelet does to the old pod, done here for real: the agent runs in a pod-like cgroup of its
own in every hierarchy (as a container of a pod does). The old agent gets SIGTERM and exits; then,
as the container runtime does for a container in the host's pid namespace (runc kills what is left
in the container's cgroup), every process still in the old pod's cgroups is SIGKILLed and the
cgroups are removed. A new agent, in a new pod cgroup, with the same work_dir and status dir (the
chart's hostPath volumes), must adopt the containers: same init pid, same container id, restarts 0,
no relaunch. That holds only if no container process was ever in the agent's own cgroups, which is
checked on /proc/<pid>/cgroup of each container's init and of its command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from reconciler.linux import cgroups, proc

from tests.conftest import AgentEnv, alive, running, wait_agent

pytestmark = pytest.mark.root

ISOLATION = "filesystem/shared,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"


def pod_hierarchies() -> list[cgroups.Hierarchy]:
    """Every hierarchy a pod's container has a cgroup in: each v1 hierarchy and the v2 one."""
    mounts = cgroups.find_mounts()
    return list(mounts.v1_hierarchies) + ([mounts.v2] if mounts.v2 else [])


class Pod:
    """A pod-like cgroup, `<name>` in every hierarchy, that processes can be started in."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hierarchies = pod_hierarchies()
        for hierarchy in self.hierarchies:
            hierarchy.create(name)

    def procs_files(self) -> list[str]:
        return [os.path.join(h.path(self.name), "cgroup.procs") for h in self.hierarchies]

    def members(self) -> set[int]:
        found: set[int] = set()
        for hierarchy in self.hierarchies:
            if hierarchy.exists(self.name):
                found.update(hierarchy.procs(self.name, recursive=True))
        return found

    def cgroups_of(self, pid: int) -> dict[str, str]:
        """This pod's cgroup path in each hierarchy, keyed as /proc/<pid>/cgroup keys them."""
        return {controllers: path for controllers, path in proc.cgroup_paths(pid).items()
                if path.rstrip("/").endswith("/" + self.name)}

    def tear_down(self, timeout: float = 10.0) -> None:
        """What the runtime does once the pod's main process has exited: kill what is left, rmdir."""
        deadline = time.monotonic() + timeout
        while members := self.members():
            assert time.monotonic() < deadline, f"pod {self.name} still has processes {members}"
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for hierarchy in self.hierarchies:
            if hierarchy.exists(self.name):
                hierarchy.remove(self.name)


@pytest.fixture
def pods(agent_env: AgentEnv):
    made: list[Pod] = []

    def make(n: int) -> Pod:
        pod = Pod(f"{agent_env.cgroups_root}-pod{n}")
        made.append(pod)
        return pod

    try:
        yield make
    finally:
        for pod in made:
            try:
                pod.tear_down()
            except Exception:  # noqa: BLE001 - remove the rest
                pass


def start_in_pod(env: AgentEnv, pod: Pod) -> subprocess.Popen:
    """`reconciler run` as a pod's container: entering the pod's cgroups before it starts."""
    enter = "; ".join(f"echo $$ > {f}" for f in pod.procs_files())
    agent = subprocess.Popen(
        ["sh", "-c", f'{enter}; exec "$0" -m reconciler run "$@"', sys.executable, *env.flags()],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=env.tmp)
    env.agents.append(agent)
    return agent


def tree(pid: int, at_least: int, timeout: float = 5.0) -> list[int]:
    """The init and its descendants, once the command has started `at_least` of them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            children = []
        if len(children) >= at_least or time.monotonic() > deadline:
            return [pid, *children]
        time.sleep(0.02)


def assert_outside(pod: Pod, pids: list[int]) -> None:
    for pid in pids:
        inside = pod.cgroups_of(pid)
        assert not inside, (f"container process {pid} is in the agent pod's cgroups {inside}: the "
                            f"runtime would kill it when the pod goes; all its cgroups: {proc.cgroup_paths(pid)}")


def test_agent_replaced_by_a_rolling_update_adopts_its_containers(agent_env, pods):
    env = agent_env
    env.launcher, env.isolation = "linux", ISOLATION
    env.write_manifest("web", "sleep 300 & exec sleep 301", kill_grace_period="1secs",
                       resources={"cpus": 0.1, "mem": 64})
    env.write_manifest("api", "exec sleep 300", kill_grace_period="1secs", restart_policy="OnFailure")

    old_pod = pods(1)
    old = start_in_pod(env, old_pod)
    wait_agent(env, old, timeout=15.0)
    assert old_pod.cgroups_of(old.pid), "the agent did not enter its pod's cgroups"
    web = env.wait_status("web", running)
    api = env.wait_status("api", running)
    processes = tree(web["pid"], 2) + tree(api["pid"], 1)
    assert len(processes) == 5, processes
    # The agent and its launch helper are in the pod; no container process ever was.
    assert_outside(old_pod, processes)
    helpers = [c.pid for c in psutil.Process(old.pid).children()]
    assert helpers and old_pod.members() >= {old.pid, *helpers}, (helpers, old_pod.members())
    assert not old_pod.members() & set(processes)

    # The rolling update: SIGTERM to the old pod's agent, then the runtime clears the pod.
    stopping = time.monotonic()
    old.send_signal(signal.SIGTERM)
    out, _ = old.communicate(timeout=20)
    assert old.returncode == 0, out
    # Well inside the chart's terminationGracePeriodSeconds (30): the kubelet never needs SIGKILL.
    assert time.monotonic() - stopping < 10, out
    old_pod.tear_down()
    time.sleep(0.3)
    assert all(alive(p) for p in processes), "tearing the old agent's pod down killed container processes"

    # The new pod's agent, same hostPath work_dir and status dir: adopts, restarts nothing.
    new_pod = pods(2)
    new = start_in_pod(env, new_pod)
    wait_agent(env, new, timeout=15.0)
    time.sleep(0.5)   # a relaunch, if one were coming, would have started by now
    for before in (web, api):
        after = env.status(before["name"])
        for key in ("pid", "container_id", "restarts", "started_at"):
            assert after[key] == before[key], (key, before, after)
        assert after["phase"] == "Running" and after["restarts"] == 0
    assert sorted(os.listdir(env.work_dir / "containers")) == sorted([web["container_id"], api["container_id"]])
    assert all(alive(p) for p in processes)
    assert_outside(new_pod, processes)

    # ... and manages them: a resource change is applied in place, a deleted manifest destroys.
    env.write_manifest("web", "sleep 300 & exec sleep 301", kill_grace_period="1secs",
                       resources={"cpus": 0.2, "mem": 64})
    updated = env.wait_status("web", lambda s: s["spec_hash"] != web["spec_hash"], timeout=10)
    assert updated["pid"] == web["pid"] and updated["container_id"] == web["container_id"], updated
    (env.manifests / "api.yaml").unlink()
    env.wait_gone("api")
    assert not alive(api["pid"])
    new.send_signal(signal.SIGTERM)
    new.communicate(timeout=20)
    assert alive(web["pid"])
