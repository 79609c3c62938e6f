"""The local image store: pulls images from archives in --docker_registry (a local directory, as Mesos's
image_tar_puller) into a content-addressed store under --docker_store_dir, shared by every container.

    <store>/layers/<hex>/rootfs      one layer, extracted once; <hex> = sha256 of its diff_id (uncompressed tar)
    <store>/layers/<hex>/layer.json  its diff_id, entry count, expanded and on-disk sizes, when it was extracted
    <store>/images/<hex>.json        an image: id, references, layer ids lowest first, runtime config, times
    <store>/refs/<hex>.json          reference → image, with the archive's path, size and mtime_ns: a pull of
                                     an unchanged archive reads only this and stat()s the archive
    <store>/staging/                 extractions in progress (renamed into layers/ once the whole image is
                                     extracted, verified and within its size limit)
    <store>/gc/                      layers being deleted by prune
    <store>/locks/                   flock files: `store` (shared by pulls, exclusive for prune), one per
                                     reference (one pull of it at a time) and per layer (one extraction)

Locks are flock(2) locks, which exclude threads of one process as well as other processes (a separate
`reconciler images prune` process, or a second agent sharing the store).

A pull is all or nothing: the layers it extracts wait in staging/ until every layer of the image is
extracted and the image is within --docker_max_image_size (what its layers' files expand to, sparse
files at their full size, each distinct layer once, those already in the store included); a refused or
failed pull leaves nothing in the store. The store root is 0700 and its own (fixed at start when an
older agent left it 0755): layers keep the image's setuid-root binaries, which no host user may run.
Its records are written under unique temp names opened O_EXCL|O_NOFOLLOW, then renamed.

Archive names follow Mesos: `<docker_registry>/<reference>.tar`, `reference` as written (`busybox:latest` →
`busybox:latest.tar`), or an OCI layout directory `<docker_registry>/<reference>/`; a bare name means `:latest`
as in Docker (`busybox` → `busybox:latest.tar`), with Mesos's `busybox.tar` as a fallback.
A digest reference (`busybox@sha256:…`) pins the image: it matches an OCI manifest digest or the image id
(the config digest). Its archive is looked for under its own name, then under the repository's names
(`busybox.tar`, `busybox:*.tar`, OCI directories), then in every archive of the registry. Once pulled,
a digest reference is served from the store without reading any archive, since its content cannot change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from reconciler import fsutil
from reconciler.images.archive import LayerBlob, ResolvedImage, Source, open_source, resolve
from reconciler.images.errors import ArchiveError, DigestMismatch, ImageError, ImageNotFound, UnsafeArchive
from reconciler.images.extract import extract_layer, hash_layer
from reconciler.images.reference import DEFAULT_TAG, ImageReference, parse_reference
from reconciler.images.registry import RegistryClient, ResolvedManifest, docker_config_credentials
from reconciler.images.remote import RegistrySource

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

log = logging.getLogger(__name__)

TOUCH_EVERY = 60.0           # seconds between two writes of an image's last_used by one process
DEFAULT_MAX_IMAGE_BYTES = 20 << 30  # --docker_max_image_size's default
MAX_EXTRACTIONS = 3         # a registry's layers extracted side by side
IMAGE_RECORD = "image.json"  # <work_dir>/containers/<id>/image.json: the layers a container uses


@dataclass(frozen=True)
class PulledImage:
    reference: str              # the reference as pulled, in Mesos's form ("busybox:latest", "busybox@sha256:…")
    id: str                     # "sha256:<hex>" of the image config (legacy docker save: of the top layer id)
    layers: list[str]           # absolute rootfs directory of each layer, LOWEST first (overlay lowerdir: reversed)
    layer_ids: list[str]        # the store's layer ids (64 hex, sha256 of the diff_id), same order
    config: dict[str, Any]      # the image config's "config": Entrypoint, Cmd, Env, WorkingDir, User, …; {} if absent
    manifest_digest: str | None = None  # the OCI manifest digest, when the archive is an OCI layout

    def record(self) -> dict[str, Any]:
        """The document the containerizer keeps as <work_dir>/containers/<id>/image.json."""
        return {"reference": self.reference, "id": self.id, "layer_ids": list(self.layer_ids)}


@dataclass
class StoredImage:
    """One image in the store, for `reconciler images list`."""
    id: str
    references: list[str]
    layer_ids: list[str]
    layers: list[str]
    size_bytes: int             # disk used by its layers (a layer shared with other images counts in each)
    created: str | None         # from the image config
    pulled_at: float
    last_used: float
    archive: str
    manifest_digests: list[str] = field(default_factory=list)


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _write_json(path: str, doc: Any) -> None:
    """fsutil's atomic replace (a unique temp name created O_EXCL|O_NOFOLLOW: whatever is planted at a
    name is never opened, let alone followed), 0600: the store is root's alone."""
    fsutil.atomic_write_json(path, doc, durable=False, mode=0o600)


