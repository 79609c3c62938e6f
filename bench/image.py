"""Container images (issue 5), each figure against its peer measured in the same run.

1. Provisioning a 3-layer image (busybox, a layer of 2,000 small files and a 4 MB file, a layer of
   configuration) from a `docker save` archive: the first pull into an empty store (read the archive,
   verify, extract every layer) against a cached pull (the store already has it: no tar is read).
2. Start-to-exit of `/bin/true` in a container with that image as its root filesystem (provision from
   the cache, the overlay, /proc, /dev, the sandbox, pivot_root; pid, ipc, mount and uts namespaces),
   until its termination is known and every isolator cleaned up (as bench/launch.py), against `runc run` of a bundle whose
   rootfs is the same image flattened (same namespaces), interleaved. Target: at most 0.5x runc.

Run as root: python3 bench/image.py [--runs 50] [--pulls 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleave, ratio_line, remove_cgroup_root, require, summary, tempdir, time_runc, remove_tempdir  # noqa: E402
from bench.launch import UtsNamespace, measure_ours  # noqa: E402
from reconciler import isolators as registry  # noqa: E402
from reconciler.agent import build_image_store, build_launcher  # noqa: E402
from reconciler.checkpoint import Checkpoints  # noqa: E402
from reconciler.config import AgentConfig  # noqa: E402
from reconciler.containerizer import Containerizer  # noqa: E402
from reconciler.images.store import ImageStore  # noqa: E402
from reconciler.launcher.base import LaunchHelper  # noqa: E402
from reconciler.models import ContainerSpec, LinuxInfo  # noqa: E402
from tests.imagebuild import Dir, File, build_image, busybox_layer, layer  # noqa: E402

REFERENCE = "bench:3layers"
ISOLATION = "filesystem/linux,docker/runtime,namespaces/pid,namespaces/ipc,posix/cpu,posix/mem"


def build_three_layers(registry_dir: Path) -> str:
    files = [Dir("/data")] + [File(f"/data/d{i // 100}/f{i}", b"x" * (i % 700)) for i in range(2000)]
    dirs = sorted({os.path.dirname(f.path) for f in files if isinstance(f, File)})
    data = layer(*([Dir(d) for d in dirs] + files + [File("/data/blob", os.urandom(4 * 1024 * 1024))]))
    settings = layer(Dir("/etc/app"), File("/etc/app/config.yaml", b"mode: bench\n"), File("/etc/motd", b"hello\n"))
    return build_image(str(registry_dir), REFERENCE, layers=[busybox_layer(), data, settings],
                       config={"Env": ["PATH=/bin"], "WorkingDir": "/data"})


def time_pulls(registry_dir: Path, store_root: Path, runs: int) -> tuple[list[float], list[float]]:
    first, cached = [], []
    for i in range(runs):
        store_dir = store_root / f"fresh-{i}"
        started = time.perf_counter()
        ImageStore(str(registry_dir), str(store_dir)).pull(REFERENCE)
        first.append(time.perf_counter() - started)
        store = ImageStore(str(registry_dir), str(store_dir))
        for _ in range(10):
            started = time.perf_counter()
            store.pull(REFERENCE)
            cached.append(time.perf_counter() - started)
        shutil.rmtree(store_dir)
    return first, cached


def flattened_bundle(directory: Path, layers: list[str]) -> Path:
    """A runc bundle whose rootfs is the image's layers copied one over the other (no whiteouts here)."""
    rootfs = directory / "rootfs"
    rootfs.mkdir(parents=True)
    for lay in layers:
        subprocess.run(["cp", "-a", f"{lay}/.", str(rootfs)], check=True)
    subprocess.run(["runc", "spec"], cwd=directory, check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["args"] = ["/bin/true"]
    config["process"]["terminal"] = False
    config["linux"]["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--pulls", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/image.py needs root (namespaces, overlay, runc)")
    require("runc", "runc")
    work = tempdir("reconciler-bench-image-")
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    registry_dir = work / "registry"
    registry_dir.mkdir()
    image_id = build_three_layers(registry_dir)
    helper = LaunchHelper()
    try:
        first, cached = time_pulls(registry_dir, work / "stores", args.pulls)
        size = sum(f.stat().st_size for f in registry_dir.iterdir())
        print(f"provision {REFERENCE} ({image_id[:19]}…, 3 layers, archive {size / 1e6:.1f} MB):")
        print(f"  first pull (empty store)  {summary(first)}")
        print(f"  cached pull               {summary(cached)}")
        print(f"  cached / first: {statistics.median(cached) / statistics.median(first):.4f}x")

        config = AgentConfig(work_dir=str(work / "work"), cgroups_root=root, isolation=ISOLATION, launcher="linux",
                             image_providers="docker", docker_registry=str(registry_dir), allow_privileged=True)
        launcher = build_launcher(config, helper)
        isolators = registry.create(config) + [UtsNamespace(config)]
        containerizer = Containerizer(launcher, isolators, Checkpoints(config.containers_path, config.sandboxes_path),
                                      image_store=build_image_store(config))
        containerizer.checkpoints.ensure_dirs()
        spec = ContainerSpec.model_validate({
            "command": {"shell": False, "value": "/bin/true"}, "resources": {"cpus": 0.1, "mem": 32},
            "container": {"type": "MESOS", "mesos": {"image": {"type": "DOCKER", "docker": {"name": REFERENCE}}}}})
        await measure_ours(containerizer, spec, 3)          # the first pull, and warm caches
        layers = containerizer.image_store.pull(REFERENCE).layers
        bundle = flattened_bundle(work / "bundle", layers)
        time_runc(bundle, 2)
        loop = asyncio.get_running_loop()

        unprofiled = spec.model_copy(update={"container": spec.container.model_copy(update={
            "linux_info": LinuxInfo(privileged=True)})})

        def ours(n: int) -> list[float]:
            return asyncio.run_coroutine_threadsafe(measure_ours(containerizer, spec, n), loop).result()

        def without_profile(n: int) -> list[float]:
            return asyncio.run_coroutine_threadsafe(measure_ours(containerizer, unprofiled, n), loop).result()

        ours_s, bare_s, runc_s = await asyncio.to_thread(
            interleave, args.runs, ours, without_profile, lambda n: time_runc(bundle, n))
        print(f"start-to-exit of /bin/true in the image's rootfs ({','.join(i.name for i in isolators)}):")
        print(f"  reconciler (cached image)  {summary(ours_s)}")
        print(f"    without the profile      {summary(bare_s)}")
        print(f"  runc run (same rootfs)     {summary(runc_s)}")
        print(ratio_line("  reconciler / runc", ours_s, runc_s, "runc's time", limit=0.5))
        print(ratio_line("  profile / no profile", ours_s, bare_s, "the time without the security profile"))
    finally:
        helper.close()
        remove_cgroup_root(root)
        remove_tempdir(work)


if __name__ == "__main__":
    asyncio.run(main())
