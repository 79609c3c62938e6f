"""network/cni figures of issue 12, each against peers measured in the same run, interleaved.

1. Launch-to-Running of a container on a bridge+portmap network (one port mapping): the manifest
   renamed into place → its status file says Running, p50 and p99 over N launches. Peers:
   - the same plugin chain invoked directly: CNI ADD of the same configuration list (reconciler's
     CNIClient, which runs the plugins) into a fresh namespace made with `ip netns add` (not timed);
     what the plugins alone cost;
   - a plain container without a network in the same agent: the agent's own launch overhead;
   - `ip netns add` + the same ADD + `runc run -d` of a busybox bundle that joins that namespace
     (the bundle's network namespace path), what a runtime built of runc and the plugins costs.
   Our overhead above the chain at p50: networked − chain ADD, of which the agent's launch of a plain
   container is one part and network/cni's own work (its namespace, checkpoints, /etc files, mounts)
   the rest: networked − plain − chain ADD, the figure the issue's target (at most 10 ms above the
   chain's ADD) is about.
2. Removal: the manifest removed → its status file gone (killed, DEL, namespace removed), against the
   chain's DEL, the plain container's removal, and `runc delete --force` + DEL + `ip netns del`.
3. M networked containers dropped at once → all Running, then all removed → all destroyed; then zero
   leftovers asserted and printed: no veth on the bridge, no namespace file under
   <work_dir>/cni/netns, no host-local reservation, no container rule of portmap (CNI-DN-*), and
   iptables-save, ip6tables-save and the nftables tables the same as before (counters aside) once
   portmap's shared chains (which portmap keeps for every container on purpose) are taken away.

Everything is the benchmark's own: a bridge (rbn-<random>), a free /24 under 10.199.0.0/16, a
host-local dataDir and configuration directory in its temporary directory, a cgroup root. At the
end, even on failure, every container is destroyed through the agent, the peers' namespaces and
runc containers are removed, the bridge deleted, portmap's shared chains and the nat table removed
if they were not there before, and the sysctls the plugins touch restored.

Run as root: python3 bench/network.py [--runs 20] [--containers 100]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, phase, remove_tempdir, require, runc_bundle, stop_agent_and_destroy_all, tempdir, wait_for, write_manifest  # noqa: E402
from reconciler.network import cni  # noqa: E402
# The host's rules and sysctls as the network tests record and compare them.
from tests.test_network_cni import (  # noqa: E402
    PORTMAP_SHARED_CHAINS, SYSCTLS, HostState, ipt, nft_tables, run, unused_subnet,
)

PLUGIN_DIR = "/usr/lib/cni"
ISOLATION = "namespaces/pid,network/cni,posix/cpu,posix/mem"
SPEC = {"kill_grace_period": "1secs", "resources": {"cpus": 0.01, "mem": 32},
        "command": {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "3600"]}}
ROUNDS = 5


def chains(lines: list[str]) -> set[str]:
    """Every chain in iptables-save output, as table/chain."""
    table, found = "", set()
    for line in lines:
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            found.add(f"{table}/{line[1:].split()[0]}")
    return found


def diff(before: list[str], after: list[str]) -> list[str]:
    return [f"+ {line}" for line in after if line not in before] + [f"- {line}" for line in before if line not in after]


def shared_portmap_line(line: str) -> bool:
    """A line of iptables-save that portmap keeps for every container (or the skeleton of its table)."""
    if "CNI-DN-" in line:
        return False
    return ("CNI-HOSTPORT-" in line or line.startswith("*") or line == "COMMIT"
            or re.fullmatch(r":[A-Z]+ (ACCEPT|DROP) \[0:0\]", line) is not None)


def remove_portmap_shared_chains(before: HostState) -> list[str]:
    """portmap's chains shared by all containers (and the jumps to them), where this run made them,
    and the iptables tables it made that are empty then. Returns what was removed."""
    removed = []
    for binary, family, was in (("iptables", "ip", before.iptables), ("ip6tables", "ip6", before.ip6tables)):
        for table in ("nat", "filter", "mangle"):
            if f"{family} {table}" not in nft_tables():
                continue
            listing = ipt(binary, table, "-S").stdout.splitlines()
            had = {c.split("/", 1)[1] for c in chains(was) if c.startswith(f"{table}/")}
            new = {line.split()[1] for line in listing if line.startswith("-N ")} - had
            new &= set(PORTMAP_SHARED_CHAINS)
            for line in listing:
                words = shlex.split(line)
                if words[:1] == ["-A"] and line not in was and "-j" in words and words[words.index("-j") + 1] in new:
                    ipt(binary, table, "-D", *words[1:])
            for chain in sorted(new):
                ipt(binary, table, "-F", chain)
                ipt(binary, table, "-X", chain)
                removed.append(f"{binary} {table} {chain}")
            empty = all(line.startswith("-P ") for line in ipt(binary, table, "-S").stdout.splitlines())
            if f"{family} {table}" not in before.tables and empty:
                subprocess.run(["nft", "delete", "table", family, table], capture_output=True)
                removed.append(f"nft table {family} {table}")
    return removed


def restore_sysctls(before: HostState) -> None:
    for path, value in before.sysctls.items():
        if Path(path).read_text().strip() != value:
            Path(path).write_text(value)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.199.0.0/16 that overlaps no route and no address of the host (as the tests pick theirs)."""
    subnet = unused_subnet()
    if subnet is None:
        raise SystemExit("bench: no free /24 under 10.199.0.0/16 on this host")
    return subnet


