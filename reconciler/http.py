"""The agent's HTTP face (`--http_address host:port`; off by default): Mesos's agent endpoints, Prometheus
metrics and Kubernetes-style probes.

  GET /state               the agent and every container, in the shape of the Mesos agent's /state
  GET /monitor/statistics  a JSON array, exactly as Mesos's: per running container
                           {container_id, executor_id, executor_name, framework_id, source, statistics}
  GET /metrics             Prometheus text format (reconciler/metrics.py lists the metrics)
  GET /healthz             200 while the event loop turns and listings keep coming; 503 and the reason if not
  GET /readyz              200 once recovery and the first listing are done; 503 before
(`/state.json` and `/monitor/statistics.json` answer too, as on a Mesos agent.) Other paths: 404;
other methods than GET and HEAD: 405.

Ids, adapted from Mesos: the agent `id` is stable per host and work_dir (a name-based UUID), `pid` is
`reconciler@<http_address>` (libprocess's form), and the OS pid is `os_pid`. A container's
`executor_id` and `executor_name` are its manifest name (what stays the same across restarts and
replacements, as a Mesos executor id does), `container_id` its current container's id, `framework_id`
is "reconciler" for all of them (the manifest directory is their one "framework"), and `source` is
the manifest file that declares it. Each container entry of /state is its status document (name,
phase, pid, restarts, conditions, net_cls, disk, statistics...) plus Mesos's ContainerStatus under
`container_status`: {container_id: {value}, executor_pid, cgroup_info: {net_cls: {classid}}}.

Why a thread with pre-rendered bytes: the reconcile loop can be busy for seconds (a burst of 500
launches, a statistics pass), and a server on that loop would answer only between its steps. The
loop publishes whole responses instead (rendered from the status documents it already composes, at
most every RENDER_DELAY while they change), and a server thread answers from them: a request is a
recv, a dictionary look-up and one send, done in the accepting thread itself when the request came
with the connection (a thread per connection takes over only for keep-alive or slow requests).
What can still delay an answer is the loop holding the GIL, so:
- the switch interval is SWITCH_INTERVAL (1 ms, not 5) while the face runs: each time the server
  thread comes back from a blocking call while the loop computes, it waits at most that long; this
  costs nothing while the loop runs alone;
- a garbage collection holds the GIL for its whole pass (10-30 ms for a full one over the agent's
  start-up objects on a small VM): what exists at start and once ready is moved out of the
  collector's sight with gc.freeze(), so full passes walk only younger objects (the price: a frozen
  object that later becomes cyclic garbage stays, e.g. a recovered container's record once it is
  replaced, a few KB each);
- the server threads run at nice SERVER_NICE, so that container start-ups saturating the CPUs do
  not starve the probes (threads have their own nice value on Linux; needs root, else unchanged).
bench/http.py measures it: p50/p99/max of /metrics and /state during a burst of 500 launches, a
recovery and statistics passes.
"""

from __future__ import annotations

import _thread
import asyncio
import errno
import gc
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from reconciler import __version__
from reconciler.config import ConfigError, parse_host_port
from reconciler.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from reconciler.metrics import AgentMetrics, container_lines
from reconciler.status import iso

if TYPE_CHECKING:
    from reconciler.agent import Agent
    from reconciler.source import Listing

log = logging.getLogger(__name__)

FRAMEWORK_ID = "reconciler"
RENDER_DELAY = 0.05          # renders at most this often while things change (the last change waits as long)
TICK = 1.0                   # the event loop's heartbeat
LOOP_STALL_AFTER = 10.0      # /healthz fails when the loop has not ticked for this long
LISTING_STALL_FLOOR = 30.0   # ... or no listing for max(3 × resync_interval, this)
SWITCH_INTERVAL = 0.001
SERVER_NICE = -10
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 30.0          # a keep-alive connection without a request is closed after this long
MAX_HEAD = 16384

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def response(status: str, content_type: str, body: bytes, extra: str = "") -> tuple[bytes, int]:
    """A whole HTTP/1.1 response, and the length of its head (what HEAD sends)."""
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\n{extra}\r\n").encode()
    return head + body, len(head)


