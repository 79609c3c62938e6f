"""What status files say about manifests that are not simply valid: duplicates and broken files."""

from __future__ import annotations


def test_a_duplicate_name_is_reported_on_the_winner_and_in_agent_status(agent_env) -> None:
    agent_env.launcher, agent_env.isolation = "posix", "posix/cpu,posix/mem"
    first = agent_env.write_manifest("web", "exec sleep 300", filename="a-web.yaml", kill_grace_period="1secs")
    second = agent_env.write_manifest("web", "exec sleep 301", filename="b-web.yaml")

    result = agent_env.once()

    assert result.returncode == 1, "a duplicate is not a converged directory"
    status = agent_env.status("web")
    assert status["phase"] == "Running" and status["manifest"] == str(first)
    [duplicate] = [c for c in status["conditions"] if c["type"] == "Duplicate"]
    assert duplicate["status"] is True
    assert duplicate["message"] == f"{second}: document 0: metadata.name: duplicate name, declared in {first} (document 0)"
    invalid = agent_env.agent_status()["invalid_documents"]
    assert [(d["file"], d["name"]) for d in invalid] == [(str(second), "web")]

    second.unlink()
    assert agent_env.once().returncode == 0
    assert [c["type"] for c in agent_env.status("web")["conditions"]] == ["Ready", "ManifestValid"]
