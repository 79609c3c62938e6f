"""The HTTP face against hostile clients, each attack made for real over loopback: slow clients
holding every connection slot (the probes must still answer, the slow ones are cut at the request
deadline), a request body made of a second request (one answer only), a body too large, chunked
bodies and smuggling shapes, HTTP versions other than 1.0 and 1.1. The server is the agent's own
(reconciler.http.HttpServer), in process; the last test plants the slot attack on a real agent.

Every socket has a timeout and every loop a bound: a regression fails, it does not hang.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from reconciler.http import MAX_BODY, MAX_CONNECTIONS, REQUEST_DEADLINE, HttpServer, response
from tests.test_http import eventually, free_port, get

HEALTHZ = b"alive\n"
READYZ = b"ready\n"
STATE = b'{"state": "the big one"}'


@contextmanager
def server() -> Iterator[HttpServer]:
    """The agent's server with answers each telling which route gave them."""
    routes = {b"/healthz": lambda: response("200 OK", "text/plain", HEALTHZ),
              b"/readyz": lambda: response("200 OK", "text/plain", READYZ),
              b"/state": lambda: response("200 OK", "application/json", STATE)}
    srv = HttpServer(f"127.0.0.1:{free_port()}", routes)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def read_answers(sock: socket.socket, timeout: float = 3.0) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Every whole response the server sends until it closes or goes quiet for `timeout`:
    ([(status, headers, body)], closed by the server)."""
    sock.settimeout(timeout)
    data, closed = b"", False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except TimeoutError:
        pass
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"a partial response: {data[:200]!r}"
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        answers.append((int(lines[0].split(" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return answers, closed


def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 3.0) -> tuple[list[Any], bool]:
    """Send `parts` on one connection (`pause` seconds apart), then read every answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            sock.sendall(part)
        return read_answers(sock, timeout)


# slots and deadlines -------------------------------------------------------------------------------

class Slowloris:
    """`count` connections sending a request head one byte a second, never finishing it; records when
    each was closed by the server and what it was told."""

    def __init__(self, port: int, count: int, stack: ExitStack) -> None:
        self.socks = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(count)]
        self.opened = time.monotonic()
        self.closed_at: dict[int, float] = {}
        self.told: dict[int, bytes] = {}
        for sock in self.socks:
            sock.sendall(b"GET /state HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        for _ in range(30):              # 30 s at most, far past the deadline
            if self.stop.wait(1.0) or len(self.closed_at) == len(self.socks):
                return
            for i, sock in enumerate(self.socks):
                if i in self.closed_at:
                    continue
                try:
                    while chunk := sock.recv(4096):
                        self.told[i] = self.told.get(i, b"") + chunk
                    self.closed_at[i] = time.monotonic()
                except BlockingIOError:
                    try:
                        sock.send(b"X")      # one more byte of a header line that never ends
                    except OSError:
                        self.closed_at[i] = time.monotonic()
                except OSError:
                    self.closed_at[i] = time.monotonic()


def timed_get(port: int, path: str, method: str = "GET") -> tuple[float, int, bytes]:
    started = time.monotonic()
    status, _, body = get(port, path, method=method, timeout=3)
    return time.monotonic() - started, status, body


def test_probes_answer_while_slow_clients_fill_every_slot_and_those_are_cut_at_the_deadline() -> None:
    with server() as srv, ExitStack() as stack:
        attack = Slowloris(srv.port, MAX_CONNECTIONS, stack)
        time.sleep(0.3)
        # Every slot is held: another path is refused at once, not queued behind the slow clients.
        seconds, status, body = timed_get(srv.port, "/state")
        assert status == 503 and b"too many connections" in body and seconds < 1.0, (seconds, status, body)

        # The probes are answered, whether their request came with the connection or after it.
        for path, expected in (("/healthz", HEALTHZ), ("/readyz", READYZ)):
            seconds, status, body = timed_get(srv.port, path)
            assert (status, body) == (200, expected) and seconds < 1.0, (path, seconds, status, body)
        assert timed_get(srv.port, "/healthz", method="HEAD")[1] == 200
        answers, closed = exchange(srv.port, b"GET /heal", b"thz HTTP/1.1\r\nHost: kubelet\r\n\r\n", pause=0.3)
        assert [(s, b) for s, _, b in answers] == [(200, HEALTHZ)] and closed
        assert answers[0][1]["connection"] == "close"
        # More clients past the cap than it keeps waiting: the newest (the probe) is still heard.
        extra = [stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
                 for _ in range(MAX_CONNECTIONS + 8)]
        time.sleep(0.2)
        assert timed_get(srv.port, "/healthz")[1] == 200
        for sock in extra:
            sock.close()

        # A byte a second buys nothing: each slow client is told 408 and closed at the deadline.
        attack.thread.join(timeout=REQUEST_DEADLINE + 10)
        assert len(attack.closed_at) == MAX_CONNECTIONS, f"{MAX_CONNECTIONS - len(attack.closed_at)} still open"
        held = sorted(at - attack.opened for at in attack.closed_at.values())
        assert REQUEST_DEADLINE - 0.5 < held[0] and held[-1] < REQUEST_DEADLINE + 2.0, held
        assert all(told.startswith(b"HTTP/1.1 408 ") for told in attack.told.values()) and \
            len(attack.told) == MAX_CONNECTIONS, attack.told
        # And the slots are free again.
        assert get(srv.port, "/state", timeout=3)[:3:2] == (200, STATE)


def test_a_connection_that_sends_nothing_is_closed_quietly_at_the_deadline() -> None:
    with server() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=REQUEST_DEADLINE + 5) as idle:
        opened = time.monotonic()
        assert idle.recv(100) == b""
        assert REQUEST_DEADLINE - 0.5 < time.monotonic() - opened < REQUEST_DEADLINE + 2.0


