"""What the benchmarks share: peers (runc, unshare) set up in the same run, timing and a throwaway agent setting."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable


BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"bench: {tool} is needed as the peer of this benchmark: apt-get install -y {package}")
    return path


def runc_bundle(directory: Path, args: list[str], namespaces: list[str]) -> Path:
    """A runc bundle whose rootfs is Debian's busybox-static, running `args` with `namespaces`."""
    require("runc", "runc")
    if not os.path.exists(BUSYBOX):
        raise SystemExit("bench: busybox is needed for the runc bundle: apt-get install -y busybox-static")
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    for sub in ("proc", "dev", "sys", "tmp"):
        (rootfs / sub).mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("true", "sh", "sleep"):
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=directory, check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["args"] = args
    config["process"]["terminal"] = False
    config["linux"]["namespaces"] = [{"type": t} for t in namespaces]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def time_command(argv: list[str], runs: int, cwd: Path | None = None) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    return samples


def time_runc(bundle: Path, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        cid = f"bench-{uuid.uuid4().hex[:10]}"
        started = time.perf_counter()
        subprocess.run(["runc", "run", "--bundle", str(bundle), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    return samples


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, from schedstat (nanoseconds)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(samples: list[float]) -> str:
    return (f"median {statistics.median(samples) * 1000:7.2f} ms  p99 {percentile(samples, 99) * 1000:7.2f} ms"
            f"  (n={len(samples)})")


def ratio_line(label: str, ours: list[float], peer: list[float], peer_name: str, limit: float | None = None) -> str:
    ratio = statistics.median(ours) / statistics.median(peer)
    verdict = "" if limit is None else (f"  [target <= {limit}x: {'met' if ratio <= limit else 'NOT met'}]")
    return f"{label}: {ratio:.3f}x {peer_name}{verdict}"


def tempdir(prefix: str) -> Path:
    """Under /var/lib, beside the agent's default work_dir, so the figures are of the disk it uses
    (on this VM, creating a file under /tmp costs ~1.2 ms, against ~0.06 ms under /var/lib)."""
    base = "/var/lib" if os.access("/var/lib", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove_tempdir(path: Path) -> None:
    """A tempdir() and what an agent left mounted in it on purpose (its nosuid,nodev sandboxes bind)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in reversed(points):
        if point == real or point.startswith(real + "/"):
            subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def interleave(runs: int, *measures: Callable[[int], list[float]]) -> list[list[float]]:
    """Alternate the measured subjects in rounds, so machine noise hits all of them alike."""
    results: list[list[float]] = [[] for _ in measures]
    rounds = 5
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for i, measure in enumerate(measures):
            results[i].extend(measure(per_round))
    return results


def remove_cgroup_root(root: str) -> None:
    """Kill what is left under a benchmark's cgroup root (through the freezer or v2), then remove it everywhere."""
    from reconciler.linux import cgroups

    mounts = cgroups.find_mounts()
    killer = cgroups.freezer_hierarchy(mounts)
    if killer is not None and killer.exists(root):
        killer.kill(root)
    for hierarchy in mounts.v1_hierarchies + ([mounts.v2] if mounts.v2 else []):
        if hierarchy.exists(root):
            hierarchy.remove(root)


def write_manifest(directory: Path, name: str, spec: dict) -> float:
    """Write a manifest atomically (temp file + rename); returns when the rename happened (perf_counter)."""
    doc = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name}, "spec": spec}
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    started = time.perf_counter()
    os.rename(tmp, directory / f"{name}.yaml")
    return started


def phase(status_dir: Path, name: str) -> str | None:
    try:
        return json.loads((status_dir / f"{name}.json").read_text()).get("phase")
    except (FileNotFoundError, ValueError):
        return None


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.0005) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def stop_agent_and_destroy_all(agent: subprocess.Popen, manifests: Path, once_flags: list[str], root: str,
                               timeout: float = 600) -> None:
    """SIGTERM a benchmark's agent, then destroy every container it ran with a final `once` over its
    emptied manifest directory (an existing empty directory is authoritative), then its cgroup root."""
    import sys

    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=30)
    except subprocess.TimeoutExpired:
        agent.kill()
    for name in os.listdir(manifests):
        os.unlink(manifests / name)
    subprocess.run([sys.executable, "-m", "reconciler", "once", *once_flags], timeout=timeout)
    remove_cgroup_root(root)
