"""Image archives are untrusted: every tar-slip variant is refused with a message naming the archive, the
layer and the member, nothing is written outside the store, and a refused image leaves nothing in it.
Sizes are what the members expand to: a sparse or huge member of a few KiB of layer cannot fill the disk."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from reconciler import config as config_module
from reconciler.agent import build_image_store
from reconciler.images import ArchiveError, ImageStore, UnsafeArchive
from reconciler.images.extract import extract_layer
from tests.conftest import IS_ROOT
from tests.imagebuild import (CLIMB, MALICIOUS_KINDS, SPARSE_FORMATS, Dir, Fifo, File, Hardlink, Huge, Raw, Sparse,
                              Symlink, build, busybox_layer, layer, layer_tar, malicious_layer, sparse_map_bomb)
from tests.test_images_e2e import image_env

IMAGE_LIMIT = "over the image size limit of 21474836480 bytes (flag --docker_max_image_size)"
EXPECTED = {
    "absolute": "absolute path '{outside}/pwned'",
    "dotdot": "path '../../../",
    "symlink-parent": "'escape' is a symlink or not a directory, and the store never writes through one",
    "climbing-symlink-parent": "'usr/lib/foo' is a symlink or not a directory, and the store never writes through one",
    "hardlink-absolute": "absolute hard link target '{outside}/secret'",
    "hardlink-dotdot": "hard link target '../../../../../../..{outside}/secret' contains '..'",
    "hardlink-through-symlink": "'escape' is a symlink or not a directory",
    "hardlink-through-climbing-symlink": "'usr/lib/foo' is a symlink or not a directory",
    "char-device": "device node (character 1:3) in an image layer",
    "block-device": "device node (block 8:0) in an image layer",
    "oversize": "65536 bytes is over the layer size limit of 32768 bytes",
    "huge": f"takes it to {(1 << 40) + 3} bytes, {IMAGE_LIMIT}",
    "sparse": f"takes it to {(1 << 40) + 3} bytes, {IMAGE_LIMIT}",
}
MEMBER = {"absolute": "{outside}/pwned", "symlink-parent": "escape/pwned", "climbing-symlink-parent": "usr/lib/foo/pwned",
          "hardlink-absolute": "passwd", "hardlink-dotdot": "passwd", "hardlink-through-symlink": "stolen",
          "hardlink-through-climbing-symlink": "stolen", "char-device": "dev/evil", "block-device": "dev/evil",
          "oversize": "big", "huge": "big", "sparse": "big"}


@pytest.fixture
def outside(tmp: Path) -> Path:
    """A host directory a malicious layer aims at; only `secret` may ever be in it."""
    (tmp / "outside").mkdir()
    (tmp / "outside/secret").write_text("host secret\n")
    return tmp / "outside"


def store_for(tmp: Path, **kw: int) -> ImageStore:
    return ImageStore(str(tmp / "registry"), str(tmp / "store"), **kw)


def store_bytes(store: ImageStore) -> int:
    """Disk the store's files take (records, locks, layers)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(store.store_dir):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def assert_nothing_escaped(tmp: Path, outside: Path, store: ImageStore, layers_before: list[str] | None = None) -> None:
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "host secret\n"
    assert not (tmp / "pwned").exists()
    assert os.listdir(store.staging_dir) == []
    # a refused image leaves nothing: not the malicious layer, not the clean ones extracted before it
    assert sorted(os.listdir(store.layers_dir)) == sorted(layers_before or [])
    assert store.images() == [] and os.listdir(store.refs_dir) == []


def assert_refused(tmp: Path, outside: Path, store: ImageStore, reference: str, match: str) -> None:
    """The pull is refused with a message matching `match`, and leaves nothing behind."""
    with pytest.raises(UnsafeArchive, match=match):
        store.pull(reference)
    assert_nothing_escaped(tmp, outside, store)


