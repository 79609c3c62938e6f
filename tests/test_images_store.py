"""The local image store: every archive format, tags and digests, the cache, races, whiteouts, prune, and
the store's own files (no other user reaches them, a link planted among them is never followed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from reconciler.images import (ArchiveError, DigestMismatch, ImageError, ImageNotFound, ImageStore, image_doc,
                               images_table, layers_in_use)
from reconciler.images import extract as extract_mod
from reconciler.images.archive import host_platform
from tests.conftest import IS_ROOT, REPO
from tests.imagebuild import (Dir, File, Opaque, Symlink, Whiteout, build, build_image, busybox_layer,
                              layer, layer_tar)

FORMATS = ["manifest", "legacy", "oci", "oci-tar"]
APPLETS = ["sh", "echo", "cat", "ls", "pwd", "env", "sleep", "true", "false"]
CONFIG = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hello"], "Env": ["PATH=/bin", "GREETING=hi"],
          "WorkingDir": "/work", "User": "root"}




@pytest.fixture
def registry(tmp: Path) -> Path:
    (tmp / "registry").mkdir()
    return tmp / "registry"


@pytest.fixture
def store(tmp: Path, registry: Path) -> ImageStore:
    return ImageStore(str(registry), str(tmp / "store"))


def small_busybox() -> Any:
    return busybox_layer(APPLETS)


def run_in(rootfs: str, *argv: str) -> str:
    return subprocess.run(["chroot", rootfs, *argv], capture_output=True, text=True, check=True, timeout=10).stdout


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("compress", [None, "gzip"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_pulls_the_layers_and_config(registry: Path, store: ImageStore, fmt: str, compress: str | None) -> None:
    app = layer(File("/work/run.sh", b"echo from app\n", 0o755), Symlink("/usr/bin/sh", "/bin/busybox"))
    built = build(str(registry), "app:1", [small_busybox(), app], CONFIG, fmt=fmt, compress=compress)
    image = store.pull("app:1")
    assert image.id == built.id and image.reference == "app:1"
    assert image.layer_ids == built.layer_ids
    assert image.layers == [os.path.join(store.store_dir, "layers", i, "rootfs") for i in built.layer_ids]
    assert image.config == CONFIG
    assert image.manifest_digest == built.manifest_digest
    base, top = image.layers
    assert os.path.isfile(os.path.join(base, "bin/busybox")) and not os.path.exists(os.path.join(top, "bin/busybox"))
    assert os.readlink(os.path.join(top, "usr/bin/sh")) == "/bin/busybox"
    # the hard links of the busybox image survive as hard links
    assert os.stat(os.path.join(base, "bin/sh")).st_ino == os.stat(os.path.join(base, "bin/busybox")).st_ino
    if IS_ROOT:
        assert run_in(base, "/bin/echo", "works") == "works\n"


def test_a_real_busybox_layer_runs_with_all_its_applets(registry: Path, store: ImageStore) -> None:
    build_image(str(registry), "busybox:latest", fmt="manifest")
    image = store.pull("busybox:latest")
    rootfs = image.layers[0]
    assert os.stat(os.path.join(rootfs, "bin/busybox")).st_nlink > 200
    assert stat.S_IMODE(os.stat(os.path.join(rootfs, "tmp")).st_mode) == 0o1777
    if IS_ROOT:
        assert run_in(rootfs, "/bin/sh", "-c", "cd /tmp && pwd && env | grep -c . >/dev/null && echo ok") == "/tmp\nok\n"


def test_modes_owners_setuid_and_mtimes_are_kept(registry: Path, store: ImageStore) -> None:
    build_image(str(registry), "perm", [layer(
        File("/usr/bin/su", b"x", 0o4755, uid=0, gid=0, mtime=1600000000),
        File("/home/u/file", b"data", 0o640, uid=1000, gid=1001, mtime=1500000000),
        Dir("/home/u", 0o750, uid=1000, gid=1001, mtime=1400000000),
        Dir("/srv/shared", 0o2775),
    )])
    rootfs = store.pull("perm").layers[0]
    su = os.stat(os.path.join(rootfs, "usr/bin/su"))
    assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_mtime == 1600000000
    f = os.stat(os.path.join(rootfs, "home/u/file"))
    assert (stat.S_IMODE(f.st_mode), f.st_mtime) == (0o640, 1500000000)
    d = os.stat(os.path.join(rootfs, "home/u"))
    assert stat.S_IMODE(d.st_mode) == 0o750 and d.st_mtime == 1400000000  # dated after its content was written
    assert stat.S_IMODE(os.stat(os.path.join(rootfs, "srv/shared")).st_mode) == 0o2775
    if IS_ROOT:
        assert (f.st_uid, f.st_gid, d.st_uid, d.st_gid) == (1000, 1001, 1000, 1001)


def test_a_gzipped_docker_save_archive(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "zipped:1", [small_busybox()], fmt="manifest")
    Path(built.archive).write_bytes(gzip.compress(Path(built.archive).read_bytes()))  # docker save | gzip
    assert store.pull("zipped:1").id == built.id


def test_a_multi_platform_index_yields_this_hosts_image(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "multi:1", [small_busybox()], fmt="oci")
    layout = registry / "multi:1"
    index = json.loads((layout / "index.json").read_text())
    descriptor = dict(index["manifests"][0])
    annotations = descriptor.pop("annotations")
    other = {"mediaType": descriptor["mediaType"], "digest": "sha256:" + "9" * 64, "size": 10,
             "platform": {"os": "linux", "architecture": "s390x" if host_platform()[1] != "s390x" else "ppc64le"}}
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [other, {**descriptor, "platform": {"os": "linux", "architecture": host_platform()[1]}}]}).encode()
    digest = hashlib.sha256(nested).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(nested)
    index["manifests"] = [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{digest}",
                           "size": len(nested), "annotations": annotations}]
    (layout / "index.json").write_text(json.dumps(index))
    image = store.pull("multi:1")
    assert (image.id, image.manifest_digest) == (built.id, built.manifest_digest)


# ---------------------------------------------------------------- names, tags and digests

def test_archives_are_named_as_mesos_names_them(registry: Path, store: ImageStore) -> None:
    build_image(str(registry), "busybox:latest", [small_busybox()])
    latest = store.pull("busybox:latest")
    # A bare name is :latest, as in Docker (Mesos looked for busybox.tar only, and failed here).
    assert store.pull("busybox").id == latest.id
    with pytest.raises(ImageNotFound) as e:
        store.pull("nothing")
    assert str(e.value) == (f"Failed to find archive for image 'nothing' at '{registry}/nothing:latest.tar' "
                            f"(nor at '{registry}/nothing.tar')")
    # Mesos's busybox.tar is still found for a bare name when there is no :latest archive.
    build_image(str(registry), "legacy", [small_busybox()])
    assert (registry / "legacy.tar").is_file() and store.pull("legacy").layers
    build_image(str(registry), "localhost:5000/team/app:1", [small_busybox()])
    assert (registry / "localhost:5000/team/app:1.tar").is_file()
    assert store.pull("localhost:5000/team/app:1").layers


def test_a_bare_name_means_the_latest_tag_inside_the_archive(registry: Path, store: ImageStore) -> None:
    build(str(registry), "busybox", [small_busybox()], repo_tags=["busybox:latest"])
    assert store.pull("busybox").layers
    build(str(registry), "other", [small_busybox()], repo_tags=["other:1.0"], fmt="manifest")
    with pytest.raises(ArchiveError) as e:
        store.pull("other")
    assert str(e.value) == f"Image 'other' is not in archive '{registry}/other.tar' (it holds: other:1.0)"


def test_legacy_archive_errors_are_mesos_messages(registry: Path, store: ImageStore) -> None:
    build(str(registry), "old", [small_busybox()], fmt="legacy", repo_tags=["old:1.0"])
    with pytest.raises(ArchiveError, match=r"^Layer id 'latest' is not found \(archive "):
        store.pull("old")
    build(str(registry), "renamed", [small_busybox()], fmt="legacy", repo_tags=["else:latest"])
    with pytest.raises(ArchiveError, match=r"^Repository 'renamed' does not exist in 'repositories'"):
        store.pull("renamed")


def test_an_archive_with_one_unnamed_image_is_that_image(registry: Path, store: ImageStore) -> None:
    for fmt in ("manifest", "oci"):
        built = build(str(registry), f"anon-{fmt}:v", [small_busybox()], fmt=fmt, repo_tags=[])
        assert store.pull(f"anon-{fmt}:v").id == built.id


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_digest_pins_the_image_id(registry: Path, store: ImageStore, fmt: str) -> None:
    built = build(str(registry), "busybox:latest", [small_busybox()], CONFIG, fmt=fmt)
    image = store.pull(f"busybox@{built.id}")  # found under the repository's name, busybox:latest
    assert image.id == built.id and image.reference == f"busybox@{built.id}"
    if built.manifest_digest:
        assert store.pull(f"busybox@{built.manifest_digest}").id == built.id


def test_a_digest_is_found_in_any_archive_and_then_needs_none(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "x", [small_busybox()], fmt="oci-tar", archive_name="sub/whatever.tar")
    ref = f"busybox@{built.manifest_digest}"
    assert store.pull(ref).id == built.id
    shutil.rmtree(registry / "sub")
    reads = store.archive_reads
    assert store.pull(ref).id == built.id  # content-addressed: the store alone serves it
    assert store.archive_reads == reads


def test_a_digest_no_archive_holds(registry: Path, store: ImageStore) -> None:
    build_image(str(registry), "busybox:latest", [small_busybox()])
    other = "sha256:" + "0" * 64
    # the archives named for busybox hold another image: a mismatch
    with pytest.raises(DigestMismatch) as e:
        store.pull(f"busybox@{other}")
    assert f"pinned to {other}, which no archive named for 'busybox' holds" in str(e.value)
    assert f"{registry}/busybox:latest.tar" in str(e.value)
    # nothing named for it at all: Mesos's message for the archive it would have read
    with pytest.raises(ImageNotFound) as e2:
        store.pull(f"nothing@{other}")
    assert str(e2.value).startswith(f"Failed to find archive for image 'nothing@{other}' at "
                                    f"'{registry}/nothing@{other}.tar'")


def test_an_archive_named_for_a_digest_must_hold_it(registry: Path, store: ImageStore) -> None:
    wrong = "sha256:" + "1" * 64
    build_image(str(registry), "pinned", [small_busybox()], archive_name=f"pinned@{wrong}.tar")
    with pytest.raises(DigestMismatch, match=f"archive '{registry}/pinned@{wrong}.tar' holds no image with digest {wrong}"):
        store.pull(f"pinned@{wrong}")


# ---------------------------------------------------------------- the cache

def test_a_second_pull_of_an_unchanged_archive_reads_no_tar(registry: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_image(str(registry), "busybox:latest", [small_busybox(), layer(File("/a", b"a"))], CONFIG)
    first = ImageStore(str(registry), str(tmp / "store")).pull("busybox:latest")

    def no_tar(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached pull opened a tar")
    monkeypatch.setattr(tarfile, "open", no_tar)
    monkeypatch.setattr(extract_mod, "extract_layer", no_tar)
    again = ImageStore(str(registry), str(tmp / "store"))  # a new agent process, the same store
    assert again.pull("busybox:latest") == first
    assert again.archive_reads == 0


def test_a_changed_archive_is_read_again(registry: Path, store: ImageStore) -> None:
    first = build_image(str(registry), "app:1", [small_busybox()], {"Cmd": ["one"]})
    assert store.pull("app:1").config == {"Cmd": ["one"]}
    second = build_image(str(registry), "app:1", [small_busybox()], {"Cmd": ["two"]})
    assert second != first
    image = store.pull("app:1")
    assert (image.id, image.config) == (second, {"Cmd": ["two"]})
    assert store.archive_reads == 2
    os.unlink(registry / "app:1.tar")
    with pytest.raises(ImageNotFound, match="Failed to find archive for image 'app:1' at "):
        store.pull("app:1")


def test_a_layer_removed_from_the_store_is_extracted_again(registry: Path, store: ImageStore) -> None:
    build_image(str(registry), "app:1", [small_busybox()])
    image = store.pull("app:1")
    shutil.rmtree(os.path.dirname(image.layers[0]))
    assert store.pull("app:1") == image and os.path.isfile(os.path.join(image.layers[0], "bin/busybox"))


def test_images_share_layers(registry: Path, store: ImageStore) -> None:
    build_image(str(registry), "a:1", [small_busybox(), layer(File("/a", b"a"))], fmt="oci")
    build_image(str(registry), "b:1", [small_busybox(), layer(File("/b", b"b"))], fmt="manifest", compress="gzip")
    a, b = store.pull("a:1"), store.pull("b:1")
    assert a.layers[0] == b.layers[0] and a.layers[1] != b.layers[1]
    assert len(os.listdir(os.path.join(store.store_dir, "layers"))) == 3


# ---------------------------------------------------------------- races

def test_threads_pulling_one_image_extract_each_layer_once(registry: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    built = build(str(registry), "race:1", [busybox_layer(), layer(File("/x", b"x" * 100000))], fmt="oci", compress="gzip")
    calls: list[str] = []
    real = extract_mod.extract_layer

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["where"])
        return real(*args, **kwargs)
    monkeypatch.setattr("reconciler.images.store.extract_layer", counting)
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def pull() -> None:
        barrier.wait()
        try:
            results.append(store.pull("race:1"))
        except Exception as e:  # surfaced by the assertion below
            results.append(e)
    threads = [threading.Thread(target=pull) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and all(r == results[0] for r in results), results
    assert results[0].id == built.id
    assert len(calls) == 2  # two layers, each extracted once
    assert os.listdir(store.staging_dir) == []


def test_pulls_taking_shared_layers_in_opposite_orders_both_finish(registry: Path, store: ImageStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Each pull holds the lock of the layer it extracts first and then needs the other's: waiting for it
    # would deadlock. The second layer is extracted without its lock; the first copy installed is kept.
    a, b = layer(File("/a", b"a" * 4096)), layer(File("/b", b"b" * 4096))
    ab = build(str(registry), "ab:1", [a, b], fmt="oci")
    ba = build(str(registry), "ba:1", [b, a], fmt="oci")
    both_hold_one = threading.Barrier(2, timeout=10)
    first_call: set[str] = set()
    real = extract_mod.extract_layer

    def in_step(*args: Any, **kwargs: Any) -> Any:
        thread = threading.current_thread().name
        if thread not in first_call:
            first_call.add(thread)
            both_hold_one.wait()
        return real(*args, **kwargs)
    monkeypatch.setattr("reconciler.images.store.extract_layer", in_step)
    results: dict[str, Any] = {}

    def pull(reference: str) -> None:
        try:
            results[reference] = store.pull(reference)
        except Exception as e:  # surfaced by the assertion below
            results[reference] = e
    threads = [threading.Thread(target=pull, args=(r,), name=r) for r in ("ab:1", "ba:1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "the two pulls deadlocked"
    assert results["ab:1"].layer_ids == ab.layer_ids and results["ba:1"].layer_ids == ba.layer_ids
    assert sorted(os.listdir(store.layers_dir)) == sorted(ab.layer_ids)
    assert os.listdir(store.staging_dir) == []
    assert Path(store.layer_path(ab.layer_ids[1]), "b").read_bytes() == b"b" * 4096


PULL_SCRIPT = """
import sys
from reconciler.images import ImageStore
img = ImageStore(sys.argv[1], sys.argv[2]).pull(sys.argv[3])
print(img.id, *img.layer_ids)
"""


def test_processes_pulling_one_image_at_once(registry: Path, tmp: Path) -> None:
    build_image(str(registry), "race:1", [busybox_layer(), layer(File("/x", b"x"))], fmt="manifest")
    procs = [subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, str(registry), str(tmp / "store"), "race:1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    assert len(set(outs)) == 1
    assert len(os.listdir(tmp / "store/layers")) == 2 and os.listdir(tmp / "store/staging") == []


# ---------------------------------------------------------------- whiteouts

@pytest.mark.root
def test_whiteouts_and_opaque_directories_become_overlayfs_ones(registry: Path, store: ImageStore, tmp: Path) -> None:
    lower = layer(File("/etc/a", b"a"), File("/etc/b", b"b"), File("/data/old1", b"1"), Dir("/data/sub"),
                  File("/data/sub/old2", b"2"))
    upper = layer(Whiteout("/etc/a"), Opaque("/data"), File("/data/new", b"n"))
    build_image(str(registry), "wh", [lower, upper], fmt="oci")
    image = store.pull("wh")
    top = image.layers[1]
    a = os.lstat(os.path.join(top, "etc/a"))
    assert stat.S_ISCHR(a.st_mode) and a.st_rdev == os.makedev(0, 0)
    assert not [n for n in os.listdir(os.path.join(top, "etc")) + os.listdir(os.path.join(top, "data")) if n.startswith(".wh.")]
    assert os.getxattr(os.path.join(top, "data"), "trusted.overlay.opaque") == b"y"
    assert b"trusted.overlay.opaque" not in [x.encode() for x in os.listxattr(os.path.join(top, "etc"))]
    # and overlayfs agrees: what the lead mounts shows the upper layer's deletions
    merged, upperdir, work = tmp / "merged", tmp / "upper", tmp / "work"
    for d in (merged, upperdir, work):
        d.mkdir()
    opts = f"lowerdir={image.layers[1]}:{image.layers[0]},upperdir={upperdir},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "etc")) == ["b"]
        assert sorted(os.listdir(merged / "data")) == ["new"]
        (merged / "etc/c").write_text("c")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert not os.path.exists(os.path.join(image.layers[1], "etc/c"))  # writes land in the upper dir only
    assert (upperdir / "etc/c").read_text() == "c"


# ---------------------------------------------------------------- corrupt archives

def test_corrupt_archives_fail_with_the_archive_named(registry: Path, store: ImageStore) -> None:
    (registry / "garbage.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(ArchiveError, match=f"'{registry}/garbage.tar'"):
        store.pull("garbage")
    path = build(str(registry), "trunc", [small_busybox()]).archive
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.tar"):
        store.pull("trunc")
    assert os.listdir(store.staging_dir) == [] and os.listdir(os.path.join(store.store_dir, "layers")) == []


def test_a_bad_manifest_names_the_file_and_field(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "bad", [small_busybox()], fmt="oci")
    index = json.loads((registry / "bad/index.json").read_text())
    index["manifests"][0]["size"] = "big"
    (registry / "bad/index.json").write_text(json.dumps(index))
    with pytest.raises(ArchiveError) as e:
        store.pull("bad")
    assert str(e.value).startswith(f"Invalid 'index.json' in archive '{registry}/bad': field 'manifests.0.size'")
    assert built.id


def test_oci_blobs_are_verified(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "tamper", [small_busybox(), layer(File("/f", b"original"))], fmt="oci")
    blob = registry / "tamper/blobs/sha256" / built.diff_ids[1].removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes().replace(b"original", b"modified"))
    with pytest.raises(DigestMismatch, match=r"^Layer 'blobs/sha256/[0-9a-f]+' of archive .* has digest sha256:"):
        store.pull("tamper")
    assert not os.path.exists(os.path.join(store.store_dir, "layers", built.layer_ids[1]))


def test_a_layer_that_does_not_match_its_diff_id_is_refused(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "liar", [small_busybox()], fmt="manifest")
    with tarfile.open(built.archive) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else b"") for m in t.getmembers()]  # type: ignore[union-attr]
    swapped = layer_tar(layer(File("/etc/passwd", b"root::0:0::/:/bin/sh\n")))
    with tarfile.open(built.archive, "w") as t:
        for m, data in members:
            if m.name.endswith("layer.tar"):
                data, m.size = swapped, len(swapped)
            t.addfile(m, io.BytesIO(data) if m.isfile() else None)
    with pytest.raises(DigestMismatch, match=r"^Layer '[0-9a-f]+/layer.tar' of archive .* has diff_id sha256:.*, "
                                             r"the image config says " + built.diff_ids[0]):
        store.pull("liar")
    assert os.listdir(os.path.join(store.store_dir, "layers")) == [] and os.listdir(store.staging_dir) == []


# ---------------------------------------------------------------- list and prune

def test_images_lists_what_is_stored(registry: Path, store: ImageStore) -> None:
    built = build(str(registry), "busybox:latest", [small_busybox()])
    store.pull("busybox:latest")
    store.pull(f"busybox@{built.id}")
    [image] = store.images()
    assert image.id == built.id
    assert image.references == ["busybox:latest", f"busybox@{built.id}"]
    assert image.layer_ids == built.layer_ids and image.size_bytes > 1_000_000
    assert image.last_used >= image.pulled_at > 0 and image.created
    table = images_table(store.images(), now=image.last_used + 90).splitlines()
    assert table[0].split() == ["REFERENCES", "IMAGE", "ID", "LAYERS", "SIZE", "CREATED", "PULLED", "LAST", "USED"]
    assert table[1].split()[:4] == [f"busybox:latest,busybox@{built.id}", built.id[7:19], "1", "1.9MB"]
    assert table[1].endswith("1m ago")
    assert image_doc(image)["references"] == image.references


def test_prune_keeps_what_containers_use(registry: Path, store: ImageStore, tmp: Path) -> None:
    a = build(str(registry), "a:1", [small_busybox(), layer(File("/a", b"a"))])
    b = build(str(registry), "b:1", [small_busybox(), layer(File("/b", b"b"))])
    work_dir = tmp / "work"
    image_a = store.pull("a:1", in_use_record=str(work_dir / "containers/c1/image.json"))
    store.pull("b:1")
    assert json.loads((work_dir / "containers/c1/image.json").read_text()) == {
        "reference": "a:1", "id": a.id, "layer_ids": a.layer_ids}
    assert layers_in_use(str(work_dir)) == set(a.layer_ids)
    removed = store.prune(set(), work_dir=str(work_dir))
    assert removed == [b.layer_ids[1]]
    assert [i.id for i in store.images()] == [a.id]
    assert all(os.path.isdir(p) for p in image_a.layers)
    assert os.listdir(os.path.join(store.store_dir, "gc")) == []
    assert store.pull("b:1").id == b.id  # pulled again from its archive
    (work_dir / "containers/c1/image.json").unlink()
    assert sorted(store.prune(set())) == sorted(set(a.layer_ids) | set(b.layer_ids))
    assert store.images() == []


def test_prune_waits_for_a_pull_in_progress(registry: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    build_image(str(registry), "slow:1", [small_busybox()])
    started, release = threading.Event(), threading.Event()
    real = extract_mod.extract_layer

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(10)
        return real(*args, **kwargs)
    monkeypatch.setattr("reconciler.images.store.extract_layer", slow)
    result: list[Any] = []
    puller = threading.Thread(target=lambda: result.append(store.pull("slow:1")))
    puller.start()
    assert started.wait(10)
    pruned: list[list[str]] = []
    pruner = threading.Thread(target=lambda: pruned.append(store.prune(set())))
    pruner.start()
    pruner.join(0.5)
    assert pruner.is_alive()  # blocked by the pull's shared lock
    release.set()
    puller.join(10)
    pruner.join(10)
    assert pruned == [result[0].layer_ids]  # it ran after the pull, and nothing used the image


def test_layers_in_use_refuses_an_unreadable_record(tmp: Path) -> None:
    assert layers_in_use(str(tmp / "nothing")) == set()
    record = tmp / "containers/c1/image.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"reference": "a", "id": "sha256:x", "layer_ids": "oops"}')
    with pytest.raises(ImageError, match=f"'{record}': field 'layer_ids' must be a list of strings"):
        layers_in_use(str(tmp))
    record.write_text('{"layer_ids": ["sha256:' + "a" * 64 + '"]}')
    assert layers_in_use(str(tmp)) == {"a" * 64}


# ---------------------------------------------------------------- the store's own files

def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    # Through a shell: setpriv itself still holds root's capabilities when it execs its argument (they
    # go at that exec), so it would find a path that nobody can reach.
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c",
                           'exec "$@"', "sh", *argv], capture_output=True, text=True, timeout=10)


@pytest.mark.root
def test_no_other_user_reaches_the_stores_files(registry: Path, tmp: Path) -> None:
    # A layer keeps the image's setuid-root binaries: from the store, a host user must not run them.
    build_image(str(registry), "suid:1", [layer(File("/bin/busybox", Path("/bin/busybox").read_bytes(), 0o4755))])
    tmp.chmod(0o755)  # everything above the store is open to all, as /var/lib is
    store = ImageStore(str(registry), str(tmp / "store"))
    binary = os.path.join(store.pull("suid:1").layers[0], "bin/busybox")
    assert stat.S_IMODE(os.stat(binary).st_mode) == 0o4755 and os.stat(binary).st_uid == 0
    assert stat.S_IMODE(os.stat(store.store_dir).st_mode) == 0o700
    denied = as_nobody("stat", binary)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    denied = as_nobody(binary, "true")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert as_nobody("ls", store.store_dir).returncode != 0
    # a store left open (an older agent made its root 0755; here every directory down to the layer):
    # then the setuid binary is there for anyone to run...
    for directory in (store.store_dir, store.layers_dir, os.path.dirname(os.path.dirname(os.path.dirname(binary)))):
        os.chmod(directory, 0o755)
    assert as_nobody(binary, "true").returncode == 0
    # ...until the next start puts it right
    ImageStore(str(registry), str(tmp / "store"))
    assert stat.S_IMODE(os.stat(store.store_dir).st_mode) == stat.S_IMODE(os.stat(store.layers_dir).st_mode) == 0o700
    assert as_nobody(binary, "true").returncode != 0


@pytest.mark.root
def test_a_store_owned_by_another_user_is_refused(registry: Path, tmp: Path) -> None:
    (tmp / "store").mkdir(mode=0o700)
    os.chown(tmp / "store", 65534, 65534)
    with pytest.raises(ImageError, match=f"Docker store directory '{tmp}/store' is owned by uid 65534, not by the "
                                         r"user running this \(uid 0\): no other user may control the store; "
                                         "chown it or choose another --docker_store_dir"):
        ImageStore(str(registry), str(tmp / "store"))


def test_links_planted_at_record_names_are_replaced_not_followed(registry: Path, store: ImageStore, tmp: Path) -> None:
    built = build(str(registry), "app:1", [small_busybox()])
    victim = tmp / "victim"
    victim.write_text("a host file\n")
    key = hashlib.sha256(b"app:1").hexdigest()
    ref_record = Path(store.refs_dir, key + ".json")
    image_record = Path(store.images_dir, built.id.removeprefix("sha256:") + ".json")
    for record in (ref_record, image_record):
        record.symlink_to(victim)
    assert store.pull("app:1").id == built.id
    assert victim.read_text() == "a host file\n"
    for record in (ref_record, image_record):
        assert not record.is_symlink() and json.loads(record.read_text())
    assert [p for p in os.listdir(store.refs_dir) + os.listdir(store.images_dir) if p.endswith(".tmp")] == []
    # and a record read through a link is ignored (the pull reads its archive again), not followed
    ref_record.unlink()
    ref_record.symlink_to(victim)
    reads = store.archive_reads
    assert store.pull("app:1").id == built.id and store.archive_reads == reads + 1
