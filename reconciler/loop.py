"""The reconcile loop: level-triggered convergence of desired (manifests) and observed (containers), per name.

It is handed a name, reads what is desired and what runs, and converges: launch what is missing,
update resources in place, replace on any other change, destroy what no manifest declares any more,
restart what died (restart policy and CrashLoopBackOff). What a failure means is in its type
(reconciler.errors), read in one place, `launch_failure`: permanent (recorded in status, not retried
until the spec changes), waiting for a node resource, or temporary (retried with backoff). `reconcile`
returns when the name wants looking at again; the work queue schedules it, and backs off a name whose
reconcile raised.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from reconciler.backoff import exponential
from reconciler.containerizer import NOT_STARTED, Container, Containerizer, State
from reconciler.errors import PermanentError, ReconcileError, ResourceExhaustedError, TemporaryError
from reconciler.images.errors import ImageError
from reconciler.isolators.base import ContainerConfig
from reconciler.linux import DEFAULT_PATH
from reconciler.logs import LogRotator
from reconciler.models import ContainerSpec, Image, ResourceStatistics
from reconciler.source import Listing
from reconciler.status import StatusWriter
from reconciler.status.compose import LaunchFailure, NameState, PullState, compose, kept_by
from reconciler.workqueue import WorkQueue

log = logging.getLogger(__name__)

# CrashLoopBackOff, as kubelet: the first restart is immediate, then 10 s doubling to 300 s; a run of
# 10 minutes resets it.
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0
# Temporary errors (a fork that failed, a busy cgroup): 1 s doubling to 60 s.
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
PULL_PROGRESS_EVERY = 0.5    # seconds between two status writes of a pull's progress


def image_of(spec: ContainerSpec) -> Image | None:
    container = spec.container
    return container.mesos.image if container is not None and container.mesos is not None else None


def restart_delay(step: int) -> float:
    return exponential(step, BACKOFF_INITIAL, BACKOFF_MAX)


def retry_delay(step: int) -> float:
    """Before the step-th retry of a temporary failure (a launch, a destroy, an update)."""
    return exponential(step, RETRY_INITIAL, RETRY_MAX)


def temporary_delay(exc: BaseException, step: int) -> float:
    """The wait before retrying after a temporary failure: the delay it names, else the backoff's."""
    return exc.delay if isinstance(exc, TemporaryError) and exc.delay is not None else retry_delay(step)


@dataclass
class Target:
    """What a name should run: the manifest's spec, or its last good spec while the manifest is broken."""
    spec: ContainerSpec
    spec_hash: str
    resources_free_hash: str
    manifest: str


# The decision, as pure functions of desired and observed state: the loop acts on them, and
# `reconciler plan` reports them, so the two cannot disagree.
class Action(str, enum.Enum):
    NONE = "none"
    CREATE = "create"
    UPDATE = "update"      # resources changed only: applied in place, nothing restarts
    REPLACE = "replace"    # any other change: the old container is destroyed, a new one launched
    DESTROY = "destroy"    # no manifest declares the name any more
    RESTART = "restart"    # it exited and its restart policy restarts it (perhaps after a back-off)


@dataclass(frozen=True)
class RestartPlan:
    at: float      # when it may be launched again (CrashLoopBackOff)
    step: int      # the back-off step this restart is at


def may_still_declare(name: str, manifest: str, listing: Listing, listed_ok: bool) -> bool:
    """A name missing from `listing.desired` whose container must be kept (with its last good spec)."""
    if not (listing.ok and listed_ok):
        return True   # a missing or unreadable directory is not an empty desired state
    if name in listing.invalid:
        return True
    return kept_by(manifest, listing) is not None


def target_of(name: str, container: Container | None, listing: Listing, listed_ok: bool) -> Target | None:
    """What `name` should run: its manifest's spec, the last good one while that manifest is broken,
    or None when nothing declares it any more."""
    desired = listing.desired.get(name)
    if desired is not None:
        return Target(desired.spec, desired.spec_hash, desired.resources_free_hash, desired.manifest)
    if container is not None and may_still_declare(name, container.config.manifest, listing, listed_ok):
        config = container.config
        return Target(config.spec, config.spec_hash, config.resources_free_hash, config.manifest)
    return None


