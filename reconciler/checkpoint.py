"""The checkpoint layout under work_dir: what recovery reads (Mesos paths.hpp, runtime_dir/containers/<id>).

    <work_dir>/containers/<id>/config.json       ContainerConfig, written before any isolator prepares
    <work_dir>/containers/<id>/pid.json          init pid + start time + boot id, written after the fork
    <work_dir>/containers/<id>/status            wait status, written by the container's init
    <work_dir>/containers/<id>/termination.json  why and how it ended, written once it is destroyed
    <work_dir>/sandboxes/<id>/                   the sandbox (stdout, stderr, relative volumes)

Every file is written write-ahead and atomically (temp file, rename): a reader, and an agent that
crashed mid-write, sees the old file or the new one, and each is written before the step it
describes. The agent is the only writer here, so a reader refuses a link or anything but a regular
file at a checkpoint's name, and a file larger than a checkpoint can be (fsutil.read_json: a
ValueError, as a document that does not parse). Only `termination` is also fsynced (with its
directory): it must survive a power loss, or a `Never` job that finished would run again after the
reboot. The others describe a process, and
no process outlives a reboot (recovery compares boot ids): a power loss leaves nothing for them to
describe, so they skip the fsync, which was most of a launch's cost (two fsyncs, ~5 ms, on this
machine's disk).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

from reconciler.container import ContainerConfig, ProvisionedImage
from reconciler.fsutil import atomic_write_json, read_json
from reconciler.models import ContainerSpec

CONFIG = "config.json"
PID = "pid.json"
STATUS = "status"
TERMINATION = "termination.json"
SANDBOXES_MODE = 0o711


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, without dataclasses.asdict's deep copy (its values are plain JSON
    already, and the copy of a launch info's mounts cost a launch ~2 ms)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


class Checkpoints:
    def __init__(self, containers_dir: str, sandboxes_dir: str) -> None:
        self.containers_dir = containers_dir
        self.sandboxes_dir = sandboxes_dir

    def ensure_dirs(self) -> None:
        os.makedirs(self.containers_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.sandboxes_dir, mode=SANDBOXES_MODE, exist_ok=True)
        # Traversable but not listable by others (a command.user reaches its own sandbox, 0750, below it);
        # an older agent made it 0755.
        os.chmod(self.sandboxes_dir, SANDBOXES_MODE)

    def dir(self, container_id: str) -> str:
        return os.path.join(self.containers_dir, container_id)

    def sandbox(self, container_id: str) -> str:
        return os.path.join(self.sandboxes_dir, container_id)

    def ids(self) -> list[str]:
        try:
            return sorted(e for e in os.listdir(self.containers_dir) if not e.startswith("."))
        except FileNotFoundError:
            return []

    def sandbox_ids(self) -> list[str]:
        try:
            return sorted(e for e in os.listdir(self.sandboxes_dir) if not e.startswith("."))
        except FileNotFoundError:
            return []

    # Writers --------------------------------------------------------------------------------
    def write_config(self, config: ContainerConfig) -> None:
        os.makedirs(self.dir(config.container_id), mode=0o700, exist_ok=True)
        doc = _fields(config) | {"spec": config.spec.model_dump(mode="json", exclude_none=True),
                                 "image": _fields(config.image) if config.image is not None else None}
        atomic_write_json(os.path.join(self.dir(config.container_id), CONFIG), doc, durable=False)

    def write_pid(self, container_id: str, pid: int, start_time: int, boot_id: str, pid_namespace: bool,
                  started_at: float) -> None:
        atomic_write_json(os.path.join(self.dir(container_id), PID), {
            "pid": pid, "start_time": start_time, "boot_id": boot_id,
            "pid_namespace": pid_namespace, "started_at": started_at,
        }, durable=False)

    def write_termination(self, container_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(os.path.join(self.dir(container_id), TERMINATION), doc)

    # Readers --------------------------------------------------------------------------------
    def read_config(self, container_id: str) -> ContainerConfig | None:
        doc = read_json(os.path.join(self.dir(container_id), CONFIG))
        if doc is None:
            return None
        doc["spec"] = ContainerSpec.model_validate(doc["spec"])
        if isinstance(doc.get("image"), dict):
            doc["image"] = ProvisionedImage(**doc["image"])
        known = {f.name for f in dataclasses.fields(ContainerConfig)}
        return ContainerConfig(**{k: v for k, v in doc.items() if k in known})

    def read_pid(self, container_id: str) -> dict[str, Any] | None:
        return read_json(os.path.join(self.dir(container_id), PID))

    def read_status(self, container_id: str) -> dict[str, Any] | None:
        """The init's record of how the command ended; None if it never wrote one (it was SIGKILLed)."""
        try:
            return read_json(os.path.join(self.dir(container_id), STATUS))
        except ValueError:
            return None

    def read_termination(self, container_id: str) -> dict[str, Any] | None:
        return read_json(os.path.join(self.dir(container_id), TERMINATION))

    # Removal (Mesos remove()) ----------------------------------------------------------------
    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.sandbox(container_id), ignore_errors=True)
        shutil.rmtree(self.dir(container_id), ignore_errors=True)
