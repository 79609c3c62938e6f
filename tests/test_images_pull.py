"""Pulling from a registry as a fleet does: layers in parallel, one flight per image however many containers
ask for it, tags resolved again only when asked or after --docker_tag_refresh_interval, the `Pulling`
condition with its bytes while a container waits for its image, and a failed pull's status naming the
registry, the HTTP status and the registry's error code, retried with backoff.

A real docker-registry on 127.0.0.1 (storage in a temp dir) with the recording proxy of tests/registries.py
in front of it: every count below is of requests the registry was really asked.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from reconciler.images.registry import RegistryClient, RegistryError
from reconciler.images.store import ImageStore
from tests.imagebuild import File, build, busybox_layer, layer
from tests.registries import TOOLS, Processes, Proxy, Registry, skopeo_copy

for tool in TOOLS:
    if not shutil.which(tool):
        pytest.skip(f"'{tool}' is not installed (apt-get install -y docker-registry skopeo)", allow_module_level=True)


@dataclass
class Pushed:
    name: str                 # team/app (the repository)
    layout: str               # oci:DIR:TAG, what skopeo pushes
    files: dict[str, bytes]


@dataclass
class PullWorld:
    tmp: Path
    registry: Registry
    proxy: Proxy
    app: Pushed               # 3 layers of random data, team/app:1
    other: Pushed             # another image, for moving a tag
    procs: Processes

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def store(self, path: Path, **kw: Any) -> ImageStore:
        client = RegistryClient(f"http://{self.host}", insecure_http_hosts=[self.host])
        return ImageStore(str(path / "unused"), str(path / "store"), registry=client, **kw)


def _push_layout(tmp: Path, name: str, layers_files: list[dict[str, bytes]], registry: Registry, tag: str,
                 base: bool = False) -> Pushed:
    layers = [busybox_layer()] if base else []
    layers += [layer(*(File(p, d) for p, d in files.items())) for files in layers_files]
    build(str(tmp), f"{name}:1", layers=layers, fmt="oci", compress="gzip", archive_name=name,
          config={"Env": ["PATH=/bin"]})
    layout = f"oci:{tmp / name}:1"
    skopeo_copy(layout, f"docker://{registry.host}/{tag}")
    return Pushed(tag.split(":")[0], layout, {p: d for files in layers_files for p, d in files.items()})


@pytest.fixture(scope="module")
def pullworld() -> Iterator[PullWorld]:
    tmp = Path(tempfile.mkdtemp(prefix="test-pull-"))
    procs = Processes()
    try:
        registry = procs.registry(tmp / "registry")
        images = tmp / "images"
        app = _push_layout(images, "app", [{f"data/{i}": os.urandom(300_000)} for i in range(3)], registry,
                           "team/app:1")
        other = _push_layout(images, "other", [{"data/other": os.urandom(1000)}], registry, "team/other:1")
        proxy = Proxy(registry.host)
        proxy.port = procs.serve(proxy.handler())
        yield PullWorld(tmp, registry, proxy, app, other, procs)
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def world(pullworld: PullWorld) -> Iterator[PullWorld]:
    pullworld.proxy.reset()
    try:
        yield pullworld
    finally:
        pullworld.proxy.release.set()
        pullworld.proxy.reset()


def _files(layers: list[str]) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for root in map(Path, layers) for p in root.rglob("*")
            if p.is_file()}


# ---------------------------------------------------------------- the store

def test_layers_download_in_parallel_and_report_their_bytes(world: PullWorld, tmp_path: Path) -> None:
    world.proxy.mode, world.proxy.rate = "slow", 1 << 20      # each layer takes about 0.3 s
    progress: list[tuple[int, int]] = []
    image = world.store(tmp_path).pull(f"{world.host}/team/app:1", progress=lambda d, t: progress.append((d, t)))
    assert _files(image.layers) == world.app.files
    assert world.proxy.max_active >= 2, "the layers were fetched one after the other"
    assert len(world.proxy.blob_gets()) == 4       # the config and three layers, once each
    total = progress[-1][1]
    assert progress[-1] == (total, total) and total > 900_000
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert list((tmp_path / "store" / "staging").iterdir()) == []


def test_concurrent_pulls_of_one_image_share_one_flight(world: PullWorld, tmp_path: Path) -> None:
    store = world.store(tmp_path)
    world.proxy.mode = "hold"      # every blob half sent until released: all ten callers are waiting by then
    results: list[Any] = []
    records = [tmp_path / "containers" / str(i) / "image.json" for i in range(10)]

    def pull(i: int) -> None:
        try:
            results.append(store.pull(f"{world.host}/team/app:1", in_use_record=str(records[i])))
        except BaseException as e:  # noqa: BLE001 - the assertion below shows it
            results.append(e)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(world.proxy.blob_gets()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    world.proxy.release.set()
    for t in threads:
        t.join(30)
    assert len(results) == 10 and len({getattr(r, "id", repr(r)) for r in results}) == 1, results
    assert len(world.proxy.manifest_gets()) == 1, world.proxy.manifest_gets()
    blobs = world.proxy.blob_gets()
    assert len(blobs) == len(set(blobs)) == 4, blobs
    assert all(r.exists() for r in records)     # each caller's in-use record, written under the store's lock


def test_a_failed_flight_fails_its_waiters_without_asking_again(world: PullWorld, tmp_path: Path) -> None:
    store = world.store(tmp_path)
    errors: list[BaseException] = []
    world.proxy.mode = "hold"

    def pull() -> None:
        try:
            store.pull(f"{world.host}/team/app:missing")
        except RegistryError as e:
            errors.append(e)

    original = store._pull_locked
    entered = threading.Event()

    def slow_leader(*args: Any, **kw: Any) -> Any:
        entered.set()
        time.sleep(0.5)               # the other callers join the flight meanwhile
        return original(*args, **kw)
    store._pull_locked = slow_leader  # type: ignore[method-assign]
    threads = [threading.Thread(target=pull) for _ in range(5)]
    threads[0].start()
    entered.wait(5)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 5
    assert {(e.status, e.code) for e in errors} == {(404, "MANIFEST_UNKNOWN")}
    assert len(world.proxy.manifest_gets()) == 1


def test_a_tag_is_resolved_again_only_when_asked_or_after_the_interval(world: PullWorld, tmp_path: Path) -> None:
    reg = world.registry
    skopeo_copy(world.app.layout, f"docker://{reg.host}/team/moving:1")
    never = world.store(tmp_path / "never")
    ttl = world.store(tmp_path / "ttl", tag_refresh_interval=0.5)
    ref = f"{world.host}/team/moving:1"
    first = never.pull(ref)
    assert ttl.pull(ref).id == first.id
    skopeo_copy(world.other.layout, f"docker://{reg.host}/team/moving:1")     # the tag moves
    world.proxy.requests.clear()
    assert never.pull(ref).id == first.id and ttl.pull(ref).id == first.id
    assert world.proxy.requests == []                  # both served from their store, the registry not asked
    time.sleep(0.6)
    moved = ttl.pull(ref)
    assert moved.id != first.id and _files(moved.layers) == world.other.files
    assert never.pull(ref).id == first.id              # never: until asked
    assert never.pull(ref, refresh=True).id == moved.id   # image.cached false, or `reconciler images pull`
    assert never.pull(ref).id == moved.id
    assert never.pull(f"{world.host}/team/moving@{first.manifest_digest}").id == first.id  # a digest: the store's


# ---------------------------------------------------------------- the agent

@pytest.fixture
def agent_env(world: PullWorld) -> Iterator[Any]:
    if os.geteuid() != 0 or not os.path.exists("/bin/busybox"):
        pytest.skip("needs root and /bin/busybox (Debian's busybox-static)")
    from tests.test_images_e2e import image_env
    base = world.tmp / "images"
    if not (base / "busy").exists():
        _push_layout(base, "busy", [{"data/payload": os.urandom(400_000)}], world.registry, "tools/busy:1", base=True)
    with image_env("pull") as env:
        env.start_registry = lambda **kw: env.agent.start(  # type: ignore[attr-defined]
            image_providers="docker", docker_registry=f"http://{world.host}", docker_insecure_registries=world.host,
            docker_store_dir=env.store, **kw)
        yield env


def test_ten_containers_of_one_image_cause_one_pull_and_show_it(world: PullWorld, agent_env: Any) -> None:
    env = agent_env
    world.proxy.mode = "hold"
    env.start_registry()
    image = f"{world.host}/tools/busy:1"
    names = [f"web{i}" for i in range(10)]
    for name in names:
        env.write(name, image, {"value": "test -s /data/payload && echo ran"})
    # Another container, with no image, is not held up by the pull.
    env.agent.write_manifest("plain", "sleep 30", restart_policy="Never")
    env.agent.wait_status("plain", lambda s: s["phase"] == "Running", timeout=20)
    pulling = [env.agent.wait_status(n, lambda s: s["phase"] == "Pending" and s.get("pull", {}).get("bytes_done", 0) > 0,
                                     timeout=20) for n in names]
    for status in pulling:
        pull = status["pull"]
        assert pull["state"] == "Pulling" and pull["registry"] == world.host and pull["image"] == image
        assert 0 < pull["bytes_done"] < pull["bytes_total"], pull
        condition = {c["type"]: c for c in status["conditions"]}["Pulling"]
        assert condition["status"] is True and "of" in condition["message"], condition
    world.proxy.release.set()
    for name in names:
        status = env.wait(name, timeout=30)
        assert status["phase"] == "Succeeded", status
        assert "pull" not in status
        assert {c["type"]: c for c in status["conditions"]}["Pulling"]["reason"] == "Pulled"
    assert len(world.proxy.manifest_gets()) == 1, world.proxy.manifest_gets()
    blobs = world.proxy.blob_gets()
    assert len(blobs) == len(set(blobs)) == 3, blobs      # config, busybox, payload: once each
    # cached: false asks the registry where the tag points again (its manifest; the config it names is
    # in the store, so no blob); cached: true does not ask.
    env.write("fresh", image, {"value": "true"}, cached=False)
    env.write("stale", image, {"value": "true"})
    assert env.wait("fresh")["phase"] == "Succeeded" and env.wait("stale")["phase"] == "Succeeded"
    assert len(world.proxy.manifest_gets()) == 2
    assert world.proxy.blob_gets() == blobs


def test_a_failed_pull_names_registry_status_and_code_and_is_retried(world: PullWorld, agent_env: Any) -> None:
    env = agent_env
    env.start_registry()
    image = f"{world.host}/tools/late:1"
    env.write("late", image, {"value": "echo at-last"})
    status = env.agent.wait_status("late", lambda s: s.get("pull", {}).get("state") == "Failed", timeout=20)
    assert status["phase"] == "Failed" and status["reason"] == "ProvisioningFailed", status
    pull = status["pull"]
    assert (pull["registry"], pull["http_status"], pull["code"]) == (world.host, 404, "MANIFEST_UNKNOWN"), pull
    assert world.host in status["message"] and "404" in status["message"] and "MANIFEST_UNKNOWN" in status["message"]
    assert "retrying at" in status["message"]
    condition = {c["type"]: c for c in status["conditions"]}["Pulling"]
    assert (condition["status"], condition["reason"]) == (False, "PullFailed")
    # The image appears: the retry (1 s doubling) pulls and runs it.
    skopeo_copy(f"oci:{world.tmp / 'images' / 'busy'}:1", f"docker://{world.registry.host}/tools/late:1")
    status = env.wait("late", phases=("Succeeded",), timeout=30)
    assert "pull" not in status and "at-last" in env.stdout(status)
    tries = [p for p in world.proxy.manifest_gets() if "/tools/late/" in p]
    assert 2 <= len(tries) <= 8, tries                 # retried, with backoff (not in a tight loop)


def test_a_replacement_pulls_its_image_while_the_old_container_runs(world: PullWorld, agent_env: Any) -> None:
    """A rollout to another image: the running container is replaced only once the new image is in the
    store; while it pulls, and when it cannot be pulled, the old one keeps running."""
    env = agent_env
    base = world.tmp / "images"
    if not (base / "busy2").exists():
        _push_layout(base, "busy2", [{"data/payload": os.urandom(400_000)}], world.registry, "tools/busy:2", base=True)
    env.start_registry()
    env.write("web", f"{world.host}/tools/busy:1", {"value": "sleep 300"})
    old = env.wait("web", phases=("Running",), timeout=30)
    world.proxy.mode = "hold"
    world.proxy.requests.clear()
    # cached: false resolves the tag: once, ahead of the replacement; the launch takes that resolution.
    env.write("web", f"{world.host}/tools/busy:2", {"value": "sleep 300"}, cached=False)
    pulling = env.agent.wait_status("web", lambda s: s.get("pull", {}).get("bytes_done", 0) > 0, timeout=20)
    assert pulling["phase"] == "Running" and pulling["pid"] == old["pid"], pulling      # still serving
    assert {c["type"]: c for c in pulling["conditions"]}["Pulling"]["status"] is True
    world.proxy.release.set()
    new = env.agent.wait_status("web", lambda s: s["phase"] == "Running" and s["image"].endswith("busy:2"),
                                timeout=30)
    assert new["pid"] != old["pid"] and "pull" not in new
    assert [p for p in world.proxy.manifest_gets() if p.endswith("/busy/manifests/2")] == ["/v2/tools/busy/manifests/2"]
    # An image that is not there: the container keeps running, and its status says why it is not replaced.
    env.write("web", f"{world.host}/tools/busy:404", {"value": "sleep 300"})
    refused = env.agent.wait_status("web", lambda s: s.get("pull", {}).get("state") == "Failed", timeout=20)
    assert refused["phase"] == "Running" and refused["pid"] == new["pid"], refused
    assert (refused["pull"]["http_status"], refused["pull"]["code"]) == (404, "MANIFEST_UNKNOWN")
    assert {c["type"]: c for c in refused["conditions"]}["Pulling"]["reason"] == "PullFailed"
    # The rollout reverted: the failure of the spec no longer wanted goes from the status.
    env.write("web", f"{world.host}/tools/busy:2", {"value": "sleep 300"}, cached=False)
    back = env.agent.wait_status("web", lambda s: "pull" not in s, timeout=20)
    assert back["phase"] == "Running" and back["pid"] == new["pid"], back
    assert {c["type"]: c for c in back["conditions"]}["Pulling"]["reason"] == "Pulled"


def test_an_image_pushed_from_a_docker_save_archive_pulls_whole(world: PullWorld, tmp_path: Path) -> None:
    """skopeo copy docker-archive: (what `docker save` writes) to the registry: a Docker schema2 manifest
    with the archive's uncompressed layers, pulled into the store with every file as it was saved."""
    files = {"etc/saved.conf": b"saved=1\n", "opt/blob": os.urandom(70_000)}
    archive_dir = tmp_path / "archives"
    build(str(archive_dir), "saved:1", layers=[layer(File("/etc/saved.conf", files["etc/saved.conf"])),
                                               layer(File("/opt/blob", files["opt/blob"]))], fmt="manifest",
          archive_name="saved.tar")     # skopeo reads a ":" in the path as a reference
    archive = archive_dir / "saved.tar"
    skopeo_copy(f"docker-archive:{archive}", f"docker://{world.registry.host}/team/saved:1")
    image = world.store(tmp_path).pull(f"{world.host}/team/saved:1")
    assert _files(image.layers) == files
    assert len(world.proxy.manifest_gets()) == 1 and len(world.proxy.blob_gets()) == 3


