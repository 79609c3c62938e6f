"""A name's status document, composed from what the loop knows of it: its current container (and what
the containerizer's isolators say of it), its last launch failure or image pull, its manifest's
problems. reconciler.loop decides; this says what the decisions look like to an operator.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from reconciler.containerizer import Container, State, resource_limits
from reconciler.models import ResourceStatistics
from reconciler.source import InvalidDocument, Listing
from reconciler.status import iso
from reconciler.units import format_bytes_approx


@dataclass
class LaunchFailure:
    spec_hash: str
    message: str
    permanent: bool
    step: int = 0
    retry_at: float = 0.0
    reason: str = "LaunchFailed"
    waits_for_release: bool = False    # retried when a destroy gives a node resource back, not on a timer
    failed: bool = False               # shown Failed while waiting to retry (an image that could not be provisioned)
    image: tuple[str, str] | None = None   # (reference, image id) when the image was provisioned before the failure


@dataclass
class PullState:
    """The name's image while a launch pulls it, or (state Failed) why the last pull failed."""
    image: str
    registry: str | None
    started_at: float
    spec_hash: str = ""          # of the spec it pulls for
    bytes_done: int = 0
    bytes_total: int = 0
    published_at: float = 0.0
    publish_pending: bool = False
    failed: dict[str, Any] | None = None      # http_status, code, error of a failed pull

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"image": self.image, "state": "Failed" if self.failed else "Pulling",
                               "registry": self.registry, "started_at": iso(self.started_at),
                               "bytes_done": self.bytes_done, "bytes_total": self.bytes_total}
        doc.update(self.failed or {})
        return {k: v for k, v in doc.items() if v is not None}

    def condition(self) -> tuple[bool, str, str]:
        if self.failed:
            return False, "PullFailed", self.failed["error"]
        where = f" from {self.registry}" if self.registry else ""
        if self.bytes_total:
            return True, "Pulling", (f"Pulling image '{self.image}'{where}: {format_bytes_approx(self.bytes_done)} of "
                                     f"{format_bytes_approx(self.bytes_total)}")
        return True, "Pulling", f"Pulling image '{self.image}'{where}"


@dataclass
class NameState:
    container: Container | None = None
    failure: LaunchFailure | None = None
    update_refused: tuple[str, str] | None = None   # (spec hash, message)
    destroy_retry: tuple[int, float] = (0, 0.0)     # after failed kills: (failures, when to try again)
    statistics: ResourceStatistics | None = None
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    phase: str | None = None          # as last published (what _agent.json counts)
    pull: PullState | None = None     # its image while a launch pulls it, or the last pull's failure
    requeue_at: float | None = None   # when its last reconcile asked to be looked at again (a restart's backoff)
    prefetched: tuple[str, float] | None = None   # (spec hash, when): a replacement's image, pulled ahead


def kept_by(manifest: str, listing: Listing) -> InvalidDocument | None:
    """The unreadable file or nameless document that may declare a name nothing else declares.

    No name can be read from it, so it may declare any: a file renamed and then half written, or a
    document whose name was mistyped. Its own file first (the manifest that last declared the name),
    then any other; while one is listed, names that no valid document declares are kept."""
    if not listing.invalid_files:
        return None
    return next((f for f in listing.invalid_files if f.manifest == manifest), listing.invalid_files[0])


