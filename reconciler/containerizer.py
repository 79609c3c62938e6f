"""The Mesos containerizer: container records, checkpoints, and the only caller of isolators and the launcher.

API (Mesos containerizer.hpp): recover, launch, update, usage, status, wait, destroy, remove.
Launch order: checkpoint config → prepare (every isolator, table order) → checkpoint launch info →
fork (the init blocks) → checkpoint pid → isolate (every isolator) → go → watch.
Destroy order: SIGTERM and grace (when asked) → kill everything (launcher) → cleanup (every
isolator, reverse order, carrying on past failures) → checkpoint the termination.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import functools
import logging
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pydantic import ValidationError

from reconciler import users
from reconciler.checkpoint import Checkpoints
from reconciler.fsutil import remove_stale_temps
from reconciler.isolators.base import (
    CONTAINER_SANDBOX,
    ContainerConfig,
    ContainerState,
    Isolator,
    LaunchInfo,
    Limitation,
    PermanentError,
    ProvisionedImage,
)
from reconciler.launch_spec import InitSpec
from reconciler.launcher.base import Forked, Launcher
from reconciler.linux import DEFAULT_PATH, proc, syscalls
from reconciler.linux.mounts import ensure_nosuid_nodev
from reconciler.models import Image, Resources, ResourceStatistics
from reconciler.status import iso
from reconciler.units import megabytes_to_bytes

log = logging.getLogger(__name__)

SANDBOX_MODE = 0o750


class State(str, enum.Enum):
    PREPARING = "PREPARING"
    ISOLATING = "ISOLATING"
    RUNNING = "RUNNING"
    DESTROYING = "DESTROYING"
    TERMINATED = "TERMINATED"


# Termination.reason of a container whose command never ran: it is launched again, whatever its policy.
NOT_STARTED = "NotStarted"


@dataclass
class Termination:
    """Mesos ContainerTermination, plus when it ended."""
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str = ""
    message: str = ""
    finished_at: float = 0.0
    limited_resources: dict[str, float] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.exit_signal is None and not self.reason

    def to_doc(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "Termination":
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass
class Container:
    config: ContainerConfig
    state: State
    identity: proc.ProcessIdentity | None = None
    pid_namespace: bool = False
    started_at: float | None = None
    termination: Termination | None = None
    limitation: Limitation | None = None
    pidfd: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    destroy_task: "asyncio.Task[Termination] | None" = None
    aborted: bool = False        # its launch failed before the command was let go (kept: its kill failed)
    _started_at_iso: str | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.config.container_id

    @property
    def started_at_iso(self) -> str | None:
        if self.started_at is None:
            return None
        if self._started_at_iso is None:
            self._started_at_iso = iso(self.started_at)
        return self._started_at_iso

    @property
    def pid(self) -> int | None:
        return self.identity.pid if self.identity else None

    @property
    def destroy_failed(self) -> bool:
        """Its processes could not all be killed: it must not be forgotten, and destroy may be retried."""
        return self.termination is not None and self.termination.reason == "DestroyFailed"

    @property
    def alive(self) -> bool:
        return self.state in (State.PREPARING, State.ISOLATING, State.RUNNING)


def resource_limits(resources: Resources) -> dict[str, Any]:
    """The limits a container's statistics carry (Mesos's _usage adds them): cpus_limit, mem_limit_bytes."""
    limits: dict[str, Any] = {}
    if resources.cpus is not None:
        limits["cpus_limit"] = resources.cpus
    if resources.mem is not None:
        limits["mem_limit_bytes"] = megabytes_to_bytes(resources.mem)
    return limits


class ContainerObserver(Protocol):
    """Who the containerizer tells about its containers, on the event loop's thread: the reconcile loop."""

    def container_changed(self, container: Container) -> None:
        """Its state changed (launched, terminating, terminated)."""

    def container_status_changed(self, container: Container) -> None:
        """A running container's isolator facts changed (no phase change): its status file only."""


class _NobodyWatches:
    def container_changed(self, container: Container) -> None:
        return None

    def container_status_changed(self, container: Container) -> None:
        return None


