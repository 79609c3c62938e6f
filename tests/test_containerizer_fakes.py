"""The containerizer's contract with isolators and the launcher, proved in-process (no root, no processes).

Mesos tests the same contract with MockIsolator and TestLauncher (src/tests/containerizer/isolator.hpp,
launcher.hpp). Here a recording fake isolator and a fake launcher write every call into one shared
journal, and the tests drive the real Containerizer over a real Checkpoints in tmp_path:

- launch: prepare (every isolator, in order) -> fork -> isolate (in order) -> watch -> go-ahead;
- destroy: kill -> cleanup (reverse order, carrying on past failures);
- an aborted launch: the init is told to give up, every isolator cleans up (reverse order), the
  checkpoints go, the container is forgotten, and the error keeps its type (permanent or not);
- update: all or nothing, rolled back in reverse order;
- recover: every isolator is told of the live containers and of the orphans.

What stands in for the kernel: the fake init's pidfd is the read end of a pipe (writing to the pipe is
the init exiting), its pid is above PID_MAX_LIMIT (no process can have it), and a recovered "live"
init is this test process itself (the fake launcher never signals or kills anything). The one patch is
`ensure_nosuid_nodev`, which `recover` runs as root on the sandboxes directory (a real bind mount).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

import reconciler.containerizer as containerizer_module
from reconciler.checkpoint import Checkpoints
from reconciler.containerizer import Container, Containerizer, State
from reconciler.isolators.base import (
    ContainerConfig,
    ContainerState,
    Isolator,
    LaunchInfo,
    Limitation,
    LimitationCallback,
    PermanentError,
)
from reconciler.launch_spec import InitSpec
from reconciler.launcher.base import Forked, Launcher
from reconciler.linux import proc
from reconciler.models import ContainerSpec, Resources

PID_MAX_LIMIT = 1 << 22          # the kernel's ceiling on pid_max: no process ever has a pid above it
OLD = Resources(cpus=1.0, mem=64)
NEW = Resources(cpus=2.0, mem=128)


# --- the journal and the fakes -------------------------------------------------------------------

@dataclass
class Entry:
    who: str          # an isolator's name, "launcher", or "init"
    what: str         # the method called
    cid: str
    detail: Any = None

    @property
    def step(self) -> str:
        return f"{self.who}.{self.what}"


class Journal(list[Entry]):
    def record(self, who: str, what: str, cid: str, detail: Any = None) -> None:
        self.append(Entry(who, what, cid, detail))

    def steps(self, cid: str | None = None, since: int = 0) -> list[str]:
        return [e.step for e in self[since:] if cid is None or e.cid == cid]


class Failures:
    """One-shot outcomes per method: each call takes the next; None (or nothing left) is success."""

    def __init__(self, **plan: list[BaseException | None]) -> None:
        self.plan = {what: list(outcomes) for what, outcomes in plan.items()}

    def check(self, what: str) -> None:
        outcomes = self.plan.get(what)
        if outcomes:
            exc = outcomes.pop(0)
            if exc is not None:
                raise exc


class FakeIsolator(Isolator):
    """MockIsolator: records every call, returns nothing unless told to, fails when planned."""

    def __init__(self, name: str, journal: Journal, failures: Failures | None = None,
                 launch_info: LaunchInfo | None = None) -> None:
        super().__init__(config=None)  # type: ignore[arg-type] - the fakes read no flags
        self.name = name
        self.journal = journal
        self.failures = failures or Failures()
        self.launch_info = launch_info
        self.on_limitation: dict[str, LimitationCallback] = {}
        self.resources: dict[str, Resources] = {}    # what this isolator has "applied" to each container

    def _call(self, what: str, cid: str, detail: Any = None) -> None:
        self.journal.record(self.name, what, cid, detail)
        self.failures.check(what)

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        self._call("recover", "", ({s.config.container_id: s.pid for s in states}, set(orphans)))

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        self._call("prepare", container_id)
        return self.launch_info

    def isolate(self, container_id: str, pid: int) -> None:
        self._call("isolate", container_id, pid)

    def watch_limit(self, container_id: str, on_limitation: LimitationCallback,
                    loop: asyncio.AbstractEventLoop) -> None:
        self._call("watch", container_id)
        self.on_limitation[container_id] = on_limitation

    def update(self, container_id: str, resources: Resources) -> None:
        self.journal.record(self.name, "update", container_id, resources)
        self.resources[container_id] = resources        # applied, even when what follows fails (half done)
        self.failures.check("update")

    def cleanup(self, container_id: str) -> None:
        self._call("cleanup", container_id)


class FakeForked(Forked):
    """A blocked init that records whether it was let go or told to give up."""

    def __init__(self, journal: Journal, cid: str, pid: int, pidfd: int) -> None:
        super().__init__(pid=pid, start_time=1, pidfd=pidfd, go_fd=-1)
        self.journal, self.cid = journal, cid
        self.outcome: str | None = None

    def go(self) -> None:
        assert self.outcome is None, "the init was let go after it was told to give up"
        self.outcome = "go"
        self.journal.record("init", "go", self.cid)

    def close_go(self) -> None:
        if self.outcome is None:
            self.outcome = "gave_up"
            self.journal.record("init", "close_go", self.cid)


class FakeLauncher(Launcher):
    """TestLauncher: fork returns a FakeForked, destroy and recover only record. Nothing is signalled."""

    name = "fake"

    def __init__(self, journal: Journal, failures: Failures | None = None) -> None:
        super().__init__(helper=None)  # type: ignore[arg-type] - no launch helper: nothing is forked
        self.journal = journal
        self.failures = failures or Failures()
        self.orphans: set[str] = set()
        self.forked: dict[str, FakeForked] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.probes: list[Callable[[str], None]] = []
        self._exit_ends: dict[str, int] = {}
        self._next_pid = PID_MAX_LIMIT + 1

    def fork(self, container_id: str, spec: dict, clone_flags: int) -> Forked:
        self.journal.record("launcher", "fork", container_id, clone_flags)
        for probe in self.probes:
            probe(container_id)
        self.failures.check("fork")
        pidfd, exit_end = os.pipe()
        self._exit_ends[container_id] = exit_end
        self.specs[container_id] = spec
        forked = FakeForked(self.journal, container_id, self._next_pid, pidfd)
        self._next_pid += 1
        self.forked[container_id] = forked
        return forked

    def exit(self, container_id: str) -> None:
        """The init ends: its pidfd becomes readable."""
        os.write(self._exit_ends[container_id], b"x")

    def destroy(self, container_id: str, identity: proc.ProcessIdentity | None, pid_namespace: bool) -> None:
        self.journal.record("launcher", "destroy", container_id, identity)
        self.failures.check("destroy")

    def recover(self, known: set[str]) -> set[str]:
        self.journal.record("launcher", "recover", "", set(known))
        return set(self.orphans)

    def belongs(self, container_id: str, pid: int) -> bool:
        return True

    def terminate(self, identity: proc.ProcessIdentity, sig: int = signal.SIGTERM) -> None:
        self.journal.record("launcher", "terminate", "", sig)

    def close(self) -> None:
        for fd in self._exit_ends.values():
            os.close(fd)
        self._exit_ends.clear()


# --- the node under test -------------------------------------------------------------------------

@dataclass
class Node:
    tmp: Path
    journal: Journal = field(default_factory=Journal)
    launcher: FakeLauncher = field(init=False)
    isolators: list[FakeIsolator] = field(default_factory=list)
    checkpoints: Checkpoints = field(init=False)
    containerizer: Containerizer = field(init=False)
    phases: list[tuple[str, State]] = field(default_factory=list)
    status_changes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.launcher = FakeLauncher(self.journal)
        self.checkpoints = Checkpoints(str(self.tmp / "containers"), str(self.tmp / "sandboxes"))
        self.checkpoints.ensure_dirs()

    def build(self, *names: str, failures: dict[str, Failures] | None = None,
              launch_info: dict[str, LaunchInfo] | None = None) -> Containerizer:
        failures, launch_info = failures or {}, launch_info or {}
        self.isolators = [FakeIsolator(n, self.journal, failures.get(n), launch_info.get(n)) for n in names]
        self.containerizer = Containerizer(self.launcher, list(self.isolators), self.checkpoints, observer=self)
        return self.containerizer

    # the containerizer's observer (reconciler.containerizer.ContainerObserver)
    def container_changed(self, container: Container) -> None:
        self.phases.append((container.id, container.state))

    def container_status_changed(self, container: Container) -> None:
        self.status_changes.append(container.id)

    def config(self, cid: str, resources: Resources = OLD) -> ContainerConfig:
        spec = ContainerSpec.model_validate({"command": {"value": "sleep 1000"},
                                             "resources": resources.model_dump(exclude_none=True)})
        return ContainerConfig(container_id=cid, name=cid, manifest=f"{cid}.yaml", spec=spec, spec_hash="hash-1",
                               resources_free_hash="free-1", sandbox=self.checkpoints.sandbox(cid))

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            try:
                await scenario()
            finally:
                self.containerizer.stop_watching()    # close every pidfd the loop watches
        asyncio.run(main())

    def checkpointed(self, cid: str) -> set[str]:
        directory = Path(self.checkpoints.dir(cid))
        return {p.name for p in directory.iterdir()} if directory.exists() else set()


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # As root, recover makes the sandboxes directory a nosuid,nodev bind mount of itself: a host mount
    # this in-process test must not leave behind.
    mounted: list[str] = []
    monkeypatch.setattr(containerizer_module, "ensure_nosuid_nodev", lambda path: mounted.append(path) or False)
    node = Node(tmp_path)
    try:
        yield node
    finally:
        node.launcher.close()


LAUNCH_ORDER = ["a.prepare", "b.prepare", "c.prepare", "launcher.fork",
                "a.isolate", "b.isolate", "c.isolate", "a.watch", "b.watch", "c.watch", "init.go"]
KILL_AND_CLEANUP = ["launcher.destroy", "c.cleanup", "b.cleanup", "a.cleanup"]


# --- launch --------------------------------------------------------------------------------------

def test_launch_prepares_every_isolator_then_forks_then_isolates_then_watches_then_lets_the_command_go(
        node: Node) -> None:
    cz = node.build("a", "b", "c", launch_info={"b": LaunchInfo(environment={"FROM_B": "1"})})

    async def scenario() -> None:
        container = await cz.launch(node.config("c1"), {"AGENT": "x"})
        assert container.state == State.RUNNING
        forked = node.launcher.forked["c1"]
        assert container.pid == forked.pid and forked.outcome == "go"
        # every isolator isolates the init's pid, and what one prepared reaches the init
        assert {e.detail for e in node.journal if e.what == "isolate"} == {forked.pid}
        assert node.launcher.specs["c1"]["env"]["FROM_B"] == "1"
        assert node.launcher.specs["c1"]["env"]["AGENT"] == "x"

    node.run(scenario)
    assert node.journal.steps() == LAUNCH_ORDER


def test_the_init_is_sent_every_key_of_its_spec_and_nothing_else(node: Node) -> None:
    """The containerizer and the init read one declaration (reconciler/launch_spec.py) that the type
    checker holds both to; the dict really sent, which crosses to the init as JSON, is held to it here."""
    cz = node.build("a")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {"AGENT": "x"})

    node.run(scenario)
    spec = node.launcher.specs["c1"]
    assert set(spec) == InitSpec.__required_keys__ | InitSpec.__optional_keys__
    assert json.loads(json.dumps(spec)) == spec     # nothing in it that JSON would change on the way


def test_checkpoints_are_written_ahead_of_the_step_they_describe(node: Node) -> None:
    """Recovery reads them: config before any isolator prepares, launch info before the fork, the pid
    before any isolator isolates (a crash in between leaves something recovery can clean up)."""
    seen: dict[str, set[str]] = {}

    class Probing(FakeIsolator):
        def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
            seen.setdefault(f"{self.name}.prepare", node.checkpointed(container_id))
            return super().prepare(container_id, config)

        def isolate(self, container_id: str, pid: int) -> None:
            seen.setdefault(f"{self.name}.isolate", node.checkpointed(container_id))
            super().isolate(container_id, pid)

    cz = node.build()
    cz.isolators[:] = [Probing("a", node.journal)]
    node.launcher.probes.append(lambda cid: seen.setdefault("fork", node.checkpointed(cid)))

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})

    node.run(scenario)
    assert seen == {"a.prepare": {"config.json"}, "fork": {"config.json"},
                    "a.isolate": {"config.json", "pid.json"}}


def test_a_second_launch_of_a_running_container_touches_nothing(node: Node) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        first = await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        assert await cz.launch(node.config("c1"), {}) is first
        assert node.journal.steps(since=mark) == []

    node.run(scenario)


# --- destroy -------------------------------------------------------------------------------------

def test_destroy_kills_then_cleans_up_every_isolator_in_reverse_order(node: Node) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        termination = await cz.destroy("c1")
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP
        assert termination is not None and termination.exit_signal == signal.SIGKILL   # no status: the init was killed
        assert cz.containers["c1"].state == State.TERMINATED
        assert node.checkpoints.read_termination("c1") == termination.to_doc()

    node.run(scenario)
    assert [state for _, state in node.phases] == [State.DESTROYING, State.TERMINATED]


def test_the_init_exiting_destroys_the_container_with_the_status_it_wrote(node: Node) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        Path(node.checkpoints.dir("c1"), "status").write_text(json.dumps({"exit_code": 3, "finished_at": 1.0}))
        node.launcher.exit("c1")
        termination = await asyncio.wait_for(cz.wait("c1"), 5)
        assert termination is not None and termination.exit_code == 3 and termination.exit_signal is None
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP

    node.run(scenario)


def test_a_limitation_destroys_the_container_and_says_why(node: Node) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        node.isolators[1].on_limitation["c1"](Limitation("MemoryLimit", "over 64 MB", {"mem": 64}))
        termination = await asyncio.wait_for(cz.wait("c1"), 5)
        assert termination is not None
        assert (termination.reason, termination.limited_resources) == ("MemoryLimit", {"mem": 64})
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP

    node.run(scenario)


def test_a_failed_cleanup_does_not_stop_the_others_and_is_reported(node: Node) -> None:
    cz = node.build("a", "b", "c", failures={"b": Failures(cleanup=[OSError(errno.EBUSY, "cgroup busy")])})

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        termination = await cz.destroy("c1")
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP
        assert termination is not None and "b: [Errno 16] cgroup busy" in termination.message

    node.run(scenario)


def test_usage_leaves_out_only_the_figures_of_an_isolator_that_are_not_resource_statistics(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    cz = node.build("a", "b")
    monkeypatch.setattr(node.isolators[0], "usage", lambda cid: {"cpus_user_time_secs": 1.5, "processes": 2})
    monkeypatch.setattr(node.isolators[1], "usage", lambda cid: {"bogus_bytes": 1, "threads": 3})

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        stats = cz.usage("c1")
        assert (stats.cpus_user_time_secs, stats.processes, stats.threads) == (1.5, 2, None)
        assert stats.timestamp is not None

    node.run(scenario)


def test_a_failed_kill_cleans_up_no_isolator_and_keeps_the_container(node: Node) -> None:
    """Mesos: isolators are not cleaned up while the container's processes may still run."""
    node.launcher.failures = Failures(destroy=[OSError("cgroup still has processes")])
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        termination = await cz.destroy("c1")
        assert termination is not None and termination.reason == "DestroyFailed"
        assert node.journal.steps(since=mark) == ["launcher.destroy"]
        assert "c1" in cz.containers and node.checkpointed("c1")
        # asked again, the kill is retried, and this time the isolators clean up
        mark = len(node.journal)
        await cz.destroy("c1")
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP

    node.run(scenario)