NOT_FOUND = response("404 Not Found", TEXT, b"404 Not Found: /state, /monitor/statistics, /metrics, /healthz, /readyz\n")
NOT_ALLOWED = response("405 Method Not Allowed", TEXT, b"405 Method Not Allowed: only GET and HEAD\n",
                       "Allow: GET, HEAD\r\nConnection: close\r\n")
BAD_REQUEST = response("400 Bad Request", TEXT, b"400 Bad Request\n", "Connection: close\r\n")
TOO_LARGE = response("431 Request Header Fields Too Large", TEXT, b"431 Request Header Fields Too Large\n",
                     "Connection: close\r\n")
BUSY = response("503 Service Unavailable", TEXT, b"503 Service Unavailable: too many connections\n",
                "Connection: close\r\n")
OK = response("200 OK", TEXT, b"ok\n")
NOT_YET = response("503 Service Unavailable", TEXT, b"503 Service Unavailable: starting\n")   # no snapshot yet


@dataclass(frozen=True)
class Snapshot:
    """Whole responses, replaced together (one attribute assignment: the server reads a consistent set)."""
    state: tuple[bytes, int]
    statistics: tuple[bytes, int]
    metrics: tuple[bytes, int]


class Health:
    """Heartbeats the loop updates and the server thread reads (floats: a read is atomic under the GIL)."""

    def __init__(self, resync_interval: float) -> None:
        self.loop_tick = time.monotonic()
        self.last_listing: float | None = None
        self.ready = False
        self.listing_stall_after = max(3 * resync_interval, LISTING_STALL_FLOOR)

    def alive(self, now: float) -> str | None:
        """None when healthy, else why not."""
        since_tick = now - self.loop_tick
        if since_tick > LOOP_STALL_AFTER:
            return f"the event loop has not run for {since_tick:.1f}s (limit {LOOP_STALL_AFTER:.0f}s)"
        if self.last_listing is not None and now - self.last_listing > self.listing_stall_after:
            return (f"no listing of the manifest directory for {now - self.last_listing:.1f}s "
                    f"(limit {self.listing_stall_after:.0f}s: 3 x --resync_interval, at least {LISTING_STALL_FLOOR:.0f}s)")
        return None

    def readiness(self) -> str | None:
        if not self.ready:
            return "recovering containers and listing the manifest directory"
        return None


