"""`reconciler plan`: what a reconcile would do, per container, and that it changes nothing.

The decision itself is the loop's (reconciler.loop.converge_action and friends): the unit tests pin
it down case by case; the CLI tests run real containers (posix launcher), ask `plan`, then let
`once` act and check the agent did what the plan said.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.containerizer import Container, State, Termination
from reconciler.isolators.base import ContainerConfig
from reconciler.loop import Action, Target, converge_action, restart_delay, restart_plan, target_of
from reconciler.models import ContainerSpec
from reconciler.source import DesiredContainer, InvalidDocument, Listing


# The decision, unit by unit ---------------------------------------------------------------------

def spec(**fields) -> ContainerSpec:
    return ContainerSpec.model_validate({"command": {"value": "sleep 1"}, **fields})


def target(s: ContainerSpec, manifest: str = "m/a.yaml") -> Target:
    from reconciler.models import spec_hash, spec_hash_without_resources
    return Target(s, spec_hash(s), spec_hash_without_resources(s), manifest)


def container(s: ContainerSpec, state: State = State.RUNNING, termination: Termination | None = None,
              started_at: float | None = None, backoff_step: int = 0) -> Container:
    t = target(s)
    config = ContainerConfig(container_id="c1", name="a", manifest=t.manifest, spec=s, spec_hash=t.spec_hash,
                             resources_free_hash=t.resources_free_hash, sandbox="/nonexistent",
                             backoff_step=backoff_step)
    return Container(config=config, state=state, termination=termination, started_at=started_at)


def listing(desired: dict | None = None, invalid: dict | None = None, ok: bool = True, invalid_files=()) -> Listing:
    return Listing(ok=ok, error=None if ok else "gone", desired=desired or {}, invalid=invalid or {},
                   duplicates=[], invalid_files=list(invalid_files), files=[], ignored=[])


def test_nothing_runs_create():
    assert converge_action(None, target(spec())) == Action.CREATE


def test_same_spec_nothing():
    s = spec(resources={"cpus": 1})
    assert converge_action(container(s), target(s)) == Action.NONE


def test_resources_only_update_in_place_other_change_replace():
    old = spec(resources={"cpus": 1, "mem": 64})
    assert converge_action(container(old), target(spec(resources={"cpus": 2, "mem": 64}))) == Action.UPDATE
    assert converge_action(container(old), target(spec(resources={"cpus": 1, "mem": 64}, restart_policy="Never"))) \
        == Action.REPLACE
    # Not yet running (still isolating): a resource change cannot be applied in place.
    assert converge_action(container(old, State.ISOLATING), target(spec(resources={"cpus": 2, "mem": 64}))) \
        == Action.REPLACE


def test_exited_restart_policy_decides():
    now = time.time()
    failed = Termination(exit_code=1, finished_at=now)
    succeeded = Termination(exit_code=0, finished_at=now)
    for policy, termination, expected in (
            ("Always", succeeded, Action.RESTART), ("Always", failed, Action.RESTART),
            ("OnFailure", failed, Action.RESTART), ("OnFailure", succeeded, Action.NONE),
            ("Never", failed, Action.NONE)):
        s = spec(restart_policy=policy)
        assert converge_action(container(s, State.TERMINATED, termination, now - 1), target(s)) == expected, policy
    # An exited container whose spec changed is replaced, whatever its policy.
    s = spec(restart_policy="Never")
    assert converge_action(container(s, State.TERMINATED, failed, now - 1), target(spec())) == Action.REPLACE


def test_restart_plan_is_crash_loop_backoff_reset_by_a_long_run():
    now = 1_000_000.0
    s = spec()
    short = container(s, State.TERMINATED, Termination(exit_code=1, finished_at=now), started_at=now - 1, backoff_step=3)
    plan = restart_plan(short, "Always")
    assert plan is not None and plan.step == 3 and plan.at == now + restart_delay(3) == now + 40
    long = container(s, State.TERMINATED, Termination(exit_code=1, finished_at=now), started_at=now - 700, backoff_step=3)
    plan = restart_plan(long, "Always")
    assert plan is not None and plan.step == 0 and plan.at == now


def test_undeclared_destroyed_but_kept_while_any_file_is_unreadable_or_the_listing_failed():
    s = spec()
    c = container(s)
    assert target_of("a", c, listing(), listed_ok=True) is None
    broken_file = InvalidDocument(manifest="m/a.yaml", document=0, name=None, message="m/a.yaml: bad")
    kept = target_of("a", c, listing(invalid_files=[broken_file]), listed_ok=True)
    assert kept is not None and kept.spec_hash == c.config.spec_hash
    another = InvalidDocument(manifest="m/renamed.yaml", document=0, name=None, message="m/renamed.yaml: bad")
    assert target_of("a", c, listing(invalid_files=[another]), listed_ok=True) is not None
    invalid = InvalidDocument(manifest="m/a.yaml", document=0, name="a", message="m/a.yaml: bad field")
    assert target_of("a", c, listing(invalid={"a": invalid}), listed_ok=True) is not None
    assert target_of("a", c, listing(ok=False), listed_ok=True) is not None
    desired = DesiredContainer(name="a", manifest="m/b.yaml", document=0, labels={}, spec=spec(restart_policy="Never"),
                               spec_hash="h2", resources_free_hash="r2")
    t = target_of("a", c, listing({"a": desired}), listed_ok=True)
    assert t is not None and t.spec_hash == "h2" and t.manifest == "m/b.yaml"


# The command, against real containers ----------------------------------------------------------

@pytest.fixture
def env(agent_env):
    agent_env.launcher, agent_env.isolation = "posix", "posix/cpu,posix/mem"
    return agent_env


def plan(env, *extra: str, json_output: bool = False, **overrides) -> tuple[int, str, str]:
    flags = [f for f in env.flags(**overrides) if not f.startswith(("--launcher", "--isolation", "--cgroups_root",
                                                                      "--resync_interval"))]
    args = [sys.executable, "-m", "reconciler", "plan", *flags, *extra] + (["--json"] if json_output else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=env.tmp)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def plan_json(env, *extra: str, **overrides) -> tuple[int, dict]:
    code, out, err = plan(env, *extra, json_output=True, **overrides)
    return code, json.loads(out)


def actions(doc: dict) -> dict[str, str]:
    return {c["name"]: c["action"] for c in doc["containers"]}


def once(env, *extra: str, **overrides) -> None:
    result = env.once(*extra, **overrides)
    assert "Traceback" not in result.stderr, result.stderr


def tree_fingerprint(root: Path) -> dict[str, tuple]:
    """Every file and directory under root with its content hash and mtime: a plan must change none."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[p] = ("dir", os.stat(p).st_mtime_ns)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[p] = (hashlib.sha256(Path(p).read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