# --- an aborted launch ---------------------------------------------------------------------------

ABORT_CLEANUP = ["launcher.destroy", "c.cleanup", "b.cleanup", "a.cleanup"]
ABORTS = {
    # where it fails: (isolator failures, launcher failures, the journal up to and including the failure)
    "prepare": ("prepare", None, ["a.prepare", "b.prepare"]),
    "fork": (None, "fork", ["a.prepare", "b.prepare", "c.prepare", "launcher.fork"]),
    "isolate": ("isolate", None, ["a.prepare", "b.prepare", "c.prepare", "launcher.fork",
                                  "a.isolate", "b.isolate", "init.close_go"]),
    "watch": ("watch", None, ["a.prepare", "b.prepare", "c.prepare", "launcher.fork",
                              "a.isolate", "b.isolate", "c.isolate", "a.watch", "b.watch", "init.close_go"]),
}


@pytest.mark.parametrize("error", [PermanentError("user 'nobody2' does not exist"), OSError(errno.EAGAIN, "try again")],
                         ids=["permanent", "temporary"])
@pytest.mark.parametrize("where", list(ABORTS))
def test_an_aborted_launch_gives_up_the_init_cleans_up_every_isolator_and_forgets_the_container(
        node: Node, where: str, error: Exception) -> None:
    isolator_step, launcher_step, expected = ABORTS[where]
    failures = {"b": Failures(**{isolator_step: [error]})} if isolator_step else {}
    if launcher_step:
        node.launcher.failures = Failures(**{launcher_step: [error]})
    cz = node.build("a", "b", "c", failures=failures)

    async def scenario() -> None:
        with pytest.raises(type(error)) as raised:
            await cz.launch(node.config("c1"), {})
        assert raised.value is error                       # the cause, unwrapped: the loop decides retry by type
        forked = node.launcher.forked.get("c1")
        if forked is not None:
            assert forked.outcome == "gave_up"             # the init exits without running the command
            with pytest.raises(OSError):
                os.fstat(forked.pidfd)                     # and its pidfd is not leaked
        assert "c1" not in cz.containers
        assert not Path(node.checkpoints.dir("c1")).exists()
        assert not Path(node.checkpoints.sandbox("c1")).exists()
        # forgotten: the same id launches afresh
        mark = len(node.journal)
        assert (await cz.launch(node.config("c1"), {})).state == State.RUNNING
        assert node.journal.steps(since=mark) == LAUNCH_ORDER

    node.run(scenario)
    assert node.journal.steps()[:len(expected) + len(ABORT_CLEANUP)] == expected + ABORT_CLEANUP