@pytest.mark.parametrize("compress", [None, "gzip"])
@pytest.mark.parametrize("kind", MALICIOUS_KINDS)
def test_each_tar_slip_variant_is_refused(tmp: Path, outside: Path, kind: str, compress: str | None) -> None:
    store = store_for(tmp, max_layer_bytes=32768)
    built = build(str(tmp / "registry"), "evil:1", [layer(File("/etc/os-release", b"ok\n")),
                                                    malicious_layer(kind, str(outside))], fmt="oci", compress=compress)
    with pytest.raises(UnsafeArchive) as e:
        store.pull("evil:1")
    message = str(e.value)
    # the layer: its blob in the OCI layout (for an uncompressed one, the blob digest is the diff_id)
    layer_name = "blobs/sha256/" + (built.layer_ids[1] if not compress else "")
    if kind in ("huge", "sparse"):
        assert message.startswith(f"Refusing image 'evil:1': layer '{layer_name}")
        assert f"of archive '{tmp}/registry/evil:1' at member 'big' " in message
    else:
        assert message.startswith(f"Refusing layer '{layer_name}")
        assert f"of archive '{tmp}/registry/evil:1': member '" in message
    if kind == "dotdot":
        assert "member '../../../" in message
    else:
        assert f"member '{MEMBER[kind].format(outside=outside)}'" in message
    assert EXPECTED[kind].format(outside=outside) in message
    assert_nothing_escaped(tmp, outside, store)
    assert store_bytes(store) < 256 << 10  # what a 1 TiB member never got to write


# ---------------------------------------------------------------- sizes: what members expand to

