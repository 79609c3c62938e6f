"""Test images built from Debian's busybox-static, in every archive format the image store reads.

    from tests.imagebuild import build_image, busybox_layer, layer, File, Dir, Symlink, Whiteout, Opaque

    image_id = build_image(registry, "busybox:latest")                      # docker save, manifest.json
    build_image(registry, "busybox", fmt="legacy")                          # → <registry>/busybox.tar
    build_image(registry, "app:1", layers=[busybox_layer(), layer(File("/app/run.sh", b"echo hi\\n", 0o755))],
                config={"Entrypoint": ["/bin/sh", "/app/run.sh"], "Cmd": [], "Env": ["A=1"], "WorkingDir": "/app"},
                fmt="oci", compress="gzip")                                  # → <registry>/app:1/ (OCI layout dir)
    built = build(registry, "app:1", ..., fmt="oci-tar")                    # → id, manifest_digest, archive, diff_ids

Formats: "manifest" (docker save: manifest.json + <config>.json + <id>/layer.tar, plus the `repositories`
file docker also writes), "legacy" (docker save's old layout only: repositories + <id>/json + <id>/layer.tar),
"oci" (an OCI image layout directory), "oci-tar" (the same layout as a tar). The archive lands where Mesos
looks for it, `<registry>/<reference>.tar` (or `<registry>/<reference>/` for "oci"), unless `archive_name`
says otherwise. Everything is deterministic (fixed mtimes), so the same inputs give the same image id.

Entries take absolute or relative paths; they are stored relative ("bin/sh"), as docker does. Malicious
archives for the tar-slip tests: `malicious_layer(kind, outside)`, `MALICIOUS_KINDS`, and `Raw` for any
hand-made tar member. `Sparse` writes a sparse file in each format GNU tar has used (the old GNU 'S'
member, PAX 0.0, 0.1 and 1.0), byte for byte as GNU tar lays them out; `Huge` a member that declares
more bytes than it carries.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import Any, Sequence

BUSYBOX = "/bin/busybox"
MTIME = 1700000000
CREATED = "2023-11-14T22:13:20Z"


# ---------------------------------------------------------------- layer entries

def _rel(path: str) -> str:
    return path.lstrip("/")


@dataclass
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass
class Symlink:
    path: str
    target: str


@dataclass
class Hardlink:
    path: str
    target: str       # another entry of the same layer


@dataclass
class Whiteout:
    path: str         # the path this layer deletes from the layers below: written as <dir>/.wh.<name>


@dataclass
class Opaque:
    path: str         # a directory whose lower-layer contents this layer hides: <dir>/.wh..wh..opq


@dataclass
class Fifo:
    path: str
    mode: int = 0o644


@dataclass
class Raw:
    """A tar member exactly as given (no path clean-up): for malicious archives."""
    info: tarfile.TarInfo
    data: bytes = b""


SPARSE_FORMATS = ("gnu", "pax-0.0", "pax-0.1", "pax-1.0")


@dataclass
class Sparse:
    """A sparse regular file of `size` bytes: only the `segments` ((offset, data), ascending) are in the
    stream, everything else is a hole. fmt: one of SPARSE_FORMATS. Every segment but the last is a whole
    number of 512-byte blocks, as GNU tar writes them (its reader starts each segment on a block, Python's
    tarfile reads them back to back: the two agree only then)."""
    path: str
    size: int
    segments: list[tuple[int, bytes]]
    fmt: str = "gnu"
    mode: int = 0o644


@dataclass
class Huge:
    """A regular file whose header declares `size` bytes while only `data` follows: how a member bigger
    than a limit looks before a byte of it is read. Nothing after it in the layer parses."""
    path: str
    size: int
    data: bytes = b""


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Fifo | Raw | Sparse | Huge


@dataclass
class Layer:
    entries: list[Entry] = field(default_factory=list)


def layer(*entries: Entry) -> Layer:
    return Layer(list(entries))


def _member(entry: Entry) -> tuple[tarfile.TarInfo, bytes | None]:
    if isinstance(entry, Raw):
        return entry.info, entry.data
    if isinstance(entry, (Sparse, Huge)):  # the name (for parent directories); layer_tar writes the blocks
        return _file_info(_rel(entry.path), entry.size, 0o644), None
    if isinstance(entry, Whiteout):
        d, _, name = _rel(entry.path).rpartition("/")
        return _member(File(f"{d}/.wh.{name}" if d else f".wh.{name}"))
    if isinstance(entry, Opaque):
        return _member(File(f"{_rel(entry.path).rstrip('/')}/.wh..wh..opq"))
    info = tarfile.TarInfo(_rel(entry.path))
    info.mtime = MTIME
    info.uname = info.gname = "root"
    if isinstance(entry, File):
        info.size, info.mode, info.uid, info.gid, info.mtime = len(entry.data), entry.mode, entry.uid, entry.gid, entry.mtime
        return info, entry.data
    if isinstance(entry, Dir):
        info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, entry.mode, entry.uid, entry.gid, entry.mtime
    elif isinstance(entry, Symlink):
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
    elif isinstance(entry, Hardlink):
        info.type, info.linkname, info.mode = tarfile.LNKTYPE, _rel(entry.target), 0o755
    elif isinstance(entry, Fifo):
        info.type, info.mode = tarfile.FIFOTYPE, entry.mode
    return info, None


def layer_tar(lay: Layer) -> bytes:
    """The uncompressed tar of a layer, with parent directories added before first use (as docker does)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for entry in lay.entries:
            info, data = _member(entry)
            if not isinstance(entry, Raw):
                parts = info.name.rstrip("/").split("/")[:-1]
                for i in range(len(parts)):
                    d = "/".join(parts[: i + 1])
                    if d not in made:
                        made.add(d)
                        if not any(isinstance(e, Dir) and _rel(e.path).rstrip("/") == d for e in lay.entries):
                            dinfo, _ = _member(Dir(d))
                            tar.addfile(dinfo)
                if info.isdir():
                    made.add(info.name.rstrip("/"))
            if isinstance(entry, (Sparse, Huge)):
                blocks = sparse_blocks(entry) if isinstance(entry, Sparse) else huge_blocks(entry)
                tar.fileobj.write(blocks)  # type: ignore[union-attr]
                tar.offset += len(blocks)
                continue
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# ---------------------------------------------------------------- sparse and huge members, by hand

