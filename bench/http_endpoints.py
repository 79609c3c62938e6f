"""The HTTP face under load: /metrics and /state latency with 500 containers WHILE the loop is busy.

A client thread asks, in turn, the agent for /metrics and /state and a peer for the same — a new
connection each time, as kubelet's probes and a Prometheus without keep-alive do; paced every
--interval ms — and times connect → last byte, through these windows of one agent's life:

  idle-0      the agent with no container
  burst       --containers manifests written at once, until every container is Running
  idle-N      the same containers running, nothing to do (--resync_interval=1hrs)
  cap-full    the same, while slow clients (a request head never finished, as Slowloris sends) hold
              every connection slot and more: /healthz and /readyz, what a liveness probe meets then
  recovery    the agent restarted over them (--resync_interval=2secs): recover, first listing, reconcile all
  statistics  then --stats-seconds of statistics passes and full re-lists every 2 s

The peer is the same server code in a process of its own with nothing else to do, serving bodies of
the sizes the agent serves: what this machine gives anyway (2 shared cores: its scheduling noise is
in both). For each window and path: p50, p99 and max of both, the ratio of p99s (what the busy agent
adds), the agent's CPU use (to show the loop was busy), and the verdict against the 20 ms target.

Run as root: python3 bench/http_endpoints.py [--containers 500] [--interval 10] [--stats-seconds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_ns, percentile, stop_agent_and_destroy_all, tempdir, wait_for, write_manifest, remove_tempdir  # noqa: E402

MAX_CONNECTIONS = 64   # reconciler/http.py's; not imported, so that this bench runs against older agents too

SPEC = {"kill_grace_period": "1secs", "resources": {"cpus": 0.01, "mem": 32},
        "command": {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "3600"]}}
TARGET = 0.020
PATHS = ("/metrics", "/state")
PEER = """
import sys, threading
from reconciler.http import HttpServer, response
sizes = {b"/metrics": 150 * 1024, b"/state": 600 * 1024}
answers = {path: response("200 OK", "application/json", b"x" * size) for path, size in sizes.items()}
server = HttpServer(sys.argv[1], {path: (lambda a=a: a) for path, a in answers.items()})
server.start()
threading.Event().wait()
"""

Samples = dict[str, list[tuple[float, int, float]]]   # path -> (seconds, body bytes, when)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, path: str) -> tuple[float, int, int]:
    """(seconds from connect to the last byte, status, body bytes)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: connection closed before the head")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            chunk = conn.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"{path}: connection closed after {len(body)} of {length} bytes")
            body += chunk
    return time.perf_counter() - started, int(head.split(b" ")[1]), len(body)


class Client(threading.Thread):
    """Paced requests to the agent and the peer in turn; samples go to the current window."""

    def __init__(self, ports: dict[str, int], interval: float, nice: int) -> None:
        super().__init__(daemon=True)
        self.ports, self.interval, self.nice = ports, interval, nice
        self.window: dict[str, Samples] | None = None
        self.errors: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        if self.nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        turns = [(who, path) for path in PATHS for who in self.ports]
        turn = 0
        while not self.stopped.is_set():
            window = self.window
            if window is not None:
                who, path = turns[turn % len(turns)]
                turn += 1
                try:
                    seconds, status, size = fetch(self.ports[who], path)
                    if status == 200:
                        window[who][path].append((seconds, size, time.perf_counter()))
                except (OSError, ValueError, StopIteration) as exc:
                    self.errors.append(f"{who} {path}: {exc}")
            time.sleep(self.interval)

    def begin(self) -> None:
        self.window = {who: {path: [] for path in PATHS} for who in self.ports}

    def end(self) -> dict[str, Samples]:
        window, self.window = self.window, None
        assert window is not None
        return window


def cpu_seconds(pid: int) -> float:
    return cpu_ns(pid) / 1e9


def figures(samples: list[float]) -> str:
    return (f"p50 {percentile(samples, 50) * 1000:6.2f}  p99 {percentile(samples, 99) * 1000:6.2f}"
            f"  max {max(samples) * 1000:6.2f} ms")