class _Dribble(io.RawIOBase):
    """A download whose first chunk is one byte (what a registry may hand over first)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.first = data, True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = 1 if self.first else len(buffer)
        self.first = False
        chunk, self.data = self.data[:n], self.data[n:]
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_a_gzip_layer_whose_first_chunk_is_one_byte_is_still_read_as_gzip(tmp_path: Path) -> None:
    import gzip
    import hashlib

    from reconciler.images.extract import extract_layer
    from tests.imagebuild import layer_tar
    tar = layer_tar(layer(File("/etc/one", b"1\n")))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    # As the store reads a registry's layer: the stream itself, no digest (the download verified it).
    stats = extract_layer(io.BufferedReader(_Dribble(gzip.compress(tar))), str(rootfs), where="layer x",
                          diff_id="sha256:" + hashlib.sha256(tar).hexdigest())
    assert stats.entries >= 1 and (rootfs / "etc" / "one").read_bytes() == b"1\n"


def test_a_waiter_that_gives_up_does_not_break_the_pull_it_waited_for(world: PullWorld, tmp_path: Path) -> None:
    import asyncio
    store = world.store(tmp_path)
    world.proxy.mode = "hold"
    results: list[Any] = []
    leader = threading.Thread(target=lambda: results.append(store.pull(f"{world.host}/team/app:1")))
    leader.start()
    deadline = time.monotonic() + 10
    while store.join(f"{world.host}/team/app:1") is None and time.monotonic() < deadline:
        time.sleep(0.01)

    async def give_up() -> None:
        flight = store.join(f"{world.host}/team/app:1")
        assert flight is not None
        waiter = asyncio.ensure_future(asyncio.wrap_future(flight))
        await asyncio.sleep(0.05)
        waiter.cancel()                 # the container's launch was cancelled (the agent stopping)
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(give_up())
    world.proxy.release.set()
    leader.join(30)
    assert len(results) == 1 and results[0].id


def test_a_reservation_is_what_later_callers_wait_for_and_fails_them_if_its_pull_never_starts(
        world: PullWorld, tmp_path: Path) -> None:
    from reconciler.images.errors import ImageError
    store = world.store(tmp_path)
    ref = f"{world.host}/team/app:1"
    waiting, reservation = store.reserve(ref)
    assert waiting is None and reservation is not None          # the first caller leads
    waiting, second = store.reserve(ref)
    assert second is None and waiting is not None                # the next waits, without a thread
    store.release(reservation)                                   # its pull never started (cancelled)
    with pytest.raises(ImageError, match="cancelled"):
        waiting.result(timeout=1)
    # Run by its reserver's pull, a reservation is one flight; a watcher that comes late is told at once
    # how far it got (layers held half sent: no further byte would tell it).
    waiting, reservation = store.reserve(ref)
    assert reservation is not None
    world.proxy.mode = "hold"
    leader_saw: list[tuple[int, int]] = []
    results: list[Any] = []
    leader = threading.Thread(target=lambda: results.append(
        store.pull(ref, reservation=reservation, progress=lambda d, t: leader_saw.append((d, t)))))
    leader.start()
    deadline = time.monotonic() + 10
    while not any(d for d, _ in leader_saw) and time.monotonic() < deadline:
        time.sleep(0.01)
    late: list[tuple[int, int]] = []
    assert store.join(ref, progress=lambda d, t: late.append((d, t))) is not None
    assert late and late[0][0] > 0, late
    world.proxy.release.set()
    leader.join(30)
    store.release(reservation)                                   # claimed: nothing to do
    assert results and results[0].id and store.join(ref) is None
    assert len(world.proxy.manifest_gets()) == 1
