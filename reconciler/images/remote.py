"""A registry's image read as the store reads an OCI image layout (reconciler.images.archive).

The registry client resolves the reference (the host's platform chosen from a list or index, the
manifest's bytes verified); this source then serves `oci-layout`, an `index.json` naming the
reference, the manifest and the config from memory, and each layer blob fetched when the store opens
it, into a temp file of the store's staging directory (its digest and size verified while streaming;
the store verifies the diff_id while it extracts). A layer already in the store is never opened, so
never fetched: a second image sharing a base layer downloads only what it adds.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import IO

from reconciler.images.archive import REF_NAME, Source
from reconciler.images.reference import ImageReference
from reconciler.images.registry import RegistryClient, ResolvedManifest

_LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'


class RegistrySource(Source):
    def __init__(self, client: RegistryClient, ref: ImageReference, staging_dir: str) -> None:
        self.client = client
        self.resolved: ResolvedManifest = client.resolve(ref)
        self.path = f"{client.scheme}://{client.host}/{self.resolved.name}"   # what messages name
        self.staging_dir = staging_dir
        resolved = self.resolved
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": resolved.media_type, "digest": resolved.digest, "size": len(resolved.manifest),
            "annotations": {REF_NAME: str(ref)}}]}
        config = io.BytesIO()
        client.fetch_blob(resolved.name, resolved.config, config)
        self._files = {"oci-layout": _LAYOUT, "index.json": json.dumps(index).encode(),
                       _blob(resolved.digest): resolved.manifest, _blob(resolved.config.digest): config.getvalue()}
        self._layers = {_blob(layer.digest): layer for layer in resolved.layers}
        self.blobs_fetched = 0

    def exists(self, name: str) -> bool:
        return name in self._files or name in self._layers

    def open(self, name: str) -> IO[bytes]:
        if name in self._files:
            return io.BytesIO(self._files[name])
        descriptor = self._layers.get(name)
        if descriptor is None:
            raise FileNotFoundError(name)
        # Unlinked at once: the open file is all there is, gone when the store closes it.
        f = tempfile.TemporaryFile(dir=self.staging_dir)
        try:
            self.client.fetch_blob(self.resolved.name, descriptor, f)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        self.blobs_fetched += 1
        return f


def _blob(digest: str) -> str:
    return os.path.join("blobs", "sha256", digest.removeprefix("sha256:"))
