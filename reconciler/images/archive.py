"""Reading image archives from the local registry: `docker save` tarballs (the `manifest.json` layout and
the legacy `repositories` layout) and OCI image layouts (a directory or a tar of one).

Nothing here writes to disk. An archive is opened as a `Source` (a tar read in place, or a directory);
`images_in(source)` lists the images it holds as `Candidate`s and `resolve()` picks the one a reference
names, yielding a `ResolvedImage`: its id (the config digest), its runtime config and its layer blobs,
lowest first. The JSON documents are checked at this edge with pydantic; OCI blobs are checked against
their digests as they are read (layer blobs by the extractor, which streams them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reconciler.images.errors import ArchiveError, DigestMismatch, ImageError
from reconciler.images.extract import MAX_HEADER_BYTES, BoundedTarInfo, HeadersTooLarge
from reconciler.images.reference import ImageReference, normalize_name, parse_reference

MAX_JSON_BYTES = 16 << 20  # manifests and configs are kilobytes; a bigger one is an attack or corruption
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")

OCI_INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.list.v2+json"}
OCI_MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                      "application/vnd.docker.distribution.manifest.v2+json"}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


# ---------------------------------------------------------------- sources

class Source:
    """Files of one archive by their names inside it ('manifest.json', 'blobs/sha256/…')."""
    path: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ArchiveError(f"Archive '{self.path}': '{name}' is larger than {limit} bytes")
        return data

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(name: str, archive: str) -> str:
    """A member name relative to the archive root; absolute paths and '..' are refused."""
    if name.startswith("/"):
        raise ArchiveError(f"Archive '{archive}': path '{name}' is absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"Archive '{archive}': path '{name}' contains '..'")
    return "/".join(parts)


class TarSource(Source):
    """A tar read in place (never unpacked); symlinks and hard links between its members are followed
    inside the archive only, as `docker save` links a repeated layer.tar to its first copy."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            self._tar = tarfile.open(path, "r:*", tarinfo=BoundedTarInfo)  # noqa: SIM115 - closed by close()
            try:
                members = self._tar.getmembers()
            except BaseException:
                self._tar.close()  # a failed pull is retried: its archive must not stay open
                raise
            for member in members:
                try:
                    self._members[_clean(member.name, path)] = member
                except ArchiveError:
                    continue  # a name we would never look up; the layers inside are checked on their own
        except HeadersTooLarge:
            raise ArchiveError(f"Failed to read archive '{path}': the headers of a member take more than "
                               f"{MAX_HEADER_BYTES} bytes") from None
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise ArchiveError(f"Failed to read archive '{path}': {e}") from None

    def _member(self, name: str) -> tarfile.TarInfo | None:
        name = _clean(name, self.path)
        for _ in range(16):
            member = self._members.get(name)
            if member is None:
                return None
            if member.issym():
                target = member.linkname if member.linkname.startswith("/") else \
                    posixpath.join(posixpath.dirname(name), member.linkname)
                name = _clean(posixpath.normpath(target).lstrip("/"), self.path)
            elif member.islnk():
                name = _clean(member.linkname, self.path)
            else:
                return member
        raise ArchiveError(f"Archive '{self.path}': too many levels of links at '{name}'")

    def exists(self, name: str) -> bool:
        member = self._member(name)
        return member is not None and member.isfile()

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        if member is None or not member.isfile():
            raise ArchiveError(f"Archive '{self.path}': no file '{name}'")
        f = self._tar.extractfile(member)
        assert f is not None
        return f

    def close(self) -> None:
        self._tar.close()


