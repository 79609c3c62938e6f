"""The example manifests in manifests/ run as README's first command runs them: as root, default isolators."""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.root

DEFAULT_ROOT_ISOLATION = "filesystem/shared,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"


def test_every_example_manifest_runs_with_the_default_isolators(agent_env) -> None:
    examples = sorted(p.name for p in (REPO / "manifests").iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert examples, "manifests/ has no example"
    for name in examples:
        shutil.copy(REPO / "manifests" / name, agent_env.manifests / name)
    agent_env.isolation = DEFAULT_ROOT_ISOLATION

    result = agent_env.once()

    assert result.returncode == 0, result.stdout + result.stderr
    web = agent_env.status("web")
    assert web["phase"] == "Running" and Path(f"/proc/{web['pid']}").exists()
    # The default isolators, and the security profile's, which the linux launcher always runs.
    assert web["isolators"] == ["filesystem/shared", "cgroups/cpu", "cgroups/mem", "linux/capabilities",
                                "linux/devices", "linux/seccomp", "namespaces/ipc", "namespaces/pid"]
    assert web["statistics"]["mem_limit_bytes"] == 64 * 1024 * 1024
    job = agent_env.wait_status("batch-job", lambda s: s["phase"] in ("Running", "Succeeded"))
    assert job["restarts"] == 0
    # The example's own promise: it serves its sandbox on 127.0.0.1:8080.
    body = _get("http://127.0.0.1:8080/", deadline=time.monotonic() + 10)
    assert "stdout" in body and "stderr" in body


def _get(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
