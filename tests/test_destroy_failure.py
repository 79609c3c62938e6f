"""A destroy that cannot kill everything keeps the container known, says so, and is retried."""

from __future__ import annotations

import asyncio
import json
import os

from reconciler.agent import Agent
from reconciler.config import AgentConfig
from reconciler.launcher.posix import PosixLauncher
from tests.conftest import read_status_file


def test_a_failed_kill_keeps_checkpoint_and_status_and_is_retried(tmp_path, monkeypatch) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(json.dumps({
        "apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web"},
        "spec": {"kill_grace_period": "100ms", "command": {"value": "exec sleep 300"}}}))
    config = AgentConfig(manifests=str(manifests), work_dir=str(tmp_path / "work"), launcher="posix",
                         isolation=["posix/cpu"])
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
            for state in agent.reconciler.names.values():
                if state.container is not None and state.container.pid:
                    try:
                        os.kill(state.container.pid, 9)
                    except ProcessLookupError:
                        pass
            agent.close()

    asyncio.run(scenario())
