"""The registry client against real registries: Debian's docker-registry (distribution 2.8) on 127.0.0.1,
storage in a temp dir, images pushed with skopeo from OCI layouts the tests build.

Registries: plain http; htpasswd Basic auth (bcrypt file from apache2-utils' `htpasswd -B`); Bearer token
auth with a token server written here (RS256 JWTs signed by `openssl dgst`, the cert in the `x5c` header);
TLS with a test CA made by `openssl`. A proxy written here sits in front of the plain registry to tamper with,
cut, stall or redirect blob responses and to record what the client asked for.

Every process started here is killed and every temp dir removed by fixture finalizers, also on failure.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from reconciler.images.errors import DigestMismatch
from reconciler.images.registry import (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST, BlobMismatch, Descriptor,
                                        Platform, RegistryClient, RegistryError, docker_config_credentials,
                                        host_platform)
from tests.imagebuild import File, build, layer
from tests.registries import Processes, Proxy, Registry, skopeo_copy, skopeo_inspect

for tool in ("docker-registry", "skopeo", "openssl", "htpasswd"):
    if not shutil.which(tool):
        pytest.skip(f"'{tool}' is not installed (apt-get install -y docker-registry skopeo apache2-utils openssl)",
                    allow_module_level=True)

HOST_ARCH = host_platform().architecture
OTHER_ARCH = "arm64" if HOST_ARCH != "arm64" else "amd64"
USER, PASSWORD = "puller", "s3cret-pw"


@dataclass
class Image:
    layout: str                 # oci:DIR:TAG source for skopeo
    manifest_digest: str
    layer_digests: list[str]
    config_digest: str
    files: dict[str, bytes]


def _image(tmp: Path, name: str, files: dict[str, bytes]) -> Image:
    """A two-layer gzip OCI layout with the given files spread over the layers."""
    items = list(files.items())
    layers = [layer(*(File(p, d) for p, d in items[:1])), layer(*(File(p, d) for p, d in items[1:]))]
    built = build(str(tmp), f"{name}:1", layers=layers, fmt="oci", compress="gzip", archive_name=name)
    index = json.loads((tmp / name / "index.json").read_text())
    manifest = json.loads((tmp / name / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    return Image(f"oci:{tmp / name}:1", built.manifest_digest or "", [d["digest"] for d in manifest["layers"]],
                 manifest["config"]["digest"], files)


def _put_manifest(reg: Registry, name: str, tag: str, body: bytes, media_type: str) -> str:
    conn = http.client.HTTPConnection(reg.host, timeout=10)
    conn.request("PUT", f"/v2/{name}/manifests/{tag}", body=body, headers={"Content-Type": media_type})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 201, resp.status
    return resp.getheader("Docker-Content-Digest") or ""


# ---------------------------------------------------------------- the token server

class TokenServer:
    """Issues RS256 JWTs the registry trusts (its cert in x5c); `lifetime` seconds past the registry's 60 s leeway."""

    def __init__(self, key: Path, cert_der: bytes, service: str) -> None:
        self.key, self.x5c, self.service = key, base64.b64encode(cert_der).decode(), service
        self.lifetime = 600.0
        self.port = 0
        self.issued: list[str] = []   # scopes asked for
        self.basic: list[str | None] = []

    def token(self, scope: str) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        now = int(time.time())
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access = [{"type": kind, "name": name, "actions": actions.split(",")}]
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": "test-issuer", "sub": USER, "aud": self.service, "iat": now, "nbf": now - 5,
                  "exp": int(now - 60 + self.lifetime), "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             capture_output=True, check=True).stdout
        return f"{signing_input}.{b64(sig)}"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlsplit
                query = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization")
                server.basic.append(auth)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if auth != expected:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                server.issued.append(scope)
                body = json.dumps({"token": server.token(scope), "expires_in": 60}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


# ---------------------------------------------------------------- fixtures

@dataclass
class World:
    tmp: Path
    plain: Registry
    basic: Registry
    proxy: Proxy
    app: Image                  # team/app:1 (OCI), team/app:docker (Docker schema2)
    multi: dict[str, Image]     # arch → image in the index team/multi:1
    multi_index_digest: str
    procs: Processes
    extra: dict[str, Any] = field(default_factory=dict)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tmp = Path(tempfile.mkdtemp(prefix="test-registry-"))
    procs = Processes()
    try:
        plain = procs.registry(tmp / "plain")
        htpasswd = subprocess.run(["htpasswd", "-nbB", USER, PASSWORD], capture_output=True, text=True,
                                  check=True).stdout
        (tmp / "htpasswd").write_text(htpasswd)
        basic = procs.registry(tmp / "basic", auth=f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp / 'htpasswd'}\n")

        images = tmp / "images"
        app = _image(images, "app", {"etc/app.conf": b"answer=42\n", "bin/hello": b"#!/bin/sh\necho hello\n" * 200})
        skopeo_copy(app.layout, f"docker://{plain.host}/team/app:1")
        skopeo_copy(app.layout, f"docker://{plain.host}/team/app:docker", "--format", "v2s2")
        skopeo_copy(app.layout, f"docker://{basic.host}/team/app:1", "--dest-creds", f"{USER}:{PASSWORD}")

        multi = {arch: _image(images, f"multi-{arch}", {"etc/arch": arch.encode(), "data": os.urandom(50000)})
                 for arch in (HOST_ARCH, OTHER_ARCH)}
        entries = []
        # The host's entry comes last, after an attestation-like one, so picking the first would be wrong.
        for arch in (OTHER_ARCH, "unknown", HOST_ARCH):
            img = multi[OTHER_ARCH if arch == "unknown" else arch]
            skopeo_copy(img.layout, f"docker://{plain.host}/team/multi:{arch}")
            raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                  f"docker://{plain.host}/team/multi:{arch}"], capture_output=True, check=True).stdout
            entries.append({"mediaType": OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
                            "size": len(raw), "platform": {"os": "unknown" if arch == "unknown" else "linux",
                                                           "architecture": arch}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        index_digest = _put_manifest(plain, "team/multi", "1", index, OCI_INDEX)

        proxy = Proxy(plain.host)
        proxy.port = procs.serve(proxy.handler())
        yield World(tmp, plain, basic, proxy, app, multi, index_digest, procs)
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _client(reg: Registry | str, **kw: Any) -> RegistryClient:
    host = reg if isinstance(reg, str) else reg.host
    kw.setdefault("insecure_http_hosts", [host])
    return RegistryClient(f"http://{host}", **kw)


def _layer_files(path: Path) -> dict[str, bytes]:
    import gzip
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(path.read_bytes()))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


# ---------------------------------------------------------------- resolve

def test_resolve_by_tag_returns_oci_manifest_and_its_descriptors(world: World) -> None:
    m = _client(world.plain).resolve(f"{world.plain.host}/team/app:1")
    inspected = skopeo_inspect(f"{world.plain.host}/team/app:1")
    assert m.media_type == OCI_MANIFEST
    assert m.digest == inspected["Digest"] == "sha256:" + hashlib.sha256(m.manifest).hexdigest()
    assert m.config.digest == world.app.config_digest
    assert [d.digest for d in m.layers] == world.app.layer_digests == inspected["Layers"]
    assert all(d.size > 0 and d.media_type.endswith("tar+gzip") for d in m.layers)
    assert m.index_digest is None and m.pinned == m.digest


def test_resolve_docker_schema2_manifest(world: World) -> None:
    m = _client(world.plain).resolve("team/app:docker")
    assert m.media_type == DOCKER_MANIFEST
    assert m.digest == skopeo_inspect(f"{world.plain.host}/team/app:docker")["Digest"]
    assert m.config.media_type == "application/vnd.docker.container.image.v1+json"
    assert len(m.layers) == 2


def test_the_digest_skopeo_reports_pins_the_image(world: World) -> None:
    digest = skopeo_inspect(f"{world.plain.host}/team/app:1")["Digest"]
    m = _client(world.plain).resolve(f"{world.plain.host}/team/app@{digest}")
    assert m.digest == digest and [d.digest for d in m.layers] == world.app.layer_digests


def test_index_chooses_the_host_platform(world: World) -> None:
    client = _client(world.plain)
    m = client.resolve("team/multi:1")
    host = world.multi[HOST_ARCH]
    assert m.index_digest == world.multi_index_digest
    assert m.platform == Platform("linux", HOST_ARCH)
    assert [d.digest for d in m.layers] == host.layer_digests
    # skopeo reports the index digest for a multi-platform tag; it pins the same choice.
    assert skopeo_inspect(f"{world.plain.host}/team/multi:1")["Digest"] == m.pinned
    pinned = client.resolve(f"team/multi@{m.pinned}")
    assert pinned.digest == m.digest and pinned.index_digest == m.index_digest

    other = _client(world.plain, platform=Platform("linux", OTHER_ARCH)).resolve("team/multi:1")
    assert [d.digest for d in other.layers] == world.multi[OTHER_ARCH].layer_digests

    with pytest.raises(RegistryError) as e:
        _client(world.plain, platform=Platform("linux", "s390x")).resolve("team/multi:1")
    assert e.value.code == "PLATFORM_UNKNOWN"
    assert f"linux/{OTHER_ARCH}" in str(e.value) and "linux/s390x" in str(e.value)


def test_unknown_tag_is_manifest_unknown(world: World) -> None:
    with pytest.raises(RegistryError) as e:
        _client(world.plain).resolve("team/app:nope")
    assert (e.value.status, e.value.code, e.value.registry) == (404, "MANIFEST_UNKNOWN", world.plain.host)
    assert "MANIFEST_UNKNOWN" in str(e.value) and world.plain.host in str(e.value) and not e.value.temporary
    assert len(str(e.value)) < 600


def test_tampered_manifest_is_refused_by_tag_and_by_digest(world: World) -> None:
    digest = _client(world.plain).resolve("team/app:1").digest
    proxied = _client(f"127.0.0.1:{world.proxy.port}")
    world.proxy.mode = "tamper-manifest"
    try:
        with pytest.raises(DigestMismatch, match=f"the registry stated {digest}"):
            proxied.resolve("team/app:1")
        with pytest.raises(DigestMismatch, match=f"manifest for digest {digest} hashes to sha256:"):
            proxied.resolve(f"team/app@{digest}")
        with pytest.raises(DigestMismatch, match=f"manifest for digest {world.multi_index_digest} hashes to"):
            proxied.resolve(f"team/multi@{world.multi_index_digest}")
    finally:
        world.proxy.mode = "pass"


def test_plain_http_only_for_named_hosts(world: World) -> None:
    with pytest.raises(Exception, match="plain http is refused"):
        RegistryClient(f"http://{world.plain.host}")


# ---------------------------------------------------------------- blobs

def test_blob_fetch_verified_into_path_and_writer(world: World, tmp_path: Path) -> None:
    client = _client(world.plain)
    m = client.resolve("team/app:1")
    seen: list[int] = []
    got = client.fetch_blob(m.name, m.layers[1], tmp_path / "layer", progress=lambda done, total: seen.append(done))
    assert got.size == m.layers[1].size and got.resumed == 0 and seen[-1] == m.layers[1].size
    assert _layer_files(tmp_path / "layer") == {"bin/hello": world.app.files["bin/hello"]}
    with open(tmp_path / "config", "wb") as f:
        client.fetch_blob(m.name, m.config, f)
    assert json.loads((tmp_path / "config").read_bytes())["rootfs"]["type"] == "layers"


def test_tampered_blob_is_refused_and_removed(world: World, tmp_path: Path) -> None:
    m = _client(world.plain).resolve("team/app:1")
    world.proxy.mode = "tamper"
    try:
        with pytest.raises(BlobMismatch) as e:
            _client(f"127.0.0.1:{world.proxy.port}").fetch_blob(m.name, m.layers[0], tmp_path / "layer")
    finally:
        world.proxy.mode = "pass"
    text = str(e.value)
    assert m.layers[0].digest in text and "team/app" in text and f"127.0.0.1:{world.proxy.port}" in text
    assert isinstance(e.value, DigestMismatch) and not (tmp_path / "layer").exists()


def test_corrupted_blob_in_registry_storage_is_refused(world: World, tmp_path: Path) -> None:
    img = _image(world.tmp / "images", "victim", {"a": b"victim a\n", "b": b"victim b\n" * 100})
    skopeo_copy(img.layout, f"docker://{world.plain.host}/team/victim:1")
    blob = world.plain.blob_file(img.layer_digests[1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    client = _client(world.plain)
    m = client.resolve("team/victim:1")
    with pytest.raises(BlobMismatch, match=img.layer_digests[1]):
        client.fetch_blob(m.name, m.layers[1], tmp_path / "b")
    # The same blob with the wrong size in its descriptor is refused as well.
    short = Descriptor(m.layers[0].media_type, m.layers[0].digest, m.layers[0].size - 1)
    with pytest.raises(BlobMismatch, match="descriptor"):
        client.fetch_blob(m.name, short, tmp_path / "a")


def test_interrupted_blob_resumes_with_range(world: World, tmp_path: Path) -> None:
    m = _client(world.plain).resolve("team/multi:1")
    big = max(m.layers, key=lambda d: d.size)
    world.proxy.mode, world.proxy.requests[:] = "cut", []
    try:
        got = _client(f"127.0.0.1:{world.proxy.port}").fetch_blob(m.name, big, tmp_path / "blob")
        blob_requests = [h for _, p, h in world.proxy.requests if big.digest in p]
        with pytest.raises(RegistryError, match="interrupted after"):
            _client(f"127.0.0.1:{world.proxy.port}").fetch_blob(m.name, big, tmp_path / "no-resume", resume=False)
    finally:
        world.proxy.mode = "pass"
    assert got.resumed == 1
    assert [h.get("Range") for h in blob_requests] == [None, f"bytes={big.size // 2}-"]
    assert hashlib.sha256((tmp_path / "blob").read_bytes()).hexdigest() == big.hex
    # The refused-to-resume download left its verified prefix; a later call continues from it.
    assert (tmp_path / "no-resume").stat().st_size == big.size // 2
    world.proxy.requests[:] = []
    again = _client(f"127.0.0.1:{world.proxy.port}").fetch_blob(m.name, big, tmp_path / "no-resume")
    assert again.size == big.size
    assert [h.get("Range") for _, p, h in world.proxy.requests if big.digest in p] == [f"bytes={big.size // 2}-"]


def test_interrupted_blob_without_range_support_restarts_into_a_writer(world: World, tmp_path: Path) -> None:
    m = _client(world.plain).resolve("team/multi:1")
    big = max(m.layers, key=lambda d: d.size)
    world.proxy.mode = "cut-no-range"
    try:
        with open(tmp_path / "blob", "wb") as f:
            got = _client(f"127.0.0.1:{world.proxy.port}").fetch_blob(m.name, big, f)
    finally:
        world.proxy.mode = "pass"
    assert got.resumed == 1 and got.size == big.size
    assert hashlib.sha256((tmp_path / "blob").read_bytes()).hexdigest() == big.hex


def test_stalled_blob_fails_after_the_stall_timeout(world: World, tmp_path: Path) -> None:
    m = _client(world.plain).resolve("team/app:1")
    world.proxy.mode = "stall"
    try:
        start = time.monotonic()
        with pytest.raises(RegistryError, match="stalled: no byte for 0.5 s"):
            _client(f"127.0.0.1:{world.proxy.port}", stall_timeout=0.5).fetch_blob(m.name, m.layers[1],
                                                                                  tmp_path / "l")
        assert time.monotonic() - start < 4
    finally:
        world.proxy.mode = "pass"
        world.proxy.stop.set()
        world.proxy.stop = threading.Event()


def test_redirect_to_blob_storage_drops_authorization(world: World, tmp_path: Path) -> None:
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    proxy = Proxy(world.basic.host, storage_auth=basic)
    proxy.port = world.procs.serve(proxy.handler())
    registry, storage = f"127.0.0.1:{proxy.port}", f"localhost:{proxy.port}"   # two hosts, one server
    client = _client(registry, credentials={registry: (USER, PASSWORD)}, insecure_http_hosts=[registry, storage])
    m = client.resolve("team/app:1")
    proxy.mode, proxy.requests[:] = "redirect", []
    client.fetch_blob(m.name, m.layers[0], tmp_path / "l")
    assert _layer_files(tmp_path / "l") == {"etc/app.conf": b"answer=42\n"}
    (first, second) = [(p, h) for _, p, h in proxy.requests]
    assert first[1].get("Authorization") == basic
    assert second[0].startswith("/_storage/") and "Authorization" not in second[1]

    # A redirect to plain http on a host not named insecure is refused.
    with pytest.raises(RegistryError, match=f"refusing plain http to '{storage}'"):
        _client(registry, credentials={registry: (USER, PASSWORD)}).fetch_blob(m.name, m.layers[0], tmp_path / "l2")


# ---------------------------------------------------------------- auth

def test_basic_auth_from_docker_config(world: World, tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as e:
        _client(world.basic).resolve("team/app:1")
    assert e.value.status == 401 and e.value.code == "UNAUTHORIZED" and "--docker_config" in str(e.value)

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"auths": {world.basic.host: {"auth": base64.b64encode(b"puller:nope").decode()}}}))
    with pytest.raises(RegistryError) as e:
        _client(world.basic, credentials=docker_config_credentials(str(wrong))).resolve("team/app:1")
    assert e.value.status == 401

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {f"http://{world.basic.host}/v2/": {
        "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}))
    client = _client(world.basic, credentials=docker_config_credentials(str(config)))
    m = client.resolve("team/app:1")
    assert [d.digest for d in m.layers] == world.app.layer_digests
    client.fetch_blob(m.name, m.layers[0], tmp_path / "l")
    assert _layer_files(tmp_path / "l") == {"etc/app.conf": b"answer=42\n"}


@pytest.fixture(scope="module")
def token_registry(world: World) -> Iterator[tuple[Registry, TokenServer]]:
    base = world.tmp / "token-auth"
    base.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2",
             "-subj", "/CN=test token issuer", cwd=base)
    _openssl("x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der", cwd=base)
    tokens = TokenServer(base / "key.pem", (base / "cert.der").read_bytes(), "test-registry")
    port = tokens.port = world.procs.serve(tokens.handler())
    reg = world.procs.registry(base / "registry", auth=(
        f"auth:\n  token:\n    realm: http://127.0.0.1:{port}/token\n    service: test-registry\n"
        f"    issuer: test-issuer\n    rootcertbundle: {base / 'cert.pem'}\n"))
    skopeo_copy(world.app.layout, f"docker://{reg.host}/team/app:1", "--dest-creds", f"{USER}:{PASSWORD}")
    yield reg, tokens


def test_bearer_token_auth_and_refresh_when_it_expires(token_registry: tuple[Registry, TokenServer],
                                                       world: World, tmp_path: Path) -> None:
    reg, tokens = token_registry
    creds = {reg.host: (USER, PASSWORD)}
    insecure = [reg.host, f"127.0.0.1:{tokens.port}"]   # the token realm is plain http too
    with pytest.raises(RegistryError) as e:
        _client(reg, insecure_http_hosts=insecure).resolve("team/app:1")   # anonymous: the token server refuses
    assert e.value.status == 401

    tokens.issued[:], tokens.lifetime = [], 2.0
    try:
        client = _client(reg, credentials=creds, insecure_http_hosts=insecure)
        m = client.resolve("team/app:1")
        client.fetch_blob(m.name, m.layers[0], tmp_path / "l0")
        assert tokens.issued == ["repository:team/app:pull"]
        time.sleep(2.5)                      # the token has expired in the middle of the pull
        client.fetch_blob(m.name, m.layers[1], tmp_path / "l1")
    finally:
        tokens.lifetime = 600.0
    assert tokens.issued == ["repository:team/app:pull"] * 2
    assert _layer_files(tmp_path / "l1") == {"bin/hello": world.app.files["bin/hello"]}


# ---------------------------------------------------------------- TLS

def test_tls_registry_with_a_test_ca(world: World, tmp_path: Path) -> None:
    base = world.tmp / "tls"
    base.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=reconciler test CA", cwd=base)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=base)
    (base / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=base)
    reg = world.procs.registry(base / "registry", tls=(str(base / "server.pem"), str(base / "server.key")))
    skopeo_copy(world.app.layout, f"docker://{reg.host}/team/app:1")

    with pytest.raises(RegistryError, match="CA bundle") as e:
        RegistryClient(f"https://{reg.host}").resolve("team/app:1")
    assert e.value.temporary
    with pytest.raises(Exception, match="plain http is refused"):
        RegistryClient(f"http://{reg.host}")
    client = RegistryClient(reg.host, ca_file=str(base / "ca.pem"))
    m = client.resolve("team/app:1")
    client.fetch_blob(m.name, m.layers[0], tmp_path / "l")
    assert _layer_files(tmp_path / "l") == {"etc/app.conf": b"answer=42\n"}


# --- the store pulling from a registry (--docker_registry as a URL) ------------------------------------

def test_the_store_pulls_an_image_from_the_registry_and_fetches_a_layer_once(world: World, tmp_path: Path) -> None:
    from reconciler.images import ImageStore
    store = ImageStore(str(tmp_path / "unused"), str(tmp_path / "store"), registry=_client(world.plain))
    ref = f"{world.plain.host}/team/app:1"
    image = store.pull(ref)
    assert image.id == world.app.config_digest and len(image.layers) == 2
    files = {str(p.relative_to(layer)): p.read_bytes() for layer in map(Path, image.layers)
             for p in layer.rglob("*") if p.is_file()}
    assert files == world.app.files
    # The same image again: served from the store (--docker_tag_refresh_interval is never by default);
    # asked for again (image.cached false): its manifest only, which names a config the store has.
    fetched = []
    real = RegistryClient.fetch_blob

    def counting(self: RegistryClient, name: str, descriptor: Any, dest: Any, **kw: Any) -> Any:
        fetched.append(descriptor.digest)
        return real(self, name, descriptor, dest, **kw)
    RegistryClient.fetch_blob = counting   # type: ignore[method-assign]
    try:
        assert store.pull(ref).id == image.id
        assert store.pull(ref, refresh=True).id == image.id
        # Its Docker schema2 twin has the same config, so the same layers: nothing is fetched.
        assert store.pull(f"{world.plain.host}/team/app:docker").layers == image.layers
    finally:
        RegistryClient.fetch_blob = real   # type: ignore[method-assign]
    assert fetched == [], fetched
    # Pinned by the digest skopeo reports: served from the store without asking the registry.
    pinned = f"{world.plain.host}/team/app@{world.app.manifest_digest}"
    assert store.pull(pinned).id == image.id


def test_the_store_refuses_a_tampered_layer_and_keeps_nothing(world: World, tmp_path: Path) -> None:
    from reconciler.images import ImageStore
    from reconciler.images.errors import ImageError
    world.proxy.mode = "tamper"       # every blob served one bit off
    try:
        store = ImageStore(str(tmp_path / "unused"), str(tmp_path / "store"),
                           registry=_client(f"127.0.0.1:{world.proxy.port}"))
        with pytest.raises(ImageError) as refused:
            store.pull(f"127.0.0.1:{world.proxy.port}/team/app:1")
    finally:
        world.proxy.mode = "pass"
    assert any(d in str(refused.value) for d in [world.app.config_digest, *world.app.layer_digests]), refused.value
    assert list((tmp_path / "store" / "layers").iterdir()) == []
    assert list((tmp_path / "store" / "staging").iterdir()) == []


def test_docker_registry_as_a_url_builds_a_store_on_that_registry(world: World, tmp_path: Path) -> None:
    from reconciler.config import AgentConfig
    from reconciler.images import ImageStore
    from reconciler.images.errors import ImageError
    base = dict(work_dir=str(tmp_path / "work"), docker_store_dir=str(tmp_path / "store"))
    with pytest.raises(ImageError, match="plain http is refused"):
        ImageStore.for_agent(AgentConfig(docker_registry=f"http://{world.plain.host}/", **base))
    store = ImageStore.for_agent(AgentConfig(docker_registry=f"http://{world.plain.host}/",
                                             docker_insecure_registries=world.plain.host, **base))
    assert store.pull(f"{world.plain.host}/team/app:1").id == world.app.config_digest
    with pytest.raises(ValueError, match="is not a registry URL"):
        AgentConfig(docker_registry=f"https://{world.plain.host}/v2/team", **base)


@pytest.mark.root
@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs /bin/busybox (Debian's busybox-static)")
def test_the_agent_runs_a_container_from_a_registry_image(world: World) -> None:
    """--docker_registry https?://...: the real agent pulls busybox from a real registry and runs it."""
    from tests.imagebuild import build, busybox_layer
    from tests.test_images_e2e import image_env
    with image_env("registry") as env:
        layout = env.registry / "layouts"
        build(str(layout), "busybox:1", layers=[busybox_layer()], fmt="oci", compress="gzip",
              archive_name="busybox", config={"Env": ["PATH=/bin"]})
        skopeo_copy(f"oci:{layout / 'busybox'}:1", f"docker://{world.plain.host}/tools/busybox:1")
        env.agent.start(image_providers="docker", docker_registry=f"http://{world.plain.host}",
                        docker_insecure_registries=world.plain.host, docker_store_dir=env.store)
        env.write("hello", f"{world.plain.host}/tools/busybox:1", {"value": "echo pulled-and-ran; cat /etc/os* 2>/dev/null; true"})
        status = env.wait("hello", timeout=30)
        assert status["phase"] == "Succeeded", status
        assert "pulled-and-ran" in env.stdout(status)
        assert status["image"] == f"{world.plain.host}/tools/busybox:1" and status["image_id"].startswith("sha256:")


def test_images_pull_prefetches_from_the_registry(world: World, tmp_path: Path) -> None:
    """`reconciler images pull NAME`: what a fleet rollout runs before it switches manifests."""
    flags = [f"--docker_registry=http://{world.plain.host}", f"--docker_insecure_registries={world.plain.host}",
             f"--docker_store_dir={tmp_path / 'store'}", f"--work_dir={tmp_path / 'work'}"]
    images = [sys.executable, "-m", "reconciler", "images"]
    pulled = subprocess.run([*images, "pull", f"{world.plain.host}/team/app:1", *flags], capture_output=True,
                            text=True, timeout=60)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.split("\t")[1] == world.app.config_digest
    listed = subprocess.run([*images, "list", "--json", *flags], capture_output=True, text=True, timeout=60)
    assert world.app.config_digest in listed.stdout, listed
    missing = subprocess.run([*images, "pull", f"{world.plain.host}/team/nothing:1", *flags], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "MANIFEST_UNKNOWN" in missing.stderr and "Traceback" not in missing.stderr
