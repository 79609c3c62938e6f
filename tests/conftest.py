"""Fixtures for real-kernel tests: each test gets its own cgroup root, work dir and manifest dir, and
everything it started (containers, agents, cgroups) is killed and removed afterwards, even on failure.

Nothing outside the test's own roots is touched: containers are found through the test's own
checkpoints and cgroups, never by name or pattern.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jsonschema
import psutil
import pytest

from reconciler.linux import cgroups, proc
from reconciler.linux.mountinfo import read_mountinfo
from reconciler.status import AGENT_FILE

IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parent.parent
STATUS_SCHEMA = REPO / "schemas" / "status.schema.json"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (namespaces, cgroups, mounts)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: creates namespaces, cgroups and mounts")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@dataclass
class AgentEnv:
    """One isolated agent setting: its directories, its cgroup root, and what it started."""
    tmp: Path
    cgroups_root: str
    manifests: Path
    work_dir: Path
    launcher: str = "linux" if IS_ROOT else "posix"
    isolation: str = "posix/cpu,posix/mem"
    agents: list[subprocess.Popen] = field(default_factory=list)

    @property
    def status_dir(self) -> Path:
        return self.work_dir / "status"

    def flags(self, **overrides: Any) -> list[str]:
        values: dict[str, Any] = {
            "manifests": self.manifests, "work_dir": self.work_dir, "launcher": self.launcher,
            "isolation": self.isolation, "cgroups_root": self.cgroups_root, "resync_interval": "2secs",
        }
        values.update(overrides)
        return [f"--{k}={v}" for k, v in values.items() if v is not None]

    def write_manifest(self, name: str, command: str, *, filename: str | None = None, **spec: Any) -> Path:
        """Write a manifest atomically (temp file + rename), as GitOps tools do."""
        doc = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name},
               "spec": {"command": {"value": command}, **spec}}
        path = self.manifests / (filename or f"{name}.yaml")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc))
        os.rename(tmp, path)
        return path

    def once(self, *extra: str, timeout: float = 60, **overrides: Any) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reconciler", "once", *self.flags(**overrides), *extra],
                              capture_output=True, text=True, timeout=timeout, cwd=self.tmp)

    def start(self, *extra: str, **overrides: Any) -> subprocess.Popen:
        agent = subprocess.Popen([sys.executable, "-m", "reconciler", "run", *self.flags(**overrides), *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.tmp)
        self.agents.append(agent)
        return agent

    def stop(self, agent: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
        agent.send_signal(sig)
        try:
            out, _ = agent.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            agent.kill()
            out, _ = agent.communicate()
        return out or ""

    def status(self, name: str) -> dict[str, Any] | None:
        return read_status_file(self.status_dir / f"{name}.json")

    def agent_status(self) -> dict[str, Any] | None:
        return read_status_file(self.status_dir / AGENT_FILE)

    def wait_status(self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status(name)
            if last is not None and predicate(last):
                return last
            time.sleep(0.02)
        raise AssertionError(f"status of {name} never matched within {timeout}s; last: {json.dumps(last, indent=1)}")

    def wait_gone(self, name: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.status_dir / f"{name}.json").exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"status file of {name} still there after {timeout}s: {self.status(name)}")
            time.sleep(0.02)

    def sandbox(self, status: dict[str, Any]) -> Path:
        return self.work_dir / "sandboxes" / status["container_id"]

    # cleanup ----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
            agent.communicate()
        kill_checkpointed_containers(self.work_dir)
        remove_cgroup_root(self.cgroups_root)
        unmount_agent_dirs(self.work_dir)


@functools.cache
def _status_validator(kind: str) -> jsonschema.Draft202012Validator:
    """The checked-in schema, held to its branch for one kind of file (it is a oneOf of both kinds, and
    a document failing a oneOf would be reported against either branch, however clear its `kind`)."""
    schema = json.loads(STATUS_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"$ref": f"#/$defs/{kind}"} in schema["oneOf"], f"{STATUS_SCHEMA} has no {kind}"
    branch = {key: value for key, value in schema.items() if key not in ("oneOf", "discriminator")}
    return jsonschema.Draft202012Validator({**branch, "$ref": f"#/$defs/{kind}"})


def read_status_file(path: Path) -> dict[str, Any] | None:
    """The document of a status file (None when there is none), which must be what schemas/status.schema.json,
    the contract operators read status files by, says: `_agent.json` an AgentStatus, any other a ContainerStatus.

    Any other content fails the test, naming the file and what is wrong. The agent replaces a status file
    by a rename, so a reader never meets a part of one: a document that does not parse is a bug too.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise AssertionError(f"status file {path} is not JSON: {exc}; it holds: {text[:200]!r}") from None
    kind = "AgentStatus" if path.name == AGENT_FILE else "ContainerStatus"
    if isinstance(doc, dict) and doc.get("kind") != kind:
        raise AssertionError(f"status file {path} has kind {doc.get('kind')!r}; {path.name} must hold kind {kind!r}")
    error = jsonschema.exceptions.best_match(_status_validator(kind).iter_errors(doc))
    if error is not None:
        raise AssertionError(f"status file {path} does not satisfy {STATUS_SCHEMA.relative_to(REPO)} "
                             f"({kind}): {error.json_path}: {error.message}")
    return doc


