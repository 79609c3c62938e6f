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
- while the face runs, the agent tunes its process for it (agent.py, ProcessTuning): a 1 ms
  switch interval, and gc.freeze() of what exists at start and once ready;
- the server threads run at nice SERVER_NICE, so that container start-ups saturating the CPUs do
  not starve the probes (threads have their own nice value on Linux; needs root, else unchanged).
bench/http_endpoints.py measures it: p50/p99/max of /metrics and /state during a burst of 500 launches, a
recovery and statistics passes.

Clients are untrusted (anyone who reaches the address), so the server holds none of its resources
at a client's pace:
- A request, head and body, must arrive within REQUEST_DEADLINE of its first byte (of the accept for
  a connection's first request), whatever the pace: a client that sends a byte a second is answered
  408 and closed at the deadline. 5 s because a real client (kubelet, Prometheus, curl) writes its
  whole head at once, so it arrives within one round trip, or two TCP retransmissions (1 s + 2 s,
  RFC 6298) on a lossy link; and it is the probes' own timeoutSeconds in the Helm chart: a probe
  slower than that has failed anyway. An answer must be taken within WRITE_TIMEOUT, a keep-alive
  connection may idle IDLE_TIMEOUT between requests.
- Only HTTP/1.0 and HTTP/1.1: another version (HTTP/2.0's preface, HTTP/1.2) is answered 505, a
  request line of another shape (HTTP/0.9's `GET /`) 400, as soon as the line is in, and closed.
- A body announced by Content-Length (up to MAX_BODY; 413 beyond) is read and dropped; any
  Transfer-Encoding is answered with the connection closed after (with both, or a Content-Length
  that is not one number: 400, the request-smuggling shapes of RFC 9112 6.3). A body is never read
  as the next request. Bare CR or LF and header names with spaces are 400 too, so that no proxy in
  front splits the head where this server does not.
- At most MAX_CONNECTIONS connections are served; past that, /healthz and /readyz are still
  answered (their answers are a few bytes, computed from two floats) and any other path gets 503:
  a liveness probe cannot be failed by filling the cap. One more thread holds those connections
  until their head is in (at most MAX_CONNECTIONS of them, the oldest dropped first, each within
  REQUEST_DEADLINE). A cap per client address would not do: the kubelet's probes come from the
  node's address, which the containers share (hostNetwork) and anyone on the node has.
- Closing after an error, the server first drains what the client still sends (LINGER, like nginx's
  lingering_close): closing with unread bytes sends a TCP reset, which can destroy the answer.
Deadlines are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO, set without releasing the GIL) and the
sockets stay blocking, so that a read or a write is one system call and one hand-back of the GIL
rather than poll then recv; the server threads block signals so that no EINTR restarts a timeout.
Why not http.server, h11 or aiohttp: each parses in a thread or on a loop of its own just the same,
with more Python per request (http.server's email parser, h11's state machine) and no way to
answer from the accepting thread; what this face needs of HTTP is the request line and three
headers, checked here as strictly as RFC 9112 asks.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import errno
import json
import logging
import os
import re
import selectors
import signal
import socket
import struct
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
    from reconciler.source import Listing

log = logging.getLogger(__name__)

FRAMEWORK_ID = "reconciler"
RENDER_DELAY = 0.05          # renders at most this often while things change (the last change waits as long)
TICK = 1.0                   # the event loop's heartbeat
LOOP_STALL_AFTER = 10.0      # /healthz fails when the loop has not ticked for this long
LISTING_STALL_FLOOR = 30.0   # ... or no listing for max(3 × resync_interval, this)
SERVER_NICE = -10
MAX_CONNECTIONS = 64         # served at once; past it only the probes are answered (see the docstring)
REQUEST_DEADLINE = 5.0       # one request's head and body, from its first byte (the first: from the accept)
IDLE_TIMEOUT = 30.0          # a keep-alive connection without a request is closed after this long
WRITE_TIMEOUT = 10.0         # an answer (600 KiB of /state with 500 containers) must be taken within this
LINGER = 1.0                 # after an early close, what the client still sends is drained this long
LINGER_BYTES = 1 << 20       # ... or up to this many bytes
MAX_HEAD = 16384
MAX_BODY = 65536
PROBES = frozenset((b"/healthz", b"/readyz"))   # answered past MAX_CONNECTIONS

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def response(status: str, content_type: str, body: bytes, extra: str = "") -> tuple[bytes, int]:
    """A whole HTTP/1.1 response, and the length of its head (what HEAD sends)."""
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\n{extra}\r\n").encode()
    return head + body, len(head)


NOT_FOUND = response("404 Not Found", TEXT,
                     b"404 Not Found: /state, /monitor/statistics, /metrics, /healthz, /readyz\n")
NOT_ALLOWED = response("405 Method Not Allowed", TEXT, b"405 Method Not Allowed: only GET and HEAD\n",
                       "Allow: GET, HEAD\r\nConnection: close\r\n")
BAD_REQUEST = response("400 Bad Request", TEXT, b"400 Bad Request\n", "Connection: close\r\n")
TOO_LARGE = response("431 Request Header Fields Too Large", TEXT, b"431 Request Header Fields Too Large\n",
                     "Connection: close\r\n")
BUSY = response("503 Service Unavailable", TEXT,
                b"503 Service Unavailable: too many connections (only /healthz and /readyz are answered)\n",
                "Connection: close\r\n")
TIMED_OUT = response("408 Request Timeout", TEXT,
                     f"408 Request Timeout: a request must arrive within {REQUEST_DEADLINE:g}s\n".encode(),
                     "Connection: close\r\n")
BODY_TOO_LARGE = response("413 Content Too Large", TEXT,
                          f"413 Content Too Large: request bodies up to {MAX_BODY} bytes\n".encode(),
                          "Connection: close\r\n")
VERSION_NOT_SUPPORTED = response("505 HTTP Version Not Supported", TEXT,
                                 b"505 HTTP Version Not Supported: HTTP/1.0 and HTTP/1.1 only\n",
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
                    f"(limit {self.listing_stall_after:.0f}s: 3 x --resync_interval, "
                    f"at least {LISTING_STALL_FLOOR:.0f}s)")
        return None

    def readiness(self) -> str | None:
        if not self.ready:
            return "recovering containers and listing the manifest directory"
        return None


TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")         # RFC 9110 5.6.2: methods, header names
TARGET = re.compile(rb"[\x21-\x7e]+")                          # visible ASCII: no control byte, no space
HTTP_VERSION = re.compile(rb"HTTP/[0-9]+(\.[0-9]+)?")


class Reject(Exception):
    """A request answered with an error, and the connection closed."""

    def __init__(self, answer: tuple[bytes, int]) -> None:
        super().__init__(answer[0].split(b"\r\n", 1)[0].decode())
        self.answer = answer


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    path: bytes        # the target without its query
    close: bool        # close after the answer (HTTP/1.0, Connection: close, a body of unknown length)
    length: int        # body bytes to read and drop
    chunked: bool      # a Transfer-Encoding: the body's end is not known, the connection is closed after


def request_line(line: bytes) -> tuple[bytes, bytes, bool]:
    """(method, target, HTTP/1.0) of a request line; Reject when it is not HTTP/1.0 or 1.1."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise Reject(BAD_REQUEST)
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise Reject(VERSION_NOT_SUPPORTED if HTTP_VERSION.fullmatch(version) else BAD_REQUEST)
    if TOKEN.fullmatch(method) is None or TARGET.fullmatch(target) is None:
        raise Reject(BAD_REQUEST)
    return method, target, version == b"HTTP/1.0"


def parse_head(head: bytes) -> Request:
    """One request head (without its blank line), read as strictly as RFC 9112 asks a server to."""
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n") or b"\0" in head:
        raise Reject(BAD_REQUEST)     # a bare CR or LF: a proxy in front may split lines elsewhere
    lines = head.split(b"\r\n")
    method, target, close = request_line(lines[0])
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or TOKEN.fullmatch(name) is None:
            raise Reject(BAD_REQUEST)  # also a folded line and a space before the colon (RFC 9112 5.1, 5.2)
        name = name.lower()
        if name == b"content-length":
            value = value.strip(b" \t").lstrip(b"0") or b"0"
            if not value.isdigit() or (length is not None and value != b"%d" % length):
                raise Reject(BAD_REQUEST)
            if len(value) > 9 or int(value) > MAX_BODY:    # int() of 4,300 digits and more would raise
                raise Reject(BODY_TOO_LARGE)
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection" and b"close" in (t.strip(b" \t").lower() for t in value.split(b",")):
            close = True
    if chunked and length is not None:
        raise Reject(BAD_REQUEST)     # both: the classic request smuggling (RFC 9112 6.1)
    return Request(method, target.split(b"?", 1)[0], close or chunked, length or 0, chunked)


def with_close(answer: bytes, head_length: int) -> bytes:
    """A pre-rendered answer that also says the connection closes after it."""
    return answer[:head_length - 2] + b"Connection: close\r\n\r\n" + answer[head_length:]


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO, never zero (which means: no timeout)."""
    micros = max(1, int(seconds * 1_000_000))
    return struct.pack("ll", micros // 1_000_000, micros % 1_000_000)


class Expired(Exception):
    """The deadline of a read or a write passed."""


def recv_by(conn: socket.socket, deadline: float) -> bytes:
    """One read of a blocking socket that returns by `deadline` (b"" at the end of the stream)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Expired
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(remaining))
    try:
        return conn.recv(65536)
    except BlockingIOError:       # SO_RCVTIMEO ran out
        raise Expired from None


def send_by(conn: socket.socket, data: bytes, deadline: float) -> None:
    """All of `data`, or Expired at `deadline` (a client reading a byte at a time gains nothing)."""
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Expired
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(remaining))
        try:
            view = view[conn.send(view):]
        except BlockingIOError:
            raise Expired from None


def _server_thread_setup() -> None:
    """The server threads run at nice SERVER_NICE (threads have their own nice value on Linux): a burst of
    container start-ups saturating the CPUs must not starve the probes. Needs root; else left as is.
    They block signals (threads started from them inherit the mask): the process's signals go to the
    main thread, and no EINTR restarts a socket timeout."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SERVER_NICE)
    except OSError:
        pass
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def _unavailable(reason: str) -> tuple[bytes, int]:
    return response("503 Service Unavailable", TEXT, f"503 Service Unavailable: {reason}\n".encode())


class HttpServer:
    """The server thread: an accept loop, one short-lived thread per connection (keep-alive honoured),
    and one for the connections past MAX_CONNECTIONS, which only asks them whether they are a probe."""

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
        self._over_cap: collections.deque[tuple[socket.socket, float, bytes]] = collections.deque()
        self._wake, self._woken = socket.socketpair()
        self._wake.setblocking(False)
        self._woken.setblocking(False)
        self._threads: list[threading.Thread] = []
        self._closed = False

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._accept, name="http", daemon=True),
                         threading.Thread(target=self._probes_past_the_cap, name="http-over-cap", daemon=True)]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept
        except OSError:
            pass
        self.sock.close()
        self._wakeup()
        for thread in self._threads:
            thread.join(timeout=2)
        self._wake.close()
        if not self._threads:
            self._woken.close()   # else the over-cap thread's to close

    def _wakeup(self) -> None:
        try:
            self._wake.send(b"x")
        except OSError:
            pass     # full: it is awake already

    def _accept(self) -> None:
        _server_thread_setup()
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)   # EMFILE and the like: do not spin
                continue
            accepted = time.monotonic()
            if not self._slots.acquire(blocking=False):
                self._past_the_cap(conn, accepted)
                continue
            # The request usually arrived with the connection: answer it here, without waking a thread,
            # but never wait on the client here: what it does not take at once (a client that does not
            # read, a request not all in, a body, an error to answer, pipelined requests) is left to
            # the connection's thread.
            pending, unsent, close, deadline = b"", b"", False, accepted + REQUEST_DEADLINE
            try:
                pending = conn.recv(65536, socket.MSG_DONTWAIT)
                if not pending:
                    self._finish(conn)
                    continue
                quick = self._quick(pending)
                if quick is not None:
                    answer, close, pending = quick
                    deadline = 0.0     # the next request's: from its first byte
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
                _thread.start_new_thread(self._serve, (conn, pending, unsent, close, deadline))
            except RuntimeError:
                self._finish(conn)

    def _quick(self, pending: bytes) -> tuple[bytes, bool, bytes] | None:
        """(answer, close, what follows) when `pending` starts with a whole, well-formed request; else None."""
        end = pending.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            return None
        try:
            request = parse_head(pending[:end])
        except Reject:
            return None
        after = end + 4 + request.length
        if request.chunked or len(pending) < after:
            return None
        answer, close = self.respond(request)
        return answer, close, pending[after:]

    def _finish(self, conn: socket.socket) -> None:
        conn.close()
        self._slots.release()

    def _serve(self, conn: socket.socket, pending: bytes, unsent: bytes, close: bool, deadline: float) -> None:
        """A connection's further requests (keep-alive), or its first when it came after the connect;
        first the rest of an answer the accept thread began. `deadline`: the first request's, 0 if it
        was answered."""
        linger = False
        try:
            if unsent:
                send_by(conn, unsent, time.monotonic() + WRITE_TIMEOUT)
            while not close:
                answer, close, linger, pending = self._read(conn, pending, deadline)
                if answer is None:
                    return
                send_by(conn, answer, time.monotonic() + WRITE_TIMEOUT)
                deadline = 0.0
            if linger:
                self._linger(conn)
        except (OSError, Expired):
            pass
        finally:
            self._finish(conn)

    def _read(self, conn: socket.socket, pending: bytes, deadline: float) -> tuple[bytes | None, bool, bool, bytes]:
        """Read one request and answer it: (answer or None when the client went or idled out, close,
        linger: close after draining what the client still sends, what follows the request)."""
        if not deadline:
            if not pending:
                try:
                    pending = recv_by(conn, time.monotonic() + IDLE_TIMEOUT)
                except Expired:
                    return None, True, False, b""
                if not pending:
                    return None, True, False, b""
            deadline = time.monotonic() + REQUEST_DEADLINE
        while pending.startswith(b"\r\n"):
            pending = pending[2:]     # RFC 9112 2.2: empty lines before a request line are ignored
        try:
            searched, line_checked = 0, False
            while (end := pending.find(b"\r\n\r\n", searched)) < 0:
                if not line_checked and (line_end := pending.find(b"\r\n")) >= 0:
                    request_line(pending[:line_end])   # an HTTP/0.9 or HTTP/2 client is told now
                    line_checked = True
                if len(pending) > MAX_HEAD:
                    raise Reject(TOO_LARGE)
                searched = max(0, len(pending) - 3)
                data = recv_by(conn, deadline)
                if not data:
                    return None, True, False, b""
                pending += data
            if end > MAX_HEAD:
                raise Reject(TOO_LARGE)
            request = parse_head(pending[:end])
            pending = pending[end + 4:]
            while len(pending) < request.length:
                data = recv_by(conn, deadline)
                if not data:
                    return None, True, False, b""
                pending += data
        except Reject as reject:
            return reject.answer[0], True, True, b""
        except Expired:
            # Said only to a client that began a request: a connection opened ahead of need (as
            # browsers do) is closed as quietly as an idle one.
            return (TIMED_OUT[0] if pending else None), True, False, b""
        answer, close = self.respond(request)
        return answer, close, request.chunked, pending[request.length:]

    def _linger(self, conn: socket.socket) -> None:
        """Drain what the client still sends before closing: closing with unread bytes sends a reset,
        which can destroy the answer on its way (nginx's lingering_close)."""
        conn.shutdown(socket.SHUT_WR)
        until, drained = time.monotonic() + LINGER, 0
        while drained < LINGER_BYTES:
            data = recv_by(conn, until)
            if not data:
                return
            drained += len(data)

    def respond(self, request: Request) -> tuple[bytes, bool]:
        """The bytes to send for one request, and whether to close the connection after."""
        route = self.routes.get(request.path)
        if route is None:
            full, head_length = NOT_FOUND
        elif request.method != b"GET" and request.method != b"HEAD":
            return NOT_ALLOWED[0], True
        else:
            full, head_length = route()
        if request.chunked:
            full, head_length = with_close(full, head_length), head_length + len(b"Connection: close\r\n")
        if request.method == b"HEAD":
            return full[:head_length], request.close
        return full, request.close

    # past the cap ---------------------------------------------------------------------------------
    def _past_the_cap(self, conn: socket.socket, accepted: float) -> None:
        """A connection past MAX_CONNECTIONS: a probe is answered, anything else gets 503. Its request
        is read here if it came with the connection, else by the over-cap thread (never waited on here)."""
        try:
            head = conn.recv(MAX_HEAD + 4, socket.MSG_DONTWAIT)
        except BlockingIOError:
            head = b""
        except OSError:
            conn.close()
            return
        answer = self._probe_answer(head)
        if answer is None and len(self._over_cap) < MAX_CONNECTIONS:
            self._over_cap.append((conn, accepted, head))
            self._wakeup()
            return
        send_ignoring_errors(conn, answer or BUSY[0])   # None: the over-cap thread is behind
        conn.close()

    def _probe_answer(self, head: bytes) -> bytes | None:
        """What a connection past the cap gets for what it sent so far; None: its head is not in yet."""
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                return TOO_LARGE[0]
            line_end = head.find(b"\r\n")
            try:
                if line_end >= 0:
                    request_line(head[:line_end])
            except Reject as reject:
                return reject.answer[0]
            return None
        try:
            request = parse_head(head[:end])
        except Reject as reject:
            return reject.answer[0]
        route = self.routes.get(request.path) if request.path in PROBES else None
        if route is None or request.method not in (b"GET", b"HEAD"):
            return BUSY[0]
        full, head_length = route()
        full = with_close(full, head_length)
        return full[:head_length + len(b"Connection: close\r\n")] if request.method == b"HEAD" else full

    def _probes_past_the_cap(self) -> None:
        """The over-cap thread: reads the heads of connections past the cap, at most MAX_CONNECTIONS at
        once (the oldest dropped for a new one: an attacker cannot keep a probe out by opening more),
        each until REQUEST_DEADLINE after its accept."""
        _server_thread_setup()
        selector = selectors.DefaultSelector()
        selector.register(self._woken, selectors.EVENT_READ)
        waiting: dict[socket.socket, tuple[float, bytes]] = {}   # oldest first: the next deadline first

        def drop(conn: socket.socket, answer: bytes = b"") -> None:
            del waiting[conn]
            selector.unregister(conn)
            if answer:
                send_ignoring_errors(conn, answer)
            conn.close()

        try:
            while not self._closed:
                timeout = max(0.0, next(iter(waiting.values()))[0] - time.monotonic()) if waiting else None
                for key, _ in selector.select(timeout):
                    conn = key.fileobj
                    if conn is self._woken:
                        try:
                            while self._woken.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        while self._over_cap:
                            new, accepted, head = self._over_cap.popleft()
                            if len(waiting) >= MAX_CONNECTIONS:
                                drop(next(iter(waiting)), BUSY[0])
                            waiting[new] = (accepted + REQUEST_DEADLINE, head)
                            selector.register(new, selectors.EVENT_READ)
                        continue
                    assert isinstance(conn, socket.socket)
                    if conn not in waiting:
                        continue    # dropped by an earlier event of this round
                    try:
                        data = conn.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        drop(conn)
                        continue
                    deadline, head = waiting[conn]
                    head += data
                    answer = self._probe_answer(head)
                    if answer is None:
                        waiting[conn] = (deadline, head)
                    else:
                        drop(conn, answer)
                now = time.monotonic()
                while waiting and next(iter(waiting.values()))[0] <= now:
                    conn, (_, head) = next(iter(waiting.items()))
                    drop(conn, TIMED_OUT[0] if head else b"")
        finally:
            for conn in list(waiting):
                conn.close()
            while self._over_cap:
                self._over_cap.popleft()[0].close()
            selector.close()
            self._woken.close()


