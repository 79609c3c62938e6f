"""Image archives are untrusted: every tar-slip variant is refused with a message naming the archive, the
layer and the member, nothing is written outside the store, and nothing half-extracted stays in it."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path


import pytest

from reconciler.images import ImageStore, UnsafeArchive
from tests.conftest import IS_ROOT
from tests.imagebuild import (MALICIOUS_KINDS, Dir, Fifo, File, Hardlink, Raw, Symlink, build, layer,
                              malicious_layer)

EXPECTED = {
    "absolute": "absolute path '{outside}/pwned'",
    "dotdot": "path '../../../",
    "symlink-parent": "'escape' is a symlink or not a directory, and the store never writes through one",
    "symlink-escape": "symlink target '../../../../../../../../..{outside}' escapes the layer",
    "hardlink-absolute": "absolute hard link target '{outside}/secret'",
    "hardlink-dotdot": "hard link target '../../../../../../..{outside}/secret' contains '..'",
    "hardlink-through-symlink": "'escape' is a symlink or not a directory",
    "hardlink-moves-symlink": "symlink target '../..' escapes the layer",
    "char-device": "device node (character 1:3) in an image layer",
    "block-device": "device node (block 8:0) in an image layer",
    "oversize": "65536 bytes is over the layer size limit of 32768 bytes",
}
MEMBER = {"absolute": "{outside}/pwned", "symlink-parent": "escape/pwned", "symlink-escape": "a/up",
          "hardlink-absolute": "passwd", "hardlink-dotdot": "passwd", "hardlink-through-symlink": "stolen", "hardlink-moves-symlink": "up",
          "char-device": "dev/evil", "block-device": "dev/evil", "oversize": "big"}




@pytest.fixture
def outside(tmp: Path) -> Path:
    """A host directory a malicious layer aims at; only `secret` may ever be in it."""
    (tmp / "outside").mkdir()
    (tmp / "outside/secret").write_text("host secret\n")
    return tmp / "outside"


def store_for(tmp: Path, **kw: int) -> ImageStore:
    return ImageStore(str(tmp / "registry"), str(tmp / "store"), **kw)


def assert_nothing_escaped(tmp: Path, outside: Path, store: ImageStore, base_layer: str) -> None:
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "host secret\n"
    assert not (tmp / "pwned").exists()
    assert os.listdir(store.staging_dir) == []
    # the clean lower layer is kept; the malicious one never reaches the store
    assert os.listdir(os.path.join(store.store_dir, "layers")) == [base_layer]


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
    assert message.startswith(f"Refusing layer '{layer_name}")
    assert f"of archive '{tmp}/registry/evil:1': member '" in message
    if kind == "dotdot":
        assert "member '../../../" in message
    else:
        assert f"member '{MEMBER[kind].format(outside=outside)}': " in message
    assert EXPECTED[kind].format(outside=outside) in message
    assert_nothing_escaped(tmp, outside, store, built.layer_ids[0])


def test_a_gzip_bomb_stops_at_the_layer_limit(tmp: Path, outside: Path) -> None:
    store = store_for(tmp, max_layer_bytes=1 << 20)
    built = build(str(tmp / "registry"), "bomb", [layer(File("/etc/os-release", b"ok\n")),
                                                  layer(*(File(f"/z{i}", b"\0" * 300_000) for i in range(8)))],
                  fmt="oci", compress="gzip")
    blobs = Path(built.archive, "blobs/sha256")
    assert sum(f.stat().st_size for f in blobs.iterdir()) < 64 << 10  # 2.4 MB of zeros, gzipped
    with pytest.raises(UnsafeArchive, match=r"the uncompressed layer is over the size limit of 1048576 bytes"):
        store.pull("bomb")
    assert_nothing_escaped(tmp, outside, store, built.layer_ids[0])


def test_a_later_member_never_writes_through_an_earlier_symlink(tmp: Path, outside: Path) -> None:
    # a symlink to a host file, then a regular file of the same name: the link is replaced, not followed
    store = store_for(tmp)
    build(str(tmp / "registry"), "swap", [layer(Symlink("/f", f"{outside}/secret"), File("/f", b"layer's own\n"),
                                                Dir("/d"), Symlink("/d", str(outside)))], fmt="manifest")
    rootfs = store.pull("swap").layers[0]
    assert Path(rootfs, "f").read_text() == "layer's own\n" and not Path(rootfs, "f").is_symlink()
    assert os.readlink(os.path.join(rootfs, "d")) == str(outside)  # a directory replaced by a symlink: allowed
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "host secret\n"


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