def report(label: str, window: dict[str, Samples], cpu: float, wall: float) -> list[tuple[str, str, float, float]]:
    out = []
    for path in PATHS:
        ours = [s for s, _, _ in window["agent"][path]]
        peer = [s for s, _, _ in window["peer"][path]]
        if not ours or not peer:
            print(f"{label:10s} {path:9s} no samples")
            continue
        size = max(b for _, b, _ in window["agent"][path])
        p99 = percentile(ours, 99)
        verdict = "met" if p99 <= TARGET else "NOT met"
        print(f"{label:10s} {path:9s} agent {figures(ours)} ({size / 1024:4.0f} KiB, n={len(ours)})"
              f" | peer {figures(peer)} | p99 {p99 / percentile(peer, 99):5.2f}x peer  [p99 <= 20 ms: {verdict}]")
        out.append((label, path, p99, max(ours)))
    print(f"{'':10s} agent CPU {cpu / wall * 100:5.1f}% of one core over {wall:.1f} s;"
          f" load average {os.getloadavg()[0]:.1f}; {freshness(window['agent']['/state'])}")
    return out


def freshness(samples: list[tuple[float, int, float]]) -> str:
    """How stale /state got: the longest time its body stayed the same size while it still changed."""
    changes = [when for (_, size, when), (_, before, _) in zip(samples[1:], samples) if size != before]
    if len(changes) < 2:
        return "/state did not change"
    return f"/state changed {len(changes)} times, at worst {max(b - a for a, b in zip(changes, changes[1:])) * 1000:.0f} ms apart"


def start_agent(flags: list[str], resync: str, log: Path) -> subprocess.Popen:
    """Its log to a file: a pipe nobody reads would block the agent once full."""
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "reconciler", "run", *flags, f"--resync_interval={resync}",
                                 "--log_level=warning"], stdout=out, stderr=out)