def _raise_priority() -> None:
    """The server threads run at nice SERVER_NICE (threads have their own nice value on Linux): a burst of
    container start-ups saturating the CPUs must not starve the probes. Needs root; else left as is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SERVER_NICE)
    except OSError:
        pass


def _unavailable(reason: str) -> tuple[bytes, int]:
    return response("503 Service Unavailable", TEXT, f"503 Service Unavailable: {reason}\n".encode())


class HttpServer:
    """The server thread: an accept loop, one short-lived thread per connection (keep-alive honoured)."""

    def __init__(self, address: str, routes: dict[bytes, Callable[[], tuple[bytes, int]]]) -> None:
        self.address = address
        self.routes = routes
        host, port = parse_host_port(address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            self.sock = socket.create_server(sockaddr[:2], family=family, backlog=128)
        except socket.gaierror as exc:
            raise ConfigError(f"flag --http_address: cannot resolve {host!r}: {exc.strerror}") from None
        except OSError as exc:
            hint = " (another process listens there: choose another port)" if exc.errno == errno.EADDRINUSE else ""
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"flag --http_address: cannot listen on {address}: {reason}{hint}") from None
        self.port = self.sock.getsockname()[1]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept, name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept
        except OSError:
            pass
        self.sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _accept(self) -> None:
        _raise_priority()
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)   # EMFILE and the like: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                try:
                    conn.sendall(BUSY[0])
                finally:
                    conn.close()
                continue
            # The request usually arrived with the connection: answer it here, without waking a thread,
            # but never wait on the client here: what it does not take at once (a client that does not
            # read, or pipelined requests) is left to the connection's thread.
            pending, unsent, close = b"", b"", False
            try:
                pending = conn.recv(65536, socket.MSG_DONTWAIT)
                if not pending:
                    self._finish(conn)
                    continue
                end = pending.find(b"\r\n\r\n")
                if end >= 0:
                    answer, close = self.respond(pending[:end])
                    pending = pending[end + 4:]
                    try:
                        sent = conn.send(answer, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    unsent = answer[sent:]
                    if close and not unsent:
                        self._finish(conn)
                        continue
            except BlockingIOError:
                pass
            except OSError:
                self._finish(conn)
                continue
            try:
                # No wait for the thread to start.
                _thread.start_new_thread(self._serve, (conn, pending, unsent, close))
            except RuntimeError:
                self._finish(conn)

    def _finish(self, conn: socket.socket) -> None:
        conn.close()
        self._slots.release()

    def _serve(self, conn: socket.socket, pending: bytes, unsent: bytes = b"", close: bool = False) -> None:
        """A connection's further requests (keep-alive), or its first when it came after the connect;
        first the rest of an answer the accept thread began."""
        try:
            conn.settimeout(IDLE_TIMEOUT)
            if unsent:
                conn.sendall(unsent)
            if close:
                return
            pending, close = self._answer(conn, pending)
            if close:
                return
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                pending, close = self._answer(conn, pending + data)
                if close:
                    return
        except OSError:
            pass
        finally:
            self._finish(conn)

    def _answer(self, conn: socket.socket, pending: bytes) -> tuple[bytes, bool]:
        """Answer every whole request head in `pending`; returns what is left and whether to close."""
        end = pending.find(b"\r\n\r\n")
        while end >= 0:
            head, pending = pending[:end], pending[end + 4:]
            answer, close = self.respond(head)
            conn.sendall(answer)
            if close:
                return b"", True
            end = pending.find(b"\r\n\r\n")
        if len(pending) > MAX_HEAD:
            conn.sendall(TOO_LARGE[0])
            return b"", True
        return pending, False

    def respond(self, head: bytes) -> tuple[bytes, bool]:
        """The bytes to send for one request head, and whether to close the connection after."""
        line_end = head.find(b"\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return BAD_REQUEST[0], True
        method, target, version = parts
        route = self.routes.get(target.split(b"?", 1)[0])
        if route is None:
            full, head_length = NOT_FOUND
        elif method != b"GET" and method != b"HEAD":
            return NOT_ALLOWED[0], True
        else:
            full, head_length = route()
        close = version == b"HTTP/1.0" or b"connection: close" in head.lower()
        if method == b"HEAD":
            return full[:head_length], close
        return full, close


class HttpFace:
    """The loop's side: keeps each container's rendered pieces, renders whole responses, runs the server."""

    def __init__(self, agent: Agent) -> None:
        config = agent.config
        assert config.http_address is not None
        self.agent = agent
        self.metrics = AgentMetrics(__version__)
        self.health = Health(config.resync_interval)
        self.server = HttpServer(config.http_address, {
            b"/state": self._state, b"/state.json": self._state,
            b"/monitor/statistics": self._statistics, b"/monitor/statistics.json": self._statistics,
            b"/metrics": self._metrics, b"/healthz": self._healthz, b"/readyz": self._readyz,
        })   # binds now: a busy port stops the agent at start (ConfigError, exit 2)
        self.snapshot: Snapshot | None = None
        self.agent_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"reconciler:{socket.gethostname()}:{config.work_dir}"))
        # Per name: the status document last published, and its rendered pieces (None: to render).
        self.docs: dict[str, dict[str, Any]] = {}
        self.pieces: dict[str, tuple[bytes, bytes | None, tuple[str, str, str, str, str]]] = {}
        self.dirty: set[str] = set()
        self.seen: dict[str, tuple[str, float]] = {}     # name -> (spec hash, perf_counter when first listed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._render_handle: asyncio.TimerHandle | None = None
        self._rendered_at = 0.0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._switch_interval = sys.getswitchinterval()

    # lifecycle (on the loop) ---------------------------------------------------------------------
    def start(self) -> None:
        reconciler = self.agent.reconciler
        reconciler.on_published = self.published
        reconciler.on_forgotten = self.forgotten
        reconciler.on_reconciled = self.metrics.reconciled
        self._loop = asyncio.get_running_loop()
        self._tick()
        self.render()
        gc.freeze()   # the modules: see set_ready
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.server.start()
        log.info("Serving /state, /monitor/statistics, /metrics, /healthz, /readyz on http://%s", self.server.address)

    def close(self) -> None:
        for handle in (self._render_handle, self._tick_handle):
            if handle is not None:
                handle.cancel()
        self.server.close()
        sys.setswitchinterval(self._switch_interval)

    def _tick(self) -> None:
        self.health.loop_tick = time.monotonic()
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(TICK, self._tick)

    # what the agent and the loop tell ----------------------------------------------------------
    def set_ready(self) -> None:
        self.health.ready = True
        # What exists now (modules, recovered containers) is long-lived: frozen out of the collector, a
        # full collection walks only what came after. A collection holds the GIL throughout, and on this
        # kind of machine a full one over the agent's ~35k start-up objects alone takes 10-30 ms.
        gc.collect()
        gc.freeze()
        self.changed()

    def listed(self, listing: Listing, seen_at: float) -> None:
        """A listing was handed to the loop: the heartbeat of /healthz, and when each new spec was seen."""
        self.health.last_listing = time.monotonic()
        names = self.agent.reconciler.names
        for name, desired in listing.desired.items():
            seen = self.seen.get(name)
            if seen is not None and seen[0] == desired.spec_hash:
                continue
            state = names.get(name)
            container = state.container if state is not None else None
            if container is not None and container.alive and container.config.spec_hash == desired.spec_hash:
                continue    # runs that spec already (recovered, or an unchanged spec)
            self.seen[name] = (desired.spec_hash, seen_at)
        self.changed()

    def pass_done(self, seconds: float) -> None:
        self.metrics.sync_duration.observe(seconds)
        self.changed()

    def published(self, name: str, doc: dict[str, Any], now: float) -> None:
        doc = dict(doc, updated_at=iso(now))
        self.docs[name] = doc
        self.dirty.add(name)
        seen = self.seen.get(name)
        if seen is not None and doc["phase"] == "Running" and doc.get("spec_hash") == seen[0] and seen[1] >= 0:
            self.metrics.launch_latency.observe(max(0.0, time.perf_counter() - seen[1]))
            self.seen[name] = (seen[0], -1.0)    # observed once per spec
        self.changed()

    def forgotten(self, name: str) -> None:
        self.docs.pop(name, None)
        self.pieces.pop(name, None)
        self.dirty.discard(name)
        self.seen.pop(name, None)
        self.changed()

    def changed(self) -> None:
        """Render soon: changes in a burst share one render. By the clock, not only by a timer: in a burst
        the loop can run hundreds of launches in one iteration, seconds before a timer's turn comes."""
        if self._loop is None:
            return
        if time.monotonic() - self._rendered_at >= RENDER_DELAY:
            if self._render_handle is not None:
                self._render_handle.cancel()
            self.render()
        elif self._render_handle is None:
            self._render_handle = self._loop.call_later(RENDER_DELAY, self.render)

    # rendering (on the loop) ------------------------------------------------------------------
    def render(self) -> None:
        self._render_handle = None
        self._rendered_at = time.monotonic()
        try:
            self._render()
        except Exception:  # noqa: BLE001 - the face must never stop the loop: serve the last snapshot
            log.exception("Rendering the HTTP snapshots failed; serving the previous ones")

    def _render(self) -> None:
        for name in self.dirty:
            doc = self.docs.get(name)
            if doc is not None:
                self.pieces[name] = (state_entry(doc), statistics_entry(doc), container_lines(name, doc))
        self.dirty.clear()
        names = sorted(self.pieces)
        agent_doc = self.agent.agent_doc()
        self.snapshot = Snapshot(
            state=response("200 OK", JSON, self._state_body(agent_doc, names)),
            statistics=response("200 OK", JSON, b"[" + b",".join(
                s for s in (self.pieces[n][1] for n in names) if s is not None) + b"]"),
            metrics=response("200 OK", METRICS_CONTENT_TYPE, self._metrics_body(agent_doc)),
        )

    def _state_body(self, agent_doc: dict[str, Any], names: list[str]) -> bytes:
        config = self.agent.config
        head: dict[str, Any] = {
            "id": self.agent_id, "pid": f"reconciler@{config.http_address}", "hostname": socket.gethostname(),
            "version": __version__, "start_time": self.agent.started_at, "os_pid": os.getpid(),
            "attributes": dict(config.attributes), "flags": agent_doc.get("flags", {}), "ready": self.health.ready,
        }
        for key, value in agent_doc.items():
            if key not in ("apiVersion", "kind", "pid", "flags"):
                head.setdefault(key, value)
        rendered = json.dumps(head).encode()
        return rendered[:-1] + b', "containers": [' + b",".join(self.pieces[n][0] for n in names) + b"]}"

    def _metrics_body(self, agent_doc: dict[str, Any]) -> bytes:
        phases: dict[str, int] = {}
        for doc in self.docs.values():
            phases[doc["phase"]] = phases.get(doc["phase"], 0) + 1
        net_cls = (agent_doc.get("isolator_status") or {}).get("cgroups/net_cls")
        listing = self.agent.reconciler.listing
        errors = {"invalid_document": len(listing.invalid), "invalid_file": len(listing.invalid_files),
                  "duplicate_name": len(listing.duplicates)} if listing is not None else {}
        return self.metrics.render({n: p[2] for n, p in self.pieces.items()}, phases, net_cls, errors)

    # routes (on the server thread: a look-up, nothing computed) -------------------------------------
    def _state(self) -> tuple[bytes, int]:
        snapshot = self.snapshot
        return snapshot.state if snapshot is not None else NOT_YET

    def _statistics(self) -> tuple[bytes, int]:
        snapshot = self.snapshot
        return snapshot.statistics if snapshot is not None else NOT_YET

    def _metrics(self) -> tuple[bytes, int]:
        snapshot = self.snapshot
        return snapshot.metrics if snapshot is not None else NOT_YET

    def _healthz(self) -> tuple[bytes, int]:
        reason = self.health.alive(time.monotonic())
        return OK if reason is None else _unavailable(reason)

    def _readyz(self) -> tuple[bytes, int]:
        reason = self.health.readiness()
        return OK if reason is None else _unavailable(reason)