@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_a_sparse_file_is_written_with_its_holes_and_counted_at_its_full_size(tmp: Path, fmt: str) -> None:
    size = 64 << 20
    segments = [(0, b"a" * 4096), (32 << 20, b"b" * 8192), (size - 3, b"end")]
    built = build(str(tmp / "registry"), "db:1", [layer(Sparse("/var/lib/db/data", size, segments, fmt),
                                                        File("/after", b"read after the sparse file\n"))], fmt="oci")
    assert os.path.getsize(Path(built.archive, "blobs/sha256", built.layer_ids[0])) < 32 << 10
    store = store_for(tmp, max_image_bytes=size + 100)
    rootfs = store.pull("db:1").layers[0]
    path = os.path.join(rootfs, "var/lib/db/data")
    st = os.stat(path)
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20  # the holes take no disk: 12 KiB of data, not 64 MiB
    with open(path, "rb") as f:
        assert f.read(4097) == b"a" * 4096 + b"\0"
        f.seek(16 << 20)
        assert f.read(4096) == bytes(4096)  # a hole reads as zeros
        f.seek(32 << 20)
        assert f.read(8192) == b"b" * 8192
        f.seek(size - 3)
        assert f.read() == b"end"
    assert Path(rootfs, "after").read_text() == "read after the sparse file\n"  # the stream stayed in step
    meta = json.loads(Path(store.layers_dir, built.layer_ids[0], "layer.json").read_text())
    assert meta["content_bytes"] == size + len("read after the sparse file\n")  # counted at its full size
    assert meta["disk_bytes"] < 1 << 20
    assert store.images()[0].size_bytes < 1 << 20  # `images list` shows the disk it takes


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_a_few_kib_of_sparse_layer_expanding_past_the_limit_is_refused(tmp: Path, outside: Path, fmt: str) -> None:
    # What filled a store: a 51 KB layer whose sparse members expanded to 2.8 GB. 40 members of 70 MB.
    members = [Sparse(f"/fill/{i}", 70_000_000, [(0, b"x" * 512), (69_999_999, b"y")], fmt) for i in range(40)]
    built = build(str(tmp / "registry"), "filler:1", [layer(File("/etc/os-release", b"ok\n")), layer(*members)],
                  fmt="oci", compress="gzip")
    blob = max(Path(built.archive, "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    assert blob.stat().st_size < 16 << 10
    store = store_for(tmp, max_image_bytes=1 << 30)
    with pytest.raises(UnsafeArchive) as e:
        store.pull("filler:1")
    # the 16th member takes the image (3 bytes of os-release, then 70 MB each) past 1 GiB
    assert str(e.value) == (f"Refusing image 'filler:1': layer 'blobs/sha256/{blob.name}' of archive "
                            f"'{built.archive}' at member 'fill/15' takes it to {16 * 70_000_000 + 3} bytes, over "
                            "the image size limit of 1073741824 bytes (flag --docker_max_image_size)")
    assert_nothing_escaped(tmp, outside, store)
    assert store_bytes(store) < 256 << 10


def test_the_layer_limit_counts_every_member_together(tmp: Path, outside: Path) -> None:
    members = [Sparse(f"/part{i}", 16 << 20, [(0, b"x" * 512)]) for i in range(8)]
    build(str(tmp / "registry"), "parts:1", [layer(*members)], fmt="manifest")
    store = store_for(tmp, max_layer_bytes=64 << 20)
    assert_refused(tmp, outside, store, "parts:1", r"member 'part4': 16777216 bytes \(a sparse file, 512 bytes "
                   r"of it in the layer\) take the layer to 83886080 bytes, over its size limit of 67108864 bytes")


def test_a_member_declaring_more_than_the_limit_is_refused_before_any_byte_is_written(tmp: Path, outside: Path) -> None:
    build(str(tmp / "registry"), "huge:1", [layer(Huge("/big", 1 << 40, b"x" * 4096))], fmt="manifest")
    store = store_for(tmp, max_image_bytes=1 << 20)
    assert_refused(tmp, outside, store, "huge:1",
                   "at member 'big' takes it to 1099511627776 bytes, over the image size limit of 1048576 bytes")


@pytest.mark.parametrize("forged, why", [
    # 912 bytes where the member holds 512: the next member's header would be read as file content
    (b"GNU.sparse.map=0,512,4096,912\n", "sparse map names 1424 bytes of data, the member holds 1024"),
    (b"GNU.sparse.map=0,512,0256,512\n", "sparse map segments overlap or are out of order"),
    (b"GNU.sparse.map=0,512,9999,512\n", "sparse map segment of 512 bytes at 9999 lies outside the file's 8192 bytes"),
])
def test_a_forged_sparse_map_is_refused(tmp: Path, forged: bytes, why: str) -> None:
    data = layer_tar(layer(Sparse("/a", 8192, [(0, b"x" * 512), (4096, b"y" * 512)], "pax-0.1")))
    assert data.count(b"GNU.sparse.map=0,512,4096,512\n") == 1
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    with pytest.raises(UnsafeArchive, match=f"Refusing layer 'l': member 'a': {why}"):
        extract_layer(io.BytesIO(data.replace(b"GNU.sparse.map=0,512,4096,512\n", forged)), str(rootfs),
                      where="layer 'l'")
    assert os.listdir(rootfs) == []


def test_the_image_limit_counts_every_layer_of_the_image(tmp: Path, outside: Path) -> None:
    mib = 1 << 20
    one, two, three = (layer(File(f"/{name}", bytes([65 + i]) * (3 * mib // 2)))
                       for i, name in enumerate(("one", "two", "three")))
    store = store_for(tmp, max_image_bytes=4 * mib)
    registry = str(tmp / "registry")
    fits = build(registry, "fits:1", [one, two], fmt="oci")
    assert store.pull("fits:1").layer_ids == fits.layer_ids  # 3 MiB of 4
    kept = sorted(os.listdir(store.layers_dir))
    # [one, two] are in the store and count at their size; `three` takes the image past 4 MiB
    too_big = build(registry, "big:1", [one, two, three], fmt="oci")
    with pytest.raises(UnsafeArchive) as e:
        store.pull("big:1")
    assert str(e.value) == (f"Refusing image 'big:1': layer 'blobs/sha256/{too_big.layer_ids[2]}' of archive "
                            f"'{too_big.archive}' at member 'three' takes it to {9 * mib // 2} bytes, over the image "
                            f"size limit of {4 * mib} bytes (flag --docker_max_image_size)")
    assert sorted(os.listdir(store.layers_dir)) == kept and os.listdir(store.staging_dir) == []
    # the layer that breaks the limit may be one already in the store: the layers extracted for the
    # refused image before it are dropped
    reversed_image = build(registry, "rev:1", [three, one, two], fmt="oci")
    with pytest.raises(UnsafeArchive, match=f"layer 'blobs/sha256/{reversed_image.layer_ids[2]}' of archive "
                                            f"'{reversed_image.archive}' \\(already in the store\\) takes it to "
                                            f"{9 * mib // 2} bytes"):
        store.pull("rev:1")
    assert sorted(os.listdir(store.layers_dir)) == kept and os.listdir(store.staging_dir) == []
    assert [i.references for i in store.images()] == [["fits:1"]]


def test_the_flag_reaches_the_agents_store(tmp: Path, outside: Path) -> None:
    parser = argparse.ArgumentParser()
    config_module.add_flags(parser)
    flags = [f"--work_dir={tmp / 'work'}", f"--docker_registry={tmp / 'registry'}", f"--docker_store_dir={tmp / 'store'}",
             "--docker_max_image_size=1MB", "--image_providers=docker", "--launcher=linux",
             "--isolation=filesystem/linux,docker/runtime"]
    config = config_module.load(parser.parse_args(flags), {})
    store = build_image_store(config)
    assert store is not None
    built = build(str(tmp / "registry"), "two-mib:1", [layer(Sparse("/disk.img", 2 << 20, [(0, b"x" * 512)]))])
    assert_refused(tmp, outside, store, "two-mib:1",
                   rf"Refusing image 'two-mib:1': layer '.*/layer.tar' of archive '{built.archive}' at member "
                   r"'disk.img' takes it to 2097152 bytes, over the image size limit of 1048576 bytes "
                   r"\(flag --docker_max_image_size\)")


def test_a_gzip_bomb_stops_at_the_layer_limit(tmp: Path, outside: Path) -> None:
    store = store_for(tmp, max_layer_bytes=1 << 20)
    built = build(str(tmp / "registry"), "bomb", [layer(File("/etc/os-release", b"ok\n")),
                                                  layer(*(File(f"/z{i}", b"\0" * 300_000) for i in range(8)))],
                  fmt="oci", compress="gzip")
    blobs = Path(built.archive, "blobs/sha256")
    assert sum(f.stat().st_size for f in blobs.iterdir()) < 64 << 10  # 2.4 MB of zeros, gzipped
    assert_refused(tmp, outside, store, "bomb",
                   r"member 'z3': 300000 bytes take the layer to 1200000 bytes, over its size limit of 1048576 bytes")


def test_a_bomb_of_headers_stops_at_the_layer_limit(tmp: Path, outside: Path) -> None:
    # empty files expand to nothing: the uncompressed stream of their headers is what is counted
    store = store_for(tmp, max_layer_bytes=1 << 20)
    build(str(tmp / "registry"), "headers", [layer(*(File(f"/e{i}") for i in range(4096)))], fmt="oci",
          compress="gzip")
    assert_refused(tmp, outside, store, "headers", r"the uncompressed layer is over the size limit of 1048576 bytes")


@pytest.mark.parametrize("what", ["pax", "gnu-longname", "gnu-sparse-map", "pax-1.0-sparse-map", "chain"])
def test_oversized_headers_are_refused_before_tarfile_reads_them(tmp: Path, what: str) -> None:
    # tarfile would read a PAX header or a GNU long name whole, and every entry of a sparse map, into memory,
    # and follows a chain of extended headers by recursion (a thousand of them: RecursionError)
    if what == "chain":
        blocks = tarfile.TarInfo("n" * 200).tobuf(tarfile.GNU_FORMAT)
        data = blocks[:1024] * 1000 + blocks[1024:] + bytes(1024)
    elif what == "pax":
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        data = layer_tar(layer(Raw(info)))
    elif what == "gnu-longname":
        data = tarfile.TarInfo("n" * (2 << 20)).tobuf(tarfile.GNU_FORMAT) + bytes(1024)
        assert data[156:157] == tarfile.GNUTYPE_LONGNAME
    else:
        data = sparse_map_bomb(what.removesuffix("-sparse-map"), 3 << 20)
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    with pytest.raises(UnsafeArchive, match=r"Refusing layer 'l': the headers of a member \(PAX records, GNU long "
                                            r"names, sparse map\) take more than 1048576 bytes or chain more than "
                                            r"32 extended headers"):
        extract_layer(io.BytesIO(data), str(rootfs), where="layer 'l'")
    assert os.listdir(rootfs) == []


def test_a_sparse_map_cut_short_is_an_archive_error(tmp: Path) -> None:
    data = sparse_map_bomb("pax-1.0", 2048)  # announces a million segments, holds 512
    with pytest.raises(ArchiveError, match="Failed to read layer 'l'"):
        extract_layer(io.BytesIO(data), str(tmp), where="layer 'l'")


# ---------------------------------------------------------------- links

def test_a_later_member_never_writes_through_an_earlier_symlink(tmp: Path, outside: Path) -> None:
    # a symlink to a host file, then a regular file of the same name: the link is replaced, not followed
    store = store_for(tmp)
    build(str(tmp / "registry"), "swap", [layer(Symlink("/f", f"{outside}/secret"), File("/f", b"layer's own\n"),
                                                Dir("/d"), Symlink("/d", str(outside)))], fmt="manifest")
    rootfs = store.pull("swap").layers[0]
    assert Path(rootfs, "f").read_text() == "layer's own\n" and not Path(rootfs, "f").is_symlink()
    assert os.readlink(os.path.join(rootfs, "d")) == str(outside)  # a directory replaced by a symlink: allowed
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "host secret\n"


def test_symlinks_climbing_out_of_the_layer_are_kept(tmp: Path) -> None:
    # As Docker and Mesos keep them: in the container's root '..' stops at '/'.
    store = store_for(tmp)
    build(str(tmp / "registry"), "climb", [layer(
        File("/lib/foo.so.1", b"\x7fELF"),
        Symlink("/usr/lib/foo", "../../../../lib/foo.so.1"),
        Dir("/a/b"), Symlink("/a/b/up", "../.."), Hardlink("/up", "/a/b/up"),  # a hard link moves a link up
    )], fmt="oci")
    rootfs = store.pull("climb").layers[0]
    assert os.readlink(os.path.join(rootfs, "usr/lib/foo")) == "../../../../lib/foo.so.1"
    assert os.readlink(os.path.join(rootfs, "up")) == "../.."


def test_a_later_layer_never_writes_through_a_climbing_symlink(tmp: Path, outside: Path) -> None:
    store = store_for(tmp)
    climbing = CLIMB + str(outside).lstrip("/")
    build(str(tmp / "registry"), "two", [
        layer(Symlink("/usr/lib/foo", climbing)),
        layer(File("/usr/lib/foo/pwned", b"pwned\n"), File("/usr/lib/foo/secret", b"overwritten\n")),
    ], fmt="oci")
    lower, upper = store.pull("two").layers
    link = os.path.join(lower, "usr/lib/foo")
    assert os.readlink(link) == climbing
    assert os.path.realpath(link) == str(outside)  # followed on the host, it would reach the host directory
    # each layer is extracted into a directory of its own: the later one made a directory of that name
    assert Path(upper, "usr/lib/foo/pwned").read_text() == "pwned\n" and not Path(upper, "usr/lib/foo").is_symlink()
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "host secret\n"
    # and a hard link can name nothing through it: the target is not in the layer being extracted
    build(str(tmp / "registry"), "steal", [layer(Symlink("/usr/lib/foo", climbing)),
                                           layer(Hardlink("/stolen", "/usr/lib/foo/secret"))], fmt="oci")
    with pytest.raises(UnsafeArchive, match="hard link target 'usr/lib/foo/secret' is not in the layer"):
        store.pull("steal")
    assert (outside / "secret").read_text() == "host secret\n" and os.stat(outside / "secret").st_nlink == 1


@pytest.mark.root
@pytest.mark.skipif(IS_ROOT and "overlay" not in Path("/proc/filesystems").read_text(), reason="needs overlayfs")
def test_in_a_container_a_climbing_symlink_stays_in_its_root() -> None:
    # The container reads and writes through links that climb out of their layer: `..` stops at its root.
    planted = Path(f"/etc/reconciler-test-{uuid.uuid4().hex[:12]}")  # where an escape would write on the host
    host_os_release = Path("/etc/os-release").read_bytes()
    with image_env("climb") as env:
        build(str(env.registry), "climb:1", [
            busybox_layer(["sh", "cat", "echo"]),
            layer(File("/etc/os-release", b"ID=image\n"),
                  Symlink("/usr/lib/os-release", "../../../../../../../etc/os-release"),
                  Symlink("/usr/lib/etc", CLIMB + "etc")),
        ], {"Env": ["PATH=/bin"]})
        env.write("climb", "climb:1", {"value": f"cat /usr/lib/os-release && echo pwned > /usr/lib/etc/{planted.name}"
                                                f" && cat /etc/{planted.name}"})
        env.start()
        try:
            done = env.wait("climb")
            assert done["phase"] == "Succeeded", done
            assert env.stdout(done) == "ID=image\npwned\n"  # the image's files, not the host's
        finally:
            escaped = planted.exists()
            planted.unlink(missing_ok=True)
        assert not escaped
        assert Path("/etc/os-release").read_bytes() == host_os_release


def test_what_images_normally_hold_is_allowed(tmp: Path) -> None:
    store = store_for(tmp)
    build(str(tmp / "registry"), "normal", [layer(
        File("/bin/busybox", b"#!", 0o755),
        Symlink("/bin/sh", "/bin/busybox"),            # absolute: resolves inside the container
        Symlink("/usr/bin/env", "../../bin/busybox"),  # relative, inside the layer
        Symlink("/usr/lib/self", "."),
        Symlink("/dangling", "/nonexistent/at/all"),
        Hardlink("/bin/ls", "/bin/busybox"),
        Hardlink("./bin/cat", "bin/busybox"),          # leading './' as GNU tar writes
        Fifo("/run/initctl", 0o600),
        Raw(_dot_root()),                              # the layer root itself
    )], fmt="legacy")
    rootfs = store.pull("normal").layers[0]
    assert os.readlink(os.path.join(rootfs, "bin/sh")) == "/bin/busybox"
    assert os.readlink(os.path.join(rootfs, "usr/bin/env")) == "../../bin/busybox"
    assert os.stat(os.path.join(rootfs, "bin/cat")).st_nlink == 3
    assert stat.S_ISFIFO(os.lstat(os.path.join(rootfs, "run/initctl")).st_mode)
    assert stat.S_IMODE(os.stat(rootfs).st_mode) == 0o755


def _dot_root() -> tarfile.TarInfo:
    info = tarfile.TarInfo("./")
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def test_zstd_layers_are_refused_with_a_clear_message(tmp: Path) -> None:
    store = store_for(tmp)
    built = build(str(tmp / "registry"), "zstd", [layer(File("/a", b"a"))], fmt="oci")
    # pretend the blob is zstd: its magic number
    blob = Path(built.archive, "blobs/sha256", built.layer_ids[0])
    blob.write_bytes(b"\x28\xb5\x2f\xfd" + blob.read_bytes())
    with pytest.raises(Exception, match="is zstd-compressed, which this store does not support"):
        store.pull("zstd")


@pytest.mark.skipif(not IS_ROOT, reason="file capabilities (security.capability) need root to set")
def test_file_capabilities_are_kept_and_trusted_xattrs_dropped(tmp: Path) -> None:
    store = store_for(tmp)
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, VFS_CAP_REVISION_2
    info = tarfile.TarInfo("bin/ping")
    info.size, info.mode = 2, 0o755
    info.pax_headers = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
                        "SCHILY.xattr.trusted.overlay.redirect": "/etc", "SCHILY.xattr.user.note": "hi"}
    build(str(tmp / "registry"), "caps", [layer(Dir("/bin"), Raw(info, b"#!"))], fmt="manifest")
    rootfs = store.pull("caps").layers[0]
    path = os.path.join(rootfs, "bin/ping")
    assert os.getxattr(path, "security.capability") == cap
    assert os.getxattr(path, "user.note") == b"hi"
    assert "trusted.overlay.redirect" not in os.listxattr(path)