def _read_json(path: str) -> Any | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink, which the store never writes
        log.warning("ignoring unreadable store record %s: %s", path, e.strerror)
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read())
    except ValueError:
        log.warning("ignoring unreadable store record %s", path)
        return None


def _disk_usage(root: str) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def layers_in_use(work_dir: str) -> set[str]:
    """Layer ids named by <work_dir>/containers/*/image.json (the containerizer writes one per provisioned
    container). An unreadable record is an error: pruning without knowing what a container uses is unsafe."""
    used: set[str] = set()
    for path in sorted(glob.glob(os.path.join(glob.escape(work_dir), "containers", "*", IMAGE_RECORD))):
        try:
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            continue  # its container was removed meanwhile
        except (OSError, ValueError) as e:
            raise ImageError(f"Cannot tell which layers are in use: '{path}' is unreadable: {e}") from None
        ids = doc.get("layer_ids") if isinstance(doc, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ImageError(f"Cannot tell which layers are in use: '{path}': field 'layer_ids' must be a list of "
                             "strings")
        used.update(_hex(i) for i in ids)
    return used


Progress = Callable[[int, int], None]   # (bytes fetched, bytes to fetch) while a pull downloads layers


class _Flight:
    """One pull of a reference in this process, which the other callers asking for it meanwhile wait for."""

    def __init__(self, key: tuple[str, bool], claimed: bool = True) -> None:
        self.key = key
        self.claimed = claimed      # a pull is running it (a reservation is not claimed until its pull starts)
        self.started = time.time()
        self.future: Future[float] = Future()     # the time it started, or its error, once it ends
        # Running: a waiter that gives up (its task cancelled, asyncio.wrap_future cancelling this) cannot
        # cancel the flight under the others, nor make its leader's set_result fail.
        self.future.set_running_or_notify_cancel()
        self.watchers: list[Progress] = []
        self.last: tuple[int, int] | None = None

    def watch(self, progress: Progress) -> None:
        """Under the store's flights lock. A watcher that comes late is told at once how far it got."""
        self.watchers.append(progress)
        if self.last is not None:
            progress(*self.last)

    def report(self, done: int, total: int) -> None:
        self.last = (done, total)
        for watcher in list(self.watchers):
            watcher(done, total)


@dataclass
class _Pull:
    """One pull's layers, counted against the image's limit; the ones it extracts wait in staging."""
    reference: str
    limit: int
    expanded: dict[str, int] = field(default_factory=dict)         # layer id -> bytes, each layer once
    staged: dict[str, tuple[str, int]] = field(default_factory=dict)  # layer id -> (staging dir, entries)
    locks: dict[str, int] = field(default_factory=dict)           # layer id -> its flock, held until installed
    parallel: bool = False       # layers extracted side by side (threads): never wait for a layer's lock
    lock: threading.Lock = field(default_factory=threading.Lock)

    def total(self) -> int:
        with self.lock:
            return sum(self.expanded.values())

    def count(self, layer_id: str, expanded: int, where: str) -> None:
        """A layer's size in the image (found in the store, or extracted): refused past the limit."""
        with self.lock:
            self.expanded[layer_id] = expanded
            total = sum(self.expanded.values())
        if total > self.limit:
            raise self.too_large(where, total, None)

    def charge(self, layer_id: str, where: str, member: str, size: int) -> None:
        """A member about to be written by one of the layers extracted side by side."""
        with self.lock:
            self.expanded[layer_id] = self.expanded.get(layer_id, 0) + size
            total = sum(self.expanded.values())
        if total > self.limit:
            raise self.too_large(where, total, member)

    def too_large(self, where: str, total: int, member: str | None) -> UnsafeArchive:
        at = f" at member '{member}'" if member else " (already in the store)"
        return UnsafeArchive(f"Refusing image '{self.reference}': {where}{at} takes it to {total} bytes, over the "
                             f"image size limit of {self.limit} bytes (flag --docker_max_image_size)")


class ImageStore:
    @classmethod
    def for_agent(cls, config: "AgentConfig") -> "ImageStore":
        """The store the flags describe: --docker_store_dir, --docker_max_image_size, and --docker_registry
        as a directory, or as a registry's URL with its credentials, CA bundle and stall timeout."""
        client = None
        if config.docker_registry_url is not None:
            credentials = docker_config_credentials(config.docker_config) if config.docker_config else None
            client = RegistryClient(config.docker_registry_url, credentials=credentials,
                                    ca_file=config.docker_registry_ca_file,
                                    insecure_http_hosts=config.docker_insecure_registries,
                                    stall_timeout=config.fetcher_stall_timeout)
        return cls(config.docker_registry_path, config.docker_store_path, max_image_bytes=config.docker_max_image_size,
                   registry=client, tag_refresh_interval=config.docker_tag_refresh_interval)

    def __init__(self, registry_dir: str, store_dir: str, max_layer_bytes: int | None = None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, registry: RegistryClient | None = None,
                 tag_refresh_interval: float | None = None) -> None:
        """max_image_bytes: --docker_max_image_size. max_layer_bytes: what one layer may expand to (and its
        uncompressed tar stream); by default the image's limit. registry: --docker_registry given as a
        URL: images come from that registry (layers fetched only when the store lacks them) instead of
        the archives of `registry_dir`. tag_refresh_interval: --docker_tag_refresh_interval, seconds after
        which a pull resolves a registry's tag again (None: never, unless the pull asks to refresh)."""
        self.registry = registry
        self.tag_refresh_interval = tag_refresh_interval
        self._flights: dict[tuple[str, bool], _Flight] = {}
        self._flights_lock = threading.Lock()
        self.registry_dir = os.path.abspath(registry_dir)
        self.store_dir = os.path.abspath(store_dir)
        self.max_image_bytes = max_image_bytes
        self.max_layer_bytes = max_layer_bytes if max_layer_bytes is not None else max_image_bytes
        self.layers_dir = os.path.join(self.store_dir, "layers")
        self.images_dir = os.path.join(self.store_dir, "images")
        self.refs_dir = os.path.join(self.store_dir, "refs")
        self.staging_dir = os.path.join(self.store_dir, "staging")
        self.gc_dir = os.path.join(self.store_dir, "gc")
        self.locks_dir = os.path.join(self.store_dir, "locks")
        try:
            os.makedirs(os.path.dirname(self.store_dir), exist_ok=True)
        except OSError as e:
            raise ImageError(f"Failed to create Docker store directory '{self.store_dir}': {e.strerror}") from None
        self._private_dir(self.store_dir, follow=True)
        for d in (self.layers_dir, self.images_dir, self.refs_dir, self.staging_dir, self.gc_dir, self.locks_dir):
            self._private_dir(d, follow=False)
        self._touched: dict[tuple[str, str], float] = {}   # (image id, reference) -> when this process last touched it
        self.archive_reads = 0  # archives opened by this store object (tests check a cached pull opens none)
        self._count_lock = threading.Lock()

    def _private_dir(self, path: str, follow: bool) -> None:
        """Create `path` 0700, or make it 0700 when found otherwise (older agents left the root 0755), and
        refuse it when another user owns it. The layers hold the images' files with their modes,
        setuid-root binaries included: a host user who could reach them could run them. follow: the
        operator may point --docker_store_dir at a symlink; the store never makes one inside."""
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
        except OSError as e:
            raise ImageError(f"Failed to create Docker store directory '{path}': {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise ImageError(f"Docker store directory '{path}' is owned by uid {st.st_uid}, not by the user "
                                 f"running this (uid {os.geteuid()}): no other user may control the store; "
                                 "chown it or choose another --docker_store_dir")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
                log.warning("Docker store directory '%s' was mode %04o; made it 0700 so that no other user "
                            "reaches the images' files", path, stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise ImageError(f"Failed to make Docker store directory '{path}' private: {e.strerror}") from None
        finally:
            os.close(fd)

    # ------------------------------------------------------------ locks

    def _lock(self, name: str, shared: bool = False, wait: bool = True) -> int | None:
        """The fd holding the lock `name` (closing it releases the lock); None when wait=False and someone
        else holds it."""
        fd = os.open(os.path.join(self.locks_dir, name + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _flock(self, name: str, shared: bool = False, wait: bool = True) -> Iterator[None]:
        """Hold the lock `name`; with wait=False, BlockingIOError when someone else holds it."""
        fd = self._lock(name, shared, wait)
        if fd is None:
            raise BlockingIOError(f"lock '{name}' is held")
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def clean_leftovers(self) -> int:
        """Remove what crashed pulls and prunes left in staging/ and gc/ (the agent does this at start).
        Only when no pull or prune runs anywhere (the store lock is free); returns the entries removed."""
        try:
            with self._flock("store", wait=False):
                return self._remove_leftovers()
        except BlockingIOError:
            return 0

    def _remove_leftovers(self) -> int:
        """Empty staging/ and gc/. The caller holds the store lock exclusively: no pull writes there."""
        removed = 0
        for directory in (self.staging_dir, self.gc_dir):
            for name in os.listdir(directory):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
                removed += 1
        return removed

    # ------------------------------------------------------------ pull

    def layer_path(self, layer_id: str) -> str:
        return os.path.join(self.layers_dir, _hex(layer_id), "rootfs")

    def pull(self, reference: str, *, in_use_record: str | None = None, refresh: bool = False,
             progress: Progress | None = None, resolved_since: float | None = None,
             reservation: _Flight | None = None) -> PulledImage:
        """Make the image available in the store and return it. Thread- and process-safe.

        in_use_record: a path (e.g. <work_dir>/containers/<id>/image.json) written with
        PulledImage.record() before the store lock is released, so that a prune running in another
        process cannot remove the layers between this pull and the caller recording them.
        refresh: resolve the reference again even when the store has it (Mesos's Image.cached false).
        progress(bytes fetched, bytes to fetch): called from the pulling thread while layers download
        from a registry. resolved_since: a tag resolved since then counts as fresh (what `join` returns).
        reservation: the flight `reserve` made for this caller, which this pull runs.

        Pulls of one reference in this process share one flight: while one runs, the others wait for
        it and take its result (or its error), so ten containers of one image cost one pull.
        """
        ref = parse_reference(reference)
        flight_key = self._flight_key(ref, refresh, resolved_since)
        refresh = flight_key[1]
        with self._flights_lock:
            flight = self._flights.get(flight_key)
            leader = flight is None or (flight is reservation and not flight.claimed)
            if flight is None:
                flight = self._flights[flight_key] = _Flight(flight_key)
            if progress is not None and flight is not reservation:   # (reserve added the reserver's)
                flight.watch(progress)
            if leader:
                flight.claimed = True
        if not leader:
            # What the flight pulled, from the store (under its lock, with this caller's in-use record).
            return self._pull_locked(ref, in_use_record, refresh=False, resolved_since=flight.future.result())
        try:
            image = self._pull_locked(ref, in_use_record, refresh=refresh, resolved_since=resolved_since,
                                      progress=flight.report)
        except BaseException as e:
            flight.future.set_exception(e)
            raise
        else:
            flight.future.set_result(flight.started)
        finally:
            with self._flights_lock:
                del self._flights[flight_key]
        return image

    @staticmethod
    def _flight_key(ref: ImageReference, refresh: bool, resolved_since: float | None) -> tuple[str, bool]:
        return str(ref), refresh and resolved_since is None   # a caller handed a fresh resolution asks no more

    def join(self, reference: str, *, refresh: bool = False, progress: Progress | None = None) -> Future[float] | None:
        """The pull of this reference running in this process, if any: `progress` is added to its watchers;
        the future gives the time it started (pass it to `pull` as resolved_since, which then serves the
        result from the store) or raises its error."""
        waiting, _ = self._join_or_reserve(parse_reference(reference), (refresh, None), progress, reserve=False)
        return waiting

    def reserve(self, reference: str, *, refresh: bool = False, resolved_since: float | None = None,
                progress: Progress | None = None) -> tuple[Future[float] | None, _Flight | None]:
        """For a caller that waits without a thread (the agent's event loop), before it hands its pull to
        one: the running flight's future to wait for, or a reservation, a flight the others wait for from
        now on, which the caller's `pull(reservation=...)` runs and `release` ends if that never starts."""
        return self._join_or_reserve(parse_reference(reference), (refresh, resolved_since), progress, reserve=True)

    def _join_or_reserve(self, ref: ImageReference, asked: tuple[bool, float | None], progress: Progress | None,
                         reserve: bool) -> tuple[Future[float] | None, _Flight | None]:
        key = self._flight_key(ref, *asked)
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is None:
                if not reserve:
                    return None, None
                flight = self._flights[key] = _Flight(key, claimed=False)
                if progress is not None:
                    flight.watch(progress)
                return None, flight
            if progress is not None:
                flight.watch(progress)
            return flight.future, None

    def release(self, reservation: _Flight) -> None:
        """After the reserver's pull: a reservation whose pull never started (its task cancelled before a
        thread took it) fails, so that those waiting for it go on."""
        with self._flights_lock:
            if reservation.claimed or self._flights.get(reservation.key) is not reservation:
                return
            del self._flights[reservation.key]
        reservation.future.set_exception(ImageError(f"the pull of '{reservation.key[0]}' was cancelled"))

    def _pull_locked(self, ref: ImageReference, in_use_record: str | None, *, refresh: bool,
                     resolved_since: float | None = None, progress: Progress | None = None) -> PulledImage:
        key = hashlib.sha256(str(ref).encode()).hexdigest()
        with self._flock("store", shared=True), self._flock(f"ref-{key}"):
            image = None if refresh and ref.digest is None else self._cached(ref, key, resolved_since)
            if image is None:
                image = self._pull(ref, key, progress)
            touched = (image.id, str(ref))
            if time.monotonic() - self._touched.get(touched, -TOUCH_EVERY) >= TOUCH_EVERY:
                self._touch(image.id, str(ref))   # `last_used` is for `images list`: a minute's precision will do
                self._touched[touched] = time.monotonic()
            if in_use_record is not None:
                os.makedirs(os.path.dirname(in_use_record), exist_ok=True)
                # Not fsynced: a reboot ends every container that the record keeps layers for.
                fsutil.atomic_write_json(in_use_record, image.record(), durable=False)
            return image

    def _archive_path(self, ref: ImageReference) -> str:
        """The archive for the reference: the tar, or an OCI layout directory of the same name. A bare
        name means `:latest`, as in Docker (`busybox` is `busybox:latest.tar`), with Mesos's `busybox.tar`
        kept as a fallback. When none exists, the first name looked for (what the error names)."""
        names = [str(ref)]
        if ref.tag is None and ref.digest is None:
            names.insert(0, f"{ref.name}:{DEFAULT_TAG}")
        for name in names:
            tar = os.path.join(self.registry_dir, f"{name}.tar")
            directory = os.path.join(self.registry_dir, name)
            if os.path.exists(tar):
                return tar
            if os.path.isfile(os.path.join(directory, "oci-layout")):
                return directory
        return os.path.join(self.registry_dir, f"{names[0]}.tar")

    @staticmethod
    def _stat_key(path: str) -> tuple[int, int] | None:
        target = os.path.join(path, "index.json") if os.path.isdir(path) else path
        try:
            st = os.stat(target)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _image_from_record(self, doc: dict[str, Any], reference: str) -> PulledImage | None:
        layer_ids = doc.get("layer_ids") or []
        if not layer_ids or not all(os.path.isdir(self.layer_path(i)) for i in layer_ids):
            return None
        return PulledImage(reference=reference, id=doc["id"], layers=[self.layer_path(i) for i in layer_ids],
                           layer_ids=list(layer_ids), config=doc.get("config") or {},
                           manifest_digest=(doc.get("manifest_digests") or [None])[0])

    def _cached(self, ref: ImageReference, key: str, resolved_since: float | None = None) -> PulledImage | None:
        """The stored image the reference names, when it may be used without looking at its source again:
        a digest always; a tag from a registry within --docker_tag_refresh_interval of its resolution (or
        resolved since `resolved_since`); a local archive while its path, size and mtime are unchanged."""
        rec = _read_json(os.path.join(self.refs_dir, key + ".json"))
        if not isinstance(rec, dict) or rec.get("reference") != str(ref):
            return None
        doc = _read_json(os.path.join(self.images_dir, _hex(rec.get("image_id", "")) + ".json"))
        if not isinstance(doc, dict):
            return None
        if ref.digest is None and self.registry is not None:
            resolved_at = rec.get("resolved_at")
            if not isinstance(resolved_at, (int, float)):
                return None
            fresh = resolved_since is not None and resolved_at >= resolved_since
            interval = self.tag_refresh_interval
            expired = interval is not None and time.time() - resolved_at >= interval
            if not fresh and (expired or rec.get("registry") != self._registry_url()):
                return None   # the tag may have moved: its manifest is asked for again (one request; layers stay)
        elif ref.digest is None:
            path = self._archive_path(ref)
            if rec.get("archive") != path or list(rec.get("stat") or []) != list(self._stat_key(path) or []):
                return None  # the archive changed, moved or is gone: read it again (or fail as Mesos does)
        elif ref.digest != doc.get("id") and ref.digest not in (doc.get("manifest_digests") or []):
            return None
        return self._image_from_record(doc, str(ref))

    def _open(self, path: str) -> Source:
        with self._count_lock:
            self.archive_reads += 1
        return open_source(path)

    def _locate(self, ref: ImageReference, progress: Progress | None = None,
                manifest: ResolvedManifest | None = None) -> tuple[Source, ResolvedImage, str]:
        if self.registry is not None:
            with self._count_lock:
                self.archive_reads += 1
            remote = RegistrySource(self.registry, ref, self.staging_dir, progress, manifest)
            try:
                return remote, resolve(remote, ref), remote.path
            except BaseException:
                remote.close()
                raise
        if ref.digest is None:
            path = self._archive_path(ref)
            if not os.path.exists(path):
                bare = os.path.join(self.registry_dir, str(ref))
                fallback = "" if ref.tag or ref.digest else f" (nor at '{bare}.tar')"
                raise ImageNotFound(f"Failed to find archive for image '{ref}' at '{path}'{fallback}")
            source = self._open(path)
            try:
                return source, resolve(source, ref), path
            except BaseException:
                source.close()
                raise
        return self._locate_digest(ref)

    def _digest_candidates(self, ref: ImageReference) -> Iterator[tuple[str, bool]]:
        """(archive path, whether it is named for this image), best first."""
        seen: set[str] = set()
        base = os.path.join(self.registry_dir, ref.name)
        named = [self._archive_path(ref)]
        named += sorted(glob.glob(glob.escape(base) + ".tar") + glob.glob(glob.escape(base) + ":*.tar"))
        named += sorted(p for p in glob.glob(glob.escape(base)) + glob.glob(glob.escape(base) + ":*")
                        if os.path.isfile(os.path.join(p, "oci-layout")))
        for p in named:
            if p not in seen and os.path.exists(p):
                seen.add(p)
                yield p, True
        for dirpath, dirnames, filenames in os.walk(self.registry_dir):
            if "oci-layout" in filenames and dirpath != self.registry_dir:
                dirnames[:] = []
                if dirpath not in seen:
                    seen.add(dirpath)
                    yield dirpath, False
                continue
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if name.endswith(".tar") and p not in seen:
                    seen.add(p)
                    yield p, False

    def _locate_digest(self, ref: ImageReference) -> tuple[Source, ResolvedImage, str]:
        mismatches: list[str] = []
        for path, named in self._digest_candidates(ref):
            try:
                source = self._open(path)
            except ImageError as e:
                if named:
                    raise
                log.warning("skipping archive %s while looking for %s: %s", path, ref.digest, e)
                continue
            try:
                return source, resolve(source, ref), path
            except DigestMismatch as e:
                source.close()
                if named:
                    mismatches.append(str(e))
            except ImageError as e:
                source.close()
                if named:
                    raise
                log.warning("skipping archive %s while looking for %s: %s", path, ref.digest, e)
        if mismatches:
            raise DigestMismatch(f"Image '{ref}' is pinned to {ref.digest}, which no archive named for "
                                 f"'{ref.name}' holds: " + "; ".join(mismatches))
        raise ImageNotFound(f"Failed to find archive for image '{ref}' at '{self._archive_path(ref)}' "
                            f"(and no archive in '{self.registry_dir}' holds an image with digest {ref.digest})")

    def _registry_url(self) -> str | None:
        return f"{self.registry.scheme}://{self.registry.host}" if self.registry is not None else None

    def _known(self, ref: ImageReference, key: str, manifest: ResolvedManifest,
               resolved_at: float) -> PulledImage | None:
        """A registry's tag resolved again to an image the store has (by its config digest, layers present):
        recorded as the tag's image, without a blob fetched (its config included)."""
        image_id = manifest.config.digest
        with self._flock(f"image-{_hex(image_id)}"):
            record_path = os.path.join(self.images_dir, _hex(image_id) + ".json")
            doc = _read_json(record_path)
            # Only an image whose id is its config's digest (not a legacy docker save's, which its archive chose).
            known = isinstance(doc, dict) and doc.get("format") in ("oci", "docker-save")
            image = self._image_from_record(doc, str(ref)) if known and isinstance(doc, dict) else None
            if image is None:
                return None
            assert isinstance(doc, dict)
            changed = False
            for field_name, value in (("references", str(ref)), ("manifest_digests", manifest.digest)):
                if value not in doc.setdefault(field_name, []):
                    doc[field_name].append(value)
                    changed = True
            if changed:
                _write_json(record_path, doc)
        self._record_ref(key, ref, image_id, f"{self._registry_url()}/{manifest.name}", None, resolved_at)
        return dataclasses.replace(image, manifest_digest=manifest.digest)

    def _record_ref(self, key: str, ref: ImageReference, image_id: str, archive: str,
                    stat_key: tuple[int, int] | None, resolved_at: float) -> None:
        """refs/<key>.json: what the reference resolved to, from where, when (what _cached reads)."""
        _write_json(os.path.join(self.refs_dir, key + ".json"),
                    {"reference": str(ref), "image_id": image_id, "archive": archive,
                     "stat": list(stat_key) if stat_key else None, "registry": self._registry_url(),
                     "resolved_at": resolved_at})

    def _pull(self, ref: ImageReference, key: str, progress: Progress | None = None) -> PulledImage:
        started = time.monotonic()
        resolved_at = time.time()
        manifest = None
        if self.registry is not None:
            manifest = self.registry.resolve(ref)
            known = self._known(ref, key, manifest, resolved_at)
            if known is not None:
                return known
        source, resolved, path = self._locate(ref, progress, manifest)
        stat_key = self._stat_key(path)
        pull = _Pull(str(ref), self.max_image_bytes)
        try:
            if isinstance(source, RegistrySource):
                results = self._ensure_layers_side_by_side(source, resolved.layers, pull)
            else:
                results = [self._ensure_layer(source, blob, pull) for blob in resolved.layers]
            layer_ids = [layer_id for layer_id, _ in results]
            non_empty = [layer_id for layer_id, entries in results if entries]
            self._install_staged(pull)
        finally:
            source.close()
            for fd in pull.locks.values():
                os.close(fd)
            for staging, _ in pull.staged.values():  # a refused or failed pull leaves nothing behind
                shutil.rmtree(staging, ignore_errors=True)
        # Empty layers (docker's metadata-only steps) add nothing to a rootfs, only overlay lowerdirs.
        used = non_empty or layer_ids[-1:]
        if not used:
            raise ArchiveError(f"Image '{ref}' in archive '{path}' has no layers")
        now = time.time()
        with self._flock(f"image-{_hex(resolved.id)}"):
            record_path = os.path.join(self.images_dir, _hex(resolved.id) + ".json")
            doc = _read_json(record_path)
            old = doc if isinstance(doc, dict) else {}
            digests = list(old.get("manifest_digests") or [])
            if resolved.manifest_digest and resolved.manifest_digest not in digests:
                digests.append(resolved.manifest_digest)
            references = list(old.get("references") or [])
            if str(ref) not in references:
                references.append(str(ref))
            _write_json(record_path, {
                "id": resolved.id, "references": references, "manifest_digests": digests,
                "layer_ids": used, "config": resolved.config, "created": resolved.created,
                "format": resolved.format, "archive": path, "names": resolved.names,
                "pulled_at": old.get("pulled_at", now), "last_used": now,
            })
        self._record_ref(key, ref, resolved.id, path, stat_key, resolved_at)
        log.info("pulled image '%s' (%s, %d layers) from '%s' in %.3fs", ref, resolved.id, len(used), path,
                 time.monotonic() - started)
        return PulledImage(reference=str(ref), id=resolved.id, layers=[self.layer_path(i) for i in used],
                           layer_ids=used, config=resolved.config, manifest_digest=resolved.manifest_digest)

    def _stored_layer(self, layer_id: str) -> tuple[int, int] | None:
        """(entries, expanded bytes) of the layer when it is complete in the store, else None."""
        if not os.path.isdir(self.layer_path(layer_id)):
            return None
        doc = _read_json(os.path.join(self.layers_dir, layer_id, "layer.json"))
        if not isinstance(doc, dict):
            return 1, 0
        return int(doc.get("entries", 1)), int(doc.get("content_bytes", 0))

    def _ensure_layers_side_by_side(self, source: RegistrySource, blobs: list[LayerBlob],
                                    pull: _Pull) -> list[tuple[str, int]]:
        """A registry's layers, up to MAX_EXTRACTIONS at once, each downloaded and extracted behind its
        download in a thread of its own (the network, zlib and the kernel's writes run beside each
        other), sharing the image's size budget. The first failure stops the downloads, and so the others."""
        unique = list({blob.diff_id or blob.name: blob for blob in blobs}.values())
        source.expect(blob.name for blob in unique
                      if blob.diff_id is None or self._stored_layer(_hex(blob.diff_id)) is None)
        pull.parallel = True
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_EXTRACTIONS, len(unique))),
                                thread_name_prefix="layer-extract") as executor:
            futures = {blob.diff_id or blob.name: executor.submit(self._ensure_layer, source, blob, pull)
                       for blob in unique}
            try:
                for future in as_completed(futures.values()):
                    future.result()
            except BaseException:
                executor.shutdown(wait=False, cancel_futures=True)   # layers not started yet never start
                source.close()
                raise
        return [futures[blob.diff_id or blob.name].result() for blob in blobs]

    def _ensure_layer(self, source: Source, blob: LayerBlob, pull: _Pull) -> tuple[str, int]:
        """The layer's id and entry count: found in the store, or extracted into staging for this pull."""
        where = f"layer '{blob.name}' of archive '{source.path}'"
        if not source.exists(blob.name):
            raise ArchiveError(f"Archive '{source.path}': layer '{blob.name}' is missing")
        diff_id = blob.diff_id
        if diff_id is None:  # legacy docker save states no diff_ids: hash the layer (reading, not writing)
            with source.open(blob.name) as f:
                diff_id, _ = hash_layer(f, where=where, max_bytes=self.max_layer_bytes)
        layer_id = _hex(diff_id)
        if layer_id in pull.staged:  # the same layer twice in one image (docker's empty layers): counted once
            return layer_id, pull.staged[layer_id][1]
        stored = self._stored_layer(layer_id)
        if stored is None:
            # One extraction of a layer at a time, across threads and processes. Waiting for a layer while
            # holding another could deadlock two pulls that take them in opposite orders: then this pull
            # extracts without the lock, and _install_staged keeps whichever copy is installed first.
            fd = self._lock(f"layer-{layer_id}", wait=not pull.locks and not pull.parallel)
            if fd is not None:
                pull.locks[layer_id] = fd
                stored = self._stored_layer(layer_id)  # another pull may have installed it while we waited
                if stored is not None:
                    os.close(pull.locks.pop(layer_id))
        if stored is not None:
            entries, expanded = stored
            pull.count(layer_id, expanded, where)
            return layer_id, entries
        staging = tempfile.mkdtemp(prefix=f"{layer_id[:12]}.", dir=self.staging_dir)
        pull.staged[layer_id] = (staging, 0)
        rootfs = os.path.join(staging, "rootfs")
        os.mkdir(rootfs, 0o755)
        started = time.monotonic()
        before = pull.total()
        with source.open(blob.name) as f:
            if pull.parallel:
                # The stream ends only once the download verified the blob's digest and size: not hashed twice.
                stats = extract_layer(f, rootfs, where=where, max_bytes=self.max_layer_bytes, diff_id=diff_id,
                                      charge=lambda member, n: pull.charge(layer_id, where, member, n))
            else:
                stats = extract_layer(f, rootfs, where=where, max_bytes=self.max_layer_bytes,
                                      diff_id=diff_id, digest=blob.digest, size=blob.size,
                                      budget=pull.limit - before,
                                      over_budget=lambda member, n: pull.too_large(where, before + n, member))
        _write_json(os.path.join(staging, "layer.json"), {
            "diff_id": stats.diff_id, "entries": stats.entries, "content_bytes": stats.bytes,
            "disk_bytes": _disk_usage(rootfs), "extracted_at": time.time(),
            "seconds": round(time.monotonic() - started, 3), "source": where,
        })
        pull.staged[layer_id] = (staging, stats.entries)
        with pull.lock:
            pull.expanded[layer_id] = stats.bytes
        return layer_id, stats.entries

    def _install_staged(self, pull: _Pull) -> None:
        """Rename the pull's extracted layers into layers/ (the image is complete and within its limit)."""
        for layer_id in [i for i in pull.staged if i in pull.locks]:
            self._install(layer_id, pull.staged[layer_id][0])
            del pull.staged[layer_id]
            os.close(pull.locks.pop(layer_id))
        for layer_id, (staging, _) in list(pull.staged.items()):
            with self._flock(f"layer-{layer_id}"):  # no other layer lock is held now: waiting is safe
                if self._stored_layer(layer_id) is None:
                    self._install(layer_id, staging)
                else:  # another pull installed its own copy meanwhile
                    shutil.rmtree(staging, ignore_errors=True)
            del pull.staged[layer_id]

    def _install(self, layer_id: str, staging: str) -> None:
        """Under the layer's lock."""
        target = os.path.join(self.layers_dir, layer_id)
        if os.path.lexists(target):  # an incomplete leftover (no rootfs): set it aside first
            os.rename(target, os.path.join(self.gc_dir, f"{layer_id}.{uuid.uuid4().hex[:8]}"))
        os.rename(staging, target)

    def _touch(self, image_id: str, reference: str) -> None:
        with self._flock(f"image-{_hex(image_id)}"):
            path = os.path.join(self.images_dir, _hex(image_id) + ".json")
            doc = _read_json(path)
            if not isinstance(doc, dict):
                return
            doc["last_used"] = time.time()
            if reference not in doc.setdefault("references", []):
                doc["references"].append(reference)
            _write_json(path, doc)

    # ------------------------------------------------------------ list, prune

    def images(self) -> list[StoredImage]:
        out = []
        for name in sorted(os.listdir(self.images_dir)):
            if not name.endswith(".json"):
                continue
            doc = _read_json(os.path.join(self.images_dir, name))
            if not isinstance(doc, dict) or "id" not in doc:
                continue
            layer_ids = list(doc.get("layer_ids") or [])
            size = 0
            for lid in layer_ids:
                meta = _read_json(os.path.join(self.layers_dir, lid, "layer.json"))
                size += int(meta.get("disk_bytes", 0)) if isinstance(meta, dict) else 0
            out.append(StoredImage(
                id=doc["id"], references=list(doc.get("references") or []), layer_ids=layer_ids,
                layers=[self.layer_path(i) for i in layer_ids], size_bytes=size, created=doc.get("created"),
                pulled_at=float(doc.get("pulled_at", 0)), last_used=float(doc.get("last_used", 0)),
                archive=doc.get("archive", ""), manifest_digests=list(doc.get("manifest_digests") or [])))
        return out

    def prune(self, in_use_layer_ids: set[str], *, work_dir: str | None = None) -> list[str]:
        """Remove every layer not in `in_use_layer_ids`, and the image records that need one of them.

        Holds the store lock exclusively: no pull runs meanwhile. work_dir: also keep what
        layers_in_use(work_dir) names, read under the lock (so a container provisioned by a pull
        that finished just before, with in_use_record, is seen). Returns the removed layer ids.
        """
        keep = {_hex(i) for i in in_use_layer_ids}
        with self._flock("store"):
            if work_dir is not None:
                keep |= layers_in_use(work_dir)
            removed_images: set[str] = set()
            for name in os.listdir(self.images_dir):
                path = os.path.join(self.images_dir, name)
                doc = _read_json(path)
                if not isinstance(doc, dict) or not set(doc.get("layer_ids") or []) <= keep:
                    removed_images.add(doc.get("id", "") if isinstance(doc, dict) else "")
                    os.unlink(path)
            for name in os.listdir(self.refs_dir):
                doc = _read_json(os.path.join(self.refs_dir, name))
                if not isinstance(doc, dict) or doc.get("image_id") in removed_images:
                    os.unlink(os.path.join(self.refs_dir, name))
            removed = []
            for layer_id in sorted(os.listdir(self.layers_dir)):
                if layer_id in keep:
                    continue
                os.rename(os.path.join(self.layers_dir, layer_id),
                          os.path.join(self.gc_dir, f"{layer_id}.{uuid.uuid4().hex[:8]}"))
                removed.append(layer_id)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.locks_dir, f"layer-{layer_id}.lock"))
            self._remove_leftovers()   # the layers just moved to gc/, and crashed pulls' staging
            log.info("pruned %d layers and %d images from '%s'", len(removed), len(removed_images), self.store_dir)
            return removed