def compose(name: str, state: NameState, listing: Listing | None, isolator_names: list[str],
            container_status: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The status document of a name: its container, its launch failure or pull, its manifest's problems."""
    container = state.container
    invalid = listing.invalid.get(name) if listing else None
    if invalid is None and listing is not None and container is not None and name not in listing.desired:
        invalid = kept_by(container.config.manifest, listing)
    doc: dict[str, Any] = {
        "apiVersion": "reconciler/v1", "kind": "ContainerStatus", "name": name,
        "container_id": None, "manifest": None, "spec_hash": None, "phase": "Pending",
        "pid": None, "started_at": None, "restarts": 0, "exit_code": None, "exit_signal": None,
        "reason": "", "message": "", "conditions": [], "isolators": list(isolator_names),
    }
    desired = listing.desired.get(name) if listing else None
    if desired is not None:
        doc["manifest"], doc["spec_hash"] = desired.manifest, desired.spec_hash
    if container is not None:
        config = container.config
        doc.update(container_id=container.id, manifest=config.manifest, spec_hash=config.spec_hash,
                   restarts=config.restarts, started_at=container.started_at_iso)
        doc["phase"], doc["reason"], doc["message"] = container_phase(state, container)
        if container.alive:
            doc["pid"] = container.pid
        elif container.termination is not None:
            doc["exit_code"] = container.termination.exit_code
            doc["exit_signal"] = container.termination.exit_signal
        if config.image is not None:
            doc["image"], doc["image_id"] = config.image.reference, config.image.id
        if container.state != State.TERMINATED:
            try:
                doc.update(container_status(container.id) | {})
            except KeyError:
                pass
            doc.pop("executor_pid", None)
            doc["container_id"] = container.id
        if state.statistics is not None and container.alive:
            doc["statistics"] = state.statistics.model_dump(mode="json")
        elif container.alive:
            doc["statistics"] = resource_limits(config.spec.resources)
    elif invalid is not None:
        doc["phase"], doc["message"] = "Invalid", invalid.message
        doc["manifest"] = invalid.manifest
    if state.failure is not None and (container is None or not container.alive):
        failure = state.failure
        if failure.image is not None:
            doc["image"], doc["image_id"] = failure.image
        doc["phase"] = "Failed" if failure.permanent or failure.waits_for_release or failure.failed else "Pending"
        doc["reason"] = failure.reason
        doc["message"] = failure.message
        if failure.waits_for_release:
            doc["message"] += " (retried as soon as a container's destroy frees one)"
        elif not failure.permanent:
            doc["message"] += f" (retrying at {iso(failure.retry_at)})"
    if state.update_refused and container is not None and container.alive:
        doc["message"] = state.update_refused[1]
    if state.pull is not None:
        # Also beside a running container whose replacement's image is pulled (it keeps running meanwhile).
        doc["pull"] = state.pull.doc()
        if not state.pull.failed and (container is None or not container.alive):
            doc["phase"], doc["reason"] = "Pending", "Pulling"
            doc["message"] = state.pull.condition()[2]
    doc["conditions"] = conditions(state, doc, invalid, listing)
    if invalid is not None and doc["phase"] != "Invalid":
        doc["message"] = invalid.message
    return doc

def container_phase(state: NameState, container: Container) -> tuple[str, str, str]:
    """phase, reason and message of a name whose current container is this one."""
    if container.state in (State.PREPARING, State.ISOLATING):
        return "Pending", "", ""
    if container.state == State.RUNNING:
        return "Running", "", ""
    if container.state == State.DESTROYING:
        return "Terminating", "", ""
    termination = container.termination
    assert termination is not None
    reason, message = termination.reason, termination.message
    if not message:
        if termination.exit_signal is not None:
            message = f"Command terminated with signal {signal.Signals(termination.exit_signal).name}" \
                if termination.exit_signal in signal.Signals._value2member_map_ else \
                f"Command terminated with signal {termination.exit_signal}"
        elif termination.exit_code is not None:
            message = f"Command exited with status {termination.exit_code}"
    policy = container.config.spec.restart_policy
    ended = "Succeeded" if termination.succeeded else "Failed"
    if policy == "Never" or (policy == "OnFailure" and termination.succeeded):
        return ended, reason, message
    until = state.requeue_at
    if until is not None and reason != "DestroyFailed":   # that one waits to kill again, not to restart
        return "BackOff", reason or "CrashLoopBackOff", f"{message}; restarting at {iso(until)}".lstrip("; ")
    return ended, reason, message

def conditions(state: NameState, doc: dict[str, Any], invalid: Any, listing: Listing | None) -> list[dict[str, Any]]:
    """Ready, ManifestValid, Pulling, Duplicate: each keeps its `since` while its status stays."""
    wanted = {"Ready": (doc["phase"] == "Running", "", "")}
    if invalid is not None:
        wanted["ManifestValid"] = (False, "InvalidManifest", invalid.message)
    elif doc["phase"] != "Invalid":
        wanted["ManifestValid"] = (True, "", "")
    if state.pull is not None:
        wanted["Pulling"] = state.pull.condition()
    elif doc.get("image_id"):
        wanted["Pulling"] = (False, "Pulled", f"Image '{doc['image']}' is in the store as {doc['image_id']}")
    duplicates = [d.message for d in (listing.duplicates if listing else []) if d.name == doc["name"]]
    if duplicates:
        # The losing declarations have no status file of their own (the name is this one's).
        wanted["Duplicate"] = (True, "DuplicateName", "; ".join(duplicates))
    out = []
    for kind, (status, reason, message) in wanted.items():
        previous = state.conditions.get(kind)
        if previous and previous["status"] == status and previous["reason"] == reason \
                and previous["message"] == message:
            out.append(previous)
            continue
        since = previous["since"] if previous and previous["status"] == status else iso(time.time())
        condition = {"type": kind, "status": status, "reason": reason, "message": message, "since": since}
        state.conditions[kind] = condition
        out.append(condition)
    return out