def test_an_aborted_launch_reports_its_cause_even_when_the_kill_fails(node: Node) -> None:
    cause = OSError(errno.EPERM, "cannot move the init into its cgroup")
    node.launcher.failures = Failures(destroy=[OSError("cgroup still has processes")])
    cz = node.build("a", "b", "c", failures={"a": Failures(isolate=[cause])})

    async def scenario() -> None:
        with pytest.raises(OSError) as raised:
            await cz.launch(node.config("c1"), {})
        assert raised.value is cause
        assert node.launcher.forked["c1"].outcome == "gave_up"
        # Something may still run: kept as a failed destroy is, its checkpoint and isolators untouched ...
        kept = cz.containers["c1"]
        assert kept.destroy_failed and kept.termination is not None and kept.termination.reason == "DestroyFailed"
        assert node.checkpointed("c1")
        assert not any(step.endswith(".cleanup") for step in node.journal.steps())
        # ... until a destroy kills it: then every isolator cleans up
        mark = len(node.journal)
        await cz.destroy("c1")
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP

    node.run(scenario)
    assert node.journal.steps()[4:7] == ["a.isolate", "init.close_go", "launcher.destroy"]


# --- update --------------------------------------------------------------------------------------

def test_update_applies_to_every_isolator_then_checkpoints_the_new_resources(node: Node) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        cz.update("c1", NEW, "hash-2")
        assert node.journal.steps(since=mark) == ["a.update", "b.update", "c.update"]
        assert all(e.detail == NEW for e in node.journal[mark:])
        recovered = node.checkpoints.read_config("c1")
        assert recovered is not None
        assert (recovered.spec.resources, recovered.spec_hash) == (NEW, "hash-2")

    node.run(scenario)


