"""The measuring process: where the collector (schedule.DiskUsageCollector) runs, a child of the agent
(`python3 -m reconciler.diskusage.process`, niced, killed with the agent), and the agent's end of it.

Not in the agent: a walk that held the agent's GIL while the kernel preempted it would stall the
reconcile loop, and on a busy two-CPU machine that doubled the time from manifest to Running.

The protocol is JSON lines. In: {"add": id, "path": sandbox, "delay": secs} or {"remove": id}. Out:
{"id", "used", "entries", "at", "secs"} per measurement, handed over once a second in one write
(each hand-over wakes the agent's loop). The process ends when its input ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from reconciler.backoff import exponential
from reconciler.diskusage.mounts import MountTable
from reconciler.diskusage.schedule import DiskUsageCollector, TrackedSandbox
from reconciler.diskusage.walk import DiskUsage
from reconciler.diskusage.watch import Inotify
from reconciler.linux import syscalls

log = logging.getLogger(__name__)


# --- the measuring process's side -------------------------------------------------------------------

def _collector_for_this_process(interval: float,
                                on_measured: Callable[[TrackedSandbox, DiskUsage], None]) -> DiskUsageCollector:
    try:
        mounts: MountTable | None = MountTable()
    except OSError as exc:
        log.warning("disk/du: cannot watch the mount table (%s): volumes bound into sandboxes are excluded "
                    "only when they are on another device", exc)
        mounts = None
    try:
        inotify: Inotify | None = Inotify()
    except OSError as exc:
        log.warning("disk/du: %s: every measurement is a full walk of the sandbox", exc)
        inotify = None
    return DiskUsageCollector(interval, on_measured, mounts, inotify)


# How often the measuring process hands its results to the agent. Each hand-over wakes the agent's loop
# (and makes it take the GIL from the threads it shares it with); once a second keeps that to one
# wake-up however many sandboxes there are, and is soon enough for a status file or a limitation.
RESULTS_EVERY = 1.0


def serve(interval: float, commands: Any = None, results: Any = None, results_every: float = RESULTS_EVERY) -> None:
    """The measuring process: JSON lines in ({"add": id, "path": sandbox} or {"remove": id}); out, every
    `results_every` seconds, one JSON line per measurement made since ({"id", "used", "entries", "at",
    "secs"}), in a single write. Ends when its input ends."""
    commands = commands if commands is not None else sys.stdin
    results = results if results is not None else sys.stdout
    lock = threading.Lock()
    pending: list[str] = []
    done = threading.Event()

    def measured(tracked: TrackedSandbox, usage: DiskUsage) -> None:
        line = json.dumps({"id": tracked.container_id, "used": usage.used_bytes, "entries": usage.entries,
                           "at": time.time(), "secs": round(tracked.last_duration, 6)})
        with lock:
            pending.append(line)

    def hand_over() -> None:
        while not done.wait(results_every):
            with lock:
                if not pending:
                    continue
                text = "\n".join(pending) + "\n"
                pending.clear()
            try:
                results.write(text)
                results.flush()
            except (BrokenPipeError, ValueError):
                return                   # the agent is gone

    collector = _collector_for_this_process(interval, measured)
    writer = threading.Thread(target=hand_over, name="disk-du-results", daemon=True)
    writer.start()
    tracked: dict[str, TrackedSandbox] = {}
    for line in commands:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "add" in doc:
            old = tracked.get(doc["add"])
            if old is not None:
                collector.remove(old)
            tracked[doc["add"]] = entry = TrackedSandbox(doc["add"], doc["path"])
            collector.add(entry, delay=float(doc.get("delay", 0.0)))
        elif "remove" in doc:
            removed = tracked.pop(doc["remove"]) if doc["remove"] in tracked else None
            if removed is not None:
                collector.remove(removed)
    collector.stop()
    done.set()
    writer.join()


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    syscalls.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python3 -m reconciler.diskusage.process",
                                     description="disk/du's measuring process (started by the agent)")
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    try:
        os.nice(10)          # measuring yields to the agent and to the containers
    except OSError:
        pass
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s reconciler.disk_du[measuring]: %(message)s")
    serve(args.interval)


# --- the agent's side ---------------------------------------------------------------------------

class _MeasuringProcess:
    """The agent's end of the measuring process: commands written without blocking, results read by
    the asyncio loop (add_reader). Walking sandboxes in another process keeps them off the agent's
    GIL: a walk preempted while holding it would stall the loop, on a busy machine for milliseconds."""

    def __init__(self, interval: float, loop: asyncio.AbstractEventLoop,
                 on_result: Callable[[dict[str, Any]], None], on_exit: Callable[[], None]) -> None:
        self.loop, self.on_result, self.on_exit = loop, on_result, on_exit
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler.diskusage.process", "--interval", repr(interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, preexec_fn=None,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin_fd, self.stdout_fd = self.process.stdin.fileno(), self.process.stdout.fileno()
        os.set_blocking(self.stdin_fd, False)
        os.set_blocking(self.stdout_fd, False)
        self.outgoing = bytearray()
        self.incoming = bytearray()
        self.closed = False
        loop.add_reader(self.stdout_fd, self._readable)

    def send(self, doc: dict[str, Any]) -> None:
        if self.closed:
            return
        self.outgoing += (json.dumps(doc) + "\n").encode()
        self._flush()

    def _flush(self) -> None:
        try:
            while self.outgoing:
                written = os.write(self.stdin_fd, self.outgoing)
                del self.outgoing[:written]
        except BlockingIOError:
            self.loop.add_writer(self.stdin_fd, self._writable)
            return
        except BrokenPipeError:
            self.outgoing.clear()      # it died: the reader sees EOF and restarts it

    def _writable(self) -> None:
        self.loop.remove_writer(self.stdin_fd)
        self._flush()

    def _readable(self) -> None:
        try:
            data = os.read(self.stdout_fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.close()
            self.on_exit()
            return
        self.incoming += data
        *lines, rest = self.incoming.split(b"\n")
        self.incoming = bytearray(rest)
        for line in lines:
            try:
                self.on_result(json.loads(line))
            except ValueError:
                continue

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for remove, fd in ((self.loop.remove_reader, self.stdout_fd), (self.loop.remove_writer, self.stdin_fd)):
            try:
                remove(fd)
            except Exception:  # noqa: BLE001 - the loop may be closed already
                pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()     # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class MeasuringClient:
    """The agent's handle on the measuring process: started for the first sandbox given to it, started
    again when it dies (killed by hand, out of memory) and given every sandbox again."""

    def __init__(self, interval: float, on_result: Callable[[dict[str, Any]], None]) -> None:
        self.interval = interval
        self.on_result = on_result
        self.process: _MeasuringProcess | None = None
        self.restarts = 0
        self.watched: dict[str, tuple[str, asyncio.AbstractEventLoop]] = {}    # container id -> sandbox, loop

    @property
    def pid(self) -> int | None:
        """The measuring process's pid while it runs."""
        return self.process.process.pid if self.process is not None and not self.process.closed else None

    def add(self, container_id: str, sandbox: str, loop: asyncio.AbstractEventLoop) -> None:
        self.watched[container_id] = (sandbox, loop)
        self._send_add(container_id, sandbox, loop)

    def _send_add(self, container_id: str, sandbox: str, loop: asyncio.AbstractEventLoop) -> None:
        # Not at once: the container is starting (its sandbox is nearly empty), and the launches around
        # it are what the machine should be busy with now.
        self._process(loop).send({"add": container_id, "path": sandbox, "delay": min(self.interval, 1.0)})

    def remove(self, container_id: str) -> None:
        """Never measured again; a walk of it under way stops at its next directory."""
        if self.watched.pop(container_id, None) is not None and self.process is not None:
            self.process.send({"remove": container_id})

    def _process(self, loop: asyncio.AbstractEventLoop) -> _MeasuringProcess:
        if self.process is None or self.process.closed:
            self.process = _MeasuringProcess(self.interval, loop, self.on_result, self._exited)
        return self.process

    def _exited(self) -> None:
        """It died: start another after a backoff, and give it every sandbox again."""
        self.restarts += 1
        log.warning("disk/du: the measuring process exited; starting it again")
        if self.watched:
            loop = next(iter(self.watched.values()))[1]
            delay = exponential(self.restarts + 1, 0.5, 30.0)   # 1 s, 2 s, ... at most 30 s
            loop.call_later(delay, self._rewatch)

    def _rewatch(self) -> None:
        for container_id, (sandbox, loop) in list(self.watched.items()):
            if not loop.is_closed():
                self._send_add(container_id, sandbox, loop)

    def close(self) -> None:
        if self.process is not None:
            self.process.close()


if __name__ == "__main__":
    main()
