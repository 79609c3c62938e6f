"""A registry's image read as the store reads an OCI image layout (reconciler.images.archive).

The registry client resolves the reference (the host's platform chosen from a list or index, the
manifest's bytes verified); this source then serves `oci-layout`, an `index.json` naming the
reference, the manifest and the config from memory, and each layer blob straight from the registry.
A layer already in the store is never opened, so never fetched: a second image sharing a base layer
downloads only what it adds.

Opening a layer starts its download in a thread of its own, which hands the bytes to the reader (the
store's extractor) through a bounded buffer: nothing touches the disk but the extracted files, and a
slow extraction slows its download rather than filling memory. The store opens up to three layers at
once (Docker's max-concurrent-downloads), each extracted behind its download. A reader never sees a
byte past what arrived, and sees the end only once the whole blob is there with its digest and size
verified; a refused, failed or stalled download is raised to the reader (the store then drops the
pull's staging). An interrupted download resumes with Range and the stream simply continues. `close`
stops every download still running.
"""

from __future__ import annotations

import collections
import io
import json
import os
import threading
from typing import IO, Callable, Iterable

from reconciler.images.archive import MAX_JSON_BYTES, REF_NAME, Source
from reconciler.images.errors import ArchiveError
from reconciler.images.extract import ReadStream
from reconciler.images.reference import ImageReference
from reconciler.images.registry import Descriptor, RegistryClient, ResolvedManifest

_LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'
BUFFERED = 8 << 20          # bytes a download may be ahead of its reader

Progress = Callable[[int, int], None]    # (bytes fetched, bytes to fetch) of the layers this pull downloads


class _Stopped(Exception):
    """The pull ended (failed, or the store closed the source) while this download was running."""


class _Download:
    """One layer blob in flight: the registry client writes, the store's extractor reads."""

    def __init__(self, descriptor: Descriptor, on_bytes: Callable[[int], None]) -> None:
        self.descriptor = descriptor
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.finished = False
        self.error: BaseException | None = None
        self.stopped = False
        self.cond = threading.Condition()
        self._on_bytes = on_bytes

    # the registry client's writer
    def write(self, data: bytes) -> int:
        with self.cond:
            while self.buffered >= BUFFERED and not self.stopped:
                self.cond.wait()
            if self.stopped:
                raise _Stopped()
            self.chunks.append(bytes(data))
            self.buffered += len(data)
            self.cond.notify_all()
        self._on_bytes(len(data))
        return len(data)

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            self.finished, self.error = True, error
            self.cond.notify_all()

    def read(self, n: int) -> bytes:
        with self.cond:
            while not self.chunks and not self.finished and not self.stopped:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            if self.stopped:
                raise _Stopped()
            if not self.chunks:
                return b""      # finished: every byte arrived and was verified
            chunk = self.chunks.popleft()
            if len(chunk) > n:
                chunk, rest = chunk[:n], chunk[n:]
                self.chunks.appendleft(rest)
            self.buffered -= len(chunk)
            self.cond.notify_all()
            return chunk

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.chunks.clear()
            self.cond.notify_all()


class _Reader(ReadStream):
    def __init__(self, download: _Download) -> None:
        self._download = download

    def read(self, n: int | None = -1) -> bytes:
        return self._download.read(n if n is not None and n > 0 else BUFFERED)

    def close(self) -> None:
        self._download.stop()      # a reader that gives up (a refused layer) ends its download
        super().close()


class RegistrySource(Source):
    def __init__(self, client: RegistryClient, ref: ImageReference, staging_dir: str,
                 progress: Progress | None = None, resolved: ResolvedManifest | None = None) -> None:
        """resolved: the reference's manifest when the caller resolved it already."""
        self.client = client
        self.resolved = resolved if resolved is not None else client.resolve(ref)
        self.path = f"{client.scheme}://{client.host}/{self.resolved.name}"   # what messages name
        self.staging_dir = staging_dir
        resolved = self.resolved
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": resolved.media_type, "digest": resolved.digest, "size": len(resolved.manifest),
            "annotations": {REF_NAME: str(ref)}}]}
        if resolved.config.size > MAX_JSON_BYTES:    # held in memory: refused before a byte is fetched
            raise ArchiveError(f"Image '{ref}': its config is {resolved.config.size} bytes, over the limit of "
                               f"{MAX_JSON_BYTES} bytes")
        config = io.BytesIO()
        client.fetch_blob(resolved.name, resolved.config, config)
        self._files = {"oci-layout": _LAYOUT, "index.json": json.dumps(index).encode(),
                       _blob(resolved.digest): resolved.manifest, _blob(resolved.config.digest): config.getvalue()}
        self._layers = {_blob(layer.digest): layer for layer in resolved.layers}
        self._downloads: list[_Download] = []
        self._threads: list[threading.Thread] = []
        self._progress = progress
        self._lock = threading.Lock()
        self._closed = False
        self.bytes_total = 0
        self.bytes_done = 0

    def exists(self, name: str) -> bool:
        return name in self._files or name in self._layers

    def expect(self, names: Iterable[str]) -> None:
        """The layers this pull will fetch (those the store lacks): what progress counts as the total."""
        self.bytes_total = sum(self._layers[n].size for n in dict.fromkeys(names) if n in self._layers)
        self._report()

    def open(self, name: str) -> IO[bytes]:
        if name in self._files:
            return io.BytesIO(self._files[name])
        descriptor = self._layers.get(name)
        if descriptor is None:
            raise FileNotFoundError(name)
        download = _Download(descriptor, self._count)
        thread = threading.Thread(target=self._fetch, args=(download,), name=f"layer-fetch-{descriptor.hex[:12]}",
                                  daemon=True)
        with self._lock:
            if self._closed:
                raise _Stopped()
            self._downloads.append(download)
            self._threads.append(thread)
        thread.start()
        return io.BufferedReader(_Reader(download), 1 << 20)

    def _fetch(self, download: _Download) -> None:
        error: BaseException | None = None
        try:
            self.client.fetch_blob(self.resolved.name, download.descriptor, download)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, who raises it: whatever it is
            error = e
        download.finish(error)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n
        self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.bytes_done, max(self.bytes_total, self.bytes_done))

    def close(self) -> None:
        """Stop every download: a writer raises at its next write; one waiting on the registry ends with
        its response (or --fetcher_stall_timeout), in its own daemon thread, touching nothing shared."""
        with self._lock:
            self._closed = True
            downloads = list(self._downloads)
        for download in downloads:
            download.stop()


def _blob(digest: str) -> str:
    return os.path.join("blobs", "sha256", digest.removeprefix("sha256:"))