@pytest.mark.parametrize("error", [PermanentError("cannot lower the memory limit"), OSError(errno.EIO, "write")],
                         ids=["permanent", "temporary"])
def test_update_failing_in_the_third_isolator_restores_the_others_in_reverse_and_keeps_the_checkpoint(
        node: Node, error: Exception) -> None:
    cz = node.build("a", "b", "c", "d", failures={"c": Failures(update=[error])})

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        with pytest.raises(type(error)) as raised:
            cz.update("c1", NEW, "hash-2")
        assert raised.value is error
        assert [(e.step, e.detail) for e in node.journal[mark:]] == [
            ("a.update", NEW), ("b.update", NEW), ("c.update", NEW), ("c.update", OLD), ("b.update", OLD), ("a.update", OLD)]
        assert node.isolators[0].resources["c1"] == node.isolators[1].resources["c1"] == OLD
        assert "c1" not in node.isolators[3].resources      # d was never asked
        for config in (cz.containers["c1"].config, node.checkpoints.read_config("c1")):
            assert config is not None and (config.spec.resources, config.spec_hash) == (OLD, "hash-1")

    node.run(scenario)


def test_a_failed_restore_does_not_stop_the_others_nor_hide_the_cause(node: Node) -> None:
    cause = OSError(errno.EIO, "write cpu.max")
    cz = node.build("a", "b", "c", failures={"b": Failures(update=[None, OSError("restore failed")]),
                                             "c": Failures(update=[cause])})

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        mark = len(node.journal)
        with pytest.raises(OSError) as raised:
            cz.update("c1", NEW, "hash-2")
        assert raised.value is cause
        assert node.journal.steps(since=mark) == ["a.update", "b.update", "c.update", "c.update", "b.update", "a.update"]
        assert node.isolators[0].resources["c1"] == OLD

    node.run(scenario)


