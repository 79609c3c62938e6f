"""Atomic file replacement: what checkpoints (durable) and status files (atomic for readers) are written with."""

from __future__ import annotations

import json
import os
from typing import Any


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, never a part.

    durable=True (checkpoints) also fsyncs the file and its directory, so the write survives a
    power loss; status files, which the agent regenerates at start, skip that cost.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def atomic_write_json(path: str, doc: Any, *, durable: bool = True) -> None:
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode(), durable=durable)


def read_json(path: str) -> Any | None:
    """The document at `path`, or None when the file is missing or empty (a write never completed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if not data.strip():
        return None
    return json.loads(data)
