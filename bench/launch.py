"""Launch-to-exit of a `/bin/true` container with pid, ipc, mount and uts namespaces and its cgroups.

Ours: the containerizer's launch (checkpoints, isolators' prepare and isolate, the launch helper
clones the init into the namespaces, the init mounts a fresh /proc and runs the command) until its
termination is known and every isolator cleaned up (cgroups removed), as `runc run` also deletes.
It runs with the default security profile (docs/security.md: Docker's capabilities, the seccomp
filter, the devices allowlist, masked paths; pid1 exec'd from its memfd), and again without it
(`linux_info.privileged`, as before the profile existed) to show what the profile costs.
Peers, measured in the same run and interleaved: `runc run` of a busybox bundle with the same
namespaces (Debian's runc, its default spec: capabilities, masked paths, devices, no seccomp), and
`unshare --pid --fork --mount-proc --ipc --uts --mount /bin/true`.

Run as root: python3 bench/launch.py [--runs 100] [--isolation LIST]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import remove_cgroup_root, interleave, ratio_line, require, runc_bundle, summary, tempdir, time_command, time_runc, remove_tempdir  # noqa: E402
from reconciler import isolators as registry  # noqa: E402
from reconciler.agent import build_launcher  # noqa: E402
from reconciler.checkpoint import Checkpoints  # noqa: E402
from reconciler.config import AgentConfig  # noqa: E402
from reconciler.containerizer import Containerizer  # noqa: E402
from reconciler.isolators.base import ContainerConfig, Isolator, LaunchInfo  # noqa: E402
from reconciler.launcher.base import LaunchHelper  # noqa: E402
from reconciler.models import ContainerInfo, ContainerSpec, spec_hash, spec_hash_without_resources  # noqa: E402

CLONE_NEWUTS = 0x04000000


class UtsNamespace(Isolator):
    """runc and unshare both give the container a UTS namespace; Mesos does it when a hostname is set."""
    name = "bench/uts"

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo:
        return LaunchInfo(clone_namespaces=CLONE_NEWUTS)


async def measure_ours(containerizer: Containerizer, spec: ContainerSpec, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        cid = str(uuid.uuid4())
        config = ContainerConfig(cid, "bench", "bench", spec, spec_hash(spec), spec_hash_without_resources(spec),
                                 containerizer.checkpoints.sandbox(cid), created_at=time.time())
        started = time.perf_counter()
        await containerizer.provision(config)          # the image from the store's cache (none: nothing)
        await containerizer.launch(config, {"PATH": "/usr/bin:/bin"})
        termination = await containerizer.wait(cid)
        samples.append(time.perf_counter() - started)
        assert termination is not None and termination.exit_code == 0, termination
        containerizer.remove(cid)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--isolation", default="namespaces/pid,namespaces/ipc,posix/cpu,posix/mem")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/launch.py needs root (namespaces, cgroups, runc)")
    require("unshare", "util-linux")
    work = tempdir("reconciler-bench-launch-")
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    config = AgentConfig(work_dir=str(work / "work"), cgroups_root=root, isolation=args.isolation, launcher="linux",
                         allow_privileged=True)
    helper = LaunchHelper()
    launcher = build_launcher(config, helper)
    isolators = registry.create(config) + [UtsNamespace(config)]
    containerizer = Containerizer(launcher, isolators, Checkpoints(config.containers_path, config.sandboxes_path))
    containerizer.checkpoints.ensure_dirs()
    spec = ContainerSpec.model_validate({"command": {"shell": False, "value": "/bin/true"},
                                         "resources": {"cpus": 0.1, "mem": 32}})
    unprofiled = spec.model_copy(update={"container": ContainerInfo.model_validate({"linux_info": {"privileged": True}})})
    bundle = runc_bundle(work / "bundle", ["/bin/true"], ["pid", "ipc", "uts", "mount"])
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--ipc", "--uts", "--mount", "/bin/true"]
    loop = asyncio.get_running_loop()
    try:
        await measure_ours(containerizer, spec, 5)  # warm the helper and the page cache
        time_runc(bundle, 2)

        def ours(n: int) -> list[float]:
            return asyncio.run_coroutine_threadsafe(measure_ours(containerizer, spec, n), loop).result()

        def without_profile(n: int) -> list[float]:
            return asyncio.run_coroutine_threadsafe(measure_ours(containerizer, unprofiled, n), loop).result()

        results = await asyncio.to_thread(
            interleave, args.runs, ours, without_profile, lambda n: time_runc(bundle, n),
            lambda n: time_command(unshare, n))
        ours_s, bare_s, runc_s, unshare_s = results
        print(f"isolation: {','.join(i.name for i in isolators)}; launcher linux ({launcher.hierarchy.version and 'cgroup v%d' % launcher.hierarchy.version})")
        print(f"reconciler launch-to-exit   {summary(ours_s)}")
        print(f"  without the profile       {summary(bare_s)}")
        print(f"runc run (busybox bundle)   {summary(runc_s)}")
        print(f"unshare ... /bin/true       {summary(unshare_s)}")
        print(ratio_line("reconciler / runc", ours_s, runc_s, "runc's time", limit=0.5))
        print(ratio_line("reconciler / unshare", ours_s, unshare_s, "unshare's time"))
        print(ratio_line("profile / no profile", ours_s, bare_s, "the time without the security profile"))
    finally:
        helper.close()
        remove_cgroup_root(root)
        remove_tempdir(work)


if __name__ == "__main__":
    asyncio.run(main())
