"""A Docker Registry HTTP API v2 / OCI distribution client: resolves a reference to the manifest of this host's
platform and streams blobs with their digest verified. It knows registries, not containers or the store.

    client = RegistryClient("https://registry.local:5000",
                            credentials=docker_config_credentials("/root/.docker/config.json"))
    m = client.resolve("team/app:1.2")                     # or "team/app@sha256:…", or an ImageReference
    for layer in m.layers:
        client.fetch_blob(m.name, layer, f"/store/blobs/{layer.hex}")

Better than Mesos's puller on the points its users hit: it asks for OCI manifests and indexes as well as
Docker's (an OCI-only image is not a 404), chooses the host's platform from a manifest list or index, gets a
new Bearer token when one expires in the middle of a long layer, follows redirects to blob storage without
handing the registry's credentials to another host, and resumes an interrupted blob with `Range`.

Every byte is checked: a manifest pulled by digest must hash to it (and one pulled by tag to the
Docker-Content-Digest the registry states), a blob to its descriptor's digest and size, while streaming.
Plain http is used only for hosts named in `insecure_http_hosts` (Mesos: a registry URL given as http://).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import platform as _platform
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Protocol, Union, cast

from reconciler.images.errors import DigestMismatch, ImageError
from reconciler.images.reference import DOCKER_HUB, ImageReference, parse_reference

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
MANIFEST_LISTS = (DOCKER_MANIFEST_LIST, OCI_INDEX)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

MAX_MANIFEST_BYTES = 4 << 20   # what distribution itself accepts on push
MAX_ERROR_BODY = 64 << 10      # of an error response, read to find its code
MAX_MESSAGE = 300              # characters of a registry's message kept in an error
MAX_REDIRECTS = 5
CHUNK = 1 << 20               # read from a response at a time (what arrived, up to this)
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})\Z")
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")

Credentials = Callable[[str], "tuple[str, str] | None"]  # registry host[:port] → (username, password)
class BlobWriter(Protocol):
    """Where a blob's bytes go when no path is given: a binary file, a BytesIO, a pipe to an extractor."""
    def write(self, data: bytes, /) -> int: ...


Writer = Union[str, "os.PathLike[str]", BlobWriter]


# ---------------------------------------------------------------- errors

class RegistryError(ImageError):
    """A registry refused or failed a request. Carries what a status needs: the registry, the HTTP status
    (None when no response came) and the registry's error code ("MANIFEST_UNKNOWN", "UNAUTHORIZED", …)."""

    def __init__(self, registry: str, message: str, *, status: int | None = None, code: str | None = None,
                 image: str | None = None) -> None:
        self.registry, self.status, self.code, self.image = registry, status, code, image
        self.detail = _bounded(message)
        where = f"registry '{registry}'" + (f", image '{image}'" if image else "")
        what = " ".join(p for p in (f"HTTP {status}" if status else "", code or "") if p)
        super().__init__(f"{where}: {what + ': ' if what else ''}{self.detail}")

    @property
    def temporary(self) -> bool:
        """Worth retrying with backoff: no response, a stall, 429 or a 5xx. 401/403/404 wait for a change."""
        return self.status is None or self.status == 429 or self.status >= 500


class BlobMismatch(RegistryError, DigestMismatch):
    """Content served for a digest does not hash to it, or is not the size its descriptor states."""


def _bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------- what resolve returns

@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class ResolvedManifest:
    registry: str                 # host[:port]
    name: str                     # the repository as the registry names it ("library/busybox")
    digest: str                   # of the image manifest below: what pins this platform's image
    media_type: str
    config: Descriptor
    layers: list[Descriptor]      # lowest first
    manifest: bytes               # the manifest as served (its sha256 is `digest`)
    index_digest: str | None = None  # the manifest list / index it was chosen from, if any (what a tag names)
    platform: Platform | None = None  # the entry chosen from that list

    @property
    def pinned(self) -> str:
        """The digest a reference should carry to get this same image again: the index's if there was one."""
        return self.index_digest or self.digest


@dataclass(frozen=True)
class FetchedBlob:
    digest: str
    size: int
    resumed: int                  # how many times the download continued with a Range request


# ---------------------------------------------------------------- platform and credentials

