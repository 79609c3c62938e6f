"""Real registries for tests and benchmarks: Debian's docker-registry (distribution 2.8) on 127.0.0.1 with
its storage in a temp dir, skopeo to push, and a proxy in front of a registry that tampers with, cuts,
stalls, slows, holds or redirects blob responses and records every request (and how many blob GETs ran at once).

Every process started through `Processes` is killed by its `close()`, which fixtures call also on failure.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = ("docker-registry", "skopeo")
HOLD_OVER = 64 << 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, log: Path | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Registry:
    host: str              # 127.0.0.1:PORT
    root: Path             # its storage
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.servers: list[http.server.HTTPServer] = []

    def registry(self, base: Path, auth: str = "", tls: tuple[str, str] | None = None) -> Registry:
        port = free_port()
        base.mkdir(parents=True)
        root = base / "storage"
        tls_yaml = f"\n  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}" if tls else ""
        (base / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {root}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-secret{tls_yaml}\n{auth}")
        log = base / "registry.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        wait_port(port, proc, log)
        return Registry(f"127.0.0.1:{port}", root, "https" if tls else "http")

    def serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> int:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return server.server_address[1]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", *extra, src, dest]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"


def skopeo_inspect(ref: str, *extra: str) -> dict[str, Any]:
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", *extra, f"docker://{ref}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- the proxy

class Proxy:
    """Forwards to a registry; `mode` decides what it does to blob GETs. Records every request.

    Modes: pass; tamper (a blob one bit off); tamper-manifest; cut (half a blob, then the connection
    closes); cut-no-range (the same, from a server that ignores Range); stall (10 bytes, then silence
    until `stop`); redirect (to "blob storage" on the same proxy); slow (blobs sent at `rate` bytes a
    second); hold (half of each blob over HOLD_OVER bytes, an image's layers
    but not its config, the rest once `release` is set). `max_active` is the most blob
    GETs that were being answered at once; `bytes_served` the blob bytes sent. In mode pass, responses are
    streamed as they come from the registry."""

    def __init__(self, upstream: str, storage_auth: str | None = None) -> None:
        self.upstream, self.storage_auth = upstream, storage_auth
        self.mode = "pass"
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.stop = threading.Event()
        self.release = threading.Event()
        self.rate = 1 << 20
        self.port = 0
        self.active = self.max_active = 0
        self.bytes_served = 0         # of blob bodies
        self._lock = threading.Lock()

    def blob_gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET" and "/blobs/" in path
                and not path.startswith("/_storage/")]

    def manifest_gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method in ("GET", "HEAD") and "/manifests/" in path]

    def reset(self) -> None:
        self.requests.clear()
        self.mode, self.max_active, self.bytes_served = "pass", 0, 0
        self.release.clear()

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers: dict[str, str] = {}
                for k, v in self.headers.items():   # repeated headers (skopeo's Accept) as one list
                    if k.lower() != "host":
                        headers[k] = f"{headers[k]}, {v}" if k in headers else v
                proxy.requests.append(("GET", self.path, dict(headers)))  # as the client sent them
                blob = "/blobs/sha256:" in self.path
                if self.path.startswith("/_storage/"):  # the "blob storage" a redirect points at
                    self.path = self.path.removeprefix("/_storage")
                    headers.pop("Authorization", None)
                    if proxy.storage_auth:  # storage's own credentials, as a signed URL would carry
                        headers["Authorization"] = proxy.storage_auth
                elif blob and proxy.mode == "redirect":
                    self.send_response(307)
                    self.send_header("Location", f"http://localhost:{proxy.port}/_storage{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                asked_range = "Range" in headers
                if proxy.mode == "cut-no-range":   # a server without Range support
                    headers.pop("Range", None)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=10)
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                if proxy.mode == "pass":
                    self._stream(resp, blob)
                    conn.close()
                    return
                body = resp.read()
                conn.close()
                mode = proxy.mode if blob and resp.status in (200, 206) else "pass"
                if proxy.mode == "tamper-manifest" and "/manifests/" in self.path:
                    body += b" "   # still valid JSON, no longer the bytes the digest names
                if mode == "tamper":
                    body = body[:-1] + bytes([body[-1] ^ 0xFF])
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode in ("cut", "cut-no-range") and not asked_range:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == "stall":
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    proxy.stop.wait(5)
                    return
                with proxy._lock:
                    proxy.active += blob
                    proxy.max_active = max(proxy.max_active, proxy.active)
                try:
                    if mode == "slow":
                        step = max(1, proxy.rate // 20)
                        for at in range(0, len(body), step):
                            self.wfile.write(body[at:at + step])
                            self.wfile.flush()
                            time.sleep(0.05)
                    elif mode == "hold" and len(body) > HOLD_OVER:
                        self.wfile.write(body[:len(body) // 2])
                        self.wfile.flush()
                        proxy.release.wait(30)
                        self.wfile.write(body[len(body) // 2:])
                    else:
                        self.wfile.write(body)
                    with proxy._lock:
                        proxy.bytes_served += len(body) if blob else 0
                finally:
                    with proxy._lock:
                        proxy.active -= blob

            def _stream(self, resp: http.client.HTTPResponse, blob: bool) -> None:
                """Passed on as it arrives (a fleet of pulls through it holds no whole blob in memory)."""
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.end_headers()
                counted = blob and resp.status in (200, 206)
                with proxy._lock:
                    proxy.active += counted
                    proxy.max_active = max(proxy.max_active, proxy.active)
                try:
                    while chunk := resp.read(1 << 20):
                        self.wfile.write(chunk)
                        if counted:
                            with proxy._lock:
                                proxy.bytes_served += len(chunk)
                finally:
                    with proxy._lock:
                        proxy.active -= counted

        return Handler


