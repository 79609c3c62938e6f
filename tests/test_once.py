"""`reconciler once` against containers that end while it finishes (issue 11, defect 9).

What `once` leaves on disk must be what is true when it exits: a container whose command ended before
`once`'s last word is shown ended, with its exit code (never Running with a dead pid, never Terminating
or DestroyFailed from a destroy begun while the process was shutting down), its output carries no
asyncio warning or traceback, and its exit status is SPEC's: 0 when every manifest converged
(Running or Succeeded), else 1.

The reproduction: short jobs whose commands end 0-50 ms after their start, under every restart
policy, next to a long-running one, and `once` run again and again with changed specs (each pass
replaces every job). A container that ends after `once`'s last word may still read Running: its init
records when its command ended (the `status` checkpoint), and that moment must then be later than the
`updated_at` of `_agent.json`, the last file `once` writes.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from typing import Any

import pytest

from reconciler.linux import proc
from tests.conftest import read_status_file

pytestmark = pytest.mark.root

RUNS = 30                      # passes of `once` per launcher
TIME_BUDGET = 150.0            # seconds for all of them
POLICIES = ("Never", "OnFailure", "Always")
SETTLED = {"Running", "Succeeded", "Failed", "BackOff"}
CONVERGED = {"Running", "Succeeded"}
BAD_OUTPUT = ("Task was destroyed", "Executor shutdown", "Traceback", "was never awaited")


def parse_iso(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def write_jobs(env: Any, run: int) -> list[str]:
    """Six short jobs (every policy, exit 0 and 1), their specs changed for this run."""
    names = []
    for index in range(6):
        name = f"job{index}"
        policy = POLICIES[index % 3]
        code = index // 3
        env.write_manifest(name, f"sleep 0.0$((RANDOM % 50)); exit {code} # run {run}",
                           restart_policy=policy, kill_grace_period="1secs")
        names.append(name)
    return names


def checkpoint(env: Any, container_id: str, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((env.work_dir / "containers" / container_id / name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def running_problem(env: Any, status: dict[str, Any], last_word: float) -> str | None:
    """A Running status must name a live init of that very container, or one whose command ended after `once` spoke last."""
    pid_doc = checkpoint(env, status["container_id"], "pid.json")
    if pid_doc is None or pid_doc["pid"] != status["pid"]:
        return f"{status['name']}: Running with pid {status['pid']}, its container's checkpoint says {pid_doc}"
    if proc.ProcessIdentity(pid_doc["pid"], pid_doc["start_time"]).is_alive():
        return None
    ended = checkpoint(env, status["container_id"], "status")
    if ended is not None and ended["finished_at"] >= last_word:
        return None      # it ended after `once` wrote its last file: Running was true then
    when = "never recorded" if ended is None else f"{last_word - ended['finished_at']:.4f}s before once's last write"
    return f"{status['name']}: Running with a dead pid {status['pid']} (its command ended {when})"


def problems_after(env: Any, result: subprocess.CompletedProcess) -> list[str]:
    """Everything that is not a settled, true picture after one `once`."""
    problems = [f"output has {text!r}" for text in BAD_OUTPUT if text in result.stdout + result.stderr]
    agent = env.agent_status()
    if agent is None:
        return problems + ["no _agent.json"]
    last_word = parse_iso(agent["updated_at"])
    phases = {}
    for path in sorted(env.status_dir.glob("[!_]*.json")):
        status = read_status_file(path)
        assert status is not None, f"{path} vanished"
        name, phase = status["name"], status["phase"]
        phases[name] = phase
        if phase not in SETTLED or status.get("reason") == "DestroyFailed":
            problems.append(f"{name}: {phase} {status.get('reason')!r} {status.get('message')!r}")
        elif phase == "Running":
            problem = running_problem(env, status, last_word)
            if problem:
                problems.append(problem)
        elif status["exit_code"] is None and status["exit_signal"] is None:
            problems.append(f"{name}: {phase} without an exit code or signal")
    expected = 0 if set(phases.values()) <= CONVERGED else 1
    if result.returncode != expected:
        problems.append(f"exit status {result.returncode}, expected {expected} for phases {phases}")
    return problems


def test_once_leaves_the_settled_truth_when_containers_end_as_it_finishes(env):
    env.write_manifest("web", "exec sleep 300", kill_grace_period="1secs")
    deadline = time.monotonic() + TIME_BUDGET
    web_pid = None
    for run in range(RUNS):
        assert time.monotonic() < deadline, f"only {run} runs of once within {TIME_BUDGET}s"
        write_jobs(env, run)
        result = env.once(timeout=30)
        problems = problems_after(env, result)
        assert not problems, f"run {run}:\n" + "\n".join(problems) + "\n--- stderr:\n" + result.stderr[-4000:]
        web = env.status("web")
        assert web["phase"] == "Running"
        assert web_pid in (None, web["pid"]), "the long-running container was never touched"
        web_pid = web["pid"]


def test_once_says_why_it_did_not_converge(agent_env) -> None:
    """It exited 1 and said nothing; now a line per reason, naming the directory, file or name."""
    env = agent_env
    missing = env.tmp / "no-such-dir"
    result = env.once(manifests=missing)
    assert result.returncode == 1
    assert f"reconciler once: not converged: manifest directory {missing} does not exist" in result.stderr
    (env.manifests / "job.yaml").write_text(json.dumps({"apiVersion": "reconciler/v1", "kind": "Container",
                                                        "metadata": {"name": "job"}, "spec": {"command": {
                                                            "value": "true", "user": "no-such-user-rcl"}}}))
    (env.manifests / "broken.yaml").write_text("spec: [")
    result = env.once()
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("reconciler once: not converged: ")]
    assert any(str(env.manifests / "broken.yaml") in line and "invalid YAML" in line for line in lines), lines
    assert any(line.startswith("reconciler once: not converged: job: Failed: ") and "no-such-user-rcl" in line
               for line in lines), lines
