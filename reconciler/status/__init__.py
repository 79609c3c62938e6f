"""Status files: `<status_dir>/<name>.json` per container and `_agent.json`, replaced atomically.

A reader sees the old document or the new one, never a part (temp file + rename; fsutil's rules: a
name someone planted in the directory, a link included, is never written through, and a reader
never follows a link at a status file's name). Status files are
derived state that the agent rewrites at start, so they skip fsync; checkpoints are the durable truth.
A document is written only when it changed (ignoring `updated_at`), which keeps a resync of
hundreds of unchanged containers cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from reconciler.fsutil import atomic_write, read_json, remove_stale_temps

AGENT_FILE = "_agent.json"


def render(doc: dict[str, Any]) -> bytes:
    """One top-level key per line, each value in compact JSON.

    Readable with `cat`, and several times cheaper than json.dumps(indent=...), which falls back to
    the pure-Python encoder: a statistics pass rewrites every running container's file.
    """
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in doc.items()]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class StatusWriter:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._last: dict[str, dict[str, Any]] = {}   # name -> last document written, without updated_at

    def ensure_dir(self) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        remove_stale_temps(self.directory)   # an agent killed mid-write leaves its temp file

    def path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.json")

    def write(self, name: str, doc: dict[str, Any], now: float) -> bool:
        """Write `doc` (adding updated_at) if it differs from what was last written. Returns whether it wrote."""
        if self._last.get(name) == doc and os.path.exists(self.path(name)):
            return False
        full = dict(doc)
        full["updated_at"] = iso(now)
        atomic_write(self.path(name), render(full), durable=False)
        self._last[name] = doc
        return True

    def remove(self, name: str) -> None:
        self._last.pop(name, None)
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def names_on_disk(self) -> set[str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        return {e[:-5] for e in entries if e.endswith(".json") and not e.startswith(("_", "."))}

    def read_all(self) -> list[dict[str, Any]]:
        docs = []
        for name in sorted(self.names_on_disk()):
            try:
                doc = read_json(self.path(name))
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict):
                docs.append(doc)
        return docs

    def write_agent(self, doc: dict[str, Any], now: float) -> None:
        full = dict(doc)
        full["updated_at"] = iso(now)
        atomic_write(os.path.join(self.directory, AGENT_FILE), render(full), durable=False)

    def read_agent(self) -> dict[str, Any] | None:
        try:
            doc = read_json(os.path.join(self.directory, AGENT_FILE))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None
