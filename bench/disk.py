"""disk/du figures of issue 4, each against its peer measured in the same run.

1. Measuring a 100,000-file sandbox against GNU `du -s -B1` on the same tree, interleaved rounds after
   a warm-up: the periodic full walk (every 10th measurement, by GNU du itself, as Mesos measures
   every time; the first measurement, which also sets the inotify watches, and a plain walk in
   Python are shown for reference), the incremental measurement the
   collector makes otherwise (inotify tells which directories changed since the last one) after a
   round of typical writes, and the two amortized; the ratio of median wall times (and of CPU times
   for the walk, which machine noise disturbs less), and how far the figures are from du's.
2. Reconcile latency (manifest written → status Running) of new containers while 200 containers run,
   with disk/du measuring every sandbox each second, against the same agent without disk/du.

Run as root: python3 bench/disk.py [--files 100000] [--containers 200] [--latency-runs 40] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, phase, stop_agent_and_destroy_all, require, tempdir, wait_for, write_manifest, remove_tempdir  # noqa: E402
from reconciler.diskusage.walk import du_measure, measure  # noqa: E402
from reconciler.diskusage.watch import Inotify, TreeUsage  # noqa: E402

BASE_ISOLATION = "namespaces/pid,namespaces/ipc,posix/cpu,posix/mem"


# --- 1. one measurement against du ---------------------------------------------------------------

def build_tree(root: Path, files: int) -> None:
    """A sandbox-like tree: 100 directories of 10 sub-directories, small files of varied sizes, a few
    hard links and symbolic links."""
    per_leaf = max(1, files // 1000)
    made = 0
    for d in range(100):
        for s in range(10):
            leaf = root / f"d{d:03d}" / f"s{s}"
            leaf.mkdir(parents=True)
            for f in range(per_leaf):
                if made >= files:
                    break
                with open(leaf / f"f{f}", "wb") as out:
                    out.write(b"x" * ((d * 7919 + s * 104729 + f * 37) % 9000))
                made += 1
        os.link(root / f"d{d:03d}" / "s0" / "f0", root / f"d{d:03d}" / "hardlink")
        (root / f"d{d:03d}" / "symlink").symlink_to("/usr")


def du_once(tree: Path) -> tuple[float, float, int]:
    """Wall time, CPU time (user + system of the child) and figure of `du -s -B1`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(["du", "-s", "-B1", str(tree)], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, int(out.split()[0])


def timed(fn) -> tuple[float, float, int]:  # noqa: ANN001
    cpu_before = time.thread_time()
    started = time.perf_counter()
    figure = fn()
    return time.perf_counter() - started, time.thread_time() - cpu_before, figure


def timed_child(fn) -> tuple[float, float, int]:  # noqa: ANN001
    """Like `timed`, with the CPU time of the du child the measurement runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu, figure = timed(fn)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, cpu + (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), figure


def churn(tree: Path, round_number: int) -> None:
    """What a running container does between two measurements: its log grows, it writes a few files."""
    with open(tree / "stdout", "ab") as log:
        log.write(b"log line\n" * 20000)
    work = tree / "d042" / "s3"
    for i in range(10):
        (work / f"out-{round_number}-{i}").write_bytes(b"r" * 6000)


def median(runs: list[tuple[float, float, int]], index: int) -> float:
    return statistics.median(r[index] for r in runs)


def bench_measurement(files: int, rounds: int) -> None:
    require("du", "coreutils")
    work = tempdir("reconciler-bench-disk-")
    tree = work / "sandbox"
    inotify = Inotify()
    try:
        build_tree(tree, files)
        incremental = TreeUsage(str(tree), inotify, full_every=10**9)   # the periodic walk is timed apart
        du_once(tree), timed(lambda: measure(str(tree)).used_bytes)     # warm the dentry and inode caches
        first = timed(lambda: incremental.measure().used_bytes)          # the collector's first measurement
        cold_du, cold_walk, steady_du, steady, py_walk = [], [], [], [], []
        for i in range(rounds):
            # Alternate who goes first, so that neither always inherits the other's cache state.
            if i % 2 == 0:
                cold_du.append(du_once(tree)), cold_walk.append(timed_child(lambda: du_measure(str(tree)).used_bytes))
                py_walk.append(timed(lambda: measure(str(tree)).used_bytes))
            else:
                py_walk.append(timed(lambda: measure(str(tree)).used_bytes))
                cold_walk.append(timed_child(lambda: du_measure(str(tree)).used_bytes)), cold_du.append(du_once(tree))
            churn(tree, i)
            if i % 2 == 0:
                steady.append(timed(lambda: incremental.measure().used_bytes)), steady_du.append(du_once(tree))
            else:
                steady_du.append(du_once(tree)), steady.append(timed(lambda: incremental.measure().used_bytes))
        du_wall = median(cold_du + steady_du, 0)
        walk_wall, steady_wall = median(cold_walk, 0), median(steady, 0)
        amortized = steady_wall + walk_wall / 10      # every 10th measurement at most adds a full walk
        errors = [abs(a[2] - b[2]) / b[2] * 100 for a, b in zip(cold_walk + steady, cold_du + steady_du)]
        print(f"measure a {files}-file sandbox (n={rounds} each, interleaved; GNU du -s -B1 median {du_wall * 1000:.1f} ms):")
        print(f"  periodic full walk (GNU du run by the collector, every 10th at most): {walk_wall * 1000:7.1f} ms = {walk_wall / du_wall:.2f}x du"
              f" (CPU {median(cold_walk, 1) / median(cold_du, 1):.2f}x du)  [target <= 1.0x: "
              f"{'met' if walk_wall <= du_wall else 'NOT met'}]")
        print(f"    (the collector's first, watch-building walk, in Python, took {first[0] * 1000:.1f} ms; a plain Python walk "
              f"{median(py_walk, 0) * 1000:.1f} ms = {median(py_walk, 0) / du_wall:.2f}x du)")
        print(f"  incremental (after the log grew 180 KB and 10 files were written): {steady_wall * 1000:7.3f} ms"
              f" = {steady_wall / du_wall:.4f}x du")
        print(f"  per measurement, amortized over the 1-in-10 full walk: {amortized * 1000:7.1f} ms = "
              f"{amortized / du_wall:.2f}x du  [target <= 1.0x: {'met' if amortized <= du_wall else 'NOT met'}]")
        print(f"  figure vs du: largest difference {max(errors):.4f} %  [target <= 1 %: "
              f"{'met' if max(errors) <= 1.0 else 'NOT met'}]")
    finally:
        inotify.close()
        remove_tempdir(work)


# --- 2. reconcile latency with disk/du on and off ----------------------------------------------------

# Each container writes 40 small files into its sandbox, so that measuring it is real work.
COMMAND = "i=0; while [ $i -lt 40 ]; do echo $i > f$i; i=$((i+1)); done; exec sleep 3600"
SPEC = {"kill_grace_period": "1secs", "resources": {"cpus": 0.01, "mem": 32, "disk": 64}, "command": {"value": COMMAND}}


def latency_run(isolation: str, containers: int, runs: int, extra: list[str]) -> tuple[list[float], int]:
    """Latencies of `runs` new manifests while `containers` run; and how many measurements disk/du made."""
    work = tempdir("reconciler-bench-disk-agent-")
    manifests, work_dir = work / "manifests", work / "work"
    manifests.mkdir()
    status_dir = work_dir / "status"
    root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
    flags = [f"--manifests={manifests}", f"--work_dir={work_dir}", f"--isolation={isolation}", f"--cgroups_root={root}",
             "--log_level=warning"]
    agent = subprocess.Popen([sys.executable, "-m", "reconciler", "run", *flags, "--resync_interval=1hrs", *extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    measurements = 0
    try:
        assert wait_for(lambda: (status_dir / "_agent.json").exists(), 30), "the agent did not start"
        names = [f"bg-{i:04d}" for i in range(containers)]
        for name in names:
            write_manifest(manifests, name, SPEC)
        assert wait_for(lambda: all(phase(status_dir, n) == "Running" for n in names), 300, 0.05), \
            "not all background containers reached Running"
        time.sleep(3)      # every sandbox is now measured once a second (with disk/du)
        latencies = []
        for i in range(runs):
            name = f"lat-{i:03d}"
            started = write_manifest(manifests, name, SPEC)
            assert wait_for(lambda: phase(status_dir, name) == "Running", 30), f"{name} never ran"
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
        agent_doc = json.loads((status_dir / "_agent.json").read_text())
        measurements = agent_doc.get("isolator_status", {}).get("disk/du", {}).get("measurements", 0)
        return latencies, measurements
    finally:
        stop_agent_and_destroy_all(agent, manifests, flags, root, timeout=900)
        remove_tempdir(work)


def bench_latency(containers: int, runs: int, repeat: int) -> None:
    # Off and on alternate, `repeat` times each, so that the machine's other load hits both alike.
    off: list[float] = []
    on: list[float] = []
    measured = 0
    for _ in range(repeat):
        off += latency_run(BASE_ISOLATION, containers, runs, [])[0]
        latencies, measured = latency_run(f"{BASE_ISOLATION},disk/du", containers, runs,
                                          ["--container_disk_watch_interval=1secs"])
        on += latencies
    p50_off, p50_on = percentile(off, 50), percentile(on, 50)
    ratio = p50_on / p50_off
    print(f"manifest -> Running with {containers} containers running (n={len(off)} each, {repeat} alternating runs):")
    print(f"  disk/du off: p50 {p50_off * 1000:6.1f} ms  p99 {percentile(off, 99) * 1000:6.1f} ms")
    print(f"  disk/du on (1 s interval; {measured} sandbox measurements in the last run): "
          f"p50 {p50_on * 1000:6.1f} ms  p99 {percentile(on, 99) * 1000:6.1f} ms")
    print(f"  latency ratio (p50): {ratio:.2f}x disk/du off  [target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2, help="alternating off/on agent runs of the latency part")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args()
    if not args.skip_measure:
        bench_measurement(args.files, args.rounds)
    if not args.skip_latency:
        if os.geteuid() != 0:
            raise SystemExit("bench/disk.py: the latency part needs root (it runs the agent with the linux launcher)")
        bench_latency(args.containers, args.latency_runs, args.repeat)


if __name__ == "__main__":
    main()