def all_running(status_dir: Path, pid: int, count: int) -> bool:
    """From _agent.json (one file: polling 500 status files would steal the client thread's GIL)."""
    try:
        doc = json.loads((status_dir / "_agent.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return doc.get("pid") == pid and doc.get("counts", {}).get("Running") == count


def answers(port: int, path: str = "/healthz") -> bool:
    try:
        return fetch(port, path)[1] == 200
    except OSError:
        return False


def cap_full(port: int, slow: int, interval: float) -> tuple[list[tuple[str, str, float, float]], bool]:
    """The probes while `slow` clients hold connections with a request head they never finish: every
    answer must be a 200 (a 503 fails a liveness probe), in as little time as when nobody attacks.
    Done within 2 s, before the agent's request deadline cuts the slow clients."""
    held = []
    try:
        for _ in range(slow):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n")
            held.append(conn)
        time.sleep(0.1)
        times: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
        statuses: dict[int | str, int] = {}   # status or the error that came instead
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            for path, samples in times.items():
                try:
                    seconds, status, _ = fetch(port, path)
                    if status == 200:
                        samples.append(seconds)
                except OSError as exc:
                    status = type(exc).__name__
                statuses[status] = statuses.get(status, 0) + 1
                time.sleep(interval)
        try:
            other: int | str = fetch(port, "/metrics")[1]
        except OSError as exc:
            other = type(exc).__name__
    finally:
        for conn in held:
            conn.close()
    out = []
    answered = ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items(), key=str))
    for path, samples in times.items():
        if not samples:
            print(f"{'cap-full':10s} {path:9s} no 200 at all  [{answered}]")
            continue
        p99 = percentile(samples, 99)
        print(f"{'cap-full':10s} {path:9s} agent {figures(samples)} (n={len(samples)})"
              f"  [p99 <= 20 ms: {'met' if p99 <= TARGET else 'NOT met'}]")
        out.append(("cap-full", path, p99, max(samples)))
    print(f"{'':10s} {slow} slow clients (cap {MAX_CONNECTIONS}); answers: {answered};"
          f" /metrics meanwhile: {other}  [every probe 200: {'met' if set(statuses) == {200} else 'NOT met'}]")
    return out, set(statuses) == {200}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--interval", type=float, default=10, help="ms between requests")
    parser.add_argument("--stats-seconds", type=float, default=12)
    parser.add_argument("--isolation", default="namespaces/pid,namespaces/ipc,posix/cpu,posix/mem")
    parser.add_argument("--launcher", default="linux")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="the client thread's nice value (below 0 takes the client's own scheduling out)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/http_endpoints.py needs root")
    work = tempdir("reconciler-bench-http-")
    manifests, work_dir = work / "manifests", work / "work"
    manifests.mkdir()
    status_dir = work_dir / "status"
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    port, peer_port = free_port(), free_port()
    flags = [f"--manifests={manifests}", f"--work_dir={work_dir}", f"--isolation={args.isolation}",
             f"--launcher={args.launcher}", f"--cgroups_root={root}"]
    http_flags = flags + [f"--http_address=127.0.0.1:{port}"]
    peer = subprocess.Popen([sys.executable, "-c", PEER, f"127.0.0.1:{peer_port}"])
    agent = start_agent(http_flags, "1hrs", work / "agent.log")
    client = Client({"agent": port, "peer": peer_port}, args.interval / 1000, args.client_nice)
    client.start()
    names = [f"c-{i:04d}" for i in range(args.containers)]
    results: list[tuple[str, str, float, float]] = []
    try:
        assert wait_for(lambda: (status_dir / "_agent.json").exists() and answers(peer_port, "/state"), 30, 0.05), \
            "the agent or the peer did not start"
        print(f"{args.containers} containers, launcher {args.launcher}, isolation {args.isolation}; a request every"
              f" {args.interval:g} ms (new connection each), client nice {args.client_nice}; times in ms")

        def measure(label: str, until: Callable[[], bool] | float) -> None:
            pid = agent.pid
            client.begin()
            cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
            if callable(until):
                assert wait_for(until, 600, 0.1), f"{label}: never done"
            else:
                time.sleep(until)
            cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - wall0
            results.extend(report(label, client.end(), cpu, wall))

        measure("idle-0", 3.0)
        for name in names:
            write_manifest(manifests, name, SPEC)
        measure("burst", lambda: all_running(status_dir, agent.pid, len(names)))
        measure(f"idle-{args.containers}", 3.0)
        under_attack, probes_all_200 = cap_full(port, MAX_CONNECTIONS + 16, args.interval / 1000)
        results.extend(under_attack)
        time.sleep(0.5)    # the slow clients' connections closed and their slots back

        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        agent = start_agent(http_flags, "2secs", work / "agent.log")
        assert wait_for(lambda: answers(port), 30, 0.01), "the restarted agent never listened"
        measure("recovery", lambda: answers(port, "/readyz") and all_running(status_dir, agent.pid, len(names)))
        measure("statistics", args.stats_seconds)
        worst = max(results, key=lambda r: r[2])
        print(f"worst p99: {worst[2] * 1000:.2f} ms ({worst[0]} {worst[1]}); worst single answer:"
              f" {max(r[3] for r in results) * 1000:.2f} ms  [p99 <= 20 ms in every window:"
              f" {'met' if all(r[2] <= TARGET for r in results) else 'NOT met'}; every probe 200 with the slots full:"
              f" {'met' if probes_all_200 else 'NOT met'}]")
        if client.errors:
            print(f"errors: {len(client.errors)} (first: {client.errors[0]})")
        logged = (work / "agent.log").read_text().strip()
        if logged:
            print("agent log:\n" + logged[-2000:])
    finally:
        client.stopped.set()
        peer.kill()
        peer.wait()
        stop_agent_and_destroy_all(agent, manifests, flags + ["--log_level=warning"], root)
        remove_tempdir(work)


if __name__ == "__main__":
    main()