def test_empty_directory_nothing_to_do_exit_0(env):
    code, out, err = plan(env)
    assert code == 0, (out, err)
    assert "Plan: no changes." in out
    assert not env.work_dir.exists(), "plan must not create the work dir"


def test_create_then_nothing_then_update_replace_destroy_and_the_agent_agrees(env):
    env.write_manifest("web", "exec sleep 300", resources={"cpus": 0.5, "mem": 64})
    env.write_manifest("job", "exit 0", restart_policy="Never")
    code, doc = plan_json(env)
    assert code == 2 and doc["changes"] is True
    assert actions(doc) == {"web": "create", "job": "create"}

    once(env)
    web_id = env.status("web")["container_id"]
    code, out, _ = plan(env)
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith("Plan")}
    assert rows["web"].split()[1:3] == ["none", "running"]
    assert rows["job"].split()[1:3] == ["none", "exited"] and "stays down (restart_policy Never)" in rows["job"]

    # Resources only: update in place, the plan names the change; `once` keeps the same container.
    env.write_manifest("web", "exec sleep 300", resources={"cpus": 1, "mem": 64})
    code, doc = plan_json(env)
    assert code == 2 and actions(doc) == {"web": "update", "job": "none"}
    web = next(c for c in doc["containers"] if c["name"] == "web")
    assert web["changed_fields"] == ["resources"] and "cpus 0.5 -> 1.0" in web["detail"]
    assert web["container_id"] == web_id
    once(env)
    assert env.status("web")["container_id"] == web_id
    assert plan(env)[0] == 0

    # Another field: replace; `once` launches a new container.
    env.write_manifest("web", "exec sleep 301", resources={"cpus": 1, "mem": 64})
    code, doc = plan_json(env)
    assert code == 2 and actions(doc)["web"] == "replace"
    assert next(c for c in doc["containers"] if c["name"] == "web")["changed_fields"] == ["command"]
    once(env)
    assert env.status("web")["container_id"] != web_id
    assert plan(env)[0] == 0

    # Removed: destroy.
    (env.manifests / "web.yaml").unlink()
    code, doc = plan_json(env)
    assert code == 2 and actions(doc) == {"web": "destroy", "job": "none"}
    assert "no manifest declares it" in doc["containers"][1]["detail"]
    once(env)
    assert env.status("web") is None
    assert plan(env)[0] == 0