def _file_info(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, MTIME
    info.uname = info.gname = "root"
    return info


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(header))[0]
    return bytes(header)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _pax_header(records: list[tuple[str, str]]) -> bytes:
    """An extended header member with `records` in order (repeated keys allowed, as PAX 0.0 needs)."""
    data = b"".join(_pax_record(k, v) for k, v in records)
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + _padded(data)


def sparse_blocks(entry: Sparse) -> bytes:
    """The tar blocks of a sparse file, laid out as GNU tar writes the format."""
    name = _rel(entry.path)
    if any(len(d) % tarfile.BLOCKSIZE for _, d in entry.segments[:-1]):
        raise ValueError("every segment of a sparse file but the last must be a multiple of 512 bytes")
    data = b"".join(d for _, d in entry.segments)
    spans = [(offset, len(d)) for offset, d in entry.segments]
    if entry.fmt == "gnu":
        header = bytearray(_file_info(name, len(data), entry.mode).tobuf(tarfile.GNU_FORMAT)[-tarfile.BLOCKSIZE:])
        header[156:157] = tarfile.GNUTYPE_SPARSE
        for i, (offset, length) in enumerate(spans[:4]):
            header[386 + 24 * i:398 + 24 * i] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
            header[398 + 24 * i:410 + 24 * i] = tarfile.itn(length, 12, tarfile.GNU_FORMAT)
        header[482] = len(spans) > 4
        header[483:495] = tarfile.itn(entry.size, 12, tarfile.GNU_FORMAT)
        extensions = b""
        rest = spans[4:]
        while rest:
            block = bytearray(tarfile.BLOCKSIZE)
            for i, (offset, length) in enumerate(rest[:21]):
                block[24 * i:24 * i + 12] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
                block[24 * i + 12:24 * i + 24] = tarfile.itn(length, 12, tarfile.GNU_FORMAT)
            rest = rest[21:]
            block[504] = bool(rest)
            extensions += bytes(block)
        return _with_checksum(header) + extensions + _padded(data)
    if entry.fmt == "pax-0.0":
        records = [("GNU.sparse.size", str(entry.size)), ("GNU.sparse.numblocks", str(len(spans)))]
        for offset, length in spans:
            records += [("GNU.sparse.offset", str(offset)), ("GNU.sparse.numbytes", str(length))]
        return _pax_header(records) + _file_info(name, len(data), entry.mode).tobuf(tarfile.USTAR_FORMAT) + _padded(data)
    fake = f"GNUSparseFile.0/{name.rpartition('/')[2]}"
    if entry.fmt == "pax-0.1":
        records = [("GNU.sparse.size", str(entry.size)), ("GNU.sparse.numblocks", str(len(spans))),
                   ("GNU.sparse.map", ",".join(f"{o},{n}" for o, n in spans)), ("GNU.sparse.name", name)]
    elif entry.fmt == "pax-1.0":
        records = [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.name", name),
                   ("GNU.sparse.realsize", str(entry.size))]
        data = _padded(f"{len(spans)}\n".encode() + b"".join(b"%d\n%d\n" % span for span in spans)) + data
    else:
        raise ValueError(f"unknown sparse format '{entry.fmt}' (one of {', '.join(SPARSE_FORMATS)})")
    return _pax_header(records) + _file_info(fake, len(data), entry.mode).tobuf(tarfile.USTAR_FORMAT) + _padded(data)