_GOARCH = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "i386": ("386", None), "i686": ("386", None),
           "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
           "armv5tel": ("arm", "v5"), "ppc64le": ("ppc64le", None), "s390x": ("s390x", None),
           "riscv64": ("riscv64", None), "mips64": ("mips64le", None)}


def host_platform() -> Platform:
    """linux and Go's GOARCH (and GOARM variant) for this machine, as image indexes name platforms."""
    arch, variant = _GOARCH.get(_platform.machine().lower(), (_platform.machine().lower(), None))
    return Platform("linux", arch, variant)


def _platform_rank(want: Platform, entry: Mapping[str, Any]) -> int | None:
    """Lower is better; None: the entry cannot run here."""
    if entry.get("os") != want.os or entry.get("architecture") != want.architecture:
        return None
    variant = entry.get("variant") or None
    if variant == want.variant:
        return 0
    if variant is None or (want.architecture == "arm64" and variant == "v8"):
        return 1
    # An older ARM variant runs on a newer CPU (v6 on v7); a newer one does not.
    if want.architecture == "arm" and want.variant and variant[1:].isdigit() and want.variant[1:].isdigit():
        if int(variant[1:]) < int(want.variant[1:]):
            return 2 + int(want.variant[1:]) - int(variant[1:])
    return None