def container_status(doc: dict[str, Any]) -> dict[str, Any]:
    """Mesos's ContainerStatus (mesos.proto, JSON form) of a status document."""
    status: dict[str, Any] = {"container_id": {"value": doc["container_id"]}}
    if doc.get("pid") is not None:
        status["executor_pid"] = doc["pid"]
    net_cls = doc.get("net_cls")
    if net_cls and net_cls.get("classid_int") is not None:
        status["cgroup_info"] = {"net_cls": {"classid": net_cls["classid_int"]}}
    return status


def state_entry(doc: dict[str, Any]) -> bytes:
    entry = dict(doc)
    if doc.get("container_id"):
        entry["container_status"] = container_status(doc)
    return json.dumps(entry).encode()


def statistics_entry(doc: dict[str, Any]) -> bytes | None:
    """Mesos's /monitor/statistics entry (a ResourceUsage.Executor), for containers that run."""
    statistics = doc.get("statistics")
    if not statistics or not doc.get("container_id") or doc.get("phase") not in ("Running", "Pending", "Terminating"):
        return None
    if "timestamp" not in statistics:
        statistics = dict(statistics, timestamp=time.time())   # only the limits are known yet
    return json.dumps({
        "container_id": doc["container_id"], "executor_id": doc["name"], "executor_name": doc["name"],
        "framework_id": FRAMEWORK_ID, "source": doc.get("manifest") or "", "statistics": statistics,
    }).encode()
