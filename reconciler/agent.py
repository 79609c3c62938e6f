"""The agent: wires source, loop, containerizer, launcher and isolators, and runs them until stopped.

Start: build isolators (refusing to start on a bad flag or missing kernel support) → recover →
first listing → reconcile every name. Then every filesystem event in the manifest directory (dot
files included: a ConfigMap's `..data` swap is one) schedules a debounced full re-list; a periodic
resync re-lists anyway. The listing, never the event, is the truth.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler import isolators as isolator_registry
from reconciler.backoff import exponential
from reconciler.checkpoint import Checkpoints
from reconciler.config import AgentConfig
from reconciler.containerizer import Container, Containerizer, State
from reconciler.http import HttpFace
from reconciler.isolators.base import IsolatorSetupError
from reconciler.launcher.base import Launcher, LaunchHelper, missing_pid1
from reconciler.logs import LogRotator, RotationPolicy
from reconciler.loop import Reconciler, container_environment
from reconciler.models import ContainerInfo
from reconciler.source import Listing, ManifestSource
from reconciler.status import StatusWriter, iso

if TYPE_CHECKING:
    from reconciler.images.store import ImageStore

log = logging.getLogger(__name__)

DEBOUNCE_MS = 100       # the longest a burst of events is grouped
STEP_MS = 5             # quiet time that ends a burst (watchfiles' own default debounce is 1.6 s)
HTTP_SWITCH_INTERVAL = 0.001   # the GIL's switch interval while the HTTP face runs (see ProcessTuning)


class ProcessTuning:
    """What the agent's process does while the HTTP face runs, so that its server thread answers while the
    loop is busy.

    The face answers from a thread (reconciler/http.py says why); what delays an answer then is the loop
    holding the GIL, so:
    - the switch interval is HTTP_SWITCH_INTERVAL (1 ms, not 5): each time the server thread comes back
      from a blocking call while the loop computes, it waits at most that long; this costs nothing while
      the loop runs alone;
    - a garbage collection holds the GIL for its whole pass (10-30 ms for a full one over the agent's ~35k
      start-up objects on a small VM): what exists at start (the modules) and once ready (recovered
      containers) is long-lived, so it is moved out of the collector's sight with gc.freeze(), and full
      passes walk only younger objects (the price: a frozen object that later becomes cyclic garbage
      stays, e.g. a recovered container's record once it is replaced, a few KB each).
    """

    def __init__(self) -> None:
        self._switch_interval: float | None = None

    def start(self) -> None:
        gc.freeze()   # the modules
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(HTTP_SWITCH_INTERVAL)

    def ready(self) -> None:
        gc.collect()
        gc.freeze()   # and what recovery and the first listing made

    def stop(self) -> None:
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None


def build_launcher(config: AgentConfig, helper: LaunchHelper) -> Launcher:
    try:
        missing_pid1()
    except FileNotFoundError as exc:
        raise IsolatorSetupError(f"flag --launcher: {exc}") from None
    if config.launcher == "posix":
        from reconciler.launcher.posix import PosixLauncher
        return PosixLauncher(helper)
    from reconciler.launcher.linux import LinuxLauncher
    from reconciler.linux import cgroups
    mounts = cgroups.find_mounts()
    hierarchy = cgroups.unified_hierarchy(mounts) if mounts.unified else cgroups.freezer_hierarchy(mounts)
    if hierarchy is None:
        raise IsolatorSetupError(
            "flag --launcher: the linux launcher needs the cgroup v1 freezer hierarchy or a unified cgroup v2 "
            "hierarchy at /sys/fs/cgroup, and neither is mounted")
    return LinuxLauncher(helper, config.cgroups_root, hierarchy)


def build_image_store(config: AgentConfig) -> ImageStore | None:
    """The local image store with --image_providers=docker (Mesos's docker store), else None."""
    if "docker" not in config.image_providers:
        return None
    from reconciler.images.errors import ImageError
    from reconciler.images.store import ImageStore
    try:
        store = ImageStore.for_agent(config)
    except ImageError as exc:
        from_registry = "--docker_registry" in str(exc) or config.docker_registry_url
        flag = "docker_registry" if from_registry else "docker_store_dir"
        raise IsolatorSetupError(f"flag --{flag}: {str(exc).removeprefix('--docker_registry ')}") from None
    store.clean_leftovers()
    return store


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        # --http_address binds first: a port in use stops the agent like a bad flag, before any isolator
        # touched the host.
        self.http = HttpFace(
            config.http_address, resync_interval=config.resync_interval, work_dir=config.work_dir,
            attributes=config.attributes, started_at=self.started_at, agent_doc=self.agent_doc,
            running_spec=self.running_spec,
        ) if config.http_address else None
        self.tuning = ProcessTuning()
        self.isolators = isolator_registry.create(config)       # IsolatorSetupError: exit 2
        self.helper = LaunchHelper()
        self.launcher = build_launcher(config, self.helper)
        self.checkpoints = Checkpoints(config.containers_path, config.sandboxes_path)
        self.containerizer = Containerizer(self.launcher, self.isolators, self.checkpoints,
                                           image_store=build_image_store(config))
        self.status = StatusWriter(config.status_path)
        default_info = ContainerInfo.model_validate(config.default_container_info) \
            if config.default_container_info else None
        self.source = ManifestSource(config.manifests, node_attributes=config.attributes,
                                     default_container_info=default_info, strict_modes=config.manifests_strict_modes)
        self.reconciler = Reconciler(self.containerizer, self.status, [i.name for i in self.isolators],
                                     container_environment(), observer=self.http)
        self.reconciler.log_rotator = LogRotator(RotationPolicy(
            config.container_logger_max_stdout_size, config.container_logger_max_stderr_size,
            config.container_logger_keep))
        self.watch_mode = "inotify"
        self.last_listed_at: float | None = None
        self.last_reconcile_duration: float | None = None
        self._relist = asyncio.Event()
        self._stop = asyncio.Event()
        self._settling: asyncio.Task[None] | None = None
        self._watching = asyncio.Event()   # set once inotify watches (or polling took over)

    # lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.http is not None:
            self.http.start()
            self.tuning.start()
        self.status.ensure_dir()
        self.helper.start()   # now, not at the first launch: it is one interpreter start-up
        recovered = await self.containerizer.recover()
        for stale in self.reconciler.adopt(recovered):
            await self.containerizer.destroy(stale.id)
            self.containerizer.remove(stale.id)
        await self.relist()
        if self.http is not None:
            self.tuning.ready()
            self.http.set_ready()
        assert self._settling is not None
        await self._settling

    async def relist(self) -> Listing:
        """List, and hand every name to the loop. Does not wait for them: one slow destroy stalls no one."""
        started = time.perf_counter()
        listing = self.source.list()
        self.last_listed_at = time.time()
        self.reconciler.set_listing(listing)
        if self.http is not None:
            self.http.listed(listing, started)
        if self._settling is None or self._settling.done():
            self._settling = asyncio.get_running_loop().create_task(self._settle(started))
        return listing

    async def _settle(self, started: float) -> None:
        """Once the loop is idle: record how long the pass took, collect stale status files, publish _agent.json."""
        await self.reconciler.queue.wait_idle()
        self.reconciler.garbage_collect_status_files()
        self.last_reconcile_duration = time.perf_counter() - started
        if self.http is not None:
            self.http.pass_done(self.last_reconcile_duration)
        self.write_agent_status()

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; containers keep running after."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # Watch before the first listing: a manifest written in between must not wait for a resync.
        tasks = [loop.create_task(self._watch(), name="watch")]
        await self._watching.wait()
        await self.start()
        tasks += [
            loop.create_task(self._relister(), name="relist"),
            loop.create_task(self._resync(), name="resync"),
            loop.create_task(self._statistics(), name="statistics"),
        ]
        await self._stop.wait()
        log.info("Stopping; containers keep running")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_watching()
        if self._settling is not None:
            self._settling.cancel()
        self.close()

    async def once(self) -> list[str]:
        """One pass, then why it did not converge (nothing when every manifest did); containers keep running.

        What it leaves on disk is what is true when it returns. It settles (see _settle_for_exit), and
        only then stops watching: asyncio tears the loop down after `once` (cancelling tasks, shutting its
        executor down) and runs it while doing so, so an exit noticed then would start a destroy that
        fails on the shut-down executor and leaves its status half-way."""
        await self.start()
        problems = await self._settle_for_exit()
        await self._stop_watching()
        if self.reconciler.log_rotator is not None:
            await self.reconciler.log_rotator.wait()    # the rotation the last statistics pass started
        self.close()
        return problems

    async def _settle_for_exit(self) -> list[str]:
        """Until the status files say what is true, then why not every manifest converged.

        Every exit handled, destroy finished and reconcile done; every sandbox measured (a disk limit it
        enforces ends a container: settled like any exit); then the last files are written (statistics,
        _agent.json) and every running container is checked once more, after that write: a command that
        ended meanwhile is handled and the files written again. No await between the last write and
        the answer: nothing can change in between."""
        while True:
            await self._drain()
            if await self._measure_now():
                continue
            self.reconciler.refresh_statistics()
            self.write_agent_status()
            ended = self._ended_unnoticed()
            if not ended:
                return self.reconciler.unconverged()
            await asyncio.gather(*(self.containerizer.destroy(c.id) for c in ended))

    async def _measure_now(self) -> bool:
        """Sandboxes with no figure yet are measured now (`once` ends before any periodic measurement);
        True when one was."""
        measured = 0
        for isolator in self.isolators:
            measured += await isolator.measure_unmeasured()
        return measured > 0

    def _ended_unnoticed(self) -> list[Container]:
        """Containers still Running whose command ended: their init recorded how (it exits right after), or is
        gone. Its exit notice may not have been read yet, or may be arriving just now."""
        return [c for c in self.containerizer.containers.values() if c.state == State.RUNNING and (
            self.checkpoints.read_status(c.id) is not None or c.identity is None or not c.identity.is_alive())]

    async def _stop_watching(self) -> None:
        """Nothing starts after the agent's last word: no exit notice or measurement is handled any more
        (the containers keep running; the next agent recovers them), no restart or retry timer fires."""
        self.containerizer.stop_watching()
        for isolator in self.isolators:
            isolator.close()
        await self.reconciler.queue.stop()

    async def _drain(self) -> None:
        """Until no destroy is under way and the loop is idle: `once` must not leave a phase half-way.

        A container that exits while `once` runs (a short job) is destroyed and reconciled again
        (restart or final phase); the status it leaves on disk is the settled one.
        """
        while True:
            await asyncio.sleep(0)   # let exits already signalled by pidfds start their destroys
            pending = [c.destroy_task for c in self.containerizer.containers.values()
                       if c.destroy_task is not None and not c.destroy_task.done()]
            if not pending and self.reconciler.queue.idle:
                return
            await asyncio.gather(*pending, return_exceptions=True)
            await self.reconciler.queue.wait_idle()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.tuning.stop()
        self.helper.close()

    # event sources ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Any event only schedules a re-list. Falls back to resync-only polling when inotify fails."""
        import watchfiles
        failures = 0      # in a row: the next try waits 1 s, doubling to 20 s
        while not self._stop.is_set():
            if not os.path.isdir(self.config.manifests):
                # Nothing to watch yet: look every second and re-list as soon as it appears.
                self.watch_mode = "polling"
                self._watching.set()
                await asyncio.sleep(min(self.config.resync_interval, 1.0))
                if os.path.isdir(self.config.manifests):
                    self._relist.set()
                continue
            try:
                self.watch_mode = "inotify"
                watched = _identity(self.config.manifests)
                # awatch sets up inotify when first iterated, before it first waits: signal from a
                # task that runs right after that point.
                asyncio.get_running_loop().call_soon(self._watching.set)
                # Every second without events (rust_timeout) it yields an empty set: the moment to
                # notice that the directory itself was replaced (`mv new manifests`, or a symlink
                # re-pointed), which inotify, attached to the old directory, cannot report.
                async for changes in watchfiles.awatch(
                    self.config.manifests, watch_filter=None, debounce=DEBOUNCE_MS, step=STEP_MS,
                    recursive=True, stop_event=self._stop, rust_timeout=1000, yield_on_timeout=True,
                ):
                    if changes:
                        self._relist.set()
                        failures = 0
                    if _identity(self.config.manifests) != watched:
                        log.info("%s was replaced: watching the new directory", self.config.manifests)
                        break
                self._relist.set()
            except (OSError, RuntimeError) as exc:
                self.watch_mode = "polling"
                self._watching.set()
                log.warning("Watching %s failed (%s); relying on --resync_interval", self.config.manifests, exc)
                failures += 1
                await asyncio.sleep(exponential(failures, 1.0, 20.0))

    async def _relister(self) -> None:
        while True:
            await self._relist.wait()
            self._relist.clear()
            await self.relist()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval)
            self._relist.set()

    async def _statistics(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval)
            self.reconciler.refresh_statistics()
            self.write_agent_status()

    def running_spec(self, name: str) -> str | None:
        """The spec hash the live container of `name` runs, None when it has none (what the HTTP face asks)."""
        state = self.reconciler.names.get(name)
        container = state.container if state is not None else None
        return container.config.spec_hash if container is not None and container.alive else None

    # _agent.json -----------------------------------------------------------------------------
    def write_agent_status(self) -> None:
        self.status.write_agent(self.agent_doc(), time.time())

    def agent_doc(self) -> dict[str, Any]:
        listing = self.reconciler.listing
        extra = {i.name: i.agent_status() for i in self.isolators if i.agent_status()}
        invalid_docs = []
        if listing is not None:
            for item in list(listing.invalid.values()) + list(listing.duplicates):
                invalid_docs.append({"file": item.manifest, "document": item.document, "name": item.name,
                                     "error": item.message})
        doc = {
            "apiVersion": "reconciler/v1", "kind": "AgentStatus", "version": __version__, "pid": os.getpid(),
            "started_at": iso(self.started_at), "isolators": [i.name for i in self.isolators],
            "launcher": self.config.launcher, "flags": self.config.public_flags(),
            "manifests_dir": self.config.manifests,
            "source": {
                "ready": bool(listing and listing.ok), "error": listing.error if listing else None,
                "last_listed_at": iso(self.last_listed_at), "files": list(listing.files) if listing else [],
                "watch_mode": self.watch_mode,
            },
            "invalid_files": [{"file": f.manifest, "error": f.message}
                              for f in (listing.invalid_files if listing else [])],
            "invalid_documents": invalid_docs,
            "last_reconcile_duration_secs": self.last_reconcile_duration,
            "counts": self.reconciler.counts(),
            "destroy_errors": self.containerizer.destroy_errors,
            "isolator_status": extra,
        }
        return doc


def _identity(path: str) -> tuple[int, int] | None:
    """Which directory a path names now (symlinks followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
