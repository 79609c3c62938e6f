"""`reconciler plan`: what a reconcile would do now, per container, without touching anything (as `nomad job plan`).

It lists the manifests as the agent does (same source, same --attributes and --default_container_info),
observes containers as recovery would, but read-only: checkpoints under work_dir and /proc, never a
cgroup, a process or a file write. Each name then goes through the loop's own decision functions
(reconciler.loop.target_of, converge_action, restart_plan), so the plan and the agent cannot disagree.

Exit status: 0 nothing would change, 2 something would, 1 an error (an invalid or duplicate
manifest, a manifest directory that cannot be listed, a bad flag): CI pipelines can tell them apart.

What it cannot see: the running agent's memory (a launch that failed permanently and waits for a
spec change, a refused update, a retry timer); the status file's message is shown for those.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from reconciler.checkpoint import Checkpoints
from reconciler.config import AgentConfig
from reconciler.containerizer import Container, State, Termination
from reconciler.linux import proc
from reconciler.loop import Action, Target, converge_action, restart_plan, target_of
from reconciler.models import ContainerInfo
from reconciler.source import Listing, ManifestSource
from reconciler.status import StatusWriter, iso

EXIT_NO_CHANGES = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2


class PlanError(Exception):
    """Observed state cannot be read: one line for the operator."""


@dataclass
class PlannedAction:
    name: str
    action: Action
    observed: str                  # what runs now, in words: "running", "exited 1", "absent"
    detail: str
    container_id: str | None = None
    manifest: str | None = None
    phase: str | None = None       # as the status file says
    restart_at: float | None = None
    changed_fields: list[str] = field(default_factory=list)

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "action": self.action.value, "observed": self.observed, "detail": self.detail,
                "container_id": self.container_id, "manifest": self.manifest, "phase": self.phase,
                "restart_at": iso(self.restart_at), "changed_fields": self.changed_fields}


@dataclass
class Plan:
    actions: list[PlannedAction]
    errors: list[dict[str, Any]]   # invalid documents and files, duplicates, a listing error

    @property
    def changes(self) -> bool:
        return any(a.action != Action.NONE for a in self.actions)

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_ERROR
        return EXIT_CHANGES if self.changes else EXIT_NO_CHANGES

    def to_doc(self) -> dict[str, Any]:
        return {"changes": self.changes, "containers": [a.to_doc() for a in self.actions], "errors": self.errors}


# Observing, read-only ---------------------------------------------------------------------------

def observe(config: AgentConfig) -> dict[str, Container]:
    """Each name's current container as recovery would adopt it (the newest), from checkpoints alone.

    A checkpointed init that is no longer alive counts as ended (recovery would destroy it, and its
    `status` checkpoint says how it ended); one that never forked is ignored (recovery removes it).
    """
    checkpoints = Checkpoints(config.containers_path, config.sandboxes_path)
    boot_id = proc.boot_id()
    current: dict[str, Container] = {}
    try:
        ids = checkpoints.ids()
    except OSError as exc:
        raise PlanError(f"cannot read the checkpoints in {config.containers_path}: {exc.strerror} "
                        f"(run plan as the agent's user, with its --work_dir)") from None
    for cid in ids:
        try:
            container_config = checkpoints.read_config(cid)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is an orphan to recovery
            continue
        if container_config is None:
            continue
        pid_doc = checkpoints.read_pid(cid)
        termination_doc = checkpoints.read_termination(cid)
        container = Container(config=container_config, state=State.RUNNING)
        container.started_at = pid_doc.get("started_at") if pid_doc else None
        if termination_doc is not None:
            container.state = State.TERMINATED
            container.termination = Termination.from_doc(termination_doc)
        elif pid_doc is None:
            continue
        else:
            identity = proc.ProcessIdentity(pid_doc["pid"], pid_doc["start_time"])
            if pid_doc.get("boot_id") == boot_id and identity.is_alive():
                container.identity = identity
            else:
                container.state = State.TERMINATED
                container.termination = _ended_while_away(checkpoints.read_status(cid))
        previous = current.get(container_config.name)
        if previous is None or previous.config.created_at <= container_config.created_at:
            current[container_config.name] = container
    return current


def _ended_while_away(status: dict[str, Any] | None) -> Termination:
    """As Containerizer._termination: no status written means the init itself was killed."""
    if status is None:
        return Termination(exit_signal=signal.SIGKILL, finished_at=time.time())
    return Termination(exit_code=status.get("exit_code"), exit_signal=status.get("exit_signal"),
                       finished_at=status.get("finished_at") or time.time(),
                       reason="LaunchFailed" if status.get("error") else "", message=status.get("error") or "")


# Planning ---------------------------------------------------------------------------------------

def make_plan(config: AgentConfig, now: float | None = None) -> Plan:
    now = time.time() if now is None else now
    default_info = (ContainerInfo.model_validate(config.default_container_info)
                    if config.default_container_info else None)
    listing = ManifestSource(config.manifests, node_attributes=config.attributes,
                             default_container_info=default_info, strict_modes=config.manifests_strict_modes).list()
    observed = observe(config)
    status_docs = {doc.get("name"): doc for doc in StatusWriter(config.status_path).read_all()}
    names = sorted(set(listing.desired) | set(listing.invalid) | set(listing.not_selected) | set(observed))
    actions = [plan_name(name, observed.get(name), listing, status_docs.get(name), config.attributes, now)
               for name in names]
    return Plan(actions=actions, errors=listing_errors(listing))


def listing_errors(listing: Listing) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    if listing.error:
        errors.append({"file": None, "document": None, "name": None, "error": listing.error})
    for item in [*listing.invalid_files, *listing.invalid.values(), *listing.duplicates]:
        errors.append({"file": item.manifest, "document": item.document, "name": item.name, "error": item.message})
    return errors


def plan_name(name: str, container: Container | None, listing: Listing, status: dict[str, Any] | None,
              attributes: dict[str, str], now: float) -> PlannedAction:
    target = target_of(name, container, listing, listed_ok=listing.ok)
    entry = PlannedAction(name=name, action=Action.NONE, observed=_observed(container), detail="",
                          container_id=container.id if container else None,
                          phase=(status or {}).get("phase"))
    invalid = listing.invalid.get(name)
    if target is None:
        entry.manifest = container.config.manifest if container else (invalid.manifest if invalid else None)
        not_selected = listing.not_selected.get(name)
        why = (f"not for this node: node_selector {_selector(not_selected.spec.node_selector)} does not match "
               f"--attributes {_selector(attributes) or '(none)'}") if not_selected else "no manifest declares it"
        if not_selected is not None:
            entry.manifest = not_selected.manifest
        if container is not None:
            entry.action, entry.detail = Action.DESTROY, why
        elif invalid is not None:
            entry.detail = f"invalid manifest, nothing runs: {invalid.message}"
        else:
            entry.detail = why
        return entry

    entry.manifest = target.manifest
    entry.action = action = converge_action(container, target)
    if container is not None and container.destroy_failed:
        entry.detail = "a failed destroy is retried first; "
    if action == Action.CREATE:
        entry.detail += f"launch from {target.manifest}"
        if status and status.get("spec_hash") == target.spec_hash and status.get("phase") == "Failed":
            entry.detail += f" (the agent's last attempt failed: {status.get('message')})"
    elif action == Action.UPDATE:
        assert container is not None
        entry.changed_fields = ["resources"]
        entry.detail += "resources in place: " + _resource_diff(container.config.spec.resources, target.spec.resources)
        if status and str(status.get("message", "")).startswith("Failed to update resources"):
            entry.detail += f" (the agent's last attempt: {status['message']})"
    elif action == Action.REPLACE:
        assert container is not None
        entry.changed_fields = _changed_fields(container, target)
        entry.detail += f"spec changed ({', '.join(entry.changed_fields) or 'spec'}): "
        entry.detail += "destroy and launch anew" if container.alive else "launch anew"
    elif action == Action.RESTART:
        assert container is not None
        plan = restart_plan(container, target.spec.restart_policy)
        assert plan is not None
        entry.restart_at = max(plan.at, now)
        policy = f"restart_policy {target.spec.restart_policy}"
        if plan.at > now:
            entry.detail += f"{policy}; in CrashLoopBackOff until {iso(plan.at)} (in {plan.at - now:.0f}s)"
        else:
            entry.detail += f"{policy}; restart now"
    elif container is None or not container.alive:
        if container is not None and container.state == State.TERMINATED:
            entry.detail += f"stays down (restart_policy {target.spec.restart_policy})"
        else:
            entry.detail += "being destroyed"
    else:
        entry.detail += "up to date"
        if container.config.manifest != target.manifest:
            entry.detail += f" (now declared by {target.manifest}, was {container.config.manifest}: nothing restarts)"
    if invalid is not None:
        entry.detail += f"; manifest invalid, its last good spec stays in force: {invalid.message}"
    return entry


def _observed(container: Container | None) -> str:
    if container is None:
        return "absent"
    if container.alive:
        return "running"
    termination = container.termination
    if termination is None:
        return container.state.value.lower()
    if termination.reason == "DestroyFailed":
        return "destroy failed"
    if termination.exit_signal is not None:
        try:
            return f"killed by {signal.Signals(termination.exit_signal).name}"
        except ValueError:
            return f"killed by signal {termination.exit_signal}"
    return f"exited {termination.exit_code}" if termination.exit_code is not None else "ended"


def _selector(selector: dict[str, str]) -> str:
    return ";".join(f"{k}:{v}" for k, v in sorted(selector.items()))


def _resource_diff(old: Any, new: Any) -> str:
    before = old.model_dump(mode="json", exclude_none=True)
    after = new.model_dump(mode="json", exclude_none=True)
    parts = [f"{key} {before.get(key, '-')} -> {after.get(key, '-')}"
             for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    return ", ".join(parts) or "unchanged"


def _changed_fields(container: Container, target: Target) -> list[str]:
    before = container.config.spec.model_dump(mode="json", exclude_none=True)
    after = target.spec.model_dump(mode="json", exclude_none=True)
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))


# Output -----------------------------------------------------------------------------------------

def format_plan(plan: Plan) -> str:
    rows = [["NAME", "ACTION", "OBSERVED", "DETAIL"]]
    for entry in plan.actions:
        rows.append([entry.name, entry.action.value, entry.observed, entry.detail])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([*(row[i].ljust(widths[i]) for i in range(3)), row[3]]).rstrip() for row in rows]
    counts: dict[str, int] = {}
    for entry in plan.actions:
        if entry.action != Action.NONE:
            counts[entry.action.value] = counts.get(entry.action.value, 0) + 1
    summary = ", ".join(f"{n} to {action}" for action, n in counts.items()) or "no changes"
    lines.append("")
    lines.append(f"Plan: {summary}.")
    if plan.errors:
        lines.append("")
        lines.append(f"{len(plan.errors)} error(s) in the manifests:")
        lines.extend(f"  {error['error']}" for error in plan.errors)
    return "\n".join(lines)


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_doc(), indent=2)
