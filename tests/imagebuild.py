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
hand-made tar member.
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


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Fifo | Raw


@dataclass
class Layer:
    entries: list[Entry] = field(default_factory=list)


def layer(*entries: Entry) -> Layer:
    return Layer(list(entries))


def _member(entry: Entry) -> tuple[tarfile.TarInfo, bytes | None]:
    if isinstance(entry, Raw):
        return entry.info, entry.data
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
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


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

MALICIOUS_KINDS = ("absolute", "dotdot", "symlink-parent", "symlink-escape", "hardlink-absolute",
                   "hardlink-dotdot", "hardlink-through-symlink", "hardlink-moves-symlink", "char-device",
                   "block-device", "oversize")


def malicious_layer(kind: str, outside: str) -> Layer:
    """A layer that tries to write `<outside>/pwned` (an absolute host directory) or to smuggle something
    the store refuses. `oversize` declares a 64 KiB member: build the store with max_layer_bytes below it."""
    out = outside.rstrip("/")
    if kind == "absolute":
        return layer(Raw(_info(f"{out}/pwned", 6), b"pwned\n"))
    if kind == "dotdot":
        depth = "../" * 16
        return layer(Raw(_info(f"{depth}{out.lstrip('/')}/pwned", 6), b"pwned\n"))
    if kind == "symlink-parent":  # a -> /outside, then a/pwned: must never be written through the link
        return layer(Symlink("/escape", out), Raw(_info("escape/pwned", 6), b"pwned\n"))
    if kind == "symlink-escape":
        return layer(Dir("/a"), Symlink("/a/up", "../../../../../../../../.." + out))
    if kind == "hardlink-absolute":
        return layer(Raw(_info("passwd", 0, tarfile.LNKTYPE, f"{out}/secret")))
    if kind == "hardlink-dotdot":
        return layer(Raw(_info("passwd", 0, tarfile.LNKTYPE, f"../../../../../../..{out}/secret")))
    if kind == "hardlink-through-symlink":
        return layer(Symlink("/escape", out), Raw(_info("stolen", 0, tarfile.LNKTYPE, "escape/secret")))
    if kind == "hardlink-moves-symlink":  # a/b/up -> ../.. stays inside; a hard link of it at the top does not
        return layer(Dir("/a/b"), Symlink("/a/b/up", "../.."), Hardlink("/up", "/a/b/up"))
    if kind in ("char-device", "block-device"):
        info = _info("dev/evil", 0, tarfile.CHRTYPE if kind == "char-device" else tarfile.BLKTYPE)
        info.devmajor, info.devminor = (1, 3) if kind == "char-device" else (8, 0)
        return layer(Dir("/dev"), Raw(info))
    if kind == "oversize":
        return layer(File("/big", b"\0" * 65536))
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