def converge_action(container: Container | None, target: Target) -> Action:
    """What converging a declared name does to its current container (after a failed destroy is retried)."""
    if container is None:
        return Action.CREATE
    if container.alive:
        if container.config.spec_hash == target.spec_hash:
            return Action.NONE
        if container.state == State.RUNNING and container.config.resources_free_hash == target.resources_free_hash:
            return Action.UPDATE
        return Action.REPLACE
    if container.state == State.DESTROYING:
        return Action.NONE   # its destroy ends with another wake-up of the name
    if container.config.spec_hash != target.spec_hash:
        return Action.REPLACE
    return Action.RESTART if restart_plan(container, target.spec.restart_policy) is not None else Action.NONE


def restart_plan(container: Container, policy: str) -> RestartPlan | None:
    """When an exited container is launched again, or None when its restart policy keeps it down."""
    termination = container.termination
    assert termination is not None
    if termination.reason == NOT_STARTED:
        return RestartPlan(at=termination.finished_at, step=container.config.backoff_step)
    if policy == "Never" or (policy == "OnFailure" and termination.succeeded):
        return None
    ran = termination.finished_at - (container.started_at or termination.finished_at)
    step = 0 if ran >= BACKOFF_RESET_AFTER else container.config.backoff_step
    return RestartPlan(at=termination.finished_at + restart_delay(step), step=step)


def launch_failure(exc: BaseException, spec_hash: str, previous: LaunchFailure | None, now: float,
                   image: tuple[str, str] | None) -> LaunchFailure:
    """What a failed launch means, from the error's type alone (reconciler.errors): the one place the loop
    decides whether and when a launch is tried again."""
    reason = exc.reason if isinstance(exc, ReconcileError) else LaunchFailure.reason
    if isinstance(exc, PermanentError):
        return LaunchFailure(spec_hash, str(exc), permanent=True, reason=reason, image=image)
    if isinstance(exc, ResourceExhaustedError):
        return LaunchFailure(spec_hash, str(exc), permanent=False, reason=reason, waits_for_release=True,
                             image=image)
    step = previous.step + 1 if previous is not None else 1
    delay = temporary_delay(exc, step)
    return LaunchFailure(spec_hash, f"Failed to launch container: {exc}", permanent=False, step=step,
                         retry_at=now + delay, reason=reason,
                         failed=isinstance(exc, ReconcileError) and exc.shows_failed, image=image)


class StatusObserver(Protocol):
    """Who the loop tells what it did (the HTTP face: /state, /metrics, watchers of status changes)."""

    def published(self, name: str, doc: dict[str, Any], now: float) -> None:
        """A name's status document changed (and was written)."""

    def forgotten(self, name: str) -> None:
        """A name is gone: no manifest declares it and its container is destroyed."""

    def reconciled(self, seconds: float, result: str) -> None:
        """One reconcile took this long; result: ok, failed (a launch failure recorded) or error."""


class _NobodyReads:
    def published(self, name: str, doc: dict[str, Any], now: float) -> None:
        return None

    def forgotten(self, name: str) -> None:
        return None

    def reconciled(self, seconds: float, result: str) -> None:
        return None