def test_update_of_a_container_that_is_not_running_touches_no_isolator(node: Node) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        await cz.destroy("c1")
        mark = len(node.journal)
        cz.update("c1", NEW, "hash-2")
        cz.update("unknown", NEW, "hash-2")
        assert node.journal.steps(since=mark) == []

    node.run(scenario)


def test_update_also_restores_the_isolator_that_failed_half_way(node: Node) -> None:
    cz = node.build("a", "b", "c", failures={"c": Failures(update=[OSError(errno.EINVAL, "cpu.cfs_quota_us")])})

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})
        with pytest.raises(OSError):
            cz.update("c1", NEW, "hash-2")
        assert [isolator.resources["c1"] for isolator in node.isolators] == [OLD, OLD, OLD]

    node.run(scenario)


def test_update_whose_checkpoint_fails_is_rolled_back_everywhere(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        await cz.launch(node.config("c1"), {})

        def disk_full(config: ContainerConfig) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(node.checkpoints, "write_config", disk_full)
        with pytest.raises(OSError):
            cz.update("c1", NEW, "hash-2")
        assert [isolator.resources["c1"] for isolator in node.isolators] == [OLD, OLD, OLD]
        assert cz.containers["c1"].config.spec_hash == "hash-1"

    node.run(scenario)


# --- recover -------------------------------------------------------------------------------------

def test_recover_hands_live_containers_and_orphans_to_every_isolator_then_destroys_what_ended(node: Node) -> None:
    cp = node.checkpoints
    me = proc.ProcessIdentity.of(os.getpid())
    assert me is not None
    boot = proc.boot_id()
    # live: its init (this very process; the fake launcher never signals) still runs
    cp.write_config(node.config("live"))
    cp.write_pid("live", me.pid, me.start_time, boot, False, 1.0)
    # dead: its init ended while the agent was away (same pid, another start time)
    cp.write_config(node.config("dead"))
    cp.write_pid("dead", me.pid, me.start_time + 1, boot, False, 1.0)
    # ended: destroyed before the agent stopped; nothing is left to do
    cp.write_config(node.config("ended"))
    cp.write_pid("ended", me.pid, me.start_time + 1, boot, False, 1.0)
    cp.write_termination("ended", {"exit_code": 0, "finished_at": 2.0})
    # orphans: stopped between config and fork, an unreadable config, a sandbox alone, a launcher's leftover
    cp.write_config(node.config("nopid"))
    Path(cp.dir("unreadable")).mkdir()
    Path(cp.dir("unreadable"), "config.json").write_text("{not json")
    Path(cp.sandbox("sandbox-only")).mkdir()
    node.launcher.orphans = {"cgroup-only"}
    orphans = {"nopid", "unreadable", "sandbox-only", "cgroup-only"}
    cz = node.build("a", "b", "c")

    async def scenario() -> None:
        recovered = await cz.recover()
        assert {c.id: c.state for c in recovered} == {
            "live": State.RUNNING, "dead": State.TERMINATED, "ended": State.TERMINATED}
        # what recovery adopted is destroyed as a launched container is
        mark = len(node.journal)
        await cz.destroy("live")
        assert node.journal.steps(since=mark) == KILL_AND_CLEANUP
        del node.journal[mark:]

    node.run(scenario)
    told = ({"dead": me.pid, "live": me.pid}, orphans)
    assert [(e.step, e.detail) for e in node.journal if e.what == "recover" and e.who != "launcher"] == [
        ("a.recover", told), ("b.recover", told), ("c.recover", told)]
    assert node.journal.steps() == (
        ["launcher.recover", "a.recover", "b.recover", "c.recover", "a.watch", "b.watch", "c.watch"]
        + KILL_AND_CLEANUP * (1 + len(orphans)))
    assert [e.cid for e in node.journal if e.step == "launcher.destroy"] == ["dead", *sorted(orphans)]
    assert [e.cid for e in node.journal if e.what == "watch"] == ["live"] * 3
    assert cp.ids() == ["dead", "ended", "live"] and cp.sandbox_ids() == []
    assert cp.read_termination("dead") is not None
