"""The daemon watching its manifest directory: every change a user or a tool makes converges within a
fraction of a second (well under --resync_interval, which the fixture sets to 2 s), and what is not a
manifest (editors' files) is never read.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from tests.conftest import alive, read_status_file, running

pytestmark = pytest.mark.root

QUICK = 1.0  # seconds: "converges within a fraction of a second" (the resync is 2 s)


@pytest.fixture
def env(agent_env):
    agent_env.isolation = "namespaces/pid,namespaces/ipc,posix/cpu,posix/mem"
    return agent_env


def manifest_text(name: str, command: str = "exec sleep 300") -> str:
    return json.dumps({"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name},
                       "spec": {"kill_grace_period": "1secs", "command": {"value": command}}})


def started_daemon(env):
    """A daemon that has done its first pass (its _agent.json exists)."""
    env.start()
    deadline = time.monotonic() + 10
    while env.agent_status() is None:
        assert time.monotonic() < deadline, "the daemon never published _agent.json"
        time.sleep(0.02)


def wait_listed(env, predicate, timeout: float = QUICK) -> dict:
    """Until _agent.json's listing matches: proof the daemon has seen the directory as it is now."""
    deadline = time.monotonic() + timeout
    while True:
        agent = env.agent_status()
        if agent is not None and predicate(agent):
            return agent
        if time.monotonic() > deadline:
            raise AssertionError(f"_agent.json never matched within {timeout}s: {json.dumps(agent, indent=1)}")
        time.sleep(0.01)


def test_drop_edit_remove_converge_quickly(env):
    started_daemon(env)

    t0 = time.monotonic()
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    first = env.wait_status("web", running, timeout=QUICK)
    assert time.monotonic() - t0 < QUICK

    t0 = time.monotonic()
    env.write_manifest("web", "exec sleep 301", kill_grace_period="1secs")
    second = env.wait_status("web", lambda s: running(s) and s["container_id"] != first["container_id"],
                             timeout=QUICK)
    assert time.monotonic() - t0 < QUICK
    assert second["pid"] != first["pid"] and second["restarts"] == 0

    t0 = time.monotonic()
    (env.manifests / "web.yaml").unlink()
    env.wait_gone("web", timeout=QUICK)
    assert time.monotonic() - t0 < QUICK
    deadline = time.monotonic() + 2
    while alive(second["pid"]):
        assert time.monotonic() < deadline, "the container's init outlived its status file"
        time.sleep(0.02)


def test_several_manifests_dropped_at_once_and_status_files_are_never_partial(env):
    started_daemon(env)
    torn: list[str] = []
    stop = threading.Event()

    def read_continuously() -> None:
        while not stop.is_set():
            for path in list(env.status_dir.glob("*.json")):
                try:
                    read_status_file(path)
                except AssertionError as exc:
                    torn.append(str(exc))

    reader = threading.Thread(target=read_continuously, daemon=True)
    reader.start()
    try:
        t0 = time.monotonic()
        for i in range(10):
            env.write_manifest(f"web{i}", "exec sleep 300", kill_grace_period="1secs")
        pids = {env.wait_status(f"web{i}", running, timeout=QUICK * 3)["pid"] for i in range(10)}
        assert len(pids) == 10
        assert time.monotonic() - t0 < 3.0
        for i in range(0, 10, 2):
            (env.manifests / f"web{i}.yaml").unlink()
        for i in range(0, 10, 2):
            env.wait_gone(f"web{i}", timeout=3)
        counts = wait_listed(env, lambda a: a["counts"].get("Running") == 5, timeout=3)["counts"]
        assert counts == {"Running": 5}, counts
    finally:
        stop.set()
        reader.join(timeout=5)
    assert not torn, torn[:5]


def test_rename_with_same_content_does_not_restart(env):
    old = env.manifests / "web.yaml"
    new = env.manifests / "web-renamed.yaml"
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    before = env.wait_status("web", running)
    t0 = time.monotonic()
    os.rename(old, new)
    wait_listed(env, lambda a: str(new) in a["source"]["files"] and str(old) not in a["source"]["files"])
    assert time.monotonic() - t0 < QUICK
    time.sleep(0.3)
    after = env.status("web")
    assert after is not None, "renaming the file destroyed the container"
    assert after["pid"] == before["pid"] and after["container_id"] == before["container_id"], (before, after)
    assert after["restarts"] == 0 and alive(before["pid"])
    # what the status says it came from follows the file
    assert after["manifest"] == str(new), after["manifest"]


