"""Pulling from a registry (issue 13), each figure against its peer measured in the same run.

A real docker-registry on 127.0.0.1 (Debian's), storage in a temp dir, an image of 3 gzip layers of
about 100 MB together (random bytes, which gzip cannot shrink, and text, which it can) pushed with
skopeo, and the recording proxy of tests/registries.py in front, which counts the blob bytes it serves.

1. A pull into an empty store (manifest, config, 3 layers fetched in parallel, each verified and
   extracted behind its download) against `skopeo copy docker://... oci:DIR` of the same image (which
   only downloads and writes the blobs), interleaved. Target: at most 1.0x. And against extraction
   alone: the same image pulled from a local OCI layout (read, verify, extract; no network).
2. A fleet: N stores (as N hosts would; N processes) pulling the image at once from the one registry.
   The registry's blob bytes must be exactly N x the image's; then the same N with the image cached
   (each resolves its tag again, as `reconciler images pull` does) must fetch no blob at all.

Run as root: python3 bench/pull.py [--runs 5] [--hosts 50] [--fleet-mb 100]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleave, ratio_line, remove_tempdir, require, tempdir  # noqa: E402
from reconciler.images.registry import RegistryClient  # noqa: E402
from reconciler.images.store import ImageStore  # noqa: E402
from tests.imagebuild import File, build, layer  # noqa: E402
from tests.registries import Processes, Proxy, skopeo_copy  # noqa: E402

MB = 1 << 20


def image_layers(total_mb: int) -> list:
    """3 layers, 45/35/20 % of about total_mb of blobs: in each, random bytes (90 % of its share; gzip
    cannot shrink them) and four times 10 % of text (which gzip shrinks about 4x), so the image expands
    to about 1.3x its blobs."""
    layers = []
    for share, name in ((45, "base"), (35, "app"), (20, "data")):
        size = total_mb * MB * share // 100
        text = b"".join(b"line %08d of a log a config or a source file\n" % i for i in range(size * 4 // 10 // 48))
        layers.append(layer(File(f"/{name}/random.bin", os.urandom(size * 9 // 10)), File(f"/{name}/text.txt", text)))
    return layers


def push_image(tmp: Path, registry_host: str, tag: str, total_mb: int) -> tuple[Path, int]:
    """The OCI layout built (also the local source of "extraction alone") and the bytes of the blobs a
    pull fetches: its config and its layers."""
    build(str(tmp), "bench:1", layers=image_layers(total_mb), fmt="oci", compress="gzip", archive_name="bench",
          config={"Env": ["PATH=/bin"]})
    skopeo_copy(f"oci:{tmp / 'bench'}:1", f"docker://{registry_host}/{tag}")
    blobs = tmp / "bench" / "blobs" / "sha256"
    index = json.loads((tmp / "bench" / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].removeprefix("sha256:")).read_text())
    return tmp / "bench", manifest["config"]["size"] + sum(d["size"] for d in manifest["layers"])


def client(host: str) -> RegistryClient:
    return RegistryClient(f"http://{host}", insecure_http_hosts=[host])


def fleet_host(args: tuple[str, str, str, bool]) -> tuple[float, int]:
    """One host of the fleet: its own store, its own client. Returns (seconds, layers)."""
    host, reference, store_dir, refresh = args
    started = time.perf_counter()
    image = ImageStore(store_dir + "/unused", store_dir, registry=client(host)).pull(reference, refresh=refresh)
    return time.perf_counter() - started, len(image.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--image-mb", type=int, default=100)
    parser.add_argument("--fleet-mb", type=int, default=100, help="size of the fleet's image")
    args = parser.parse_args()
    require("docker-registry", "docker-registry")
    require("skopeo", "skopeo")
    tmp = tempdir("bench-pull-")
    procs = Processes()
    try:
        registry = procs.registry(tmp / "registry")
        proxy = Proxy(registry.host)
        proxy.port = procs.serve(proxy.handler())
        host = f"127.0.0.1:{proxy.port}"
        layout, blob_bytes = push_image(tmp / "images", registry.host, "bench/app:1", args.image_mb)
        reference = f"{registry.host}/bench/app:1"     # straight from the registry, for both
        print(f"image: 3 layers, {blob_bytes / MB:.1f} MB of blobs (gzip), from docker-registry on {registry.host}")

        n = [0]

        def ours(runs: int) -> list[float]:
            samples = []
            for _ in range(runs):
                n[0] += 1
                store = tmp / f"ours-{n[0]}"
                started = time.perf_counter()
                ImageStore(str(tmp / "unused"), str(store), registry=client(registry.host)).pull(reference)
                samples.append(time.perf_counter() - started)
                shutil.rmtree(store)
            return samples

        def skopeo(runs: int) -> list[float]:
            samples = []
            for _ in range(runs):
                n[0] += 1
                dest = tmp / f"skopeo-{n[0]}"
                started = time.perf_counter()
                subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                                f"docker://{reference}", f"oci:{dest}:1"], check=True)
                samples.append(time.perf_counter() - started)
                shutil.rmtree(dest)
            return samples

        local_dir = tmp / "local"
        local_dir.mkdir()
        os.symlink(layout, local_dir / "bench:1")

        def extraction(runs: int) -> list[float]:
            samples = []
            for _ in range(runs):
                n[0] += 1
                store = tmp / f"local-{n[0]}"
                started = time.perf_counter()
                ImageStore(str(local_dir), str(store)).pull("bench:1")
                samples.append(time.perf_counter() - started)
                shutil.rmtree(store)
            return samples

        ours_s, skopeo_s, extract_s = interleave(args.runs, ours, skopeo, extraction)
        for label, samples in (("reconciler pull", ours_s), ("skopeo copy docker:// oci:", skopeo_s),
                               ("extraction alone (local OCI layout)", extract_s)):
            print(f"  {label:40s} median {statistics.median(samples):6.3f} s  (n={len(samples)})")
        print(ratio_line("pull into an empty store", ours_s, skopeo_s, "skopeo copy", limit=1.0))
        print(ratio_line("pull into an empty store", ours_s, extract_s, "extraction alone"))

        # The fleet, through the proxy that counts the blob bytes served.
        fleet_tag = "bench/fleet:1"
        if args.fleet_mb != args.image_mb:
            _, fleet_bytes = push_image(tmp / "fleet-image", registry.host, fleet_tag, args.fleet_mb)
        else:
            skopeo_copy(f"oci:{layout}:1", f"docker://{registry.host}/{fleet_tag}")
            fleet_bytes = blob_bytes
        fleet_ref = f"{host}/{fleet_tag}"
        stores = [str(tmp / "fleet" / f"host-{i:03d}") for i in range(args.hosts)]
        for label, refresh in (("empty stores", False), ("image cached, tag resolved again", True)):
            proxy.requests.clear()
            proxy.bytes_served = 0
            started = time.perf_counter()
            with multiprocessing.get_context("fork").Pool(args.hosts) as pool:
                results = pool.map(fleet_host, [(host, fleet_ref, s, refresh) for s in stores])
            wall = time.perf_counter() - started
            blobs = len(proxy.blob_gets())
            print(f"fleet of {args.hosts} hosts, {label}: wall {wall:.2f} s (slowest host {max(r[0] for r in results):.2f} s), "
                  f"{blobs} blob requests, {proxy.bytes_served} blob bytes served = "
                  f"{proxy.bytes_served / fleet_bytes:.3f}x the image ({fleet_bytes} bytes)")
            expected = args.hosts * fleet_bytes if not refresh else 0
            print(f"  [registry bytes {'==' if proxy.bytes_served == expected else '!='} {expected}: "
                  f"{'met' if proxy.bytes_served == expected else 'NOT met'}]")
    finally:
        procs.close()
        remove_tempdir(tmp)


if __name__ == "__main__":
    main()