def unmount_agent_dirs(work_dir: Path) -> None:
    """Undo the mounts an agent leaves on purpose (its nosuid,nodev sandboxes directory)."""
    if not IS_ROOT:
        return
    real = os.path.realpath(work_dir)
    for entry in reversed(read_mountinfo()):
        mountpoint = entry.mount_point
        if mountpoint == real or mountpoint.startswith(real + "/"):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def kill_checkpointed_containers(work_dir: Path) -> None:
    """SIGKILL every init this work dir checkpointed, and its session (the posix launcher's containers)."""
    containers = work_dir / "containers"
    if not containers.is_dir():
        return
    inits, sessions = [], []
    for entry in containers.iterdir():
        try:
            doc = json.loads((entry / "pid.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        sessions.append(doc["pid"])
        identity = proc.ProcessIdentity(doc["pid"], doc["start_time"])
        if identity.is_alive():
            inits.append(identity.pid)
    if not sessions:
        return
    table = proc.process_table()
    victims = set(inits)
    for pid in inits:
        victims |= proc.descendants(table, pid)
    # What a dead init left behind in its session (a reused pid leads its own session: excluded).
    victims |= {p for p, e in table.items() if e.session in sessions and p not in sessions}
    victims.discard(os.getpid())
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_cgroup_root(root: str) -> None:
    """Kill and remove `root` in every hierarchy (it is the test's own)."""
    if not IS_ROOT:
        return
    mounts = cgroups.find_mounts()
    hierarchies = list(mounts.v1_hierarchies) + ([mounts.v2] if mounts.v2 else [])
    for hierarchy in hierarchies:
        if hierarchy.exists(root):
            try:
                hierarchy.kill(root, timeout=10)
            except Exception:  # noqa: BLE001 - keep removing the rest
                pass
            try:
                hierarchy.remove(root)
            except OSError:
                pass


@pytest.fixture
def agent_env(tmp_path: Path) -> Any:
    env = AgentEnv(tmp=tmp_path, cgroups_root=f"reconciler-test-{uuid.uuid4().hex[:12]}",
                   manifests=tmp_path / "manifests", work_dir=tmp_path / "work")
    env.manifests.mkdir()
    try:
        yield env
    finally:
        env.cleanup()


# The two settings the agent's own tests run under: the linux launcher with namespaces, and posix.
CONFIGS = {
    "linux": ("linux", "namespaces/pid,namespaces/ipc,posix/cpu,posix/mem"),
    "posix": ("posix", "posix/cpu,posix/mem"),
}


@pytest.fixture(params=list(CONFIGS))
def env(request: pytest.FixtureRequest, agent_env: AgentEnv) -> AgentEnv:
    """agent_env under each launcher in turn (a test file may override `env` with one setting)."""
    agent_env.launcher, agent_env.isolation = CONFIGS[request.param]
    return agent_env


@pytest.fixture
def linux_env(agent_env: AgentEnv) -> AgentEnv:
    agent_env.launcher, agent_env.isolation = CONFIGS["linux"]
    return agent_env


@pytest.fixture
def outside_tmp_env(agent_env: AgentEnv) -> Any:
    """agent_env with its work dir under /var/tmp, mode 0755: /tmp can then be a volume (the mount
    would hide a sandbox under /tmp), and a non-root command user can reach its sandbox (pytest's
    tmp_path is root's 0700). Fails if a mount is left under it, and never removes through one."""
    outside = Path(tempfile.mkdtemp(prefix="reconciler-test-", dir="/var/tmp"))
    outside.chmod(0o755)
    agent_env.work_dir = outside / "work"
    try:
        yield agent_env
    finally:
        for agent in agent_env.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        kill_checkpointed_containers(agent_env.work_dir)
        unmount_agent_dirs(agent_env.work_dir)
        left = any(entry.mount_point.startswith(str(outside)) for entry in read_mountinfo())
        if not left:
            shutil.rmtree(outside, ignore_errors=True)
        assert not left, f"mounts left under {outside}"


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A loop-mounted XFS image without quotas (skipped with the reason where it cannot be made):
    project ids work on any kernel with XFS, quotactl does not."""
    from tests.test_linux_quota import mount_xfs, umount_xfs

    mount = mount_xfs(tmp_path_factory.mktemp("xfs"))
    try:
        yield mount
    finally:
        umount_xfs(mount)


# helpers for the tests -------------------------------------------------------------------------

def running(status: dict[str, Any]) -> bool:
    return status["phase"] == "Running" and status["pid"] is not None


def wait_agent(env: "AgentEnv", agent: subprocess.Popen, timeout: float = 10.0) -> dict:
    """Until this agent process has published its _agent.json (its first pass is done)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = env.agent_status()
        if doc is not None and doc.get("pid") == agent.pid:
            return doc
        assert agent.poll() is None, agent.communicate()[0]
        assert time.monotonic() < deadline, f"agent {agent.pid} never published _agent.json: {doc}"
        time.sleep(0.02)


@pytest.fixture
def tmp() -> Any:
    """A temporary directory under /var/tmp (creating files under /tmp is slow on these machines)."""
    path = Path(tempfile.mkdtemp(prefix="reconciler-test-", dir="/var/tmp"))
    yield path
    unmount_agent_dirs(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_agent_mount_left(request: pytest.FixtureRequest) -> Any:
    """An agent's work dir in a test's tmp_path keeps a nosuid,nodev bind of its sandboxes: undone after
    the test, whatever started the agent (AgentEnv, or a Containerizer made by the test itself)."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        unmount_agent_dirs(path)


def alive(pid: int) -> bool:
    """Running code: a zombie (exited, not yet reaped) is not alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still alive after {timeout}s: {left}")
        time.sleep(0.02)