def test_rewriting_identical_content_does_not_restart(env):
    path = env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    before = env.wait_status("web", running)
    text = path.read_text()
    for _ in range(3):  # new inode and mtime each time, as a GitOps sync rewriting the tree
        tmp = path.with_name(".web.yaml.tmp")
        tmp.write_text(text)
        os.rename(tmp, path)
        time.sleep(0.15)
    path.touch()
    time.sleep(0.3)
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["container_id"] == before["container_id"]


def test_rename_then_break_the_renamed_file_keeps_the_container(env):
    """After a rename, the renamed file is the one that last declared the name: breaking it destroys nothing."""
    old = env.manifests / "web.yaml"
    new = env.manifests / "web-renamed.yaml"
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    before = env.wait_status("web", running)
    os.rename(old, new)
    wait_listed(env, lambda a: str(new) in a["source"]["files"] and str(old) not in a["source"]["files"])
    time.sleep(0.2)
    new.write_text("metadata: {name: web\nspec: [[[")
    wait_listed(env, lambda a: str(new) in [f["file"] for f in a["invalid_files"]])
    time.sleep(0.5)
    after = env.status("web")
    assert after is not None, "breaking the renamed manifest destroyed the container"
    assert after["pid"] == before["pid"] and alive(before["pid"])


def test_rename_and_break_while_the_agent_is_down_keeps_the_container(env):
    """Issue 11 #8: the agent never saw the renamed file parse, so the manifest that last declared
    `web` is gone; but the unparseable file may declare it, and nothing may be destroyed for it."""
    old, new = env.manifests / "web.yaml", env.manifests / "web-renamed.yaml"
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    agent = env.start()
    before = env.wait_status("web", running)
    env.stop(agent)
    os.rename(old, new)
    new.write_text(new.read_text()[:20])   # a truncated write
    started_daemon(env)
    agent_doc = wait_listed(env, lambda a: [f["file"] for f in a["invalid_files"]] == [str(new)])
    time.sleep(0.5)
    after = env.status("web")
    assert after is not None and after["pid"] == before["pid"] and alive(before["pid"]), agent_doc
    valid = next(c for c in after["conditions"] if c["type"] == "ManifestValid")
    assert valid["status"] is False and str(new) in valid["message"]
    # Fixed under its new name: adopted without a restart; then removed: destroyed.
    env.write_manifest("web", "exec sleep 300", filename=new.name, kill_grace_period="1secs")
    env.wait_status("web", lambda s: s["manifest"] == str(new) and s["pid"] == before["pid"]
                    and all(c["status"] for c in s["conditions"] if c["type"] == "ManifestValid"), timeout=5)
    new.unlink()
    env.wait_gone("web", timeout=10)
    assert not alive(before["pid"])


def test_an_unparseable_file_beside_holds_every_undeclared_name(env):
    """A name dropped from its manifest while another file cannot be read is kept until that file reads."""
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    before = env.wait_status("web", running)
    broken = env.manifests / "other.yaml"
    broken.write_text("metadata: {name: [")
    wait_listed(env, lambda a: [f["file"] for f in a["invalid_files"]] == [str(broken)])
    (env.manifests / "web.yaml").unlink()
    wait_listed(env, lambda a: str(env.manifests / "web.yaml") not in a["source"]["files"])
    time.sleep(0.5)
    assert env.status("web")["pid"] == before["pid"] and alive(before["pid"])
    broken.unlink()
    env.wait_gone("web", timeout=10)