def docker_config_credentials(path: str) -> Credentials:
    """Credentials from Docker's config.json `auths` ({"host": {"auth": base64("user:pass")}} or
    username/password). Keys may be a bare host or a URL ("https://index.docker.io/v1/" for Docker Hub).
    The file is read once, here, so a malformed one fails at start naming the file."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        raise ImageError(f"Cannot read Docker credentials from '{path}' (--docker_config): {e}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        auths = {}
    table: dict[str, tuple[str, str]] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ImageError(f"Docker credentials '{path}': auths['{key}'].auth is not base64 of "
                                 "'user:password'") from None
        if not user or password is None:
            continue
        host = urllib.parse.urlsplit(key).netloc if "://" in key else key.split("/")[0]
        table[host.lower()] = (user, password)

    def lookup(host: str) -> tuple[str, str] | None:
        host = host.lower()
        if host in _DOCKER_HUB_HOSTS:
            return next((table[h] for h in _DOCKER_HUB_HOSTS if h in table), None)
        return table.get(host)
    return lookup


def _as_credentials(credentials: Credentials | Mapping[str, tuple[str, str]] | None) -> Credentials:
    if credentials is None:
        return lambda host: None
    if callable(credentials):
        return credentials
    table = {k.lower(): v for k, v in credentials.items()}
    return lambda host: table.get(host.lower())


# ---------------------------------------------------------------- WWW-Authenticate

_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="https://auth/token",service="registry",scope="repository:a:pull"' → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


# ---------------------------------------------------------------- the client

class _Interrupted(Exception):
    """The connection ended before the body did: worth a Range retry."""


class RegistryClient:
    def __init__(self, base_url: str, *, credentials: Credentials | Mapping[str, tuple[str, str]] | None = None,
                 ca_file: str | None = None, insecure_http_hosts: Iterable[str] = (), stall_timeout: float = 60.0,
                 platform: Platform | None = None, max_resumes: int = 5, user_agent: str = "reconciler") -> None:
        url = base_url if "://" in base_url else f"https://{base_url}"
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ImageError(f"--docker_registry '{base_url}' is not https://HOST[:PORT] (or http:// for a host "
                             "allowed as insecure)")
        self.host = parts.netloc.lower()
        if self.host in ("docker.io", "index.docker.io"):
            self.host = "registry-1.docker.io"   # where Docker Hub's v2 API answers
        self.scheme = parts.scheme
        self._insecure = {h.lower() for h in insecure_http_hosts}
        if self.scheme == "http" and self.host not in self._insecure:
            raise ImageError(f"--docker_registry '{base_url}': plain http is refused for '{self.host}'; use https, "
                             "or name the host as an insecure registry")
        self._credentials = _as_credentials(credentials)
        self._ca_file = ca_file
        self._ssl_context: ssl.SSLContext | None = None     # made at the first https connection
        self.stall_timeout = stall_timeout
        self.platform = platform or host_platform()
        self.max_resumes = max_resumes
        self.user_agent = user_agent
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}          # scope → Bearer token
        self._basic: str | None = None             # "Basic …" once the registry asked for it

    # -------------------------------------------------- references

    def repository(self, reference: ImageReference) -> str:
        name = reference.repository
        if self.host in _DOCKER_HUB_HOSTS and "/" not in name:
            name = f"library/{name}"
        return name

    # -------------------------------------------------- manifests

    def resolve(self, reference: str | ImageReference) -> ResolvedManifest:
        """The manifest of this host's platform for a tag or digest, its bytes verified."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        name = self.repository(ref)
        image = f"{self.host}/{name}"
        pinned = ref.digest
        body, media_type, digest = self._manifest(name, ref.digest or ref.effective_tag, pinned, image)
        index_digest = chosen = None
        for _ in range(2):  # an index may name another index (OCI allows it); two levels is plenty
            if media_type not in MANIFEST_LISTS:
                break
            entries = self._parse(body, image, digest).get("manifests")
            if not isinstance(entries, list):
                raise RegistryError(self.host, f"manifest list {digest} has no 'manifests' array", image=image)
            desc, chosen = self._choose(entries, image, digest)
            index_digest = index_digest or digest
            body, media_type, digest = self._manifest(name, desc.digest, desc.digest, image)
            if len(body) != desc.size:
                raise BlobMismatch(self.host, f"manifest {desc.digest} is {len(body)} bytes, its index says "
                                   f"{desc.size}", image=image)
        if media_type not in IMAGE_MANIFESTS:
            raise RegistryError(self.host, f"manifest {digest} has media type '{media_type or '(none)'}'; only "
                                "Docker schema2 and OCI image manifests (and lists/indexes of them) are supported",
                                image=image)
        doc = self._parse(body, image, digest)
        config = self._descriptor(doc.get("config"), image, f"manifest {digest} config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(self.host, f"manifest {digest} has no 'layers' array", image=image)
        return ResolvedManifest(
            registry=self.host, name=name, digest=digest, media_type=media_type, config=config,
            layers=[self._descriptor(d, image, f"manifest {digest} layer {i}") for i, d in enumerate(layers)],
            manifest=body, index_digest=index_digest, platform=chosen)

    def _manifest(self, name: str, tag_or_digest: str, pinned: str | None, image: str) -> tuple[bytes, str, str]:
        path = f"/v2/{name}/manifests/{tag_or_digest}"
        resp, conn = self._request("GET", path, {"Accept": ACCEPT}, name=name, image=image)
        try:
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
                raise RegistryError(self.host, f"manifest {tag_or_digest} is {length} bytes, over the "
                                    f"{MAX_MANIFEST_BYTES}-byte limit", status=resp.status, image=image)
            body = self._read(resp, MAX_MANIFEST_BYTES + 1, image)
            if len(body) > MAX_MANIFEST_BYTES:
                raise RegistryError(self.host, f"manifest {tag_or_digest} is over the {MAX_MANIFEST_BYTES}-byte "
                                    "limit", status=resp.status, image=image)
            stated = (resp.getheader("Docker-Content-Digest") or "").strip()
            content_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        finally:
            conn.close()
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if pinned and actual != pinned:
            raise BlobMismatch(self.host, f"manifest for digest {pinned} hashes to {actual}; refusing it",
                               image=image)
        if _SHA256.match(stated) and stated != actual:
            raise BlobMismatch(self.host, f"manifest {tag_or_digest} hashes to {actual}, the registry stated "
                               f"{stated}; refusing it", image=image)
        media_type = ""
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
                media_type = doc["mediaType"]
            elif isinstance(doc, dict) and "manifests" in doc and not content_type.startswith("application/vnd"):
                media_type = OCI_INDEX
        except ValueError:
            pass
        return body, media_type or content_type, actual

    def _parse(self, body: bytes, image: str, digest: str) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(self.host, f"manifest {digest} is not JSON: {e}", image=image) from None
        if not isinstance(doc, dict):
            raise RegistryError(self.host, f"manifest {digest} is not a JSON object", image=image)
        return doc

    def _descriptor(self, doc: Any, image: str, what: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise RegistryError(self.host, f"{what} is not a descriptor object", image=image)
        digest, size, media_type = doc.get("digest"), doc.get("size"), doc.get("mediaType", "")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise RegistryError(self.host, f"{what} has digest {digest!r}; only sha256:<64 hex> is supported",
                                image=image)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(self.host, f"{what} has size {size!r}, not a byte count", image=image)
        plat = doc.get("platform")
        return Descriptor(media_type if isinstance(media_type, str) else "", digest, size,
                          plat if isinstance(plat, dict) else None)

    def _choose(self, entries: list[Any], image: str, digest: str) -> tuple[Descriptor, Platform]:
        ranked = []
        seen = []
        for i, entry in enumerate(entries):
            desc = self._descriptor(entry, image, f"manifest list {digest} entry {i}")
            plat = desc.platform or {}
            seen.append("/".join(str(plat.get(k)) for k in ("os", "architecture", "variant") if plat.get(k)) or "?")
            rank = _platform_rank(self.platform, plat)
            if rank is not None:
                ranked.append((rank, i, desc))
        if not ranked:
            raise RegistryError(self.host, f"no manifest for platform {self.platform} in {digest} (it has: "
                                f"{', '.join(seen) or 'nothing'})", code="PLATFORM_UNKNOWN", image=image)
        _, _, desc = min(ranked, key=lambda r: (r[0], r[1]))
        plat = desc.platform or {}
        return desc, Platform(plat.get("os", ""), plat.get("architecture", ""), plat.get("variant") or None)

    # -------------------------------------------------- blobs

    def fetch_blob(self, name: str, descriptor: Descriptor, dest: Writer, *, resume: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> FetchedBlob:
        """Stream a blob into a file path or a binary writer, verifying its sha256 and size as it comes.

        With a path, a partial file left by an earlier interrupted call is continued (resume=True) and a
        refused blob is removed; with a writer, only this call's bytes are known. An interrupted transfer
        continues with `Range: bytes=N-` (a registry that answers 200 instead has its first N bytes skipped).
        `progress(done, total)` is called as bytes arrive."""
        image = f"{self.host}/{name}"
        m = _SHA256.match(descriptor.digest)
        if not m:
            raise RegistryError(self.host, f"blob digest '{descriptor.digest}' is not sha256:<64 hex>", image=image)
        hasher = hashlib.sha256()
        done = 0
        path = os.fspath(dest) if isinstance(dest, (str, os.PathLike)) else None
        file: BinaryIO | None = None
        out: BlobWriter
        if path is not None:
            mode = "r+b" if resume and os.path.exists(path) else "wb"
            out = file = cast(BinaryIO, open(path, mode))  # noqa: SIM115 - closed in the finally below
            if mode == "r+b":
                while chunk := file.read(CHUNK):
                    if done + len(chunk) > descriptor.size:
                        break
                    hasher.update(chunk)
                    done += len(chunk)
                file.seek(done)
                file.truncate()
        else:
            assert not isinstance(dest, (str, os.PathLike))
            out = dest
        resumed = failures = 0
        try:
            while done < descriptor.size:
                before = done
                try:
                    done = self._stream_blob(name, descriptor, image, out, hasher, done, progress)
                    break
                except _Interrupted as e:
                    done, why = e.args
                    failures = 0 if done != before else failures + 1
                    if not resume or failures >= 3 or resumed >= self.max_resumes:
                        raise RegistryError(self.host, f"blob {descriptor.digest} interrupted after {done} of "
                                            f"{descriptor.size} bytes ({why})", image=image) from None
                    resumed += 1
            actual = "sha256:" + hasher.hexdigest()
            if done != descriptor.size or actual != descriptor.digest:
                raise BlobMismatch(self.host, f"blob {descriptor.digest} ({descriptor.size} bytes) arrived as "
                                   f"{actual} ({done} bytes); refusing it", image=image)
            if file is not None:
                file.flush()
                os.fsync(file.fileno())
        except BlobMismatch:
            if file is not None and path is not None:
                file.close()
                _remove(path)  # a refused blob must not be continued by the next try
            raise
        finally:
            if file is not None:
                file.close()  # an interrupted one keeps its prefix for the next try (hashed again then)
        return FetchedBlob(descriptor.digest, done, resumed)

    def _stream_blob(self, name: str, descriptor: Descriptor, image: str, out: BlobWriter, hasher: Any, done: int,
                     progress: Callable[[int, int], None] | None) -> int:
        headers = {"Range": f"bytes={done}-"} if done else {}
        try:
            resp, conn = self._request("GET", f"/v2/{name}/blobs/{descriptor.digest}", headers, name=name,
                                       image=image)
        except RegistryError as e:
            if e.status is None and done:
                raise _Interrupted(done, e.detail) from None
            raise
        try:
            skip = 0
            if done:
                if resp.status == 206:
                    m = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
                    if not m or int(m.group(1)) != done:
                        raise RegistryError(self.host, f"blob {descriptor.digest}: asked for bytes {done}-, got "
                                            f"Content-Range '{_bounded(resp.getheader('Content-Range') or '', 80)}'",
                                            status=206, image=image)
                else:
                    skip = done  # no Range support: read from the start, keep what we already have
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) - skip + done > descriptor.size:
                raise BlobMismatch(self.host, f"blob {descriptor.digest} is served as {int(length) - skip + done} "
                                   f"bytes, its descriptor says {descriptor.size}; refusing it",
                                   status=resp.status, image=image)
            while True:
                try:
                    chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
                except socket.timeout:
                    raise RegistryError(self.host, f"blob {descriptor.digest} stalled: no byte for "
                                        f"{self.stall_timeout:g} s after {done} of {descriptor.size} bytes "
                                        "(--fetcher_stall_timeout)", image=image) from None
                except (http.client.IncompleteRead, ConnectionError, OSError, http.client.HTTPException) as e:
                    raise _Interrupted(done, _bounded(repr(e), 120)) from None
                if not chunk:
                    break
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                if done + len(chunk) > descriptor.size:
                    raise BlobMismatch(self.host, f"blob {descriptor.digest} is longer than its descriptor's "
                                       f"{descriptor.size} bytes; refusing it", status=resp.status, image=image)
                hasher.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, descriptor.size)
            if done < descriptor.size:
                raise _Interrupted(done, f"connection closed at {done} of {descriptor.size} bytes")
            return done
        finally:
            conn.close()

    # -------------------------------------------------- HTTP

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            with self._lock:
                if self._ssl_context is None:   # loading the system's CA bundle takes a while: not for http
                    self._ssl_context = ssl.create_default_context(cafile=self._ca_file)
            return http.client.HTTPSConnection(netloc, timeout=self.stall_timeout, context=self._ssl_context)
        if netloc.lower() not in self._insecure:
            raise RegistryError(self.host, f"refusing plain http to '{netloc}': it is not an insecure registry host")
        return http.client.HTTPConnection(netloc, timeout=self.stall_timeout)

    def _send(self, method: str, url: str, headers: Mapping[str, str],
              image: str | None) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        parts = urllib.parse.urlsplit(url)
        conn = self._connect(parts.scheme, parts.netloc)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target or "/", headers={"User-Agent": self.user_agent, **headers})
            return conn.getresponse(), conn
        except socket.timeout:
            conn.close()
            raise RegistryError(self.host, f"{method} {_bounded(parts.netloc + parts.path, 160)}: no response for "
                                f"{self.stall_timeout:g} s", image=image) from None
        except ssl.SSLError as e:
            conn.close()
            raise RegistryError(self.host, f"TLS with '{parts.netloc}' failed: {e} (is the CA bundle flag set for a "
                                "private registry?)", image=image) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RegistryError(self.host, f"{method} {_bounded(parts.netloc + parts.path, 160)}: {e!r}",
                                image=image) from None

    def _auth_header(self, scope: str) -> str | None:
        with self._lock:
            token = self._tokens.get(scope)
            return f"Bearer {token}" if token else self._basic

    def _request(self, method: str, path: str, headers: Mapping[str, str], *, name: str,
                 image: str) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send with the registry's credentials, answering one 401 challenge (a first one, or an expired
        token's), and follow redirects; Authorization goes only to the registry's own host."""
        scope = f"repository:{name}:pull"
        url = f"{self.scheme}://{self.host}{path}"
        reauthenticated = False
        redirects = 0
        while True:
            parts = urllib.parse.urlsplit(url)
            own = parts.netloc.lower() == self.host and parts.scheme == self.scheme
            send = dict(headers)
            auth = self._auth_header(scope) if own else None
            if auth:
                send["Authorization"] = auth
            resp, conn = self._send(method, url, send, image)
            if resp.status == 401 and own and not reauthenticated:
                challenge = resp.getheader("WWW-Authenticate") or ""
                self._drain(resp, conn)
                self._authenticate(challenge, scope, auth, image)
                reauthenticated = True
                continue
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                self._drain(resp, conn)
                if not location or redirects >= MAX_REDIRECTS:
                    raise RegistryError(self.host, f"{method} {path}: too many redirects or no Location",
                                        status=resp.status, image=image)
                redirects += 1
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                    raise RegistryError(self.host, f"{method} {path}: redirect to unsupported URL "
                                        f"'{_bounded(url, 120)}'", status=resp.status, image=image)
                continue
            if resp.status >= 400 or resp.status < 200:
                raise self._error(resp, conn, method, path, image)
            return resp, conn

    def _authenticate(self, challenge: str, scope: str, failed: str | None, image: str) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self._credentials(self.host)
        if scheme == "basic":
            if not creds:
                raise RegistryError(self.host, "the registry asks for Basic credentials and --docker_config has "
                                    f"none for '{self.host}'", status=401, code="UNAUTHORIZED", image=image)
            basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            if failed == basic:
                raise RegistryError(self.host, f"the registry refused the credentials for '{self.host}' in "
                                    "--docker_config", status=401, code="UNAUTHORIZED", image=image)
            with self._lock:
                self._basic = basic
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(self.host, f"unsupported authentication challenge '{_bounded(challenge, 120)}'",
                                status=401, code="UNAUTHORIZED", image=image)
        token = self._fetch_token(params, scope, creds, image)
        with self._lock:
            if failed and failed == f"Bearer {token}":
                raise RegistryError(self.host, "the registry refused a fresh token for "
                                    f"'{params.get('scope') or scope}'", status=401, code="UNAUTHORIZED", image=image)
            self._tokens[scope] = token

    def _fetch_token(self, params: Mapping[str, str], scope: str, creds: tuple[str, str] | None, image: str) -> str:
        query = [("service", params["service"])] if params.get("service") else []
        query.append(("scope", params.get("scope") or scope))
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {}
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RegistryError(self.host, f"token realm '{_bounded(realm, 120)}' is not an http(s) URL",
                                status=401, image=image)
        resp, conn = self._send("GET", url, headers, image)
        try:
            if resp.status != 200:
                raise self._error(resp, conn, "GET", f"token from {parts.netloc}", image)
            body = self._read(resp, MAX_ERROR_BODY, image)
        finally:
            conn.close()
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(self.host, f"token server '{parts.netloc}' answered without a token", status=200,
                                image=image)
        return token

    def _read(self, resp: http.client.HTTPResponse, limit: int, image: str | None) -> bytes:
        try:
            return resp.read(limit)
        except socket.timeout:
            raise RegistryError(self.host, f"response stalled: no byte for {self.stall_timeout:g} s",
                                image=image) from None
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(self.host, f"response interrupted: {e!r}", image=image) from None

    @staticmethod
    def _drain(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> None:
        try:
            resp.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            pass
        conn.close()

    def _error(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, method: str, path: str,
               image: str) -> RegistryError:
        try:
            body = resp.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            conn.close()
        code, message = None, ""
        try:
            errors = json.loads(body).get("errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                code = str(errors[0].get("code") or "") or None
                message = str(errors[0].get("message") or "")
        except (ValueError, AttributeError, UnicodeDecodeError):
            message = body[:200].decode("utf-8", "replace")
        return RegistryError(self.host, f"{method} {_bounded(path, 160)}" + (f": {message}" if message else ""),
                             status=resp.status, code=code and _bounded(code, 64), image=image)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["RegistryClient", "RegistryError", "BlobMismatch", "ResolvedManifest", "Descriptor", "Platform",
           "FetchedBlob", "host_platform", "docker_config_credentials", "parse_challenge", "DOCKER_HUB",
           "ACCEPT", "DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "OCI_MANIFEST", "OCI_INDEX"]