class Containerizer:
    def __init__(self, launcher: Launcher, isolators: list[Isolator], checkpoints: Checkpoints,
                 observer: ContainerObserver | None = None, image_store: Any = None) -> None:
        self.launcher = launcher
        self.image_store = image_store     # reconciler.images.ImageStore with --image_providers=docker
        # Pulls of one image share one flight in the store (the others wait in their threads).
        self._pull_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-pull")
        self.isolators = isolators
        self.checkpoints = checkpoints
        self.observer: ContainerObserver = observer or _NobodyWatches()
        self.containers: dict[str, Container] = {}
        self.boot_id = proc.boot_id()
        self.destroy_errors = 0
        self.watching = True     # False once the agent stops: exits and limits are the next agent's business
        self._event_loop: asyncio.AbstractEventLoop | None = None
        for isolator in isolators:
            isolator.attach(self)

    def attach(self, observer: ContainerObserver) -> None:
        self.observer = observer

    def isolator_status_changed(self, container_id: str) -> None:
        """From any thread (isolators measure in their own): hop to the loop, then publish."""
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._publish_status, container_id)

    def _publish_status(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        if container is not None and container.state == State.RUNNING:
            self.observer.container_status_changed(container)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # recover ----------------------------------------------------------------------------------
    async def recover(self) -> list[Container]:
        """Adopt live containers, learn how the others ended, destroy orphans. Returns the known containers."""
        self._event_loop = asyncio.get_running_loop()
        self.checkpoints.ensure_dirs()
        if os.geteuid() == 0:
            # What a container leaves in its sandbox (a setuid-root shell, a device node, its root
            # filesystem's upper layer) must give a host user who reaches it nothing.
            ensure_nosuid_nodev(self.checkpoints.sandboxes_dir)
        recovered: list[Container] = []
        to_destroy: list[Container] = []
        orphans: set[str] = set()
        for cid in self.checkpoints.ids():
            remove_stale_temps(self.checkpoints.dir(cid))   # an agent killed between a write and its rename
            config = self._read_config_or_none(cid)
            if config is None:
                orphans.add(cid)
                continue
            container = Container(config=config, state=State.RUNNING)
            pid_doc = self.checkpoints.read_pid(cid)
            termination_doc = self.checkpoints.read_termination(cid)
            if termination_doc is not None:
                container.state = State.TERMINATED
                container.termination = Termination.from_doc(termination_doc)
                container.started_at = pid_doc.get("started_at") if pid_doc else None
                container.done.set()
            elif pid_doc is None:
                # The agent stopped between config and fork: it never ran. Clean up and forget it.
                orphans.add(cid)
                continue
            else:
                container.identity = proc.ProcessIdentity(pid_doc["pid"], pid_doc["start_time"])
                container.pid_namespace = bool(pid_doc.get("pid_namespace"))
                container.started_at = pid_doc.get("started_at")
                same_boot = pid_doc.get("boot_id") == self.boot_id
                alive = container.identity.is_alive()
                if not (same_boot and alive and self.launcher.belongs(cid, container.identity.pid)):
                    # It ended while we were away; its status file says how. Whoever holds its pid now
                    # (pids and start times repeat across boots) is not ours: only its cgroup is killed.
                    if not same_boot or container.identity.is_alive():
                        container.identity = None
                    to_destroy.append(container)
            recovered.append(container)
            self.containers[cid] = container
        orphans |= self.launcher.recover(set(self.containers))
        orphans |= {sid for sid in self.checkpoints.sandbox_ids() if sid not in self.containers}
        live = [ContainerState(c.config, c.pid) for c in recovered if c.state != State.TERMINATED]
        for isolator in self.isolators:
            isolator.recover(live, orphans)
        for container in recovered:
            if container.state == State.RUNNING and container not in to_destroy:
                if not self._arm_exit_watch(container):
                    to_destroy.append(container)
                    continue
                for isolator in self.isolators:
                    isolator.watch(container.id).add_done_callback(self._limitation_callback(container))
        for container in to_destroy:
            await self.destroy(container.id)
        for cid in sorted(orphans):
            log.info("Cleaning up orphan container %s", cid)
            await self._destroy_orphan(cid)
        return recovered

    def _read_config_or_none(self, cid: str) -> ContainerConfig | None:
        try:
            return self.checkpoints.read_config(cid)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint makes an orphan, not a crash
            log.warning("Checkpoint of container %s is unreadable (%s): treating it as an orphan", cid, exc)
            return None

    async def _destroy_orphan(self, cid: str) -> None:
        try:
            await asyncio.to_thread(self.launcher.destroy, cid, None, False)
        except Exception as exc:  # noqa: BLE001
            self.destroy_errors += 1
            log.error("Failed to kill orphan container %s: %s", cid, exc)
            return
        await self._cleanup_isolators(cid)
        self.checkpoints.remove(cid)

    # provision (Mesos's provisioner) ----------------------------------------------------------
    async def provision(self, config: ContainerConfig, progress: Callable[[int, int], None] | None = None,
                        resolved_since: float | None = None) -> None:
        """The container's image in the store (pulled from --docker_registry once), set on `config`, and its
        layers recorded in the checkpoint as in use (before the store's lock is let go, so a concurrent
        `reconciler images prune` cannot take them). Runs in a thread: extracting a layer takes time.
        progress(bytes fetched, bytes to fetch) is called from that thread while layers download."""
        container = config.spec.container
        image = container.mesos.image if container is not None and container.mesos is not None else None
        if image is None:
            return
        if self.image_store is None:
            raise PermanentError("Container image is not supported: the agent runs without --image_providers=docker")
        from reconciler.images.store import IMAGE_RECORD
        record_dir = self.checkpoints.dir(config.container_id)
        os.makedirs(record_dir, mode=0o700, exist_ok=True)
        try:
            pulled = await self._pull(image, progress, os.path.join(record_dir, IMAGE_RECORD), resolved_since)
        except BaseException:
            # A new id each try: nothing else is in it. The error's type says what the loop does next
            # (an invalid reference is permanent, any other image error temporary).
            shutil.rmtree(record_dir, ignore_errors=True)
            raise
        config.image = ProvisionedImage(reference=pulled.reference, id=pulled.id, layers=list(pulled.layers),
                                        config=dict(pulled.config))

    async def prefetch(self, image: Image, progress: Callable[[int, int], None] | None = None) -> None:
        """Pull a container's image into the store ahead of its launch: a replacement's, while the container
        it replaces still runs. Its layers are not recorded as in use (the launch records them)."""
        if self.image_store is None:
            raise PermanentError("Container image is not supported: the agent runs without --image_providers=docker")
        await self._pull(image, progress, None)

    async def _pull(self, image: Image, progress: Callable[[int, int], None] | None,
                    in_use_record: str | None, resolved_since: float | None = None) -> Any:
        """resolved_since: a resolution of the tag since then holds (the pull ahead of this launch)."""
        assert self.image_store is not None
        pull = functools.partial(self.image_store.pull, image.docker.name, refresh=not image.cached,
                                 in_use_record=in_use_record, progress=progress, resolved_since=resolved_since)
        # Ten containers of one image: one pull, which the others await here without a thread of theirs
        # (then each takes the result from the store, with its own in-use record). The first reserves the
        # flight before its pull waits for a thread, so the others never queue for threads of their own.
        waiting, reservation = self.image_store.reserve(image.docker.name, refresh=not image.cached,
                                                        resolved_since=resolved_since, progress=progress)
        if waiting is not None:
            since = await asyncio.wrap_future(waiting)
            since = since if resolved_since is None else min(since, resolved_since)
            pull = functools.partial(pull, resolved_since=since)
        else:
            pull = functools.partial(pull, reservation=reservation)
        # Pulls get threads of their own: a long extraction must not hold up destroys and the other work
        # the loop hands to the default executor.
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pull_executor, pull)
        finally:
            if reservation is not None:
                self.image_store.release(reservation)

    # launch -----------------------------------------------------------------------------------
    async def launch(self, config: ContainerConfig, environment: dict[str, str]) -> Container:
        """Launch and return once the command was let go (Mesos: SUCCESS when unblocked).

        Raises PermanentError for launches that cannot succeed until the spec changes; any other
        exception is temporary. Either way nothing is left behind.
        """
        cid = config.container_id
        if cid in self.containers:
            return self.containers[cid]  # ALREADY_LAUNCHED: never touch the running one
        container = Container(config=config, state=State.PREPARING)
        self.containers[cid] = container
        forked: Forked | None = None
        try:
            # A container with an image finds its command.user in the image's /etc/passwd (as Mesos, after
            # chroot, and Docker): its init looks it up there. Any other in the host's user database.
            user = users.resolve(config.spec.command.user) if config.spec.command.user and config.image is None \
                else None
            self.checkpoints.write_config(config)
            # Not traversable by other users: what a container puts in its sandbox (a setuid-root copy of
            # a shell, its root filesystem's upper layer) is no host user's business.
            os.makedirs(config.sandbox, mode=SANDBOX_MODE, exist_ok=True)
            if user is not None and os.geteuid() != 0:
                users.give_sandbox(config.sandbox, user)   # refused unless it is the agent's own user
            # As root, the init gives the sandbox to the user once it has made its mounts and opened
            # stdout and stderr in it: until then only root can change what is in it.
            self._check_networks(config)
            info = LaunchInfo()
            for isolator in self.isolators:
                part = await isolator.prepare_async(cid, config)
                if part is not None:
                    info.merge(part)
            spec = self._init_spec(config, info, environment, user)
            container.pid_namespace = bool(info.clone_namespaces & syscalls.CLONE_NEWPID)
            forked = self.launcher.fork(cid, spec, info.clone_namespaces)
            container.identity = proc.ProcessIdentity(forked.pid, forked.start_time)
            container.pidfd = forked.pidfd
            container.started_at = time.time()
            self.checkpoints.write_pid(cid, forked.pid, forked.start_time, self.boot_id,
                                       container.pid_namespace, container.started_at)
            container.state = State.ISOLATING
            for isolator in self.isolators:
                isolator.isolate(cid, forked.pid)
            for isolator in self.isolators:
                isolator.watch(cid).add_done_callback(self._limitation_callback(container))
            forked.go()
            container.state = State.RUNNING
            self.loop.add_reader(forked.pidfd, self._on_init_exit, container)
        except BaseException:
            if forked is not None:
                forked.close_go()  # the init sees EOF and exits without running anything
            await self._abort_launch(container)
            raise
        return container

    def _check_networks(self, config: ContainerConfig) -> None:
        """A container on CNI networks without network/cni would run on the host network unannounced."""
        container = config.spec.container
        named = [n.name for n in container.network_infos if n.name] if container is not None else []
        if named and not any(isolator.name == "network/cni" for isolator in self.isolators):
            raise PermanentError(f"container.network_infos names the CNI network '{named[0]}', but the network/cni "
                                 "isolator is not enabled (add it to --isolation)")

    async def _abort_launch(self, container: Container) -> None:
        """Undo a launch that failed half way. When its processes cannot be killed it is kept, as a destroy
        that failed is: Failed with reason DestroyFailed, its checkpoint and isolators left alone (they may
        still hold what runs), the kill tried again by destroy() (the loop does, with backoff)."""
        cid = container.id
        try:
            self.launcher.destroy(cid, container.identity, container.pid_namespace)
        except Exception as exc:  # noqa: BLE001 - whatever it is, something may still run: keep the container
            self.destroy_errors += 1
            log.error("Failed to kill container %s after a failed launch: %s", cid, exc)
            container.aborted = True
            container.state = State.TERMINATED
            container.termination = Termination(
                reason="DestroyFailed", finished_at=time.time(),
                message=f"Failed to kill all processes in the container after a failed launch: {exc}")
            container.done.set()
            return
        if container.pidfd is not None:
            os.close(container.pidfd)
            container.pidfd = None
        await self._cleanup_isolators(cid)
        self.checkpoints.remove(cid)
        self.containers.pop(cid, None)

    def _init_spec(self, config: ContainerConfig, info: LaunchInfo, environment: dict[str, str],
                   user: users.User | None = None) -> InitSpec:
        """What the init needs: argv, environment, files; Mesos's env precedence (agent < sandbox < isolators <
        user)."""
        command = config.spec.command
        if info.command:   # docker/runtime: the image's Entrypoint/Cmd, argv[0] is the program
            executable, argv = info.command[0], list(info.command)
        elif command.shell:
            if not command.value:
                raise PermanentError("Shell command is not specified")
            executable, argv = "/bin/sh", ["sh", "-c", command.value]
        else:
            if not command.value:
                raise PermanentError("Command value is not specified")
            executable, argv = command.value, list(command.arguments) or [command.value]
        # With its own root filesystem, the container finds its sandbox where filesystem/linux bound it.
        sandbox_inside = CONTAINER_SANDBOX if info.rootfs else config.sandbox
        env = dict(environment)
        env["MESOS_SANDBOX"] = env["RECONCILER_SANDBOX"] = sandbox_inside
        env.update(info.environment)
        if command.environment:
            for variable in command.environment.variables:
                env[variable.name] = variable.value
        env.setdefault("PATH", DEFAULT_PATH)
        image_user = info.user["in_image"] if info.user else None
        in_image = command.user if command.user and config.image is not None else image_user
        return {
            "container_id": config.container_id,
            "checkpoint_dir": self.checkpoints.dir(config.container_id),
            "executable": executable,
            "argv": argv,
            "env": env,
            # Mesos ignores an isolator's working directory unless the container has an image.
            "cwd": info.working_directory if config.image is not None and info.working_directory else sandbox_inside,
            "rootfs": info.rootfs,
            "stdout": os.path.join(config.sandbox, "stdout"),
            "stderr": os.path.join(config.sandbox, "stderr"),
            "hostname": info.hostname,
            "network_namespace": info.network_namespace,
            "mounts": info.mounts,
            "rlimits": info.rlimits,
            "capabilities": info.capabilities,
            "last_cap": syscalls.last_capability(),
            "user": user.launch_spec() if user is not None else None,
            "user_in_image": in_image,
            "chown_sandbox": os.geteuid() == 0,
            "sandbox_in_container": sandbox_inside,
            "seccomp_filter": self._seccomp_program(info),
        }

    def _seccomp_program(self, info: LaunchInfo) -> str | None:
        """linux/seccomp's profile compiled for the capabilities the command will hold (Docker profiles
        allow some calls only to holders of a capability), as the init loads it: base64 of the raw filter."""
        if info.seccomp is None:
            return None
        from reconciler.linux import seccomp
        caps = info.capabilities
        names = caps.get("effective_names") if caps else None
        if names is None:
            names = caps.get("bounding_names", []) if caps else []
        try:
            program = seccomp.compile_for(info.seccomp.get("path"), frozenset(names))
        except seccomp.SeccompError as exc:
            raise PermanentError(f"Failed to compile seccomp profile '{info.seccomp.get('name')}': {exc}") from None
        return base64.b64encode(program).decode()

    # watch ------------------------------------------------------------------------------------
    def _arm_exit_watch(self, container: Container) -> bool:
        """Adopt a recovered init: a pidfd, checked against the start time after opening (no pid-reuse race)."""
        assert container.identity is not None
        try:
            pidfd = os.pidfd_open(container.identity.pid)
        except ProcessLookupError:
            return False
        if not container.identity.is_alive():
            os.close(pidfd)
            return False
        container.pidfd = pidfd
        self.loop.add_reader(pidfd, self._on_init_exit, container)
        return True

    def _on_init_exit(self, container: Container) -> None:
        self._forget_pidfd(container)
        if container.destroy_task is None and self.watching:
            self._start_destroy(container, grace=0.0, termination=None)

    def stop_watching(self) -> None:
        """The agent stops and its containers keep running: no exit or limit starts a destroy any more
        (asyncio runs the loop while tearing it down, its executor shut down), and every exit watch is
        closed. The next agent recovers the containers and learns from their checkpoints how any ended."""
        self.watching = False
        for container in self.containers.values():
            self._forget_pidfd(container)

    def _forget_pidfd(self, container: Container) -> None:
        if container.pidfd is not None:
            try:
                self.loop.remove_reader(container.pidfd)
            finally:
                os.close(container.pidfd)
                container.pidfd = None

    def _limitation_callback(self, container: Container) -> Callable[[asyncio.Future[Limitation]], None]:
        def limited(watched: asyncio.Future[Limitation]) -> None:
            limitation = watched.result()
            if container.state == State.TERMINATED or not self.watching:
                return
            if container.destroy_task is not None:
                # Its end was noticed first (an OOM victim's exit can beat the OOM notice): the
                # limitation still says why it ended, unless the destroy was asked for with a reason.
                if container.limitation is None:
                    container.limitation = limitation
                return
            log.info("Container %s (%s) reached a limit: %s", container.id, container.config.name, limitation.message)
            container.limitation = limitation
            self._start_destroy(container, grace=0.0, termination=Termination(
                reason=limitation.reason, message=limitation.message, limited_resources=limitation.resources))
        return limited

    # destroy ----------------------------------------------------------------------------------
    async def destroy(self, container_id: str, grace: float = 0.0, reason: str = "",
                      message: str = "") -> Termination | None:
        """Kill (gracefully for `grace` seconds), clean up, and return how it ended. Unknown id: None."""
        container = self.containers.get(container_id)
        if container is None:
            return None
        if container.state == State.TERMINATED:
            if not container.destroy_failed:
                return container.termination
            container.destroy_task = None   # the kill failed last time: try it again
        if container.destroy_task is None:
            termination = Termination(reason=reason, message=message) if (reason or message) else None
            self._start_destroy(container, grace, termination)
        assert container.destroy_task is not None
        return await asyncio.shield(container.destroy_task)

    def _start_destroy(self, container: Container, grace: float, termination: Termination | None) -> None:
        container.destroy_task = self.loop.create_task(self._destroy(container, grace, termination))

    async def _destroy(self, container: Container, grace: float, termination: Termination | None) -> Termination:
        cid = container.id
        container.state = State.DESTROYING
        self.observer.container_changed(container)
        identity = container.identity
        if grace > 0 and identity is not None and identity.is_alive():
            self.launcher.terminate(identity, signal.SIGTERM)
            await self._wait_exit(container, grace)
        try:
            await asyncio.to_thread(self.launcher.destroy, cid, identity, container.pid_namespace)
        except Exception as exc:  # noqa: BLE001 - Mesos: isolators are not cleaned up when the kill failed
            self.destroy_errors += 1
            log.error("Failed to kill all processes in container %s: %s", cid, exc)
            container.state = State.TERMINATED
            container.termination = Termination(reason="DestroyFailed", finished_at=time.time(),
                                                message=f"Failed to kill all processes in the container: {exc}")
            container.done.set()
            self.observer.container_changed(container)
            return container.termination
        self._forget_pidfd(container)
        cleanup_errors = await self._cleanup_isolators(cid)
        final = self._termination(container, termination)
        if cleanup_errors:
            final.message = (final.message + "; " if final.message else "") + \
                "Failed to clean up an isolator when destroying container: " + "; ".join(cleanup_errors)
        container.termination = final
        container.state = State.TERMINATED
        self.checkpoints.write_termination(cid, final.to_doc())
        container.done.set()
        self.observer.container_changed(container)
        return final

    async def _wait_exit(self, container: Container, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        identity = container.identity
        while identity is not None and identity.is_alive() and self.loop.time() < deadline:
            await asyncio.sleep(min(0.02, max(0.0, deadline - self.loop.time())))

    def _termination(self, container: Container, given: Termination | None) -> Termination:
        final = given
        if final is None and container.limitation is not None:
            limitation = container.limitation
            final = Termination(reason=limitation.reason, message=limitation.message,
                                limited_resources=limitation.resources)
        final = final or Termination()
        status = self.checkpoints.read_status(container.id)
        if container.aborted and final.reason != NOT_STARTED:
            # A launch that failed and whose kill failed, destroyed later: its command never ran, whatever
            # the init managed to write (the kill usually beats its not_started).
            final.reason = NOT_STARTED
            final.message = "the launch failed before the command started"
            final.exit_code = final.exit_signal = None
            final.finished_at = time.time()
            return final
        if status is not None and status.get("not_started"):
            # The agent died between the fork and the go-ahead: nothing of the command ran.
            final.reason, final.message = NOT_STARTED, "the agent stopped before the command started"
            final.finished_at = status.get("finished_at") or time.time()
            return final
        if status is None:
            # Mesos reap(): no status written means the init itself was killed.
            final.exit_signal = signal.SIGKILL if container.started_at is not None else None
        else:
            final.exit_code = status.get("exit_code")
            final.exit_signal = status.get("exit_signal")
            if status.get("error") and not final.message:
                final.message = status["error"]
                final.reason = final.reason or "LaunchFailed"
        final.finished_at = (status or {}).get("finished_at") or time.time()
        return final

    async def _cleanup_isolators(self, cid: str) -> list[str]:
        errors = []
        for isolator in reversed(self.isolators):
            try:
                await isolator.cleanup_async(cid)
            except Exception as exc:  # noqa: BLE001 - carry on: every isolator gets its cleanup
                log.error("Failed to clean up isolator %s for container %s: %s", isolator.name, cid, exc)
                errors.append(f"{isolator.name}: {exc}")
        return errors

    # wait, remove, update, usage, status -------------------------------------------------------------
    async def wait(self, container_id: str) -> Termination | None:
        container = self.containers.get(container_id)
        if container is None:
            return None
        await container.done.wait()
        return container.termination

    def remove(self, container_id: str) -> None:
        """Forget a terminated container: its checkpoint and its sandbox go (Mesos remove())."""
        container = self.containers.get(container_id)
        if container is not None and container.state != State.TERMINATED:
            raise RuntimeError("Container has not terminated yet")
        self.containers.pop(container_id, None)
        self.checkpoints.remove(container_id)

    def update(self, container_id: str, resources: Resources, spec_hash: str) -> None:
        """Apply new resources in place; unknown or terminating containers are ignored (as Mesos)."""
        container = self.containers.get(container_id)
        if container is None or container.state != State.RUNNING:
            return
        applied: list[Isolator] = []
        updated = dataclasses.replace(container.config, spec_hash=spec_hash,
                                      spec=container.config.spec.model_copy(update={"resources": resources}))
        try:
            for isolator in self.isolators:
                applied.append(isolator)   # restored too if it fails half way (updates are idempotent)
                isolator.update(container_id, resources)
            self.checkpoints.write_config(updated)
        except BaseException:
            # All or nothing: the checkpointed spec keeps the old resources, so must the kernel.
            for isolator in reversed(applied):
                try:
                    isolator.update(container_id, container.config.spec.resources)
                except Exception as exc:  # noqa: BLE001
                    log.error("Failed to restore the resources of container %s in %s: %s",
                              container_id, isolator.name, exc)
            raise
        container.config.spec, container.config.spec_hash = updated.spec, spec_hash

    def usage(self, container_id: str) -> ResourceStatistics:
        """Mesos's usage(): every isolator's figures of the container, its limits, when they were taken.
        A figure that is not measured is absent (an isolator that fails is skipped, as in Mesos)."""
        container = self.containers.get(container_id)
        if container is None:
            raise KeyError(f"Unknown container {container_id}")
        parts: list[tuple[str, dict[str, Any]]] = []
        for isolator in self.isolators:
            try:
                parts.append((isolator.name, isolator.usage(container_id)))
            except Exception as exc:  # noqa: BLE001 - Mesos skips a failed isolator's usage with a warning
                log.debug("usage of %s from %s failed: %s", container_id, isolator.name, exc)
        parts.append(("limits", {"timestamp": time.time(), **resource_limits(container.config.spec.resources)}))
        try:
            return ResourceStatistics.model_validate({k: v for _, part in parts for k, v in part.items()})
        except ValidationError:
            # One isolator's figures that are not ResourceStatistics (a bug) cost only those figures.
            statistics: dict[str, Any] = {}
            for name, part in parts:
                try:
                    ResourceStatistics.model_validate(part)
                except ValidationError as exc:
                    log.warning("usage of %s from %s is not ResourceStatistics, left out: %s", container_id, name,
                                str(exc).replace("\n", " ")[:300])
                    continue
                statistics.update(part)
            return ResourceStatistics.model_validate(statistics)

    def status(self, container_id: str) -> dict[str, Any]:
        container = self.containers.get(container_id)
        if container is None:
            raise KeyError(f"Unknown container: {container_id}")
        doc: dict[str, Any] = {"container_id": container_id, "executor_pid": container.pid}
        security: dict[str, Any] = {}
        for isolator in self.isolators:
            try:
                part = isolator.status(container_id)
            except Exception as exc:  # noqa: BLE001
                log.debug("status of %s from %s failed: %s", container_id, isolator.name, exc)
                continue
            # The security profile has a part from each isolator that applies one (capabilities, seccomp, devices...).
            security.update(part.pop("security", None) or {})
            doc.update(part)
        if security:
            doc["security"] = security
        return doc