def test_editor_temporary_files_are_ignored(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    before = env.wait_status("web", running)
    # Editors' files declaring the same name with another command (they sort before web.yaml, so
    # reading them would replace web) and a new name (reading it would launch something).
    (env.manifests / ".web.yaml.swp").write_text(manifest_text("web", "exec sleep 401"))
    (env.manifests / "4913").write_text(manifest_text("web", "exec sleep 402"))
    (env.manifests / "web.yaml~").write_text(manifest_text("tilde", "exec sleep 403"))
    (env.manifests / "#web.yaml#").write_text(manifest_text("emacs", "exec sleep 404"))
    # A real manifest dropped after them: once it runs, the daemon has listed past the editor files.
    env.write_manifest("probe", "exec sleep 300", kill_grace_period="1secs")
    env.wait_status("probe", running, timeout=QUICK)
    agent = wait_listed(env, lambda a: str(env.manifests / "probe.yaml") in a["source"]["files"])
    time.sleep(0.2)
    after = env.status("web")
    assert after["pid"] == before["pid"] and after["container_id"] == before["container_id"]
    assert env.status("tilde") is None and env.status("emacs") is None
    assert sorted(agent["source"]["files"]) == sorted([str(env.manifests / "probe.yaml"), str(env.manifests / "web.yaml")])
    assert agent["invalid_files"] == [] and agent["invalid_documents"] == []
    for name in ("4913", ".web.yaml.swp", "web.yaml~"):
        (env.manifests / name).unlink()


def test_configmap_data_symlink_swap(env):
    """Kubernetes ConfigMap volume: files are symlinks through `..data`, swapped with one rename."""
    m = env.manifests
    first = m / "..2026_01_01_00_00_00.000000001"
    first.mkdir()
    (first / "web.yaml").write_text(manifest_text("web", "exec sleep 300"))
    (m / "..data").symlink_to(first.name)
    (m / "web.yaml").symlink_to("..data/web.yaml")
    started_daemon(env)
    before = env.wait_status("web", running)
    assert before["manifest"] == str(m / "web.yaml")

    # kubelet's atomic writer: new timestamped dir, `..data_tmp` symlink, rename over `..data`
    second = m / "..2026_01_01_00_00_05.000000002"
    second.mkdir()
    (second / "web.yaml").write_text(manifest_text("web", "exec sleep 301"))
    (m / "..data_tmp").symlink_to(second.name)
    t0 = time.monotonic()
    os.rename(m / "..data_tmp", m / "..data")
    after = env.wait_status("web", lambda s: running(s) and s["container_id"] != before["container_id"],
                            timeout=QUICK)
    assert time.monotonic() - t0 < QUICK
    assert after["pid"] != before["pid"]
    deadline = time.monotonic() + 3
    while [c.cmdline() for c in psutil.Process(after["pid"]).children()] != [["sleep", "301"]]:
        assert time.monotonic() < deadline, psutil.Process(after["pid"]).children()
        time.sleep(0.02)
    for f in first.iterdir():
        f.unlink()
    first.rmdir()

    # a ConfigMap key removed: the top-level symlink goes away and the container with it
    t0 = time.monotonic()
    (m / "web.yaml").unlink()
    env.wait_gone("web", timeout=QUICK)
    assert time.monotonic() - t0 < QUICK


@pytest.mark.parametrize("how", ["rename", "symlink"])
def test_whole_directory_swapped_is_still_watched(env, how):
    """Some tools replace the directory itself rather than its files: `mv manifests manifests.old;
    mv new manifests`, or a `manifests -> releases/N` symlink switched to the next release. The agent
    must follow the path, not the old directory's inode."""
    if how == "symlink":
        releases = env.tmp / "releases"
        releases.mkdir()
        env.manifests.rmdir()
        (releases / "1").mkdir()
        env.manifests.symlink_to(releases / "1")
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    before = env.wait_status("web", running)
    new = env.tmp / "releases" / "2" if how == "symlink" else env.tmp / "manifests.new"
    new.mkdir()
    (new / "web.yaml").write_text(manifest_text("web", "exec sleep 301"))
    if how == "symlink":
        (env.tmp / "manifests.tmp").symlink_to(new)
        os.rename(env.tmp / "manifests.tmp", env.manifests)
    else:
        os.rename(env.manifests, env.tmp / "manifests.old")
        os.rename(new, env.manifests)
    # at the latest at the next resync (2 s in these tests)
    env.wait_status("web", lambda s: running(s) and s["container_id"] != before["container_id"], timeout=3.5)
    # and from then on, changes in the new directory are seen as quickly as ever
    time.sleep(0.3)
    t0 = time.monotonic()
    env.write_manifest("late", "exec sleep 300", kill_grace_period="1secs")
    env.wait_status("late", running, timeout=5)
    took = time.monotonic() - t0
    assert took < QUICK, f"a manifest dropped into the swapped-in directory took {took:.2f}s (resync is 2 s)"


def test_manifest_directory_created_after_start_is_picked_up(env):
    env.manifests.rmdir()
    started_daemon(env)
    assert env.agent_status()["source"]["error"]
    env.manifests.mkdir()
    env.write_manifest("late", "exec sleep 300", kill_grace_period="1secs")
    env.wait_status("late", running, timeout=3.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_exits_0_and_leaves_containers_running(env, sig):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    agent = env.start()
    status = env.wait_status("web", running)
    out = env.stop(agent, sig)
    assert agent.returncode == 0, out
    assert "Traceback" not in out
    assert alive(status["pid"])


# --- StrictModes: a directory or file another user can write is refused, nothing destroyed -----------

def test_a_manifest_directory_others_can_write_is_refused_and_nothing_is_destroyed(env):
    m = env.manifests
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    started_daemon(env)
    web = env.wait_status("web", running)

    os.chmod(m, 0o777)
    agent = wait_listed(env, lambda a: not a["source"]["ready"], timeout=5)
    error = agent["source"]["error"]
    assert error.startswith(f"manifest directory {m} refused: {m} (owner ") and "mode 0777" in error, error
    assert error.endswith("or set --manifests_strict_modes=false") and "\n" not in error
    # Refused as an unreadable directory is: what another user might have dropped there is not run,
    # and what runs is not destroyed.
    env.write_manifest("intruder", "exec sleep 300", kill_grace_period="1secs")
    time.sleep(2.5)                               # past a resync
    assert env.status("intruder") is None
    assert env.status("web")["container_id"] == web["container_id"] and alive(web["pid"])

    # One file another user can write: an invalid file, its container kept.
    (m / "intruder.yaml").unlink()
    os.chmod(m, 0o755)
    wait_listed(env, lambda a: a["source"]["ready"], timeout=5)
    os.chmod(m / "web.yaml", 0o666)
    agent = wait_listed(env, lambda a: [f["file"] for f in a["invalid_files"]] == [str(m / "web.yaml")], timeout=5)
    assert "refused: the file (owner" in agent["invalid_files"][0]["error"]
    time.sleep(2.5)
    assert env.status("web")["container_id"] == web["container_id"] and alive(web["pid"])
    os.chmod(m / "web.yaml", 0o644)
    wait_listed(env, lambda a: a["invalid_files"] == [], timeout=5)
    assert env.status("web")["container_id"] == web["container_id"]


def test_no_secret_behind_a_link_reaches_agent_json_status_files_or_state(env):
    from tests.test_http import free_port, get
    from tests.test_source import SECRET_SHAPES, TOKEN, plant_secret_links

    os.chmod(env.manifests, 0o777)                # relaxed: the links could be anyone's
    plant_secret_links(env.tmp, env.manifests)
    port = free_port()
    env.start(manifests_strict_modes="false", http_address=f"127.0.0.1:{port}")
    wait_listed(env, lambda a: len(a["invalid_files"]) == len(SECRET_SHAPES) - 1
                and [d["name"] for d in a["invalid_documents"]] == ["leaky"], timeout=10)
    leaky = env.wait_status("leaky", lambda s: s["phase"] == "Invalid")
    assert leaky["message"].startswith(f"{env.manifests / 'named.yaml'}: document 0: spec.restart_policy: ")
    published = {p.name: p.read_text() for p in env.status_dir.iterdir()}
    assert "_agent.json" in published and "leaky.json" in published
    deadline = time.monotonic() + 10
    while True:
        status, _, state = get(port, "/state")
        if status == 200 and b"leaky" in state:
            break
        assert time.monotonic() < deadline, (status, state[:200])
        time.sleep(0.1)
    for where, text in [*published.items(), ("/state", state.decode())]:
        assert TOKEN not in text and "4f9a2c71" not in text, where