def sparse_map_bomb(fmt: str, map_bytes: int) -> bytes:
    """A layer tar of one 4 KiB sparse file whose map takes `map_bytes` of headers: old GNU extension
    blocks ("gnu", each with no segment in it) or PAX 1.0 map lines ("pax-1.0", a million empty segments
    announced). tarfile reads a whole map into memory before the member is returned."""
    blocks = sparse_blocks(Sparse("a", 4096, [(0, b"x" * 512)], fmt))
    if fmt == "gnu":
        header = bytearray(blocks[:tarfile.BLOCKSIZE])
        header[482] = 1
        extension = bytearray(tarfile.BLOCKSIZE)
        extension[504] = 1
        count = map_bytes // tarfile.BLOCKSIZE
        blocks = (_with_checksum(header) + bytes(extension) * (count - 1) + bytes(tarfile.BLOCKSIZE)
                  + blocks[tarfile.BLOCKSIZE:])
    elif fmt == "pax-1.0":
        lines = b"1000000\n" + b"0\n0\n" * (map_bytes // 4)
        pax_end = blocks.index(b"GNUSparseFile.0/a")  # the member's own header starts with its name
        member = _file_info("GNUSparseFile.0/a", len(_padded(lines)), 0o644).tobuf(tarfile.USTAR_FORMAT)
        blocks = blocks[:pax_end] + member + _padded(lines)
    else:
        raise ValueError(f"no map bomb for sparse format '{fmt}' (gnu, pax-1.0)")
    return blocks + bytes(2 * tarfile.BLOCKSIZE)


def huge_blocks(entry: Huge) -> bytes:
    return _file_info(_rel(entry.path), entry.size, 0o644).tobuf(tarfile.PAX_FORMAT) + _padded(entry.data)


def busybox_applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    return [a for a in out.split() if a and "/" not in a and a != "busybox"]


def busybox_layer(applets: Sequence[str] | None = None, links: str = "hard") -> Layer:
    """/bin/busybox from the host (Debian's busybox-static) and /bin/<applet> links to it (hard links, as the
    busybox image has, or links="sym"), plus the usual top-level directories and a minimal /etc/passwd."""
    with open(BUSYBOX, "rb") as f:
        binary = f.read()
    entries: list[Entry] = [Dir("/bin"), File("/bin/busybox", binary, 0o755)]
    for applet in (busybox_applets() if applets is None else applets):
        entries.append(Hardlink(f"/bin/{applet}", "/bin/busybox") if links == "hard"
                       else Symlink(f"/bin/{applet}", "busybox"))
    entries += [Dir("/dev"), Dir("/proc"), Dir("/sys"), Dir("/root", 0o700), Dir("/tmp", 0o1777),
                Dir("/etc"), File("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
                File("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")]
    return Layer(entries)


# ---------------------------------------------------------------- malicious layers

MALICIOUS_KINDS = ("absolute", "dotdot", "symlink-parent", "climbing-symlink-parent", "hardlink-absolute",
                   "hardlink-dotdot", "hardlink-through-symlink", "hardlink-through-climbing-symlink",
                   "char-device", "block-device", "oversize", "huge", "sparse")
CLIMB = "../" * 40  # more '..' than any test directory is deep: from anywhere on the host, this is '/'


def malicious_layer(kind: str, outside: str) -> Layer:
    """A layer that tries to write `<outside>/pwned` (an absolute host directory) or to smuggle something
    the store refuses. `oversize` declares a 64 KiB member: build the store with max_layer_bytes below it;
    `huge` declares 1 TiB and `sparse` is a 1 TiB sparse file, each in a few KiB of layer.
    `climbing-symlink-parent` plants `usr/lib/foo -> ../../…/<outside>`, a relative link that leads to the
    host directory when followed from the store (and to `<outside>` in the container's root, where it is
    harmless), then writes through it."""
    out = outside.rstrip("/")
    if kind == "absolute":
        return layer(Raw(_info(f"{out}/pwned", 6), b"pwned\n"))
    if kind == "dotdot":
        depth = "../" * 16
        return layer(Raw(_info(f"{depth}{out.lstrip('/')}/pwned", 6), b"pwned\n"))
    if kind == "symlink-parent":  # a -> /outside, then a/pwned: must never be written through the link
        return layer(Symlink("/escape", out), Raw(_info("escape/pwned", 6), b"pwned\n"))
    if kind == "climbing-symlink-parent":
        return layer(Symlink("/usr/lib/foo", CLIMB + out.lstrip("/")), Raw(_info("usr/lib/foo/pwned", 6), b"pwned\n"))
    if kind == "hardlink-absolute":
        return layer(Raw(_info("passwd", 0, tarfile.LNKTYPE, f"{out}/secret")))
    if kind == "hardlink-dotdot":
        return layer(Raw(_info("passwd", 0, tarfile.LNKTYPE, f"../../../../../../..{out}/secret")))
    if kind == "hardlink-through-symlink":
        return layer(Symlink("/escape", out), Raw(_info("stolen", 0, tarfile.LNKTYPE, "escape/secret")))
    if kind == "hardlink-through-climbing-symlink":
        return layer(Symlink("/usr/lib/foo", CLIMB + out.lstrip("/")), Hardlink("/stolen", "/usr/lib/foo/secret"))
    if kind in ("char-device", "block-device"):
        info = _info("dev/evil", 0, tarfile.CHRTYPE if kind == "char-device" else tarfile.BLKTYPE)
        info.devmajor, info.devminor = (1, 3) if kind == "char-device" else (8, 0)
        return layer(Dir("/dev"), Raw(info))
    if kind == "oversize":
        return layer(File("/big", b"\0" * 65536))
    if kind == "huge":
        return layer(Huge("/big", 1 << 40, b"x" * 1024))
    if kind == "sparse":
        return layer(Sparse("/big", 1 << 40, [(0, b"x" * 512), ((1 << 40) - 1, b"y")]))
    raise ValueError(f"unknown malicious layer kind '{kind}' (one of {', '.join(MALICIOUS_KINDS)})")


def _info(name: str, size: int, type: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode, info.mtime = size, type, linkname, 0o644, MTIME
    return info


# ---------------------------------------------------------------- images

@dataclass
class Built:
    id: str                        # "sha256:…" of the config (legacy: "sha256:" + top layer id)
    manifest_digest: str | None    # OCI formats only
    archive: str                   # the tar file or OCI directory written
    diff_ids: list[str]
    layer_ids: list[str]           # the store's ids: the diff_id hex of each layer (empty layers included)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, data in files:
            parts = name.split("/")[:-1]
            for i in range(len(parts)):
                d = "/".join(parts[: i + 1])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _repo_tag(reference: str) -> tuple[str, str]:
    name = reference.split("@")[0]
    head, sep, tag = name.rpartition(":")
    if sep and "/" not in tag:
        return head, tag
    return name, "latest"


def build(registry_dir: str, reference: str, layers: Sequence[Layer] | None = None,
          config: dict[str, Any] | None = None, fmt: str = "manifest", compress: str | None = None,
          archive_name: str | None = None, repo_tags: Sequence[str] | None = None) -> Built:
    """Write an image archive into registry_dir and describe what was written.

    layers: lowest first; default [busybox_layer()]. config: the runtime config (Entrypoint, Cmd, Env,
    WorkingDir, User). compress="gzip" gzips each layer blob (OCI media type tar+gzip; layer.tar in
    docker save formats). repo_tags: the names stored inside the archive (default: the reference with
    its tag, "latest" when it has none; [] stores none).
    """
    if fmt not in ("manifest", "legacy", "oci", "oci-tar"):
        raise ValueError(f"unknown format '{fmt}'")
    layers = list(layers) if layers is not None else [busybox_layer()]
    tars = [layer_tar(lay) for lay in layers]
    diff_ids = [_sha(t) for t in tars]
    blobs = [_gz(t) if compress == "gzip" else t for t in tars]
    repo, tag = _repo_tag(reference)
    tags = list(repo_tags) if repo_tags is not None else [f"{repo}:{tag}"]
    image_config = {
        "architecture": _arch(), "os": "linux", "created": CREATED,
        "config": config if config is not None else {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_digest = _sha(config_bytes)
    name = archive_name or (f"{reference}.tar" if fmt != "oci" else reference)
    path = os.path.join(registry_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    layer_ids = [d.removeprefix("sha256:") for d in diff_ids]

    if fmt in ("manifest", "legacy"):
        files: list[tuple[str, bytes]] = []
        # Legacy v1 ids: a chain, each id derived from its parent and its layer, as docker's were.
        ids, parent = [], ""
        for d in diff_ids:
            parent = hashlib.sha256(f"{parent}\n{d}".encode()).hexdigest()
            ids.append(parent)
        for i, (lid, blob) in enumerate(zip(ids, blobs)):
            v1: dict[str, Any] = {"id": lid, "created": CREATED}
            if i:
                v1["parent"] = ids[i - 1]
            if i == len(ids) - 1:
                v1["config"] = image_config["config"]
                v1["architecture"], v1["os"] = _arch(), "linux"
            files += [(f"{lid}/VERSION", b"1.0"), (f"{lid}/json", json.dumps(v1).encode()), (f"{lid}/layer.tar", blob)]
        repositories: dict[str, dict[str, str]] = {}
        for t in tags:
            r, _, tg = t.rpartition(":")
            repositories.setdefault(r, {})[tg] = ids[-1]
        files.append(("repositories", json.dumps(repositories).encode()))
        if fmt == "manifest":
            config_name = config_digest.removeprefix("sha256:") + ".json"
            files.append((config_name, config_bytes))
            files.append(("manifest.json", json.dumps([{"Config": config_name, "RepoTags": tags or None,
                                                         "Layers": [f"{lid}/layer.tar" for lid in ids]}]).encode()))
            image_id = config_digest
        else:
            image_id = "sha256:" + ids[-1]
        with open(path, "wb") as f:
            f.write(_tar(files))
        return Built(id=image_id, manifest_digest=None, archive=path, diff_ids=diff_ids, layer_ids=layer_ids)

    layer_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress == "gzip" else "")
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": layer_type, "digest": _sha(b), "size": len(b)} for b in blobs],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = _sha(manifest_bytes)
    annotations = {"org.opencontainers.image.ref.name": tags[0].rpartition(":")[2],
                   "io.containerd.image.name": tags[0]} if tags else {}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                            "size": len(manifest_bytes), **({"annotations": annotations} if annotations else {})}]}
    files = [("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
             ("index.json", json.dumps(index).encode())]
    for blob in [config_bytes, manifest_bytes, *blobs]:
        entry = (f"blobs/sha256/{_sha(blob).removeprefix('sha256:')}", blob)
        if entry not in files:
            files.append(entry)
    if fmt == "oci-tar":
        with open(path, "wb") as f:
            f.write(_tar(files))
    else:
        for rel, data in files:
            target = os.path.join(path, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
    return Built(id=config_digest, manifest_digest=manifest_digest, archive=path, diff_ids=diff_ids, layer_ids=layer_ids)


def build_image(registry_dir: str, reference: str, layers: Sequence[Layer] | None = None,
                config: dict[str, Any] | None = None, fmt: str = "manifest", compress: str | None = None,
                archive_name: str | None = None) -> str:
    """Write an image archive into registry_dir (see build()) and return its image id ("sha256:…")."""
    return build(registry_dir, reference, layers, config, fmt, compress, archive_name).id
