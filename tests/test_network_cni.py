"""reconciler.network.cni against Debian's real CNI plugins (bridge, host-local, portmap in /usr/lib/cni),
and against fake plugins each test writes into its tmp_path.

A real-plugin test (root) gets a `Lab`: its own bridge (rcb-<random>), a /24 under 10.199.0.0/16 that no
host route or address touches, a host-local dataDir under tmp_path, and its own network namespace
(`ip netns add rcn-<random>`). Afterwards, even when it fails, the namespace and the bridge are removed
and the host's iptables and ip6tables rules (counters aside), nftables tables and the sysctls the plugins
touch are asserted to be as the test found them. Two things the plugins leave on purpose are removed
first, and only if they were not there before: the bridge plugin never deletes a bridge or resets
ip_forward (isGateway sets it), and portmap keeps the chains every container shares (CNI-HOSTPORT-DNAT,
-MASQ, -SETMARK and the jumps to them). A container's own rules (CNI-DN-*) are DEL's to remove: any
left is a failure. Traffic goes only to 127.0.0.1 and into the test's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.network import cni
from reconciler.network.cni import (
    Attachment,
    CNIClient,
    NetworkConfigError,
    NetworkConfigList,
    PluginError,
    PluginNotFoundError,
    Result,
    UnknownNetworkError,
)

PLUGIN_DIR = "/usr/lib/cni"
REAL_PLUGINS = ("bridge", "host-local", "portmap")
root_only = pytest.mark.root
needs_real_plugins = pytest.mark.skipif(
    not all(os.access(os.path.join(PLUGIN_DIR, p), os.X_OK) for p in REAL_PLUGINS),
    reason=f"the CNI plugins are not in {PLUGIN_DIR}: apt-get install containernetworking-plugins")
SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/all/route_localnet")
PORTMAP_SHARED_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK")


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


# --- the host as a test found it -------------------------------------------------------------------

def rules(command: str) -> list[str]:
    """iptables-save/ip6tables-save without its dated comments and packet counters."""
    return [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in run(command).splitlines() if not line.startswith("#")]


def nft_tables() -> set[str]:
    return {line.removeprefix("table ") for line in run("nft", "list", "tables").splitlines() if line.strip()}


@dataclass
class HostState:
    iptables: list[str]
    ip6tables: list[str]
    tables: set[str]
    sysctls: dict[str, str]

    @classmethod
    def now(cls) -> HostState:
        return cls(rules("iptables-save"), rules("ip6tables-save"), nft_tables(),
                   {path: Path(path).read_text().strip() for path in SYSCTLS})


def saved_chains(saved: list[str], table: str) -> set[str]:
    """The chains of `table` in iptables-save output."""
    current, found = "", set()
    for line in saved:
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith(":") and current == table:
            found.add(line[1:].split()[0])
    return found


def saved_rules(saved: list[str], table: str) -> set[str]:
    current, found = "", set()
    for line in saved:
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith("-A ") and current == table:
            found.add(line)
    return found


def ipt(binary: str, table: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, "-w", "-t", table, *args], capture_output=True, text=True)


def remove_cni_rules(binary: str, table: str, saved: list[str], only: set[str] | None) -> None:
    """Delete the CNI rules and chains that are not in `saved` (only those jumping to or in `only`, if given)."""
    listing = ipt(binary, table, "-S").stdout.splitlines()
    new_chains = {line.split()[1] for line in listing if line.startswith("-N ")} - saved_chains(saved, table)
    new_chains = {c for c in new_chains if c.startswith("CNI-") and (only is None or c in only)}
    for line in listing:
        words = shlex.split(line)
        if words[:1] != ["-A"] or line in saved_rules(saved, table) or "CNI-" not in line:
            continue
        target = words[words.index("-j") + 1] if "-j" in words else ""
        if only is None or target in new_chains or words[1] in new_chains:
            ipt(binary, table, "-D", *words[1:])
    for chain in new_chains:
        ipt(binary, table, "-F", chain)
        ipt(binary, table, "-X", chain)


def restore_host(before: HostState, only_portmap_shared: bool) -> None:
    """Remove the CNI rules, chains and iptables tables that appeared since `before` (all of them, or only
    portmap's shared chains and tables left empty), and reset the sysctls."""
    only = set(PORTMAP_SHARED_CHAINS) if only_portmap_shared else None
    for binary, family, saved in (("iptables", "ip", before.iptables), ("ip6tables", "ip6", before.ip6tables)):
        for table in ("nat", "filter", "mangle"):
            if f"{family} {table}" not in nft_tables():
                continue
            remove_cni_rules(binary, table, saved, only)
            empty = all(line.startswith("-P ") for line in ipt(binary, table, "-S").stdout.splitlines())
            if f"{family} {table}" not in before.tables and (empty or not only_portmap_shared):
                subprocess.run(["nft", "delete", "table", family, table], capture_output=True)
    for path, value in before.sysctls.items():
        Path(path).write_text(value)


def changes(before: list[str], after: list[str]) -> str:
    return "; ".join([f"+ {line}" for line in after if line not in before] +
                     [f"- {line}" for line in before if line not in after])


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.199.0.0/16 that overlaps no route and no address of the host."""
    return unused_subnet() or pytest.fail("no free /24 under 10.199.0.0/16 on this host")


def unused_subnet() -> ipaddress.IPv4Network | None:
    """free_subnet's search (bench/network.py picks its subnet with it too); None when every /24 is taken."""
    used = []
    for line in run("ip", "-o", "route", "show", "table", "all").splitlines() + \
            run("ip", "-o", "-4", "addr", "show").splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.199.{random.randrange(1, 255)}.0/24")
        if not any(candidate.overlaps(u) for u in used if u.version == 4 and u.prefixlen > 0):
            return candidate
    return None


def free_port() -> int:
    for _ in range(100):
        port = random.randrange(30000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    pytest.fail("no free TCP port in 30000-39999")


# --- one test's network ------------------------------------------------------------------------

@dataclass
class Lab:
    """A bridge, subnet, host-local dataDir, config dir and network namespace of one test's own."""
    tmp: Path
    name: str = field(default_factory=lambda: f"rct-{uuid.uuid4().hex[:8]}")
    bridge: str = field(default_factory=lambda: f"rcb-{uuid.uuid4().hex[:6]}")
    netns_name: str = field(default_factory=lambda: f"rcn-{uuid.uuid4().hex[:8]}")
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)

    def __post_init__(self) -> None:
        self.config_dir = self.tmp / "net.d"
        self.config_dir.mkdir()
        self.data_dir = self.tmp / "ipam"
        self.client = CNIClient([str(self.tmp / "no-plugins-here"), PLUGIN_DIR], timeout=20)
        run("ip", "netns", "add", self.netns_name)

    @property
    def netns(self) -> str:
        return f"/run/netns/{self.netns_name}"

    def bridge_plugin(self, data_dir: Path | None = None) -> dict[str, Any]:
        return {"type": "bridge", "bridge": self.bridge, "isGateway": True,
                "ipam": {"type": "host-local", "subnet": str(self.subnet), "dataDir": str(data_dir or self.data_dir)}}

    def write(self, *plugins: dict[str, Any], filename: str = "10-lab.conflist", **extra: Any) -> NetworkConfigList:
        doc = {"cniVersion": "1.0.0", "name": self.name, "plugins": list(plugins), **extra}
        (self.config_dir / filename).write_text(json.dumps(doc))
        return cni.get_network(str(self.config_dir), self.name)

    def reserved_ips(self) -> set[str]:
        directory = self.data_dir / self.name
        return {p.name for p in directory.iterdir() if re.match(r"^[0-9.]+$", p.name)} if directory.exists() else set()

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.netns_name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a bridge, a network namespace and iptables rules")
    if shutil.which("nft") is None or shutil.which("iptables-save") is None:
        pytest.skip("iptables and nft are needed to check and restore the host's rules: apt-get install iptables nftables")
    before = HostState.now()
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.remove()
        restore_host(before, only_portmap_shared=True)
        after = HostState.now()
        if after != before:
            restore_host(before, only_portmap_shared=False)
        assert after.iptables == before.iptables, f"iptables rules left: {changes(before.iptables, after.iptables)}"
        assert after.ip6tables == before.ip6tables, f"ip6tables rules left: {changes(before.ip6tables, after.ip6tables)}"
        assert after.tables == before.tables, "nftables tables left: " + ", ".join(after.tables ^ before.tables)
        assert after.sysctls == before.sysctls


def host_link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def host_veth(result: Result, lab: Lab) -> str:
    (veth,) = [i.name for i in result.interfaces if not i.sandbox and i.name != lab.bridge]
    return veth


# --- real plugins ------------------------------------------------------------------------------

@root_only
@needs_real_plugins
def test_bridge_chain_add_gives_an_ip_and_del_releases_it_and_removes_the_veth(lab: Lab) -> None:
    network = lab.write(lab.bridge_plugin())

    result = lab.client.add(network, "c1", lab.netns, "eth0")

    (address,) = result.ip_addresses()
    assert address in lab.subnet and address.ip != lab.subnet.network_address + 1  # .1 is the bridge's
    assert f"inet {address}" in run("ip", "-n", lab.netns_name, "-o", "-4", "addr", "show", "dev", "eth0")
    assert lab.reserved_ips() == {str(address.ip)}
    veth = host_veth(result, lab)
    assert host_link_exists(veth)

    assert lab.client.delete(network, "c1", lab.netns, "eth0", cached_result=result) == []

    assert lab.reserved_ips() == set()
    assert not host_link_exists(veth)
    assert "eth0" not in run("ip", "-n", lab.netns_name, "-o", "link", "show")


@root_only
@needs_real_plugins
def test_del_is_idempotent_even_after_the_namespace_is_gone(lab: Lab) -> None:
    network = lab.write(lab.bridge_plugin())
    result = lab.client.add(network, "c1", lab.netns, "eth0")
    run("ip", "netns", "del", lab.netns_name)  # as after a crash: the namespace went first

    notes = lab.client.delete(network, "c1", lab.netns, "eth0", cached_result=result)
    again = lab.client.delete(network, "c1", lab.netns, "eth0", cached_result=result)

    assert lab.reserved_ips() == set()
    assert any("is gone" in note for note in notes) and again == notes


SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
s.settimeout(20)
print("listening", flush=True)
conn, peer = s.accept()
conn.sendall(b"hello from the namespace")
conn.close()
"""


def fetch(port: int) -> bytes:
    """One bounded attempt at 127.0.0.1:port (three tries, in case the rules land a moment late)."""
    error: OSError | None = None
    for _ in range(3):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                return conn.recv(100)
        except OSError as e:
            error = e
            time.sleep(0.2)
    raise AssertionError(f"127.0.0.1:{port} did not answer: {error}")


@root_only
@needs_real_plugins
def test_portmap_serves_the_namespace_on_localhost_and_del_removes_its_rules(lab: Lab) -> None:
    # 127.0.0.1 works with portmap 1.1.1's defaults: `snat` (true unless set) makes it add the OUTPUT
    # jump for local destinations, mark 127.0.0.1-sourced connections for MASQUERADE and set
    # route_localnet on the host interface routing to the container (our bridge); the bridge needs an
    # address for that masquerade and the route, hence isGateway.
    network = lab.write(lab.bridge_plugin(), {"type": "portmap", "capabilities": {"portMappings": True}})
    port = free_port()
    mappings = {"portMappings": [{"hostPort": port, "containerPort": 8080, "protocol": "tcp"}]}
    server = subprocess.Popen(["ip", "netns", "exec", lab.netns_name, sys.executable, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        result = lab.client.add(network, "web-1", lab.netns, "eth0", capabilities=mappings)
        assert any(f"--dport {port}" in line for line in rules("iptables-save"))

        assert fetch(port) == b"hello from the namespace"

        lab.client.delete(network, "web-1", lab.netns, "eth0", capabilities=mappings, cached_result=result)
        assert not any(str(port) in line or "web-1" in line for line in rules("iptables-save"))
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        server.kill()
        server.wait()


@root_only
@needs_real_plugins
def test_check_runs_bridge_and_skips_debian_portmap_with_a_note(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    network = lab.write(lab.bridge_plugin(), {"type": "portmap", "capabilities": {"portMappings": True}})
    mappings = {"portMappings": [{"hostPort": free_port(), "containerPort": 80, "protocol": "tcp"}]}
    result = lab.client.add(network, "c1", lab.netns, "eth0", capabilities=mappings)
    try:
        with caplog.at_level(logging.INFO, logger="reconciler.network.cni"):
            report = lab.client.check(network, "c1", lab.netns, "eth0", capabilities=mappings, cached_result=result)
    finally:
        lab.client.delete(network, "c1", lab.netns, "eth0", capabilities=mappings, cached_result=result)

    assert report.checked == ("bridge",)
    (note,) = report.notes
    assert "CHECK skipped for plugin 'portmap'" in note and "1.3.0" in note
    assert note in caplog.text


@root_only
@needs_real_plugins
def test_del_uses_the_checkpointed_config_when_the_file_changed_after_add(lab: Lab, tmp_path: Path) -> None:
    network = lab.write(lab.bridge_plugin())
    attached = Attachment(network, "c1", lab.netns, "eth0").add(lab.client)
    assert attached.result is not None and lab.reserved_ips() == {str(attached.result.ip_addresses()[0].ip)}
    checkpoint = tmp_path / "attachment.json"
    checkpoint.write_text(json.dumps(attached.to_json()))
    veth = host_veth(attached.result, lab)
    # The operator edits the network: another dataDir (the original holds our IP) and another bridge.
    lab.write({**lab.bridge_plugin(tmp_path / "other-ipam"), "bridge": "rcb-never"})

    attachment = Attachment.from_json(json.loads(checkpoint.read_text()))
    attachment.delete(lab.client)

    assert attachment == attached
    assert lab.reserved_ips() == set()
    assert not host_link_exists(veth)


@needs_real_plugins
def test_version_reads_the_plugins_answer() -> None:
    info = CNIClient([PLUGIN_DIR]).version("bridge")

    assert info.plugin == "bridge"
    assert {"0.4.0", "1.0.0"} <= set(info.supported_versions)


@needs_real_plugins
def test_validate_finds_every_plugin_and_its_cni_version() -> None:
    client = CNIClient([PLUGIN_DIR])
    chain = {"type": "bridge", "ipam": {"type": "host-local"}}

    assert client.validate(network(chain, {"type": "portmap"})) == []
    assert client.validate(network({"type": "bandwidth"}, version="0.2.0")) == [
        "The CNI plugin 'bandwidth' does not speak CNI 0.2.0, which CNI network 'fakenet' uses (it speaks "
        "0.3.0, 0.3.1, 0.4.0, 1.0.0)"]
    (problem,) = client.validate(network({"type": "bridge", "ipam": {"type": "no-such-ipam"}}))
    assert problem.startswith("The CNI plugin 'no-such-ipam' was not found in the CNI plugin path")


# --- fake plugins ------------------------------------------------------------------------------

FAKE_PLUGIN = """#!{python}
# A CNI plugin for tests: logs each call (its environment as exec'd, and its config), then does what its
# config's "fake" key says for this command: "ok" (ADD echoes prevResult or fake.result), or "fail".
import json, os, sys
ABOUT = {about!r}
command = os.environ.get("CNI_COMMAND", "")
if not command:
    if ABOUT:
        print(ABOUT, file=sys.stderr)
    sys.exit(0)
conf = json.load(sys.stdin)
if command == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": {versions!r}}}))
    sys.exit(0)
raw = open("/proc/self/environ", "rb").read().split(b"\\0")
env = dict(item.decode().split("=", 1) for item in raw if item)
with open({log!r}, "a") as log:
    log.write(json.dumps({{"plugin": os.path.basename(sys.argv[0]), "env": env, "conf": conf}}) + "\\n")
fake = conf.get("fake", {{}})
if fake.get(command) == "fail":
    print(json.dumps(fake["error"]))
    print("e" * 5000, file=sys.stderr)
    sys.exit(1)
if command == "ADD":
    print(json.dumps(conf.get("prevResult") or fake["result"]))
"""

RESULT_1_0 = {"cniVersion": "1.0.0",
              "interfaces": [{"name": "br0", "mac": "aa:00:00:00:00:01"},
                             {"name": "eth0", "mac": "aa:00:00:00:00:02", "sandbox": "/run/netns/x"}],
              "ips": [{"address": "10.1.0.1/24", "interface": 0},
                      {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
                      {"address": "fd00::5/64", "interface": 1}],
              "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0"}],
              "dns": {"nameservers": ["10.1.0.53"], "domain": "example.internal", "search": ["a.example"],
                      "options": ["ndots:2"]}}


@dataclass
class Fakes:
    """Fake plugins in a directory of their own, and the log of every call they got."""
    tmp: Path

    def __post_init__(self) -> None:
        self.dir = self.tmp / "plugins"
        self.dir.mkdir()
        self.log = self.tmp / "calls.jsonl"
        self.client = CNIClient([str(self.dir)], timeout=10)

    def plugin(self, name: str, *, about: str = "", versions: tuple[str, ...] = cni.SUPPORTED_VERSIONS) -> None:
        path = self.dir / name
        path.write_text(FAKE_PLUGIN.format(python=sys.executable, about=about, versions=list(versions),
                                           log=str(self.log)))
        path.chmod(0o755)

    def script(self, name: str, body: str) -> None:
        path = self.dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def network(*plugins: dict[str, Any], version: str = "1.0.0", **extra: Any) -> NetworkConfigList:
    return NetworkConfigList.from_json({"cniVersion": version, "name": "fakenet", "plugins": list(plugins), **extra})


def test_a_chain_runs_in_spec_order_with_a_clean_environment_and_declared_capabilities(fakes: Fakes) -> None:
    fakes.plugin("first")
    fakes.plugin("second")
    net = network({"type": "first", "capabilities": {"portMappings": True}, "fake": {"result": RESULT_1_0}},
                  {"type": "second", "capabilities": {"bandwidth": False, "mac": True}, "cniVersion": "0.1.0"})
    capabilities = {"portMappings": [{"hostPort": 8080, "containerPort": 80}], "bandwidth": {"ingressRate": 1}}

    result = fakes.client.add(net, "c-1", "/run/netns/x", "eth1", {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"},
                              capabilities)
    fakes.client.delete(net, "c-1", "/run/netns/x", "eth1", {"IgnoreUnknown": "1"}, capabilities, result)

    calls = fakes.calls()
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls] == [
        ("first", "ADD"), ("second", "ADD"), ("second", "DEL"), ("first", "DEL")]
    add1, add2, del2, del1 = (c["conf"] for c in calls)
    assert calls[0]["env"] == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c-1", "CNI_NETNS": "/run/netns/x",
                               "CNI_IFNAME": "eth1", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web",
                               "CNI_PATH": str(fakes.dir), "PATH": cni.PLUGIN_PATH_ENV}
    assert "prevResult" not in add1 and add2["prevResult"] == RESULT_1_0
    assert add1["runtimeConfig"] == {"portMappings": capabilities["portMappings"]}
    assert "runtimeConfig" not in add2  # bandwidth is declared false, mac was not given
    assert {(c["name"], c["cniVersion"]) for c in (add1, add2, del1, del2)} == {("fakenet", "1.0.0")}
    assert del1["prevResult"] == del2["prevResult"] == result.to_json() == RESULT_1_0


def test_del_below_cni_0_4_0_gets_no_prev_result_and_check_is_not_run(fakes: Fakes) -> None:
    fakes.plugin("only")
    net = network({"type": "only", "fake": {"result": {"cniVersion": "0.3.1", "ips": []}}}, version="0.3.1")
    result = fakes.client.add(net, "c1", "/run/netns/x", "eth0")

    fakes.client.delete(net, "c1", "/run/netns/x", "eth0", cached_result=result)
    report = fakes.client.check(net, "c1", "/run/netns/x", "eth0", cached_result=result)

    assert [c["env"]["CNI_COMMAND"] for c in fakes.calls()] == ["ADD", "DEL"]
    assert "prevResult" not in fakes.calls()[1]["conf"]
    assert report.checked == () and "needs 0.4.0" in report.notes[0]


def test_disable_check_is_honoured(fakes: Fakes) -> None:
    fakes.plugin("only")
    net = network({"type": "only", "fake": {"result": RESULT_1_0}}, disableCheck="true")
    result = fakes.client.add(net, "c1", "/run/netns/x", "eth0")

    report = fakes.client.check(net, "c1", "/run/netns/x", "eth0", cached_result=result)

    assert [c["env"]["CNI_COMMAND"] for c in fakes.calls()] == ["ADD"]
    assert report.notes == ("CHECK not run: CNI network 'fakenet' sets disableCheck",)


@pytest.mark.parametrize("about, versions, skipped", [
    ("CNI portmap plugin v1.1.1", ("0.4.0", "1.0.0"), "v1.1.1"),
    ("CNI portmap plugin version unknown", ("0.4.0", "1.0.0"), "release is unknown"),
    ("CNI portmap plugin v1.3.0", ("0.4.0", "1.0.0"), None),
    ("CNI portmap plugin version unknown", ("0.4.0", "1.0.0", "1.1.0"), None),  # libcni >= 1.2: long fixed
])
def test_check_of_portmap_is_skipped_only_before_1_3_0(fakes: Fakes, about: str, versions: tuple[str, ...],
                                                       skipped: str | None) -> None:
    fakes.plugin("portmap", about=about, versions=versions)
    net = network({"type": "portmap", "fake": {"result": RESULT_1_0}})
    result = fakes.client.add(net, "c1", "/run/netns/x", "eth0")

    report = fakes.client.check(net, "c1", "/run/netns/x", "eth0", cached_result=result)

    checks = [c for c in fakes.calls() if c["env"]["CNI_COMMAND"] == "CHECK"]
    if skipped:
        assert checks == [] and report.checked == () and skipped in report.notes[0]
    else:
        assert len(checks) == 1 and checks[0]["conf"]["prevResult"] == RESULT_1_0 and report.notes == ()


def test_a_result_of_another_version_is_converted_for_the_next_plugin(fakes: Fakes) -> None:
    fakes.plugin("old")
    fakes.plugin("new")
    legacy = {"cniVersion": "0.2.0", "ip4": {"ip": "10.2.0.7/16", "gateway": "10.2.0.1",
                                             "routes": [{"dst": "0.0.0.0/0"}]}}
    net = network({"type": "old", "fake": {"result": legacy}}, {"type": "new"})

    result = fakes.client.add(net, "c1", "/run/netns/x", "eth0")

    assert fakes.calls()[1]["conf"]["prevResult"] == {
        "cniVersion": "1.0.0", "ips": [{"address": "10.2.0.7/16", "gateway": "10.2.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}]}
    assert result.cni_version == "1.0.0" and [str(a) for a in result.ip_addresses()] == ["10.2.0.7/16"]


def test_a_failing_plugin_is_reported_in_mesos_words_and_the_chain_is_undone(fakes: Fakes) -> None:
    fakes.plugin("good")
    fakes.plugin("bad")
    error = {"cniVersion": "1.0.0", "code": 7, "msg": "invalid network config", "details": "no subnet given"}
    net = network({"type": "good", "fake": {"result": RESULT_1_0}}, {"type": "bad", "fake": {"ADD": "fail", "error": error}})

    with pytest.raises(PluginError) as caught:
        fakes.client.add(net, "c1", "/run/netns/x", "eth0")

    message = str(caught.value)
    assert message.startswith("The CNI plugin 'bad' failed to attach container c1 to CNI network 'fakenet': "
                              "invalid network config: no subnet given (CNI error code 7) (stdout='{")
    assert "stderr='eeee" in message and len(message) < 1200  # 5000 characters of stderr, bounded
    assert message.endswith("the attachment was undone (DEL of every plugin succeeded)")
    assert (caught.value.code, caught.value.plugin, caught.value.network) == (7, "bad", "fakenet")
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in fakes.calls()] == [
        ("good", "ADD"), ("bad", "ADD"), ("bad", "DEL"), ("good", "DEL")]


def test_a_failing_del_is_reported_as_a_detach(fakes: Fakes) -> None:
    fakes.plugin("bad")
    net = network({"type": "bad", "fake": {"DEL": "fail", "error": {"code": 11, "msg": "try again later"}}})

    with pytest.raises(PluginError, match=r"^The CNI plugin 'bad' failed to detach container c1 from CNI "
                                          r"network 'fakenet': try again later \(CNI error code 11\)"):
        fakes.client.delete(net, "c1", "/run/netns/x", "eth0")


def test_an_unknown_container_on_del_is_success(fakes: Fakes) -> None:
    fakes.plugin("gone")
    net = network({"type": "gone", "fake": {"DEL": "fail", "error": {"code": 3, "msg": "unknown container"}}})
    netns = fakes.tmp / "netns"  # stands in for a namespace that still exists
    netns.touch()

    notes = fakes.client.delete(net, "c1", str(netns), "eth0")

    assert notes == ["plugin 'gone' does not know container c1 (CNI error 3): nothing to detach"]


def process_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_hung_plugin_is_killed_with_its_process_group_after_the_timeout(fakes: Fakes) -> None:
    pidfile = fakes.tmp / "child.pid"
    fakes.script("hang", f'[ "$CNI_COMMAND" = ADD ] || exit 0\nsleep 300 &\necho $! > {pidfile}\nsleep 300\n')
    client = CNIClient([str(fakes.dir)], timeout=1)
    net = network({"type": "hang"})

    started = time.monotonic()
    with pytest.raises(PluginError) as caught:
        client.add(net, "c1", "/run/netns/x", "eth0")

    assert time.monotonic() - started < 5
    assert caught.value.timed_out
    assert str(caught.value).startswith("The CNI plugin 'hang' failed to attach container c1 to CNI network "
                                        "'fakenet': it did not finish within 1 s and was killed")
    assert process_gone(int(pidfile.read_text()), within=2), "the plugin's child outlived it"


def test_find_plugin_searches_the_path_in_order_and_names_what_it_searched(tmp_path: Path, fakes: Fakes) -> None:
    fakes.plugin("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine").write_text("not executable")

    assert cni.find_plugin("mine", [str(tmp_path / "other"), str(fakes.dir)]) == str(fakes.dir / "mine")
    with pytest.raises(PluginNotFoundError) as caught:
        cni.find_plugin("absent", [str(tmp_path / "other"), str(fakes.dir)])
    assert str(caught.value) == (f"The CNI plugin 'absent' was not found in the CNI plugin path (searched: "
                                 f"{tmp_path / 'other'}, {fakes.dir})")
    with pytest.raises(PluginNotFoundError, match="exists but is not executable"):
        cni.find_plugin("mine", [str(tmp_path / "other")])
    with pytest.raises(PluginNotFoundError, match="is not a CNI plugin name"):
        cni.find_plugin("../other/mine", [str(fakes.dir)])


def test_a_plugin_that_cannot_be_started_is_reported(fakes: Fakes) -> None:
    (fakes.dir / "noshebang").write_text("echo this is not an executable format\n")
    (fakes.dir / "noshebang").chmod(0o755)

    with pytest.raises(PluginError, match=r"^The CNI plugin 'noshebang' failed to attach container c1 to CNI "
                                          r"network 'fakenet': .*/noshebang could not be started: Exec format error"):
        fakes.client.add(network({"type": "noshebang"}), "c1", "/run/netns/x", "eth0")


def test_a_missing_plugin_fails_before_any_plugin_runs(fakes: Fakes) -> None:
    fakes.plugin("present")
    net = network({"type": "present", "fake": {"result": RESULT_1_0}}, {"type": "absent"})

    with pytest.raises(PluginNotFoundError, match=r"^Cannot attach container c1 \(CNI network 'fakenet'\): "
                                                  r"The CNI plugin 'absent' was not found"):
        fakes.client.add(net, "c1", "/run/netns/x", "eth0")
    assert fakes.calls() == []


def test_container_ids_interface_names_and_cni_args_are_checked_before_any_plugin_runs(fakes: Fakes) -> None:
    fakes.plugin("only")
    net = network({"type": "only", "fake": {"result": RESULT_1_0}})

    for container_id, ifname, args in (("-bad", "eth0", {}), ("c1", "a/b", {}), ("c1", "x" * 16, {}),
                                       ("c1", "eth0", {"K": "a;b"}), ("c1", "eth0", {"K=V": "x"})):
        with pytest.raises(cni.CNIArgumentError):
            fakes.client.add(net, container_id, "/run/netns/x", ifname, args)
    assert fakes.calls() == []


# --- configuration files -----------------------------------------------------------------------

def write(directory: Path, name: str, content: str | bytes | dict[str, Any]) -> None:
    path = directory / name
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


BRIDGE_CONF = {"cniVersion": "0.4.0", "name": "good", "type": "bridge", "ipam": {"type": "host-local"}}


def test_invalid_config_files_are_reported_with_path_and_reason_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "SECRET-TOKEN-0123456789"
    write(tmp_path, "00-good.conf", BRIDGE_CONF)
    write(tmp_path, "05-again.conflist", {"cniVersion": "1.0.0", "name": "good", "plugins": [{"type": "ptp"}]})
    write(tmp_path, "10-truncated.conf", f'{{"cniVersion": "1.0.0", "name": "x", "password": "{secret}", ')
    write(tmp_path, "20-notype.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [{"token": secret}]})
    write(tmp_path, "30-badname.conf", {**BRIDGE_CONF, "name": f"bad name {secret}"})
    write(tmp_path, "40-version.conf", {**BRIDGE_CONF, "name": "v", "cniVersion": "9.9.9"})
    write(tmp_path, "45-noversion.conf", {"name": "nv", "type": "bridge"})
    write(tmp_path, "50-huge.json", " " * (cni.MAX_CONFIG_BYTES + 1) + "{}")
    write(tmp_path, "60-array.json", "[1, 2]")
    write(tmp_path, "70-binary.conf", b"\xff\xfe{}")
    write(tmp_path, "80-typeobject.conflist", {"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": {"key": secret}}]})
    (tmp_path / "90-directory.conf").mkdir()
    os.mkfifo(tmp_path / "95-fifo.conf")  # must not hang the reader
    write(tmp_path, "99-notes.txt", "not a configuration: ignored")

    with caplog.at_level(logging.ERROR, logger="reconciler.network.cni"):
        networks = cni.load_networks(str(tmp_path))

    assert list(networks) == ["good"] and networks["good"].source == str(tmp_path / "00-good.conf")
    problems = {Path(p.path).name: p.reason for p in cni.scan_networks(str(tmp_path)).problems}
    assert problems == {
        "05-again.conflist": f"defines CNI network 'good' again; {tmp_path / '00-good.conf'} defines it first, "
                             "so this file is ignored",
        "10-truncated.conf": "is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 77",
        "20-notype.conflist": "field 'plugins[0].type': Field required",
        "30-badname.conf": "field 'name': must start with a letter or digit, followed by letters, "
                           "digits, '_', '.' or '-' (CNI's rule for network names)",
        "40-version.conf": "field 'cniVersion': Input should be '0.1.0', '0.2.0', '0.3.0', '0.3.1', '0.4.0' or '1.0.0'",
        "45-noversion.conf": "has no 'cniVersion'; set it to one of 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0",
        "50-huge.json": f"is {cni.MAX_CONFIG_BYTES + 3} bytes, more than the {cni.MAX_CONFIG_BYTES} a CNI "
                        "configuration may have here",
        "60-array.json": "is not a JSON object",
        "70-binary.conf": "is not UTF-8 text",
        "80-typeobject.conflist": "field 'plugins[0].type': Input should be a valid string",
        "90-directory.conf": "is not a regular file",
        "95-fifo.conf": "is not a regular file",
    }
    assert secret not in caplog.text and "Skipping CNI network configuration" in caplog.text
    assert len(caplog.records) == len(problems)


def test_a_conf_is_a_list_of_one_plugin_and_disable_check_is_read(tmp_path: Path) -> None:
    write(tmp_path, "a.conf", BRIDGE_CONF)
    write(tmp_path, "b.conflist", {"cniVersion": "1.0.0", "name": "chain", "disableCheck": True,
                                   "plugins": [{"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": True}}]})

    networks = cni.load_networks(str(tmp_path))

    good, chain = networks["good"], networks["chain"]
    assert (good.cni_version, good.disable_check, [p.type for p in good.plugins]) == ("0.4.0", False, ["bridge"])
    assert good.to_json() == {"cniVersion": "0.4.0", "name": "good",
                              "plugins": [{"type": "bridge", "ipam": {"type": "host-local"}}]}
    assert chain.disable_check and chain.plugins[1].capabilities == {"portMappings": True}
    restored = NetworkConfigList.from_json(json.loads(json.dumps(chain.to_json())))
    assert restored == chain and restored.to_json() == chain.to_json()


def test_unknown_network_in_mesos_words_and_files_are_reread_on_every_call(tmp_path: Path) -> None:
    write(tmp_path, "bad.conf", "{")

    with pytest.raises(UnknownNetworkError) as caught:
        cni.get_network(str(tmp_path), "late")
    assert str(caught.value).startswith("Unknown CNI network 'late' (1 configuration file(s) in ")
    assert "bad.conf: is not valid JSON" in str(caught.value)

    write(tmp_path, "late.conf", {**BRIDGE_CONF, "name": "late"})
    assert cni.get_network(str(tmp_path), "late").name == "late"

    (tmp_path / "late.conf").unlink()
    with pytest.raises(UnknownNetworkError, match=r"^Unknown CNI network 'late'"):
        cni.get_network(str(tmp_path), "late")


def test_a_missing_config_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(NetworkConfigError, match=r"^The CNI network configuration directory '.*/absent' does not exist$"):
        cni.load_networks(str(tmp_path / "absent"))


def test_a_checkpoint_that_is_not_an_attachment_is_refused_with_its_source() -> None:
    with pytest.raises(NetworkConfigError, match=r"^/ckpt/a.json: has no 'containerId'"):
        Attachment.from_json({"network": network({"type": "x"}).to_json()}, "/ckpt/a.json")
    with pytest.raises(NetworkConfigError, match=r"^/ckpt/a.json: field 'name'"):
        Attachment.from_json({"network": {"cniVersion": "1.0.0", "name": "", "plugins": [{"type": "x"}]}},
                             "/ckpt/a.json")


# --- results -----------------------------------------------------------------------------------

def test_a_1_0_0_result_gives_the_container_addresses_and_dns() -> None:
    result = Result.from_json(RESULT_1_0)

    assert [str(a) for a in result.ip_addresses()] == ["10.1.0.5/24", "fd00::5/64"]  # not the bridge's 10.1.0.1
    assert result.dns == cni.DNS(nameservers=("10.1.0.53",), domain="example.internal", search=("a.example",),
                                 options=("ndots:2",))
    assert result.to_json() == RESULT_1_0


def test_a_0_2_0_result_gives_ip4_and_ip6() -> None:
    result = Result.from_json({"cniVersion": "0.2.0", "ip4": {"ip": "10.3.0.2/16", "gateway": "10.3.0.1"},
                               "ip6": {"ip": "fd01::2/64", "routes": [{"dst": "::/0", "gw": "fd01::1"}]},
                               "dns": {"nameservers": ["10.3.0.1"]}})

    assert [str(a) for a in result.ip_addresses()] == ["10.3.0.2/16", "fd01::2/64"]
    assert result.routes == (cni.Route(ipaddress.ip_network("::/0"), ipaddress.ip_address("fd01::1")),)
    assert result.dns.nameservers == ("10.3.0.1",)


def test_results_convert_between_versions() -> None:
    as_040 = cni.convert_result(RESULT_1_0, "0.4.0")
    assert [ip.get("version") for ip in as_040["ips"]] == ["4", "4", "6"]
    assert cni.convert_result(as_040, "1.0.0") == RESULT_1_0
    assert cni.convert_result(RESULT_1_0, "1.0.0") == RESULT_1_0
    assert cni.convert_result(RESULT_1_0, "0.2.0") == {
        "cniVersion": "0.2.0", "dns": RESULT_1_0["dns"],
        "ip4": {"ip": "10.1.0.5/24", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]},
        "ip6": {"ip": "fd00::5/64", "routes": [{"dst": "::/0"}]}}
    assert cni.convert_result({"cniVersion": "0.3.0", "ip": [{"version": "4", "address": "10.0.0.2/8"}]},
                              "0.3.1") == {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.0.0.2/8"}]}


def test_a_refused_name_is_quoted_on_one_line_with_control_characters_escaped() -> None:
    with pytest.raises(cni.CNIArgumentError) as refused:
        cni.validate_ifname("eth0\x1b[2J" + "x" * 100)
    assert str(refused.value).startswith(
        f"interface name 'eth0\\x1b[2J{'x' * 32}'... (108 characters) is not a Linux interface name: ")
    with pytest.raises(cni.CNIArgumentError, match=r"^container id 'a\\nb' is not a CNI container id"):
        cni.validate_container_id("a\nb")


def test_a_result_that_does_not_parse_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"'ips\[0\]\.address' \('10\.0\.0\.300/24'\) is not an address"):
        Result.from_json({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]})
    with pytest.raises(ValueError, match=r"'ips\[0\]\.interface' is not an index"):
        Result.from_json({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "interface": "eth0"}]})