def test_plan_touches_nothing(env):
    env.write_manifest("web", "exec sleep 300")
    once(env)
    env.write_manifest("web", "exec sleep 301")               # would replace
    env.write_manifest("new", "exec sleep 300")               # would create
    before = tree_fingerprint(env.work_dir)
    pid = env.status("web")["pid"]
    time.sleep(0.05)
    code, doc = plan_json(env)
    assert code == 2 and actions(doc) == {"web": "replace", "new": "create"}
    assert tree_fingerprint(env.work_dir) == before
    assert Path(f"/proc/{pid}").exists(), "plan must not kill anything"


def test_node_selector_against_attributes(env):
    env.write_manifest("rack1", "exec sleep 300", node_selector={"rack": "r1"})
    code, doc = plan_json(env, attributes="rack:r2")
    assert code == 0 and actions(doc) == {"rack1": "none"}
    assert "not for this node: node_selector rack:r1 does not match --attributes rack:r2" in doc["containers"][0]["detail"]
    assert actions(plan_json(env, attributes="rack:r1")[1]) == {"rack1": "create"}
    once(env, attributes="rack:r1")
    # The node's attributes change: what runs here is no longer for it.
    code, doc = plan_json(env, attributes="rack:r2")
    assert code == 2 and actions(doc) == {"rack1": "destroy"}


def test_invalid_manifest_is_an_error_and_keeps_the_last_good_spec(env):
    env.write_manifest("web", "exec sleep 300")
    once(env)
    bad = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web"},
           "spec": {"command": {"value": "x"}, "restart_policy": "Sometimes"}}
    (env.manifests / "web.yaml").write_text(json.dumps(bad))
    (env.manifests / "junk.yaml").write_text("key: [unclosed\n")
    code, out, _ = plan(env)
    assert code == 1, out
    assert "manifest invalid, its last good spec stays in force" in out
    assert "spec.restart_policy" in out and "junk.yaml" in out and "2 error(s)" in out
    code, doc = plan_json(env)
    assert code == 1 and actions(doc) == {"web": "none"}
    assert {e["file"].rsplit("/", 1)[-1] for e in doc["errors"]} == {"web.yaml", "junk.yaml"}


def test_crash_loop_shows_restart_and_when(env):
    env.write_manifest("crash", "exit 3", restart_policy="Always")
    # The first restart is immediate, the next ones wait (10 s, doubling): a few passes get there.
    for _ in range(4):
        once(env)
        code, doc = plan_json(env)
        entry = doc["containers"][0]
        assert code == 2 and entry["action"] == "restart", entry
        if "CrashLoopBackOff" in entry["detail"]:
            break
        assert entry["detail"] == "restart_policy Always; restart now", entry
    assert entry["observed"] == "exited 3"
    assert "CrashLoopBackOff until" in entry["detail"], entry
    restart_at = parse_iso(entry["restart_at"])
    assert time.time() < restart_at <= time.time() + 300


def parse_iso(text: str) -> float:
    import calendar
    return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + text[19:-1])


def test_a_container_killed_while_no_agent_runs_is_restarted(env):
    env.write_manifest("web", "exec sleep 300")
    once(env)
    pid = env.status("web")["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    code, doc = plan_json(env)
    entry = doc["containers"][0]
    assert code == 2 and entry["action"] == "restart" and entry["observed"] == "killed by SIGKILL", entry


def test_bad_flag_and_unlistable_directory_exit_1(env):
    code, out, err = plan(env, "--resync_interval=-3")
    assert code == 1 and "flag --resync_interval" in err
    code, out, err = plan(env, "--no_such_flag")
    assert code == 1
    code, out, err = plan(env, manifests=env.tmp / "missing")
    assert code == 1 and "missing" in out


def test_a_renamed_manifest_changes_nothing(env):
    path = env.write_manifest("web", "exec sleep 300")
    once(env)
    os.rename(path, env.manifests / "10-web.yaml")
    code, doc = plan_json(env)
    assert code == 0 and actions(doc) == {"web": "none"}
    assert "now declared by" in doc["containers"][0]["detail"] and "10-web.yaml" in doc["containers"][0]["detail"]
