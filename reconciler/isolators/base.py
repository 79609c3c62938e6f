"""The isolator protocol, as Mesos's include/mesos/slave/isolator.hpp, and the launch info isolators return.

The containerizer is the only caller. Order: `prepare` runs for every isolator in the fixed table
order (Mesos `MesosContainerizer::create`), then the init is forked, then `isolate` for every
isolator, then the command runs; `cleanup` runs in reverse order and carries on past failures.
Every method is idempotent and tolerates unknown container ids (MESOS-6059): recovery after a
crash may call prepare or cleanup a second time.

An isolator never calls another. It may publish facts (a net_cls classid, a disk usage) through
`status()` and `usage()`, which the containerizer folds into the status file, and it reports a
limitation (memory or disk over its limit) through the callback given to `watch()`.

The containers an isolator is told about (ContainerConfig, ContainerState) are reconciler/container.py's,
named here too as the protocol's vocabulary.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from reconciler import errors
from reconciler.container import CONTAINER_SANDBOX, ROOTFS_DIR, ContainerConfig, ContainerState, ProvisionedImage
from reconciler.launch_spec import CapabilitySets, Mount, MountStep, RLimitSetting, SeccompProfile, UserInImage
from reconciler.linux import syscalls

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import Resources

__all__ = [
    "CONTAINER_SANDBOX", "PRIVATE_ROOT", "ROOTFS_DIR", "ContainerConfig", "ContainerState", "Isolator",
    "IsolatorSetupError", "LaunchInfo", "Limitation", "LimitationCallback", "PermanentError", "ProvisionedImage",
    "ResourceExhaustedError",
]


# What an isolator raises to say what the loop does with its failure (reconciler.errors).
PermanentError = errors.PermanentError
ResourceExhaustedError = errors.ResourceExhaustedError


class IsolatorSetupError(Exception):
    """The agent cannot start with this isolator on this host (missing kernel support, bad flag).

    The message names the flag and the reason; the CLI prints it on one line and exits 2.
    """


# The first mount of any new mount namespace: without it, what the init mounts there would propagate
# to the host through shared mounts (systemd makes / shared).
PRIVATE_ROOT: Mount = {"source": None, "target": "/", "fstype": None,
                       "flags": syscalls.MS_REC | syscalls.MS_PRIVATE, "data": None}


@dataclass
class LaunchInfo:
    """Mesos ContainerLaunchInfo: what an isolator needs done in the container before the command runs."""
    clone_namespaces: int = 0
    environment: dict[str, str] = field(default_factory=dict)
    mounts: list[MountStep] = field(default_factory=list)   # applied in order by the init
    rlimits: list[RLimitSetting] = field(default_factory=list)
    hostname: str | None = None
    working_directory: str | None = None
    capabilities: CapabilitySets | None = None
    user: UserInImage | None = None
    # docker/runtime: the argv to exec instead of the manifest's command (argv[0] is the program,
    # looked up in PATH when it has no slash); None keeps the manifest's command.
    command: list[str] | None = None
    # filesystem/linux: the init pivots into this directory after every mount is made.
    rootfs: str | None = None
    # linux/seccomp: the profile the command's process loads last before exec; the containerizer
    # compiles it for the container's capabilities. None: unconfined.
    seccomp: SeccompProfile | None = None
    # network/cni: the network namespace (a bind-mounted nsfs file) the init joins before anything else.
    network_namespace: str | None = None

    def merge(self, other: "LaunchInfo") -> None:
        """Fold another isolator's launch info in, refusing the conflicts Mesos refuses."""
        self.clone_namespaces |= other.clone_namespaces
        self.environment.update(other.environment)
        self.mounts.extend(other.mounts)
        for attr, message in (
            ("rlimits", "Multiple isolators specify rlimits"),
            ("working_directory", "Multiple isolators specify working directory"),
            ("capabilities", "Multiple isolators specify effective capabilities"),
            ("hostname", "Multiple isolators specify hostname"),
            ("user", "Multiple isolators specify user"),
            ("command", "Multiple isolators specify command"),
            ("rootfs", "Multiple isolators specify rootfs"),
            ("seccomp", "Multiple isolators specify seccomp"),
            ("network_namespace", "Multiple isolators specify a network namespace"),
        ):
            theirs = getattr(other, attr)
            if theirs:
                if getattr(self, attr):
                    raise PermanentError(message)
                setattr(self, attr, theirs)


