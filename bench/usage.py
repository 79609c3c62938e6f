"""One statistics pass over N running containers: the agent CPU it costs, with the default root isolators.

A pass asks every isolator for usage (cgroups: cpuacct/cpu.stat/memory.stat reads; posix: one shared
/proc table) and rewrites each container's status file. The peer is `du`-free: the figure is CPU
seconds of this process (time.process_time), against the same pass over the same containers with
posix/cpu,posix/mem (the /proc walk Mesos's posix isolators do), measured in the same run.

Run as root: python3 bench/usage.py [--containers 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import remove_cgroup_root, tempdir, remove_tempdir  # noqa: E402
from reconciler.agent import Agent  # noqa: E402
from reconciler.config import AgentConfig  # noqa: E402


async def pass_cpu(isolation: str, containers: int, work: Path) -> tuple[float, int]:
    manifests = work / f"manifests-{isolation.replace('/', '_').replace(',', '-')}"
    manifests.mkdir()
    for i in range(containers):
        (manifests / f"c{i}.yaml").write_text(json.dumps({
            "apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": f"c{i}"},
            "spec": {"kill_grace_period": "100ms", "resources": {"cpus": 0.01, "mem": 32},
                     "command": {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "3600"]}}}))
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    config = AgentConfig(manifests=str(manifests), work_dir=str(manifests) + "-work", cgroups_root=root,
                         isolation=isolation, launcher="linux")
    agent = Agent(config)
    try:
        await agent.start()
        agent.reconciler.refresh_statistics()       # warm: first reads open the files
        running = [s.container.id for s in agent.reconciler.names.values() if s.container is not None]
        collect, publish = [], []
        for _ in range(5):
            started = time.process_time()
            for cid in running:
                agent.containerizer.usage(cid)
            collect.append(time.process_time() - started)
            started = time.process_time()
            agent.reconciler.refresh_statistics()
            publish.append(time.process_time() - started)
        measured = sum(1 for s in agent.reconciler.names.values() if s.statistics)
        return statistics.median(collect), statistics.median(publish), measured
    finally:
        for name in os.listdir(manifests):
            os.unlink(manifests / name)
        await agent.relist()
        await agent._settling
        agent.close()
        remove_cgroup_root(root)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--containers", type=int, default=500)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/statistics.py needs root")
    work = tempdir("reconciler-bench-stats-")
    try:
        cgroups_cpu, cgroups_all, n1 = await pass_cpu("namespaces/pid,cgroups/cpu,cgroups/mem", args.containers, work)
        posix_cpu, posix_all, n2 = await pass_cpu("namespaces/pid,posix/cpu,posix/mem", args.containers, work)
        print(f"statistics collection, {n1} containers, cgroups/cpu,cgroups/mem: {cgroups_cpu * 1000:.1f} ms agent CPU"
              f"  [target <= 200 ms: {'met' if cgroups_cpu <= 0.2 else 'NOT met'}]")
        print(f"statistics collection, {n2} containers, posix/cpu,posix/mem (a /proc walk): {posix_cpu * 1000:.1f} ms;"
              f" ratio cgroups/posix {cgroups_cpu / posix_cpu:.2f}x")
        print(f"collection + rewriting every status file: {cgroups_all * 1000:.1f} ms (cgroups), {posix_all * 1000:.1f} ms (posix)")
    finally:
        remove_tempdir(work)


if __name__ == "__main__":
    asyncio.run(main())