def test_keep_alive_waits_for_a_next_request_but_a_started_one_has_the_deadline() -> None:
    with server() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=15) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(REQUEST_DEADLINE + 0.5)      # idle between requests: not the request deadline
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answers, closed = read_answers(sock, timeout=REQUEST_DEADLINE + 3)
        assert [(s, b) for s, _, b in answers][:1] == [(200, HEALTHZ)]
        assert [s for s, _, _ in answers[1:]] == [408] and closed
        assert REQUEST_DEADLINE - 0.5 < time.monotonic() - started < REQUEST_DEADLINE + 2.0


# bodies ----------------------------------------------------------------------------------------------

SMUGGLED = b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("pause", [0.0, 0.2], ids=["at-once", "body-later"])
def test_a_body_that_looks_like_a_request_is_read_as_a_body(pause: float) -> None:
    with server() as srv:
        # GET with a body, then a real request on the same connection: two answers, neither /state's.
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
        answers, closed = exchange(srv.port, head, SMUGGLED + b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
                                   pause=pause, timeout=1.0)
        assert [(s, b) for s, _, b in answers] == [(200, HEALTHZ), (200, READYZ)], answers
        assert not closed, "keep-alive goes on after a body"
        # POST with such a body: one 405, the connection closed, and the client reads it (no reset).
        head = b"POST /state HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
        answers, closed = exchange(srv.port, head, SMUGGLED, pause=pause)
        assert [s for s, _, _ in answers] == [405] and closed, answers


def test_a_body_over_the_cap_is_413_and_the_client_reads_it() -> None:
    with server() as srv:
        size = 4 * MAX_BODY
        head = b"POST /state HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        answers, closed = exchange(srv.port, head, (SMUGGLED * (size // len(SMUGGLED) + 1))[:size])
        assert [s for s, _, _ in answers] == [413] and closed, answers
        assert b"65536" in answers[0][2]
        # Just at the cap: read, answered, kept alive.
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MAX_BODY
        answers, closed = exchange(srv.port, head, b"x" * MAX_BODY, b"GET /readyz HTTP/1.1\r\n\r\n", timeout=1.0)
        assert [(s, b) for s, _, b in answers] == [(200, HEALTHZ), (200, READYZ)] and not closed