@dataclass
class Limitation:
    """Mesos ContainerLimitation: why an isolator wants its container destroyed."""
    reason: str          # e.g. "MemoryLimit", "DiskLimitation"
    message: str
    resources: dict[str, float] = field(default_factory=dict)


LimitationCallback = Callable[[Limitation], None]


class IsolatorObserver(Protocol):
    """Who an isolator tells, from any thread, that what `status()` says of a container changed (a disk
    measurement), so that its status file is written again: the containerizer."""

    def isolator_status_changed(self, container_id: str) -> None: ...


class _NobodyListens:
    def isolator_status_changed(self, container_id: str) -> None:
        return None


class Isolator:
    """Every hook defaults to doing nothing, as in Mesos."""

    name: str = ""

    def __init__(self, config: "AgentConfig") -> None:
        self.config = config
        self.observer: IsolatorObserver = _NobodyListens()

    def attach(self, observer: IsolatorObserver) -> None:
        """The containerizer listens to what this isolator reports of its containers."""
        self.observer = observer

    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        """Rebuild in-memory state for live containers; clean up what only orphans hold."""

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        return None

    def isolate(self, container_id: str, pid: int) -> None:
        """The init exists (blocked, pid in the host's namespace): put it where it belongs."""

    def watch(self, container_id: str) -> asyncio.Future[Limitation]:
        """Mesos's watch(): a future, set on the running event loop when the container reaches a limit
        this isolator enforces, and never for one that enforces none. The containerizer awaits it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Limitation] = loop.create_future()

        def limited(limitation: Limitation) -> None:
            if not future.done():
                future.set_result(limitation)
        self.watch_limit(container_id, limited, loop)
        return future

    def watch_limit(self, container_id: str, on_limitation: LimitationCallback,
                    loop: asyncio.AbstractEventLoop) -> None:
        """An isolator that enforces a limit (memory, disk): arrange to call `on_limitation` once, from the
        loop's thread, when the container reaches it. Watching a container twice watches it once."""

    def update(self, container_id: str, resources: "Resources") -> None:
        """Apply new resources in place."""

    def usage(self, container_id: str) -> dict[str, float | int]:
        """ResourceStatistics fields this isolator measures. Omit what is not measured."""
        return {}

    def status(self, container_id: str) -> dict[str, Any]:
        """Status-file blocks this isolator owns (e.g. {"net_cls": {...}})."""
        return {}

    def cleanup(self, container_id: str) -> None:
        """Undo prepare/isolate. Must succeed for unknown ids and when called twice."""

    # The containerizer calls these. An isolator whose prepare or cleanup waits on other programs
    # (network/cni's plugins) runs it in a worker thread here, so that one slow or hung plugin does
    # not stall every other container's work on the event loop.
    async def prepare_async(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        return self.prepare(container_id, config)

    async def cleanup_async(self, container_id: str) -> None:
        self.cleanup(container_id)

    def agent_status(self) -> dict[str, Any]:
        """What the isolator adds to _agent.json (e.g. handles used and free)."""
        return {}

    async def measure_unmeasured(self) -> int:
        """Measure now, for `once`, what this isolator otherwise measures on its own timer (disk/du);
        returns how many containers it measured, and applies the result as a timed measurement would."""
        return 0

    def close(self) -> None:
        """The agent stops (its containers keep running): stop the isolator's own timers and helpers."""
