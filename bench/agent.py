"""The agent with its daemon watching: latency and scale figures of issue 2.

1. Manifest written (atomic rename) → its status file says Running: p50 and p99 over N launches,
   against `runc run -d` (create + start, detached) of a busybox bundle in the same run.
2. M manifests dropped at once → all Running: the wall time, and per container against runc -d.
3. A resync (full re-list + reconcile of every name) of M unchanged running containers: the
   agent's CPU time for it (from /proc/<pid>/task/*/schedstat, nanoseconds).
4. The agent's RSS with M containers, and the unique memory (USS) of each container's init.

Run as root: python3 bench/agent.py [--latency-runs 100] [--containers 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_ns, phase, stop_agent_and_destroy_all, wait_for, write_manifest, percentile, runc_bundle, tempdir, remove_tempdir  # noqa: E402

SPEC = {"kill_grace_period": "1secs", "resources": {"cpus": 0.01, "mem": 32},
        "command": {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "3600"]}}




def runc_detached(bundle: Path, runs: int) -> list[float]:
    samples, ids = [], []
    for _ in range(runs):
        cid = f"bench-{uuid.uuid4().hex[:10]}"
        started = time.perf_counter()
        subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
        ids.append(cid)
    for cid in ids:
        subprocess.run(["runc", "delete", "--force", cid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--isolation", default="namespaces/pid,namespaces/ipc,posix/cpu,posix/mem")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/agent.py needs root")
    work = tempdir("reconciler-bench-agent-")
    manifests, work_dir = work / "manifests", work / "work"
    manifests.mkdir()
    status_dir = work_dir / "status"
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    bundle = runc_bundle(work / "bundle", ["/bin/sleep", "3600"], ["pid", "ipc", "uts", "mount"])
    agent = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", f"--manifests={manifests}", f"--work_dir={work_dir}",
         f"--isolation={args.isolation}", f"--cgroups_root={root}", "--resync_interval=1hrs", "--log_level=warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (status_dir / "_agent.json").exists(), 30), "the agent did not start"
        # 1. latency, one manifest at a time
        latencies = []
        for i in range(args.latency_runs):
            name = f"lat-{i}"
            started = write_manifest(manifests, name, SPEC)
            assert wait_for(lambda: phase(status_dir, name) == "Running", 10), f"{name} never ran"
            latencies.append(time.perf_counter() - started)
        runc_lat = runc_detached(bundle, 20)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        runc_p50 = percentile(runc_lat, 50)
        print(f"manifest -> Running   p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms  (n={len(latencies)})"
              f"  [targets p50 <= 50 ms: {'met' if p50 <= 0.05 else 'NOT met'}, p99 <= 200 ms: {'met' if p99 <= 0.2 else 'NOT met'}]")
        print(f"runc run -d           p50 {runc_p50 * 1000:6.1f} ms  (n={len(runc_lat)});  ratio of p50s: {p50 / runc_p50:.2f}x runc")
        for i in range(args.latency_runs):
            os.unlink(manifests / f"lat-{i}.yaml")
        assert wait_for(lambda: not any(status_dir.glob("lat-*.json")), 60, 0.05), "latency containers not destroyed"

        # 2. M at once
        names = [f"c-{i:04d}" for i in range(args.containers)]
        started = time.perf_counter()
        for name in names:
            write_manifest(manifests, name, SPEC)
        running = lambda: all(phase(status_dir, n) == "Running" for n in names)  # noqa: E731
        assert wait_for(running, 120, 0.05), "not all containers reached Running"
        burst = time.perf_counter() - started
        print(f"{args.containers} manifests at once -> all Running: {burst:.2f} s  ({burst / args.containers * 1000:.1f} ms each;"
              f" {burst / args.containers / runc_p50:.2f}x runc -d per container)  [target <= 10 s: {'met' if burst <= 10 else 'NOT met'}]")

        # 3. resync CPU: an event re-lists and reconciles every name; wait for _agent.json to say so
        time.sleep(2)
        samples = []
        for _ in range(5):
            before_doc = json.loads((status_dir / "_agent.json").read_text())["source"]["last_listed_at"]
            before = cpu_ns(agent.pid)
            (manifests / ".resync").write_text(str(time.time()))
            assert wait_for(lambda: json.loads((status_dir / "_agent.json").read_text())["source"]["last_listed_at"] != before_doc, 30, 0.01)
            time.sleep(0.5)
            samples.append((cpu_ns(agent.pid) - before) / 1e9)
        resync = sorted(samples)[len(samples) // 2]
        print(f"resync of {args.containers} unchanged running containers: {resync * 1000:.1f} ms agent CPU (median of 5)"
              f"  [target <= 100 ms: {'met' if resync <= 0.1 else 'NOT met'}]")

        # 4. memory
        agent_rss = psutil.Process(agent.pid).memory_info().rss
        helper = [c for c in psutil.Process(agent.pid).children() if "reconciler.launcher.helper" in " ".join(c.cmdline())]
        inits = []
        for entry in (work_dir / "containers").iterdir():
            doc = json.loads((entry / "pid.json").read_text())
            inits.append(psutil.Process(doc["pid"]).memory_full_info().uss)
        uss = sorted(inits)[len(inits) // 2]
        print(f"agent RSS with {args.containers} containers: {agent_rss / 2**20:.1f} MB"
              f" (+ launch helper {helper[0].memory_info().rss / 2**20 if helper else 0:.1f} MB)"
              f"  [target <= 100 MB: {'met' if agent_rss <= 100 * 2**20 else 'NOT met'}]")
        print(f"per-container init USS: median {uss / 1024:.0f} KiB, max {max(inits) / 1024:.0f} KiB"
              f"  [target <= 1 MB: {'met' if uss <= 2**20 else 'NOT met'}]")
    finally:
        stop_agent_and_destroy_all(agent, manifests, [f"--manifests={manifests}", f"--work_dir={work_dir}",
                                   f"--isolation={args.isolation}", f"--cgroups_root={root}", "--log_level=warning"], root)
        remove_tempdir(work)


if __name__ == "__main__":
    main()