class Reconciler:
    def __init__(self, containerizer: Containerizer, status: StatusWriter, isolator_names: list[str],
                 environment: dict[str, str], observer: StatusObserver | None = None) -> None:
        self.containerizer = containerizer
        self.status = status
        self.isolator_names = isolator_names
        self.environment = environment
        self.listing: Listing | None = None
        self.listed_ok = False            # a successful listing happened: absence now means "gone"
        self.names: dict[str, NameState] = {}
        self.queue = WorkQueue(self._timed_reconcile)
        self.observer: StatusObserver = observer or _NobodyReads()
        self.log_rotator: LogRotator | None = None     # set by the agent (--container_logger_*)
        containerizer.attach(self)

    # inputs -----------------------------------------------------------------------------------
    def adopt(self, containers: list[Container]) -> list[Container]:
        """Recovered containers become each name's current one (the newest); returns the stale rest."""
        stale = []
        for container in sorted(containers, key=lambda c: c.config.created_at):
            state = self.names.setdefault(container.config.name, NameState())
            if state.container is not None:
                stale.append(state.container)
            state.container = container
            state.statistics = self._first_statistics(container)
        return stale

    def set_listing(self, listing: Listing) -> None:
        """A new listing: every name it or we know of is looked at again (level-triggered)."""
        self.listing = listing
        if listing.ok:
            self.listed_ok = True
        for name in set(listing.desired) | set(listing.invalid) | set(self.names):
            self.queue.add(name)

    def container_changed(self, container: Container) -> None:
        name = container.config.name
        state = self.names.get(name)
        if state is not None and state.container is container:
            self.publish(name)
            self.queue.add(name)
        if container.state == State.TERMINATED:
            # Its isolators' cleanup gave back what it held (a net_cls handle, an XFS project id).
            for other, other_state in self.names.items():
                if other_state.failure is not None and other_state.failure.waits_for_release:
                    self.queue.add(other)

    def container_status_changed(self, container: Container) -> None:
        state = self.names.get(container.config.name)
        if state is not None and state.container is container:
            self.publish(container.config.name)

    # the reconcile of one name ------------------------------------------------------------------
    async def _timed_reconcile(self, name: str) -> float | None:
        """reconcile(), timed and its result counted (ok; failed: a launch failure recorded; error); returns
        when the name wants looking at again (the work queue's business)."""
        started = time.perf_counter()
        result = "error"
        try:
            requeue_after = await self.reconcile(name)
            state = self.names.get(name)
            result = "failed" if state is not None and state.failure is not None else "ok"
            return requeue_after
        finally:
            self.observer.reconciled(time.perf_counter() - started, result)

    async def reconcile(self, name: str) -> float | None:
        """Converge one name; returns in how many seconds it wants looking at again (a restart's backoff,
        a launch's retry, a failed destroy's), or None. An exception is a bug: the work queue logs it and
        tries the name again with backoff."""
        listing = self.listing
        if listing is None:
            return None
        state = self.names.setdefault(name, NameState())
        container = state.container
        target = target_of(name, container, listing, self.listed_ok)
        if target is None and container is not None:
            return await self._retire(name, state, container)
        if target is None:
            if name in listing.invalid:
                self.publish(name)
            else:
                self._forget(name)
            return None
        requeue_after = await self._converge(name, state, target)
        state.requeue_at = time.time() + requeue_after if requeue_after is not None else None
        self.publish(name)
        return requeue_after

    async def _converge(self, name: str, state: NameState, target: Target) -> float | None:
        if state.failure is not None and state.failure.spec_hash != target.spec_hash:
            state.failure = None     # of a spec no longer wanted (a rollout reverted): it says nothing now
        if state.pull is not None and state.pull.failed and state.pull.spec_hash != target.spec_hash:
            state.pull = None
        container = state.container
        if container is not None and container.config.spec_hash == target.spec_hash \
                and container.config.manifest != target.manifest:
            # Same spec from another file (a rename): nothing restarts, but the file that now declares
            # the name is the one whose breakage must keep it alive.
            container.config.manifest = target.manifest
            self.containerizer.checkpoints.write_config(container.config)
        if container is not None and container.destroy_failed:
            retry = await self._destroy(container, reason="", message="")
            if retry is not None:
                return retry   # nothing restarts beside processes that may have survived
        action = converge_action(container, target)
        if action == Action.NONE:
            return None
        if action == Action.UPDATE:
            assert container is not None
            return self._update_in_place(name, state, container, target)
        if action == Action.RESTART:
            assert container is not None
            return await self._maybe_restart(name, state, container, target)
        if action == Action.REPLACE:
            assert container is not None
            if container.alive:
                ready, requeue_after = await self._pull_before_replacing(name, state, container, target)
                if not ready:
                    return requeue_after
                retry = await self._destroy(container, reason="Replaced",
                                            message="The manifest changed: replacing the container")
                if retry is not None:
                    return retry
            self.containerizer.remove(container.id)
            state.container = None
        return await self._launch(name, state, target, restarts=0, backoff_step=0)

    def _update_in_place(self, name: str, state: NameState, container: Container, target: Target) -> float | None:
        if state.update_refused and state.update_refused[0] == target.spec_hash:
            return None
        try:
            self.containerizer.update(container.id, target.spec.resources, target.spec_hash)
        except PermanentError as exc:
            state.update_refused = (target.spec_hash, f"Failed to update resources: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - temporary, whatever it is: try again soon
            delay = temporary_delay(exc, 1)
            log.warning("Failed to update resources of %s: %s; retrying", name, exc)
            return delay
        container.config.manifest = target.manifest
        state.update_refused = None
        log.info("Updated resources of %s in place", name)
        return None

    async def _maybe_restart(self, name: str, state: NameState, container: Container,
                             target: Target) -> float | None:
        plan = restart_plan(container, target.spec.restart_policy)
        if plan is None:
            return None
        ready_at, step = plan.at, plan.step
        now = time.time()
        if now < ready_at:
            return ready_at - now
        restarts, step = container.config.restarts + 1, step + 1
        if container.termination is not None and container.termination.reason == NOT_STARTED:
            restarts, step = container.config.restarts, container.config.backoff_step   # its command never ran
        return await self._launch(name, state, target, restarts=restarts, backoff_step=step, previous=container)

    async def _launch(self, name: str, state: NameState, target: Target, restarts: int, backoff_step: int,
                      previous: Container | None = None) -> float | None:
        failure = state.failure
        if failure is not None and failure.spec_hash != target.spec_hash:
            state.failure = failure = None
        now = time.time()
        if failure is not None:
            if failure.permanent:
                return None   # until the spec changes
            if now < failure.retry_at:    # (one waiting for a node resource tries at each wake-up)
                return failure.retry_at - now
        cid = str(uuid.uuid4())
        config = ContainerConfig(
            container_id=cid, name=name, manifest=target.manifest, spec=target.spec, spec_hash=target.spec_hash,
            resources_free_hash=target.resources_free_hash, sandbox=self.containerizer.checkpoints.sandbox(cid),
            restarts=restarts, backoff_step=backoff_step, created_at=now,
        )
        try:
            try:
                await self._provision(name, state, config)
                container = await self.containerizer.launch(config, self.environment)
            finally:
                provisioned = (config.image.reference, config.image.id) if config.image is not None else None
        except Exception as exc:  # noqa: BLE001 - what it means is in its type: launch_failure decides
            state.failure = failure = launch_failure(exc, target.spec_hash, failure, now, provisioned)
            unkilled = self.containerizer.containers.get(cid)
            if unkilled is not None and unkilled.destroy_failed:
                # Its processes could not be killed: the name's container now, destroyed again (with
                # backoff, as any failed destroy) before anything else runs under its name.
                if previous is not None:
                    self.containerizer.remove(previous.id)
                state.container = unkilled
                state.destroy_retry = (1, now + retry_delay(1))
                log.error("Failed to launch %s, and to kill what it started: %s", name, exc)
                return retry_delay(1)
            if failure.permanent:
                log.error("Failed to launch %s: %s", name, exc)
                return None
            if failure.waits_for_release:
                log.warning("Failed to launch %s: %s (retrying when a container's destroy frees one)", name, exc)
                return None
            log.warning("Failed to launch %s (retrying in %.0fs): %s", name, failure.retry_at - now, exc)
            return failure.retry_at - now
        state.failure = None
        state.update_refused = None
        state.container = container
        state.statistics = self._first_statistics(container)
        if previous is not None:
            self.containerizer.remove(previous.id)
        log.info("Launched %s as container %s (pid %s)", name, container.id, container.pid)
        return None

    async def _provision(self, name: str, state: NameState, config: ContainerConfig) -> None:
        """The container's image, pulled (or found in the store) with its progress in the name's status."""
        image = image_of(config.spec)
        if image is None:
            state.pull = None
            return
        # A replacement's image was pulled (and its tag resolved) just before: that resolution holds.
        since = state.prefetched[1] if state.prefetched is not None and state.prefetched[0] == config.spec_hash \
            else None
        await self._pulling(name, state, image, config.spec_hash,
                            lambda progress: self.containerizer.provision(config, progress, resolved_since=since))

    async def _pull_before_replacing(self, name: str, state: NameState, container: Container,
                                     target: Target) -> tuple[bool, float | None]:
        """A replacement that runs another image pulls it while the container it replaces still runs, so a
        rollout costs a service only the restart, and an image that cannot be pulled costs it nothing:
        (ready, when to look again). Failures are retried as a launch's are (launch_failure)."""
        image = image_of(target.spec)
        running = container.config.image.reference if container.config.image is not None else None
        if image is None or image.docker.name == running:
            return True, None      # (without an image store, prefetch refuses: the running one is kept)
        failure = state.failure if state.failure is not None and state.failure.spec_hash == target.spec_hash else None
        now = time.time()
        if failure is not None:
            if failure.permanent:
                return False, None
            if now < failure.retry_at:
                return False, failure.retry_at - now
        try:
            await self._pulling(name, state, image, target.spec_hash,
                                lambda progress: self.containerizer.prefetch(image, progress))
        except Exception as exc:  # noqa: BLE001 - what it means is in its type: launch_failure decides
            state.failure = failure = launch_failure(exc, target.spec_hash, failure, now, None)
            log.warning("Keeping %s running: the image of its replacement could not be pulled: %s", name, exc)
            return False, None if failure.permanent else failure.retry_at - now
        state.failure = None
        state.prefetched = (target.spec_hash, now)
        return True, None

    async def _pulling(self, name: str, state: NameState, image: Image, spec_hash: str,
                       pull: Callable[[Callable[[int, int], None]], Awaitable[None]]) -> None:
        """Run a pull of the name's image with its progress, then its failure, in the name's status."""
        store = self.containerizer.image_store
        registry = store.registry.host if store is not None and store.registry is not None else None
        pulling = state.pull = PullState(image.docker.name, registry, time.time(), spec_hash)
        self.publish(name)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:    # the pulling thread's
            loop.call_soon_threadsafe(self._pull_progress, name, pulling, done, total)

        try:
            await pull(progress)
        except ImageError as exc:
            if state.pull is pulling:   # what the status shows until the next try (a RegistryError's status and code)
                pulling.failed = {"error": str(exc), "http_status": getattr(exc, "status", None),
                                  "code": getattr(exc, "code", None)}
            raise
        except BaseException:
            if state.pull is pulling:
                state.pull = None
            raise
        if state.pull is pulling:
            state.pull = None

    def _pull_progress(self, name: str, pull: PullState, done: int, total: int) -> None:
        state = self.names.get(name)
        if state is None or state.pull is not pull or pull.failed:
            return
        pull.bytes_done, pull.bytes_total = done, total
        wait = pull.published_at + PULL_PROGRESS_EVERY - time.monotonic()
        if wait <= 0 or done == total:
            pull.published_at = time.monotonic()
            self.publish(name)
        elif not pull.publish_pending:     # the last figures of a burst are written too, a moment later
            pull.publish_pending = True
            asyncio.get_running_loop().call_later(wait, self._publish_pull, name, pull)

    def _publish_pull(self, name: str, pull: PullState) -> None:
        pull.publish_pending = False
        state = self.names.get(name)
        if state is not None and state.pull is pull:
            pull.published_at = time.monotonic()
            self.publish(name)

    async def _destroy(self, container: Container, reason: str, message: str) -> float | None:
        """Destroy gracefully; None when done, else when to try again (some process could not be killed)."""
        name = container.config.name
        state = self.names.setdefault(name, NameState())
        failures, retry_at = state.destroy_retry
        now = time.time()
        if container.destroy_failed and now < retry_at:
            return retry_at - now
        if container.alive or container.state == State.DESTROYING or container.destroy_failed:
            await self.containerizer.destroy(container.id, grace=container.config.spec.kill_grace_period,
                                             reason=reason, message=message)
        if container.destroy_failed:
            # Something may have survived: keep its checkpoint and its status (which says why).
            delay = retry_delay(failures + 1)
            state.destroy_retry = (failures + 1, time.time() + delay)
            return delay
        state.destroy_retry = (0, 0.0)
        return None

    async def _retire(self, name: str, state: NameState, container: Container) -> float | None:
        """The manifest that declared this name is gone: destroy gracefully, forget, remove the status file."""
        log.info("Destroying %s: no manifest declares it any more", name)
        retry = await self._destroy(container, reason="Removed",
                                    message="No manifest declares this container any more")
        if retry is not None:
            return retry
        self.containerizer.remove(container.id)
        state.container = None
        self._forget(name)
        return None

    def _forget(self, name: str) -> None:
        self.names.pop(name, None)
        self.status.remove(name)
        self.observer.forgotten(name)

    # status -----------------------------------------------------------------------------------
    def phase(self, name: str) -> str | None:
        state = self.names.get(name)
        return self.compose(name, state)["phase"] if state is not None else None

    def publish(self, name: str) -> None:
        state = self.names.get(name)
        if state is None:
            return
        doc = self.compose(name, state)
        state.phase = doc["phase"]
        now = time.time()
        if self.status.write(name, doc, now):
            self.observer.published(name, doc, now)

    def compose(self, name: str, state: NameState) -> dict[str, Any]:
        return compose(name, state, self.listing, self.isolator_names, self.containerizer.status)

    def _first_statistics(self, container: Container) -> ResourceStatistics | None:
        """A first usage reading of a container that just started or was recovered, so that its status and
        /monitor/statistics show it from its first moment rather than from the next statistics pass (up to
        --resync_interval later). Cheap enough for the loop: a few cgroup files, or the /proc table the
        posix isolators share; disk figures are the last measured ones, never a walk."""
        if container.state != State.RUNNING:
            return None
        try:
            return self.containerizer.usage(container.id)
        except KeyError:
            return None

    def refresh_statistics(self) -> None:
        """One usage pass over every running container (the figures in each status file), and a log
        rotation pass over their sandboxes (in a thread: see reconciler.logs)."""
        sandboxes = []
        for name, state in list(self.names.items()):
            container = state.container
            if container is None or container.state != State.RUNNING:
                continue
            sandboxes.append(container.config.sandbox)
            try:
                state.statistics = self.containerizer.usage(container.id)
            except KeyError:
                continue
            self.publish(name)
        if self.log_rotator is not None:
            self.log_rotator.check(sandboxes)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self.names.values():
            if state.phase is not None:
                counts[state.phase] = counts.get(state.phase, 0) + 1
        return counts

    def unconverged(self) -> list[str]:
        """Why `once` did not converge (every manifest Running or Succeeded, none invalid), a line each:
        the listing's problems, then each name not Running or Succeeded with its phase and message."""
        listing = self.listing
        if listing is None:
            return ["the manifest directory was never listed"]
        if not listing.ok:
            return [listing.error or "the manifest directory could not be listed"]
        problems = [item.message for item in [*listing.invalid_files, *listing.invalid.values(), *listing.duplicates]]
        for name in listing.desired:
            state = self.names.get(name)
            doc = self.compose(name, state) if state is not None else {"phase": "Pending", "message": ""}
            if doc["phase"] not in ("Running", "Succeeded"):
                problems.append(f"{name}: {doc['phase']}" + (f": {doc['message']}" if doc["message"] else ""))
        return problems

    def garbage_collect_status_files(self) -> None:
        """Status files of names nobody knows (left by an earlier run); only after a good listing."""
        if not self.listed_ok:
            return
        for name in self.status.names_on_disk() - set(self.names):
            if self.listing is not None and name not in self.listing.invalid:
                self.status.remove(name)


PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ")


def container_environment() -> dict[str, str]:
    """What every command starts from, before MESOS_SANDBOX and the manifest's variables.

    Unlike a Mesos executor, a container does not inherit the agent's whole environment (it may hold
    credentials, and it would make a container's behaviour depend on how the agent was started): only
    the locale, the time zone and PATH pass, as kubelet passes none of its own.
    """
    env = {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env
