"""A destroy that cannot kill everything keeps the container known, says so, and is retried."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from reconciler.agent import Agent
from reconciler.config import AgentConfig
from reconciler.launcher.posix import PosixLauncher
from tests.conftest import read_status_file


def web_agent_config(tmp_path: Path) -> AgentConfig:
    """An in-process agent (posix launcher) with one manifest, web, running `sleep 300`."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(json.dumps({
        "apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web"},
        "spec": {"kill_grace_period": "100ms", "command": {"value": "exec sleep 300"}}}))
    return AgentConfig(manifests=str(manifests), work_dir=str(tmp_path / "work"), launcher="posix",
                       isolation=["posix/cpu"])


def kill_all_and_close(agent: Agent) -> None:
    """The test's teardown: whatever the agent still runs is killed (its kills were made to fail)."""
    for state in agent.reconciler.names.values():
        if state.container is not None and state.container.pid:
            try:
                os.kill(state.container.pid, 9)
            except ProcessLookupError:
                pass
    agent.close()


def test_a_failed_kill_keeps_checkpoint_and_status_and_is_retried(tmp_path, monkeypatch) -> None:
    manifests = tmp_path / "manifests"
    config = web_agent_config(tmp_path)
    real_destroy = PosixLauncher.destroy
    failures = {"left": 1}

    def flaky_destroy(self, container_id, identity, pid_namespace):  # noqa: ANN001
        if failures["left"]:
            failures["left"] -= 1
            raise TimeoutError("1234 still alive")
        return real_destroy(self, container_id, identity, pid_namespace)

    async def scenario() -> None:
        agent = Agent(config)
        try:
            await agent.start()
            container = agent.reconciler.names["web"].container
            monkeypatch.setattr(PosixLauncher, "destroy", flaky_destroy)
            (manifests / "web.yaml").unlink()
            await agent.relist()
            await agent.reconciler.queue.wait_idle()

            status = read_status_file(tmp_path / "work" / "status" / "web.json")
            assert status is not None
            assert status["reason"] == "DestroyFailed"
            assert status["message"] == "Failed to kill all processes in the container: 1234 still alive"
            assert os.path.isdir(tmp_path / "work" / "containers" / container.id), "the checkpoint must stay"
            assert agent.containerizer.destroy_errors == 1

            await agent.relist()     # a wake-up before the backoff ends does not retry the kill
            await agent.reconciler.queue.wait_idle()
            assert agent.containerizer.destroy_errors == 1 and failures["left"] == 0
            assert (tmp_path / "work" / "status" / "web.json").exists()

            await asyncio.sleep(1.3)  # the retry comes by itself after 1 s; now the kill works
            await agent.reconciler.queue.wait_idle()
            assert not (tmp_path / "work" / "status" / "web.json").exists()
            assert not os.path.isdir(tmp_path / "work" / "containers" / container.id)
            assert container.identity is not None and not container.identity.is_alive()
        finally:
            kill_all_and_close(agent)

    asyncio.run(scenario())


def test_a_failed_launch_whose_kill_fails_is_kept_and_destroyed_before_the_next_try(tmp_path, monkeypatch) -> None:
    """An aborted launch that cannot kill what it started is not forgotten: the name's container is a
    failed destroy (checkpoint kept, retried with backoff), and only once it is gone is the launch tried again."""
    from reconciler.isolators.posix import PosixCpuIsolator
    config = web_agent_config(tmp_path)
    real_destroy, real_isolate = PosixLauncher.destroy, PosixCpuIsolator.isolate
    left = {"isolate": 1, "destroy": 1}

    def failing_isolate(self, container_id, pid):  # noqa: ANN001
        if left["isolate"]:
            left["isolate"] -= 1
            raise OSError("cannot move the init into its cgroup")
        return real_isolate(self, container_id, pid)

    def failing_destroy(self, container_id, identity, pid_namespace):  # noqa: ANN001
        if left["destroy"]:
            left["destroy"] -= 1
            raise TimeoutError("1234 still alive")
        return real_destroy(self, container_id, identity, pid_namespace)

    monkeypatch.setattr(PosixCpuIsolator, "isolate", failing_isolate)
    monkeypatch.setattr(PosixLauncher, "destroy", failing_destroy)

    async def scenario() -> None:
        agent = Agent(config)
        try:
            await agent.start()
            await agent.reconciler.queue.wait_idle()
            kept = agent.reconciler.names["web"].container
            assert kept is not None and kept.destroy_failed, "the unkilled launch is the name's container"
            assert os.path.isdir(tmp_path / "work" / "containers" / kept.id), "its checkpoint stays"
            assert agent.containerizer.destroy_errors == 1
            status = read_status_file(tmp_path / "work" / "status" / "web.json")
            assert status is not None and status["phase"] != "Running"
            assert "cannot move the init into its cgroup" in status["message"]

            await asyncio.sleep(2.5)   # the destroy is retried after 1 s and works; then the launch is tried again
            await agent.reconciler.queue.wait_idle()
            assert not os.path.isdir(tmp_path / "work" / "containers" / kept.id)
            current = agent.reconciler.names["web"].container
            assert current is not None and current.id != kept.id and current.pid
            status = read_status_file(tmp_path / "work" / "status" / "web.json")
            assert status is not None and status["phase"] == "Running", status
            assert status["restarts"] == 0, "its command never ran: the next launch is not a restart"
        finally:
            kill_all_and_close(agent)

    asyncio.run(scenario())