class DirSource(Source):
    """An OCI image layout directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._root = os.path.realpath(path)

    def _path(self, name: str) -> str:
        full = os.path.realpath(os.path.join(self._root, _clean(name, self.path)))
        if full != self._root and not full.startswith(self._root + "/"):
            raise ArchiveError(f"Archive '{self.path}': '{name}' leads outside the layout")
        return full

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._path(name), "rb")
        except OSError as e:
            raise ArchiveError(f"Archive '{self.path}': cannot read '{name}': {e.strerror}") from None


def open_source(path: str) -> Source:
    return DirSource(path) if os.path.isdir(path) else TarSource(path)


# ---------------------------------------------------------------- the documents (validated at this edge)

class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Descriptor(_Doc):
    mediaType: str = ""
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None


class OCILayout(_Doc):
    imageLayoutVersion: str


class OCIIndex(_Doc):
    schemaVersion: int
    manifests: list[Descriptor]


class OCIManifest(_Doc):
    schemaVersion: int
    config: Descriptor
    layers: list[Descriptor]


class RootFS(_Doc):
    type: str = "layers"
    diff_ids: list[str] = []


class RuntimeConfig(_Doc):
    Entrypoint: list[str] | None = None
    Cmd: list[str] | None = None
    Env: list[str] | None = None
    WorkingDir: str | None = None
    User: str | None = None


class ImageConfig(_Doc):
    created: str | None = None
    config: RuntimeConfig | None = None
    rootfs: RootFS | None = None


class SaveEntry(_Doc):
    Config: str
    RepoTags: list[str] | None = None
    Layers: list[str]


class LegacyLayerJSON(_Doc):
    id: str | None = None
    parent: str | None = None
    created: str | None = None
    config: RuntimeConfig | None = None


def _json(source: Source, name: str, data: bytes | None = None) -> Any:
    if data is None:
        data = source.read(name)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveError(f"Failed to parse '{name}' in archive '{source.path}': {e}") from None


def _model(model: type[BaseModel], doc: Any, source: Source, name: str) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(document)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ArchiveError(f"Invalid '{name}' in archive '{source.path}': field '{loc}': "
                           f"{first['msg']}{more}") from None


def sha256_hex(digest: str, what: str, source: Source) -> str:
    m = _SHA256.match(digest)
    if not m:
        raise ArchiveError(f"Archive '{source.path}': {what} has digest '{digest}'; only sha256:<64 hex> is supported")
    return m.group(1)


# ---------------------------------------------------------------- images in an archive

@dataclass
class LayerBlob:
    name: str                   # its path inside the archive
    diff_id: str | None         # sha256 of the uncompressed tar, when the format states it
    digest: str | None = None   # the blob's own digest (OCI), verified while streaming
    size: int | None = None     # the blob's size (OCI), verified too
    media_type: str = ""


@dataclass
class ResolvedImage:
    id: str                     # "sha256:<hex>" of the image config (legacy: of the top layer id)
    manifest_digest: str | None
    config: dict[str, Any]      # the config's "config" object (Entrypoint, Cmd, Env, WorkingDir, User); {} if absent
    created: str | None
    layers: list[LayerBlob]     # lowest first
    names: list[str]
    format: str                 # "docker-save" | "docker-save-legacy" | "oci"
    archive: str


@dataclass
class Candidate:
    """One image an archive holds, before its config is read (OCI) or after (docker save)."""
    names: list[str]
    digests: set[str]
    load: Callable[[], ResolvedImage]
    format: str
    platform_ok: bool = True
    _loaded: ResolvedImage | None = field(default=None, repr=False)

    def get(self) -> ResolvedImage:
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded


def detect_format(source: Source) -> str:
    if source.exists("oci-layout") and source.exists("index.json"):
        return "oci"
    if source.exists("manifest.json"):
        return "docker-save"
    if source.exists("repositories"):
        return "docker-save-legacy"
    raise ArchiveError(f"Archive '{source.path}' is neither a docker save archive (no 'manifest.json' or "
                       "'repositories') nor an OCI image layout (no 'oci-layout' and 'index.json')")


def images_in(source: Source) -> list[Candidate]:
    fmt = detect_format(source)
    if fmt == "oci":
        return _oci_candidates(source)
    if fmt == "docker-save":
        return _save_candidates(source)
    return _legacy_candidates(source)


def _read_blob(source: Source, desc: Descriptor, what: str) -> bytes:
    hexdigest = sha256_hex(desc.digest, what, source)
    name = f"blobs/sha256/{hexdigest}"
    if not source.exists(name):
        raise ArchiveError(f"Archive '{source.path}': {what} blob '{name}' is missing")
    data = source.read(name)
    actual = hashlib.sha256(data).hexdigest()
    if actual != hexdigest:
        raise DigestMismatch(f"Archive '{source.path}': {what} blob '{name}' has digest sha256:{actual}, "
                             f"expected {desc.digest}")
    if desc.size != len(data):
        raise DigestMismatch(f"Archive '{source.path}': {what} blob '{name}' is {len(data)} bytes, "
                             f"its descriptor says {desc.size}")
    return data


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}.get(machine, machine)
    return "linux", arch


def _platform_matches(p: dict[str, Any] | None) -> bool:
    if not p:
        return True
    os_, arch = host_platform()
    return p.get("os") == os_ and p.get("architecture") == arch


def _oci_candidates(source: Source) -> list[Candidate]:
    _model(OCILayout, _json(source, "oci-layout"), source, "oci-layout")
    index = _model(OCIIndex, _json(source, "index.json"), source, "index.json")
    out: list[Candidate] = []

    def visit(desc: Descriptor, names: list[str], depth: int, platform_ok: bool) -> None:
        if depth > 4:
            raise ArchiveError(f"Archive '{source.path}': image indexes nested deeper than 4")
        annotations = desc.annotations or {}
        names = names + [annotations[k] for k in (REF_NAME, CONTAINERD_NAME) if k in annotations]
        if desc.mediaType in OCI_INDEX_TYPES:
            nested = _model(OCIIndex, _json(source, desc.digest, _read_blob(source, desc, "image index")),
                            source, f"image index {desc.digest}")
            for child in nested.manifests:
                visit(child, names, depth + 1, _platform_matches(child.platform))
        elif desc.mediaType in OCI_MANIFEST_TYPES or not desc.mediaType:
            out.append(Candidate(names=names, digests={desc.digest}, format="oci", platform_ok=platform_ok,
                                 load=lambda: _load_oci(source, desc, names)))

    for desc in index.manifests:
        visit(desc, [], 0, _platform_matches(desc.platform))
    return out


def _check_config(source: Source, name: str, doc: Any, n_layers: int) -> tuple[ImageConfig, list[str]]:
    config = _model(ImageConfig, doc, source, name)
    diff_ids = config.rootfs.diff_ids if config.rootfs else []
    if len(diff_ids) != n_layers:
        raise ArchiveError(f"Invalid '{name}' in archive '{source.path}': rootfs.diff_ids lists {len(diff_ids)} "
                           f"layers but the manifest has {n_layers}")
    for d in diff_ids:
        sha256_hex(d, f"a diff_id in '{name}'", source)
    return config, diff_ids


def _runtime(doc: Any) -> dict[str, Any]:
    runtime = doc.get("config") if isinstance(doc, dict) else None
    return dict(runtime) if isinstance(runtime, dict) else {}


def _load_oci(source: Source, desc: Descriptor, names: list[str]) -> ResolvedImage:
    what = f"manifest {desc.digest}"
    manifest = _model(OCIManifest, _json(source, what, _read_blob(source, desc, "manifest")), source, what)
    config_doc = _json(source, "config", _read_blob(source, manifest.config, "image config"))
    config, diff_ids = _check_config(source, f"config {manifest.config.digest}", config_doc, len(manifest.layers))
    layers = []
    for layer, diff_id in zip(manifest.layers, diff_ids, strict=True):
        hexdigest = sha256_hex(layer.digest, "a layer", source)
        layers.append(LayerBlob(name=f"blobs/sha256/{hexdigest}", diff_id=diff_id, digest=layer.digest,
                                size=layer.size, media_type=layer.mediaType))
    return ResolvedImage(id=manifest.config.digest, manifest_digest=desc.digest, config=_runtime(config_doc),
                         created=config.created, layers=layers, names=names, format="oci", archive=source.path)


def _save_candidates(source: Source) -> list[Candidate]:
    doc = _json(source, "manifest.json")
    if not isinstance(doc, list):
        raise ArchiveError(f"Invalid 'manifest.json' in archive '{source.path}': expected a list of images")
    out = []
    for i, raw in enumerate(doc):
        entry = _model(SaveEntry, raw, source, f"manifest.json[{i}]")
        config_bytes = source.read(entry.Config)
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        stem = posixpath.basename(entry.Config).removesuffix(".json")
        if _HEX64.match(stem) and "sha256:" + stem != image_id:
            raise DigestMismatch(f"Archive '{source.path}': config '{entry.Config}' has digest {image_id}")
        out.append(Candidate(names=list(entry.RepoTags or []), digests={image_id}, format="docker-save",
                             load=functools.partial(_load_save, source, entry, config_bytes, image_id)))
    return out


def _load_save(source: Source, entry: SaveEntry, config_bytes: bytes, image_id: str) -> ResolvedImage:
    config_doc = _json(source, entry.Config, config_bytes)
    config, diff_ids = _check_config(source, entry.Config, config_doc, len(entry.Layers))
    layers = [LayerBlob(name=_clean(name, source.path), diff_id=d)
              for name, d in zip(entry.Layers, diff_ids, strict=True)]
    return ResolvedImage(id=image_id, manifest_digest=None, config=_runtime(config_doc), created=config.created,
                         layers=layers, names=list(entry.RepoTags or []), format="docker-save", archive=source.path)


def _legacy_candidates(source: Source) -> list[Candidate]:
    # Mesos's image_tar_puller messages, for the layout it reads.
    try:
        repositories = json.loads(source.read("repositories"))
    except ValueError as e:
        raise ArchiveError(f"Failed to parse 'repositories': {e} (archive '{source.path}')") from None
    if not isinstance(repositories, dict):
        raise ArchiveError(f"Failed to parse 'repositories': not a JSON object (archive '{source.path}')")
    out = []
    for repo, tags in repositories.items():
        if not isinstance(tags, dict):
            raise ArchiveError(f"Failed to find repository '{repo}' in 'repositories': not an object "
                               f"(archive '{source.path}')")
        for tag, layer_id in tags.items():
            if not isinstance(layer_id, str) or not layer_id:
                raise ArchiveError(f"Failed to access layer id '{tag}': not a string (archive '{source.path}')")
            digests = {"sha256:" + layer_id} if _HEX64.match(layer_id) else set()
            out.append(Candidate(names=[f"{repo}:{tag}"], digests=digests, format="docker-save-legacy",
                                 load=functools.partial(_load_legacy, source, repo, tag, layer_id)))
    return out


def _load_legacy(source: Source, repo: str, tag: str, top: str) -> ResolvedImage:
    chain: list[str] = []
    docs: dict[str, LegacyLayerJSON] = {}
    layer_id: str | None = top
    while layer_id:
        if layer_id in docs or len(chain) > 1000:
            raise ArchiveError(f"Failed to find parent layer id for layer '{top}': the parent chain loops "
                               f"(archive '{source.path}')")
        name = f"{_clean(layer_id, source.path)}/json"
        if not source.exists(name):
            raise ArchiveError(f"Failed to find parent layer id for layer '{top}': Failed to read manifest "
                               f"from '{name}' (archive '{source.path}')")
        doc = _model(LegacyLayerJSON, _json(source, name), source, name)
        docs[layer_id] = doc
        chain.insert(0, layer_id)
        layer_id = doc.parent or None
    top_doc = docs[top]
    raw_top = _json(source, f"{top}/json")
    layers = [LayerBlob(name=f"{lid}/layer.tar", diff_id=None) for lid in chain]
    image_id = "sha256:" + top if _HEX64.match(top) else "sha256:" + hashlib.sha256(top.encode()).hexdigest()
    return ResolvedImage(id=image_id, manifest_digest=None, config=_runtime(raw_top), created=top_doc.created,
                         layers=layers, names=[f"{repo}:{tag}"], format="docker-save-legacy", archive=source.path)


# ---------------------------------------------------------------- choosing the image a reference names

def name_matches(name: str, ref: ImageReference) -> bool:
    """Does an archive's name for an image (RepoTag, OCI ref.name) denote this reference's name and tag?"""
    if "/" not in name and ":" not in name and "@" not in name:
        return name == ref.effective_tag  # an OCI ref.name that is only a tag
    try:
        other = parse_reference(name)
    except ImageError:
        return False
    return other.normalized_name() == ref.normalized_name() and other.effective_tag == ref.effective_tag


def resolve(source: Source, ref: ImageReference) -> ResolvedImage:
    """The image `ref` names in this archive, or ImageError saying what the archive holds instead."""
    candidates = images_in(source)
    if ref.digest:
        for c in candidates:
            if ref.digest in c.digests:
                return c.get()
        for c in candidates:  # an OCI manifest's config digest is only known once the manifest is read
            if c.format == "oci" and c.platform_ok and c.get().id == ref.digest:
                return c.get()
        held = sorted({d for c in candidates for d in c.digests if c.platform_ok})
        raise DigestMismatch(f"Image '{ref}': archive '{source.path}' holds no image with digest {ref.digest} "
                             f"(it holds {', '.join(held) or 'no images'})")
    matching = [c for c in candidates if c.platform_ok and any(name_matches(n, ref) for n in c.names)]
    if matching:
        return matching[0].get()
    unnamed = [c for c in candidates if c.platform_ok and not c.names]
    if len(candidates) == len(unnamed) and len(unnamed) == 1:
        return unnamed[0].get()  # the archive was chosen by its file name and holds one image
    if candidates and candidates[0].format == "docker-save-legacy":
        repos = {n.rpartition(":")[0] for c in candidates for n in c.names}
        wanted = [r for r in repos if normalize_name(r) == ref.normalized_name()]
        if not wanted:
            raise ArchiveError(f"Repository '{ref.repository}' does not exist in 'repositories' "
                               f"(archive '{source.path}')")
        raise ArchiveError(f"Layer id '{ref.effective_tag}' is not found (archive '{source.path}')")
    held = sorted({n for c in candidates for n in c.names if c.platform_ok})
    if candidates and not any(c.platform_ok for c in candidates):
        raise ArchiveError(f"Image '{ref}': archive '{source.path}' has no image for {'/'.join(host_platform())}")
    raise ArchiveError(f"Image '{ref}' is not in archive '{source.path}' "
                       f"(it holds: {', '.join(held) or 'no named images'})")
