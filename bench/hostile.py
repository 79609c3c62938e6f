"""The agent beside every hostile manifest of issue 11: its memory, and how soon a good manifest runs.

Two agents in the same run, the same flags: one whose manifest directory holds every hostile input
of the bad-input campaign (numbers past a float's range, a YAML alias bomb, 500,000 generated
arguments, a 10 MB file, a value that contains itself, 100,000 nested brackets, ...), one whose
directory is empty (the peer). For each: the agent's peak RSS over a few full relistings, and the
time from a good manifest's rename to its status saying Running (p50 of N drops).

Run as root: python3 bench/hostile.py [--drops 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    percentile, phase, remove_tempdir, stop_agent_and_destroy_all, tempdir, wait_for, write_manifest,
)
from tests.test_hostile_manifests import hostile_directory  # noqa: E402

SPEC = {"kill_grace_period": "1secs", "command": {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "3600"]}}


def measure(work: Path, hostile: bool, drops: int, isolation: str) -> tuple[int, list[float]]:
    manifests, work_dir = work / "manifests", work / "work"
    manifests.mkdir()
    if hostile:
        hostile_directory(manifests)
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    flags = [f"--manifests={manifests}", f"--work_dir={work_dir}", f"--isolation={isolation}",
             f"--cgroups_root={root}", "--resync_interval=1secs", "--manifests_strict_modes=false"]
    agent = subprocess.Popen([sys.executable, "-m", "reconciler", "run", *flags],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: (work_dir / "status" / "_agent.json").exists(), 60, poll=0.01):
            raise SystemExit("the agent never published _agent.json")
        process = psutil.Process(agent.pid)
        peak = 0
        for _ in range(30):   # three full relistings
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.1)
        samples = []
        for i in range(drops):
            name = f"good-{i}"
            started = write_manifest(manifests, name, SPEC)
            if not wait_for(lambda: phase(work_dir / "status", name) == "Running", 30):
                raise SystemExit(f"{name} never ran")
            samples.append(time.perf_counter() - started)
            peak = max(peak, process.memory_info().rss)
        return peak, samples
    finally:
        stop_agent_and_destroy_all(agent, manifests, flags, root)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=10)
    parser.add_argument("--isolation", default="namespaces/pid,posix/cpu,posix/mem")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/hostile.py needs root")
    results = {}
    for hostile in (True, False):
        work = tempdir("reconciler-bench-hostile-")
        try:
            results[hostile] = measure(work, hostile, args.drops, args.isolation)
        finally:
            remove_tempdir(work)
    (rss, times), (peer_rss, peer_times) = results[True], results[False]
    print(f"agent RSS, every hostile manifest listed: {rss / 2**20:.1f} MiB (limit 200 MiB); "
          f"empty directory: {peer_rss / 2**20:.1f} MiB; ratio {rss / peer_rss:.2f}x")
    print(f"good manifest -> Running, p50: {percentile(times, 50) * 1000:.0f} ms beside them (limit 1000 ms), "
          f"{percentile(peer_times, 50) * 1000:.0f} ms alone; ratio {percentile(times, 50) / percentile(peer_times, 50):.2f}x")


if __name__ == "__main__":
    main()
