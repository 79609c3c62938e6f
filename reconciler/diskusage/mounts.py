"""The mount points below a sandbox, which its usage leaves out: a volume bound into the sandbox is not
the sandbox's usage, and a bind mount from the same device is told apart only by the mount table."""

from __future__ import annotations

import select

from reconciler.linux.mountinfo import parse_mountinfo


class MountTable:
    """Mount points of this mount namespace, re-read only after the kernel says the table changed
    (/proc/self/mountinfo polls POLLPRI on every mount and unmount)."""

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - kept open: it is what poll() watches
        self._poll = select.poll()
        self._poll.register(self._file.fileno(), select.POLLPRI | select.POLLERR)
        self._mountpoints: list[str] = []
        self._below: dict[str, list[str]] = {}
        self._read()

    def _read(self) -> None:
        self._file.seek(0)
        self._mountpoints = [entry.mount_point for entry in parse_mountinfo(self._file.read())]
        self._below = {}

    def below(self, directory: str) -> list[str]:
        """Mount points strictly below `directory`."""
        if self._poll.poll(0):
            self._read()
        found = self._below.get(directory)
        if found is None:
            prefix = directory.rstrip("/") + "/"
            found = self._below[directory] = [p for p in self._mountpoints if p.startswith(prefix)]
            if len(self._below) > 4096:
                self._below = {directory: found}
        return found

    def close(self) -> None:
        self._file.close()