def free_ports(count: int) -> list[int]:
    """`count` consecutive TCP ports nothing listens on (portmap's DNAT would shadow a listener)."""
    for _ in range(100):
        base = random.randrange(30000, 40000 - count)
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + count))
    raise SystemExit(f"bench: no {count} free consecutive TCP ports in 30000-39999")


# --- figures ---------------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def line(label: str, samples: list[float]) -> str:
    return (f"{label:<52} p50 {ms(percentile(samples, 50))}  p99 {ms(percentile(samples, 99))}"
            f"  (n={len(samples)})")


def p50(samples: list[float]) -> float:
    return percentile(samples, 50)


# --- the bench -------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = tempdir("reconciler-bench-network-")
        self.manifests, self.work_dir = self.work / "manifests", self.work / "work"
        self.manifests.mkdir()
        self.status_dir = self.work_dir / "status"
        self.root = f"reconciler-bench-{uuid.uuid4().hex[:8]}"
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"rbn-{self.tag}"
        self.network_name = f"rbench-{self.tag}"
        self.subnet = free_subnet()
        self.config_dir, self.data_dir = self.work / "net.d", self.work / "ipam"
        self.config_dir.mkdir()
        self.client = cni.CNIClient([PLUGIN_DIR], timeout=30)
        self.peer_netns: set[str] = set()               # `ip netns add` names still to delete
        self.peer_attachments: dict[str, tuple[str, dict[str, Any], cni.Result | None]] = {}   # cid -> netns, caps, result
        self.runc_ids: set[str] = set()
        self.runc_netns = f"rbn-{self.tag}-runc"
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = self.work / "agent.log"
        self.counter = 0

    # setup ------------------------------------------------------------------------------------
    def write_network(self) -> cni.NetworkConfigList:
        doc = {"cniVersion": "1.0.0", "name": self.network_name, "plugins": [
            {"type": "bridge", "bridge": self.bridge, "isGateway": True,
             "ipam": {"type": "host-local", "subnet": str(self.subnet), "dataDir": str(self.data_dir)}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}
        (self.config_dir / "10-bench.conflist").write_text(json.dumps(doc))
        return cni.get_network(str(self.config_dir), self.network_name)

    def agent_flags(self) -> list[str]:
        return [f"--manifests={self.manifests}", f"--work_dir={self.work_dir}", f"--isolation={ISOLATION}",
                f"--cgroups_root={self.root}", "--log_level=warning", f"--network_cni_config_dir={self.config_dir}",
                f"--network_cni_plugins_dir={PLUGIN_DIR}"]

    def start_agent(self) -> None:
        with open(self.agent_log, "wb") as log:
            self.agent = subprocess.Popen([sys.executable, "-m", "reconciler", "run", *self.agent_flags(),
                                           "--resync_interval=1hrs"], stdout=subprocess.DEVNULL, stderr=log)
        if not wait_for(lambda: (self.status_dir / "_agent.json").exists(), 30, 0.01):
            raise SystemExit(f"bench: the agent did not start: {self.agent_log.read_text()[-2000:]}")

    def bundle(self) -> Path:
        bundle = runc_bundle(self.work / "bundle", ["/bin/sleep", "3600"], ["pid", "ipc", "uts", "mount"])
        config = json.loads((bundle / "config.json").read_text())
        config["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{self.runc_netns}"})
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    # ours ---------------------------------------------------------------------------------------
    def spec(self, port: int | None) -> dict[str, Any]:
        if port is None:
            return SPEC
        return {**SPEC, "container": {"network_infos": [
            {"name": self.network_name, "port_mappings": [{"host_port": port, "container_port": 8080}]}]}}

    def ours(self, runs: int, port: int | None) -> tuple[list[float], list[float]]:
        """Launch-to-Running and removal-to-gone of `runs` containers, one at a time."""
        launches, removals = [], []
        for _ in range(runs):
            self.counter += 1
            name = f"{'net' if port else 'plain'}-{self.counter}"
            started = write_manifest(self.manifests, name, self.spec(port))
            if not wait_for(lambda: phase(self.status_dir, name) == "Running", 30):
                raise SystemExit(f"bench: {name} never ran: {self.status(name)}")
            launches.append(time.perf_counter() - started)
            started = time.perf_counter()
            os.unlink(self.manifests / f"{name}.yaml")
            if not wait_for(lambda: not (self.status_dir / f"{name}.json").exists(), 30):
                raise SystemExit(f"bench: {name} was never removed: {self.status(name)}")
            removals.append(time.perf_counter() - started)
        return launches, removals

    def status(self, name: str) -> Any:
        try:
            return json.loads((self.status_dir / f"{name}.json").read_text())
        except (OSError, ValueError) as exc:
            return str(exc)

    # peers --------------------------------------------------------------------------------------
    def netns_add(self, name: str) -> float:
        started = time.perf_counter()
        self.peer_netns.add(name)
        run("ip", "netns", "add", name)
        return time.perf_counter() - started

    def netns_del(self, name: str) -> float:
        started = time.perf_counter()
        run("ip", "netns", "del", name)
        self.peer_netns.discard(name)
        return time.perf_counter() - started

    def add(self, network: cni.NetworkConfigList, cid: str, netns: str, port: int) -> float:
        caps = {"portMappings": [{"hostPort": port, "containerPort": 8080, "protocol": "tcp"}]}
        self.peer_attachments[cid] = (netns, caps, None)
        started = time.perf_counter()
        result = self.client.add(network, cid, f"/run/netns/{netns}", "eth0", capabilities=caps)
        elapsed = time.perf_counter() - started
        self.peer_attachments[cid] = (netns, caps, result)
        return elapsed

    def delete(self, network: cni.NetworkConfigList, cid: str) -> float:
        netns, caps, result = self.peer_attachments[cid]
        started = time.perf_counter()
        self.client.delete(network, cid, f"/run/netns/{netns}", "eth0", capabilities=caps, cached_result=result)
        elapsed = time.perf_counter() - started
        del self.peer_attachments[cid]
        return elapsed

    def chain(self, network: cni.NetworkConfigList, runs: int, port: int) -> tuple[list[float], list[float], list[float]]:
        """ADD and DEL of the chain into a fresh `ip netns add` namespace; and what `ip netns add` took."""
        adds, dels, netns_adds = [], [], []
        for _ in range(runs):
            cid = f"bench-chain-{uuid.uuid4().hex[:10]}"
            name = f"rbn-{self.tag}-{cid[-6:]}"
            netns_adds.append(self.netns_add(name))
            adds.append(self.add(network, cid, name, port))
            dels.append(self.delete(network, cid))
            self.netns_del(name)
        return adds, dels, netns_adds

    def runc_with_chain(self, network: cni.NetworkConfigList, bundle: Path, runs: int,
                        port: int) -> tuple[list[float], list[float]]:
        """`ip netns add` + ADD + `runc run -d` (the bundle joins that namespace), and
        `runc delete --force` + DEL + `ip netns del`."""
        launches, removals = [], []
        for _ in range(runs):
            cid = f"bench-runc-{uuid.uuid4().hex[:10]}"
            started = time.perf_counter()
            self.netns_add(self.runc_netns)
            self.add(network, cid, self.runc_netns, port)
            self.runc_ids.add(cid)
            subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            launches.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run(["runc", "delete", "--force", cid], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.runc_ids.discard(cid)
            self.delete(network, cid)
            self.netns_del(self.runc_netns)
            removals.append(time.perf_counter() - started)
        return launches, removals

    # leftovers ----------------------------------------------------------------------------------
    def leftovers(self, before: HostState) -> dict[str, Any]:
        found: dict[str, Any] = {}
        brif = Path(f"/sys/class/net/{self.bridge}/brif")
        found["veths on the bridge"] = sorted(os.listdir(brif)) if brif.is_dir() else []
        netns_dir = self.work_dir / "cni" / "netns"
        found["namespace files in <work_dir>/cni/netns"] = sorted(os.listdir(netns_dir)) if netns_dir.is_dir() else []
        cni_dir = self.work_dir / "cni"
        found["container directories in <work_dir>/cni"] = sorted(
            e for e in os.listdir(cni_dir) if e != "netns") if cni_dir.is_dir() else []
        reservations = self.data_dir / self.network_name
        found["host-local reservations"] = sorted(
            p.name for p in reservations.iterdir() if re.match(r"^[0-9a-f.:]+$", p.name)) if reservations.is_dir() else []
        now = HostState.now()
        added = (chains(now.iptables) - chains(before.iptables)) | (chains(now.ip6tables) - chains(before.ip6tables))
        found["CNI chains added, beside portmap's shared ones"] = sorted(
            c for c in added if "CNI-" in c and c.split("/", 1)[1] not in PORTMAP_SHARED_CHAINS)
        # iptables-save against before: what may differ is portmap's shared chains (their declarations,
        # the jumps to them and their shared SETMARK/MASQ rules) and the skeleton of the nat table they
        # made; any other line added or removed (a container's DNAT rule, a CNI-DN-* chain) is left over.
        changed = []
        for was, now_lines, tables in ((before.iptables, now.iptables, "ip"), (before.ip6tables, now.ip6tables, "ip6")):
            changed += [change for change in diff(was, now_lines) if not shared_portmap_line(change[2:])
                        or change.startswith("- ")]
        found["iptables-save lines changed, beside portmap's shared chains"] = changed
        return {what: value for what, value in found.items() if value}

    def agent_cni_means(self) -> str:
        try:
            doc = json.loads((self.status_dir / "_agent.json").read_text())
            operations = doc["isolator_status"]["network/cni"]["operations"]
        except (OSError, ValueError, KeyError, TypeError):
            return "n/a (no operations in _agent.json)"
        parts = []
        for op in operations:
            if op["network"] == self.network_name and op["count"]:
                parts.append(f"{op['command'].upper()} {op['result']} x{op['count']} mean "
                             f"{op['seconds'] / op['count'] * 1000:.1f} ms")
        return "; ".join(parts) or "n/a"

    # cleanup ------------------------------------------------------------------------------------
    def cleanup(self, before: HostState) -> list[str]:
        notes = []
        if self.agent is not None:
            for name in os.listdir(self.manifests):
                os.unlink(self.manifests / name)
            stop_agent_and_destroy_all(self.agent, self.manifests, self.agent_flags(), self.root)
        for cid in list(self.runc_ids):
            subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
        network = None
        try:
            network = self.write_network()
        except cni.CNIError:
            pass
        for cid, (netns, caps, result) in list(self.peer_attachments.items()):
            if network is not None:
                try:
                    self.client.delete(network, cid, f"/run/netns/{netns}", "eth0", capabilities=caps,
                                       cached_result=result)
                except cni.CNIError as exc:
                    notes.append(f"DEL of peer {cid} failed: {exc}")
        for name in list(self.peer_netns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        removed = remove_portmap_shared_chains(before)
        restore_sysctls(before)
        remove_tempdir(self.work)
        if removed:
            notes.append("removed what portmap keeps for all containers (made by this run): " + ", ".join(removed))
        return notes


def interleaved(rounds: int, runs: int, *subjects: Callable[[int], None]) -> None:
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for subject in subjects:
            subject(per_round)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/network.py needs root (a bridge, network namespaces, iptables)")
    for plugin in ("bridge", "host-local", "portmap"):
        if not os.access(os.path.join(PLUGIN_DIR, plugin), os.X_OK):
            raise SystemExit(f"bench: the CNI plugin {plugin} is not in {PLUGIN_DIR}: "
                             "apt-get install -y containernetworking-plugins")
    if args.containers > 240:
        raise SystemExit("bench: --containers is at most 240 (one /24 for the bridge, the peers and the warm-up)")
    require("iptables-save", "iptables")
    require("nft", "nftables")
    require("ip", "iproute2")
    before = HostState.now()
    bench = Bench(args)
    ok: bool | None = None     # None: the run did not get as far as counting leftovers
    try:
        network = bench.write_network()
        bundle = bench.bundle()
        port, scale_ports = free_ports(1)[0], free_ports(args.containers)
        bench.start_agent()
        # Warm-up, not counted: page cache, the plugins' binaries, the bridge's creation.
        bench.chain(network, 2, port)
        bench.ours(2, port)
        bench.ours(2, None)
        bench.runc_with_chain(network, bundle, 2, port)

        net_launch, net_remove, plain_launch, plain_remove = [], [], [], []
        chain_add, chain_del, netns_add = [], [], []
        runc_launch, runc_remove = [], []

        def networked(n: int) -> None:
            launch, remove = bench.ours(n, port)
            net_launch.extend(launch)
            net_remove.extend(remove)

        def plain(n: int) -> None:
            launch, remove = bench.ours(n, None)
            plain_launch.extend(launch)
            plain_remove.extend(remove)

        def chain(n: int) -> None:
            adds, dels, netns = bench.chain(network, n, port)
            chain_add.extend(adds)
            chain_del.extend(dels)
            netns_add.extend(netns)

        def runc(n: int) -> None:
            launch, remove = bench.runc_with_chain(network, bundle, n, port)
            runc_launch.extend(launch)
            runc_remove.extend(remove)

        interleaved(ROUNDS, args.runs, networked, chain, plain, runc)

        print(f"network: bridge {bench.bridge} ({bench.subnet}, isGateway) + portmap (snat), CNI 1.0.0, one port "
              f"mapping; plugins of {PLUGIN_DIR}; isolation {ISOLATION}; {os.cpu_count()} CPUs")
        print("-- launch")
        print(line("chain ADD (CNIClient, into an `ip netns add` netns)", chain_add))
        print(line("  `ip netns add` (not in the chain's figure)", netns_add))
        print(line("reconciler, networked: manifest -> Running", net_launch))
        print(line("reconciler, plain (no network): manifest -> Running", plain_launch))
        print(line("ip netns add + chain ADD + runc run -d", runc_launch))
        over = p50(net_launch) - p50(chain_add)
        own = p50(net_launch) - p50(plain_launch) - p50(chain_add)
        print(f"overhead above the chain's ADD at p50: networked - chain ADD = {over * 1000:.1f} ms, of which the "
              f"agent's launch of a plain container {p50(plain_launch) * 1000:.1f} ms and network/cni's own "
              f"(networked - plain - chain ADD) {own * 1000:.1f} ms")
        print(f"  [target <= 10 ms above the chain's ADD at p50: network/cni's own {own * 1000:.1f} ms "
              f"{'met' if own <= 0.010 else 'NOT met'}; the whole launch above the chain {over * 1000:.1f} ms "
              f"{'met' if over <= 0.010 else 'NOT met'}]")
        print(f"ratios of p50s: networked / chain ADD {p50(net_launch) / p50(chain_add):.2f}x; "
              f"networked / (ip netns add + ADD + runc run -d) {p50(net_launch) / p50(runc_launch):.2f}x; "
              f"networked / plain {p50(net_launch) / p50(plain_launch):.2f}x")
        print("-- removal")
        print(line("chain DEL (CNIClient, cached result)", chain_del))
        print(line("reconciler, networked: manifest removed -> gone", net_remove))
        print(line("reconciler, plain: manifest removed -> gone", plain_remove))
        print(line("runc delete --force + chain DEL + ip netns del", runc_remove))
        del_over = p50(net_remove) - p50(plain_remove) - p50(chain_del)
        print(f"network/cni's own removal overhead above the chain's DEL at p50 (networked - plain - chain DEL): "
              f"{del_over * 1000:.1f} ms; ratios of p50s: networked / chain DEL {p50(net_remove) / p50(chain_del):.2f}x,"
              f" networked / (runc delete + DEL + netns del) {p50(net_remove) / p50(runc_remove):.2f}x")
        print(f"inside the agent (_agent.json, every launch so far): {bench.agent_cni_means()}")

        # 3. M at once
        names = [f"many-{i:04d}" for i in range(args.containers)]
        started = time.perf_counter()
        for name, host_port in zip(names, scale_ports):
            write_manifest(bench.manifests, name, bench.spec(host_port))
        if not wait_for(lambda: all(phase(bench.status_dir, n) == "Running" for n in names), 600, 0.05):
            stuck = [n for n in names if phase(bench.status_dir, n) != "Running"]
            raise SystemExit(f"bench: {len(stuck)} containers never ran, e.g. {bench.status(stuck[0])}")
        all_running = time.perf_counter() - started
        brif = Path(f"/sys/class/net/{bench.bridge}/brif")
        attached = len(os.listdir(brif))
        reserved = len([p for p in (bench.data_dir / bench.network_name).iterdir() if re.match(r"^[0-9.]+$", p.name)])
        started = time.perf_counter()
        for name in names:
            os.unlink(bench.manifests / f"{name}.yaml")
        if not wait_for(lambda: not any((bench.status_dir / f"{n}.json").exists() for n in names), 600, 0.05):
            raise SystemExit("bench: not every container was destroyed")
        all_gone = time.perf_counter() - started
        print(f"-- {args.containers} networked containers at once (a port mapping each)")
        print(f"all Running: {all_running:.2f} s ({all_running / args.containers * 1000:.1f} ms each; "
              f"{all_running / (args.containers * p50(chain_add)):.2f}x {args.containers} chain ADDs in a row at "
              f"the p50); {attached} veths on the bridge, {reserved} addresses reserved")
        print(f"all removed and destroyed: {all_gone:.2f} s ({all_gone / args.containers * 1000:.1f} ms each; "
              f"{all_gone / (args.containers * p50(chain_del)):.2f}x {args.containers} chain DELs in a row at the p50)")
        left = bench.leftovers(before)
        for what in ("veths on the bridge", "namespace files in <work_dir>/cni/netns",
                     "container directories in <work_dir>/cni", "host-local reservations",
                     "CNI chains added, beside portmap's shared ones",
                     "iptables-save lines changed, beside portmap's shared chains"):
            print(f"leftovers: {what}: {len(left.get(what, []))}" + (f" {left[what][:5]}" if what in left else ""))
        ok = not left
    finally:
        notes = bench.cleanup(before)
        after = HostState.now()
        for note in notes:
            print(f"cleanup: {note}")
        same = {"iptables-save": diff(before.iptables, after.iptables),
                "ip6tables-save": diff(before.ip6tables, after.ip6tables),
                "nft tables": sorted(before.tables ^ after.tables),
                "sysctls": [p for p in SYSCTLS if before.sysctls[p] != after.sysctls[p]]}
        for what, changes in same.items():
            same_text = "the same as before" + (" (counters aside)" if what.endswith("-save") else "")
            print(f"host after cleanup: {what} {same_text if not changes else 'CHANGED: ' + '; '.join(changes[:5])}")
        host_ok = not any(same.values())
        if ok is None:
            print(f"zero leftovers: not counted (the run stopped early); host after cleanup "
                  f"{'as before' if host_ok else 'CHANGED'}")
        else:
            print(f"zero leftovers: {'yes' if ok and host_ok else 'NO'}")
    if not (ok and host_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