def send_ignoring_errors(conn: socket.socket, data: bytes) -> None:
    """A last answer before closing, if the client takes it at once (never waited on)."""
    try:
        conn.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass


class HttpFace:
    """The loop's side: keeps each container's rendered pieces, renders whole responses, runs the server.

    It knows the agent only by what it is handed: a few flags, when the agent started, `agent_doc` (the
    _agent.json document, asked for at each render) and `running_spec` (the spec hash the live container
    of a name runs, None without one). The agent tells it the rest: listings, published and forgotten
    status documents, passes done.
    """

    def __init__(self, address: str, *, resync_interval: float, work_dir: str, attributes: dict[str, str],
                 started_at: float, agent_doc: Callable[[], dict[str, Any]],
                 running_spec: Callable[[str], str | None]) -> None:
        self.metrics = AgentMetrics(__version__)
        self.health = Health(resync_interval)
        self.attributes = dict(attributes)
        self.started_at = started_at
        self.agent_doc = agent_doc
        self.running_spec = running_spec
        self.listing: Listing | None = None      # the last one the agent handed to the loop
        self.server = HttpServer(address, {
            b"/state": self._state, b"/state.json": self._state,
            b"/monitor/statistics": self._statistics, b"/monitor/statistics.json": self._statistics,
            b"/metrics": self._metrics, b"/healthz": self._healthz, b"/readyz": self._readyz,
        })   # binds now: a busy port stops the agent at start (ConfigError, exit 2)
        self.snapshot: Snapshot | None = None
        self.agent_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"reconciler:{socket.gethostname()}:{work_dir}"))
        # Per name: the status document last published, and its rendered pieces (None: to render).
        self.docs: dict[str, dict[str, Any]] = {}
        self.pieces: dict[str, tuple[bytes, bytes | None, tuple[str, str, str, str, str]]] = {}
        self.dirty: set[str] = set()
        self.seen: dict[str, tuple[str, float]] = {}     # name -> (spec hash, perf_counter when first listed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._render_handle: asyncio.TimerHandle | None = None
        self._rendered_at = 0.0
        self._tick_handle: asyncio.TimerHandle | None = None

    # lifecycle (on the loop) ---------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick()
        self.render()
        self.server.start()
        log.info("Serving /state, /monitor/statistics, /metrics, /healthz, /readyz on http://%s", self.server.address)

    def close(self) -> None:
        for handle in (self._render_handle, self._tick_handle):
            if handle is not None:
                handle.cancel()
        self.server.close()

    def _tick(self) -> None:
        self.health.loop_tick = time.monotonic()
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(TICK, self._tick)

    # what the agent and the loop tell ----------------------------------------------------------
    def set_ready(self) -> None:
        self.health.ready = True
        self.changed()

    def listed(self, listing: Listing, seen_at: float) -> None:
        """A listing was handed to the loop: the heartbeat of /healthz, and when each new spec was seen."""
        self.health.last_listing = time.monotonic()
        self.listing = listing
        for name, desired in listing.desired.items():
            seen = self.seen.get(name)
            if seen is not None and seen[0] == desired.spec_hash:
                continue
            if self.running_spec(name) == desired.spec_hash:
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

    def reconciled(self, seconds: float, result: str) -> None:
        self.metrics.reconciled(seconds, result)

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
        except Exception:   # the face must never stop the loop: serve the last snapshot (logged with its traceback)
            log.exception("Rendering the HTTP snapshots failed; serving the previous ones")

    def _render(self) -> None:
        for name in self.dirty:
            doc = self.docs.get(name)
            if doc is not None:
                self.pieces[name] = (state_entry(doc), statistics_entry(doc), container_lines(name, doc))
        self.dirty.clear()
        names = sorted(self.pieces)
        agent_doc = self.agent_doc()
        self.snapshot = Snapshot(
            state=response("200 OK", JSON, self._state_body(agent_doc, names)),
            statistics=response("200 OK", JSON, b"[" + b",".join(
                s for s in (self.pieces[n][1] for n in names) if s is not None) + b"]"),
            metrics=response("200 OK", METRICS_CONTENT_TYPE, self._metrics_body(agent_doc)),
        )

    def _state_body(self, agent_doc: dict[str, Any], names: list[str]) -> bytes:
        head: dict[str, Any] = {
            "id": self.agent_id, "pid": f"reconciler@{self.server.address}", "hostname": socket.gethostname(),
            "version": __version__, "start_time": self.started_at, "os_pid": os.getpid(),
            "attributes": dict(self.attributes), "flags": agent_doc.get("flags", {}), "ready": self.health.ready,
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
        cni = (agent_doc.get("isolator_status") or {}).get("network/cni")
        listing = self.listing
        errors = {"invalid_document": len(listing.invalid), "invalid_file": len(listing.invalid_files),
                  "duplicate_name": len(listing.duplicates)} if listing is not None else {}
        return self.metrics.render({n: p[2] for n, p in self.pieces.items()}, phases, net_cls, errors, cni)

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
    if doc.get("network_infos"):
        # Mesos's NetworkInfo: addresses and port mappings (the interface is ours, not in mesos.proto).
        status["network_infos"] = [{"name": n["name"], "ip_addresses": n["ip_addresses"],
                                    "port_mappings": n["port_mappings"]} for n in doc["network_infos"]]
    return status


def state_entry(doc: dict[str, Any]) -> bytes:
    entry = dict(doc)
    if doc.get("container_id"):
        entry["container_status"] = container_status(doc)
    return json.dumps(entry).encode()


def statistics_entry(doc: dict[str, Any]) -> bytes | None:
    """Mesos's /monitor/statistics entry (a ResourceUsage.Executor), for containers that run: every document
    with a `statistics` block (the loop gives one to each live container), even an empty one (no limits,
    nothing measured yet), so that a container is listed from its first moment."""
    statistics = doc.get("statistics")
    live = doc.get("phase") in ("Running", "Pending", "Terminating")
    if statistics is None or not doc.get("container_id") or not live:
        return None
    if "timestamp" not in statistics:
        statistics = dict(statistics, timestamp=time.time())   # only the limits are known yet
    entry = {
        "container_id": doc["container_id"], "executor_id": doc["name"], "executor_name": doc["name"],
        "framework_id": FRAMEWORK_ID, "source": doc.get("manifest") or "", "statistics": statistics,
    }
    if doc.get("network_infos"):
        entry["network_infos"] = container_status(doc)["network_infos"]   # network/cni: where the counters come from
    return json.dumps(entry).encode()