def test_a_chunked_body_is_answered_then_the_connection_closed() -> None:
    with server() as srv:
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        answers, closed = exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                                   chunk, pause=0.1)
        assert [(s, b) for s, _, b in answers] == [(200, HEALTHZ)] and closed, answers
        assert answers[0][1]["connection"] == "close"
        # HEAD says so too, without the body.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=3) as sock:
            sock.sendall(b"HEAD /healthz HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunk)
            sock.settimeout(3)
            got = b""
            while chunk_ := sock.recv(4096):
                got += chunk_
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"Connection: close\r\n\r\n"), got


@pytest.mark.parametrize("head, status", [
    (b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nContent-Length : 5\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded: line\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
], ids=["cl-and-te", "two-lengths", "negative-length", "space-before-colon", "folded", "bare-lf",
        "two-lengths-one-huge", "huge-length"])
def test_request_smuggling_shapes_are_refused_and_closed(head: bytes, status: int) -> None:
    with server() as srv:
        answers, closed = exchange(srv.port, head + b"hello" + SMUGGLED)
        assert [s for s, _, _ in answers] == [status] and closed, answers
        assert get(srv.port, "/healthz", timeout=3)[0] == 200, "the server is still there"


# versions --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),          # HTTP/2's prior-knowledge preface
    (b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    (b"GET /healthz HTTP/3\r\n\r\n", 505),
    (b"GET /healthz\r\n", 400),                           # HTTP/0.9: one line, no blank line after it
    (b"GET /healthz\r\n\r\n", 400),
    (b"GET /healthz HTTQ/1.1\r\n\r\n", 400),
    (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
    (b"G\x01T /healthz HTTP/1.1\r\n\r\n", 400),
], ids=["http2", "h2-preface", "http1.2", "http3", "http0.9", "no-version", "not-http", "two-spaces", "control-byte"])
def test_only_http_1_0_and_1_1_are_answered(request_bytes: bytes, status: int) -> None:
    with server() as srv:
        started = time.monotonic()
        answers, closed = exchange(srv.port, request_bytes)
        assert [s for s, _, _ in answers] == [status] and closed, answers
        assert time.monotonic() - started < 1.0, "told at once, not at the deadline"


def test_http_1_0_is_answered_and_closed() -> None:
    with server() as srv:
        answers, closed = exchange(srv.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert [(s, b) for s, _, b in answers] == [(200, HEALTHZ)] and closed
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=3)
        try:
            conn.request("GET", "/readyz", body=b"a body http.client sends with a Content-Length")
            reply = conn.getresponse()
            assert (reply.status, reply.read()) == (200, READYZ)
            conn.request("GET", "/healthz")
            reply = conn.getresponse()
            assert (reply.status, reply.read()) == (200, HEALTHZ), "the same connection, after a body"
        finally:
            conn.close()


# the agent -----------------------------------------------------------------------------------------

@pytest.mark.root
def test_slow_clients_past_the_cap_cannot_fail_the_agents_liveness_probe(agent_env: Any) -> None:
    env = agent_env
    env.launcher, env.isolation = "posix", "posix/cpu,posix/mem"
    port = free_port()
    agent = env.start(f"--http_address=127.0.0.1:{port}", "--log_level=warning")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if get(port, "/readyz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError(f"the agent never became ready: {env.stop(agent)}")
    with ExitStack() as stack:
        attack = Slowloris(port, MAX_CONNECTIONS + 16, stack)
        time.sleep(0.5)
        for path in ("/healthz", "/readyz", "/healthz"):
            seconds, status, body = timed_get(port, path)
            assert (status, body) == (200, b"ok\n") and seconds < 1.0, (path, seconds, status, body)
        assert timed_get(port, "/metrics")[1] == 503, "the cap holds for everything else"
        attack.stop.set()
    eventually(lambda: get(port, "/metrics", timeout=3)[0] == 200, timeout=10, what="/metrics once the clients went")
    env.stop(agent)
    assert agent.returncode == 0
