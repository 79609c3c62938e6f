"""network/cni when things go wrong (issue 12): an agent killed during DEL, or after the namespace was
made but before any ADD, leaves nothing once the next agent recovered; a missing plugin directory
stops the agent at start; a plugin that hangs is killed and the launch fails, leaving nothing; and a
container on two networks gets eth0 and eth1.

Real kernel and Debian's real plugins. Each test has the `lab` of test_network_cni (its own bridge,
/24, host-local dataDir and configuration directory; afterwards the host's iptables, nftables and
sysctls are asserted to be as they were), and where it needs a second network, a second bridge and
/24 of its own, removed afterwards. Whatever a test leaves, its containers are destroyed through the
agent (a final `once` over its emptied manifest directory) before the lab checks the host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.linux.mountinfo import read_mountinfo
from reconciler.network import netns
from tests.conftest import AgentEnv, running, wait_agent
from tests.test_isolator_network_cni import destroy_through_the_agent, wait_file, write
from tests.test_network_cni import PLUGIN_DIR, Lab, free_port, free_subnet, lab, needs_real_plugins, rules  # noqa: F401

pytestmark = [pytest.mark.root, needs_real_plugins]

ISOLATION = "namespaces/pid,network/cni,posix/cpu,posix/mem"
PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}


# --- a test's networks and agent flags ---------------------------------------------------------

@dataclass
class SecondNetwork:
    """A second CNI network of a test's own: another bridge, another free /24, another dataDir."""
    tmp: Path
    avoid: ipaddress.IPv4Network
    name: str = field(default_factory=lambda: f"rcs-{uuid.uuid4().hex[:8]}")
    bridge: str = field(default_factory=lambda: f"rcb-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        self.subnet = free_subnet()
        while self.subnet.overlaps(self.avoid):
            self.subnet = free_subnet()
        self.data_dir = self.tmp / "ipam-second"

    def write(self, config_dir: Path) -> None:
        doc = {"cniVersion": "1.0.0", "name": self.name, "plugins": [
            {"type": "bridge", "bridge": self.bridge, "isGateway": True,
             "ipam": {"type": "host-local", "subnet": str(self.subnet), "dataDir": str(self.data_dir)}}]}
        (config_dir / "20-second.conflist").write_text(json.dumps(doc))

    def reserved_ips(self) -> set[str]:
        directory = self.data_dir / self.name
        return {p.name for p in directory.iterdir() if re.match(r"^[0-9.]+$", p.name)} if directory.exists() else set()

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def portmap_container_chains() -> set[str]:
    """portmap's chains of one container each (CNI-DN-<hash of network and container id>)."""
    return {line.split()[0][1:] for line in rules("iptables-save") if line.startswith(":CNI-DN-")}


@dataclass
class Setup:
    env: AgentEnv
    lab: Lab
    plugins_dir: str = PLUGIN_DIR
    more_flags: list[str] = field(default_factory=list)
    second: SecondNetwork | None = None
    # portmap's per-container chains already there (another test's, on a shared host): not ours to count
    chains_before: set[str] = field(default_factory=lambda: set(portmap_container_chains()))

    def flags(self) -> list[str]:
        return [f"--network_cni_config_dir={self.lab.config_dir}", f"--network_cni_plugins_dir={self.plugins_dir}",
                *self.more_flags]

    def add_second_network(self) -> SecondNetwork:
        self.second = SecondNetwork(self.lab.tmp, self.lab.subnet)
        self.second.write(self.lab.config_dir)
        return self.second

    @property
    def netns_dir(self) -> Path:
        return self.env.work_dir / "cni" / "netns"

    def leftovers(self) -> dict[str, Any]:
        """Everything a container's networks could leave on the host: empty when nothing is left."""
        found: dict[str, Any] = {}
        reserved = {self.lab.name: self.lab.reserved_ips()}
        bridges = [self.lab.bridge]
        if self.second is not None:
            reserved[self.second.name] = self.second.reserved_ips()
            bridges.append(self.second.bridge)
        found["host-local reservations"] = {net: ips for net, ips in reserved.items() if ips}
        found["veths on the bridges"] = {b: os.listdir(f"/sys/class/net/{b}/brif") for b in bridges
                                         if os.path.isdir(f"/sys/class/net/{b}/brif") and
                                         os.listdir(f"/sys/class/net/{b}/brif")}
        found["netns files"] = os.listdir(self.netns_dir) if self.netns_dir.is_dir() else []
        real = os.path.realpath(self.netns_dir)
        found["netns mounts"] = [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(real + "/")]
        cni_dir = self.env.work_dir / "cni"
        found["container directories"] = [e for e in os.listdir(cni_dir) if e != "netns"] if cni_dir.is_dir() else []
        found["portmap chains"] = sorted(portmap_container_chains() - self.chains_before)
        return {what: value for what, value in found.items() if value}

    def wait_clean(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        left = self.leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.leftovers()
        assert not left, f"left behind: {left}"


@pytest.fixture
def setup(agent_env: AgentEnv, lab: Lab) -> Iterator[Setup]:  # noqa: F811 - lab: the imported fixture
    agent_env.isolation = ISOLATION
    lab.write(lab.bridge_plugin(), PORTMAP)
    s = Setup(agent_env, lab)
    try:
        yield s
    finally:
        # Before the lab checks the host: every container destroyed through the agent (CNI DEL).
        destroy_through_the_agent(agent_env, s.flags())
        if s.second is not None:
            s.second.remove()


# An agent that dies (os._exit: no cleanup of any kind, as SIGKILL) at the point RECONCILER_TEST_DIE names.
_DRIVER = """
import os, sys
from reconciler.network import cni, netns

def die(where):
    os.write(2, ("dying " + where + "\\n").encode())
    os._exit(9)

real_create, real_delete = netns.create, cni.Attachment.delete
point = os.environ["RECONCILER_TEST_DIE"]
if point == "after-netns-create":
    def create(directory, name):
        real_create(directory, name)
        die("after the namespace was created")
    netns.create = create
elif point == "before-add":
    def add(self, client):
        die("before the ADD")
    cni.Attachment.add = add
elif point == "before-del":
    def delete(self, client):
        die("before the first DEL")
    cni.Attachment.delete = delete
elif point == "after-first-del":
    def delete(self, client):
        real_delete(self, client)
        die("after the first DEL")
    cni.Attachment.delete = delete
else:
    raise SystemExit("unknown RECONCILER_TEST_DIE " + point)
from reconciler.cli import main
sys.exit(main(sys.argv[1:]))
"""


def dying_agent(s: Setup, point: str) -> subprocess.Popen[str]:
    agent = subprocess.Popen([sys.executable, "-c", _DRIVER, "run", *s.env.flags(), *s.flags()],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=s.env.tmp,
                             env={**os.environ, "RECONCILER_TEST_DIE": point})
    s.env.agents.append(agent)
    return agent


def died(agent: subprocess.Popen[str], timeout: float = 20) -> str:
    try:
        out, _ = agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        agent.kill()
        out, _ = agent.communicate()
        raise AssertionError(f"the agent did not die as planned: {out[-2000:]}") from None
    assert agent.returncode == 9, out[-2000:]
    return out


# --- an agent killed during DEL ----------------------------------------------------------------

@pytest.mark.parametrize("point", ["before-del", "after-first-del"])
def test_an_agent_killed_during_del_leaves_nothing_once_recovered(setup: Setup, point: str) -> None:
    s, env = setup, setup.env
    second = s.add_second_network()
    port = free_port()
    write(env, "web", "exec sleep 300", [{"name": s.lab.name, "port_mappings": [{"host_port": port,
                                                                                  "container_port": 8080}]},
                                         {"name": second.name}])
    agent = dying_agent(s, point)
    web = env.wait_status("web", running, timeout=20)
    assert [n["interface"] for n in web["network_infos"]] == ["eth0", "eth1"]
    assert len(s.lab.reserved_ips()) == 1 and len(second.reserved_ips()) == 1
    (env.manifests / "web.yaml").unlink()
    died(agent)

    # Where it died: DEL runs in reverse, the second network (eth1) first.
    assert len(s.lab.reserved_ips()) == 1
    assert len(second.reserved_ips()) == (1 if point == "before-del" else 0)
    assert os.listdir(s.netns_dir) == [web["container_id"]]
    assert (env.work_dir / "cni" / web["container_id"] / "networks.json").exists()
    assert portmap_container_chains() - s.chains_before, "the port mapping's rules were not there"

    recovered = env.start(*s.flags())
    wait_agent(env, recovered, timeout=20)
    s.wait_clean()
    env.wait_gone("web", timeout=10)
    env.stop(recovered)


# --- an agent killed after the namespace was made, before any ADD -------------------------------

@pytest.mark.parametrize("point", ["after-netns-create", "before-add"])
def test_an_agent_killed_before_any_add_leaves_nothing_once_recovered(setup: Setup, point: str) -> None:
    s, env = setup, setup.env
    write(env, "web", "exec sleep 300", [{"name": s.lab.name, "port_mappings": [{"host_port": free_port(),
                                                                                  "container_port": 8080}]}])
    died(dying_agent(s, point), timeout=30)

    [cid] = os.listdir(s.netns_dir)
    assert netns.is_mounted(str(s.netns_dir / cid))
    checkpoint = env.work_dir / "cni" / cid / "networks.json"
    if point == "before-add":   # written ahead of the ADD, without a result
        [attachment] = json.loads(checkpoint.read_text())["attachments"]
        assert attachment["result"] is None and attachment["ifName"] == "eth0"
    else:
        assert (env.work_dir / "cni" / cid).is_dir() and not checkpoint.exists()
    assert s.lab.reserved_ips() == set()

    (env.manifests / "web.yaml").unlink()
    recovered = env.start(*s.flags())
    wait_agent(env, recovered, timeout=20)
    s.wait_clean()
    env.stop(recovered)


# --- a missing plugin directory ----------------------------------------------------------------

@pytest.mark.parametrize("plugins_dir, wanted", [
    (None, "reconciler: flag --network_cni_plugins_dir: Missing required '--network_cni_plugins_dir' flag"),
    ("{tmp}/no-such-dir", "reconciler: flag --network_cni_plugins_dir: The CNI plugin directory '{tmp}/no-such-dir' "
                          "does not exist"),
    (f"{PLUGIN_DIR}:{{tmp}}/no-such-dir", "reconciler: flag --network_cni_plugins_dir: The CNI plugin directory "
                                          "'{tmp}/no-such-dir' does not exist"),
], ids=["missing-flag", "missing-directory", "missing-directory-in-path"])
def test_network_cni_without_its_plugin_directory_stops_the_agent_at_start(
        agent_env: AgentEnv, tmp_path: Path, plugins_dir: str | None, wanted: str) -> None:
    config_dir = tmp_path / "net.d"
    config_dir.mkdir()
    extra = [f"--network_cni_config_dir={config_dir}"]
    if plugins_dir is not None:
        extra.append(f"--network_cni_plugins_dir={plugins_dir.format(tmp=tmp_path)}")
    agent_env.isolation = ISOLATION

    done = subprocess.run([sys.executable, "-m", "reconciler", "run", *agent_env.flags(), *extra],
                          capture_output=True, text=True, timeout=30, cwd=agent_env.tmp)

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(wanted.format(tmp=tmp_path)), line
    assert not (agent_env.work_dir / "cni").exists()


# --- a plugin that hangs -----------------------------------------------------------------------

HANG = """#!/bin/sh
# A CNI plugin that never answers an ADD (and the children it started neither); anything else is fine.
[ "$CNI_COMMAND" = ADD ] || exit 0
echo $$ >> {pids}
sleep 300 &
echo $! >> {pids}
sleep 300
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def install_hanging_plugin(s: Setup, timeout: str) -> Path:
    """A plugin `hang` first in the search path, after the bridge in the lab's chain; its pids file."""
    net = s.lab
    plugins, pids = net.tmp / "plugins", net.tmp / "hang.pids"
    plugins.mkdir()
    (plugins / "hang").write_text(HANG.format(pids=pids))
    (plugins / "hang").chmod(0o755)
    s.plugins_dir = f"{plugins}:{PLUGIN_DIR}"         # first in the search path
    s.more_flags = [f"--network_cni_plugin_timeout={timeout}"]
    net.write(net.bridge_plugin(), {"type": "hang"})  # bridge attaches, then hang never answers
    return pids


def test_a_hung_plugin_is_killed_after_the_timeout_the_launch_fails_and_nothing_is_left(setup: Setup) -> None:
    s, env, net = setup, setup.env, setup.lab
    pids = install_hanging_plugin(s, "1secs")
    write(env, "stuck", "exec sleep 300", [{"name": net.name}])

    started = time.monotonic()
    agent = env.start(*s.flags())
    stuck = env.wait_status("stuck", lambda st: "'hang'" in (st.get("message") or ""), timeout=20)
    assert time.monotonic() - started < 15

    message = stuck["message"]
    assert "The CNI plugin 'hang' failed to attach container" in message, message
    assert f"to CNI network '{net.name}': it did not finish within 1 s and was killed" in message, message
    assert "the attachment was undone" in message, message   # the bridge had attached: DELeted at once
    assert (stuck["phase"], stuck["reason"], stuck["pid"]) == ("Pending", "LaunchFailed", None), stuck
    env.stop(agent)          # between two tries: a launch holds the loop until its cleanup is done
    s.wait_clean(timeout=5)
    assert pids.exists() and all(gone(int(pid)) for pid in pids.read_text().split()), "the plugin outlived its timeout"


def test_a_hung_plugin_does_not_stall_other_containers(setup: Setup) -> None:
    """Plugins run in a worker thread: while one hangs (up to its timeout), the agent goes on."""
    s, env, net = setup, setup.env, setup.lab
    pids = install_hanging_plugin(s, "8secs")
    agent = env.start(*s.flags())
    wait_agent(env, agent)                                      # past its first pass: watching
    write(env, "stuck", "exec sleep 300", [{"name": net.name}])
    deadline = time.monotonic() + 10
    while not (pids.exists() and pids.read_text().split()):     # the plugin hangs now
        assert time.monotonic() < deadline, "the hanging plugin never ran"
        time.sleep(0.05)
    env.write_manifest("plain", "exec sleep 300", kill_grace_period="1secs")
    dropped = time.monotonic()
    env.wait_status("plain", running, timeout=6)
    assert time.monotonic() - dropped < 3, "a hung CNI plugin held the agent"
    env.wait_status("stuck", lambda st: "'hang'" in (st.get("message") or ""), timeout=20)
    env.stop(agent)
    s.wait_clean(timeout=10)


# --- two networks ------------------------------------------------------------------------------

def test_two_networks_give_eth0_and_eth1_an_address_each_in_status_and_etc_hosts(setup: Setup) -> None:
    s, env, net = setup, setup.env, setup.lab
    second = s.add_second_network()
    write(env, "both", "cat /etc/hosts > hosts.txt; ls /sys/class/net > links.txt; exec sleep 300",
          [{"name": net.name}, {"name": second.name}])
    agent = env.start(*s.flags())
    both = env.wait_status("both", running, timeout=30)

    infos = both["network_infos"]
    assert [(n["name"], n["interface"]) for n in infos] == [(net.name, "eth0"), (second.name, "eth1")]
    [first_ip] = [ipaddress.ip_address(a["ip_address"]) for a in infos[0]["ip_addresses"]]
    [second_ip] = [ipaddress.ip_address(a["ip_address"]) for a in infos[1]["ip_addresses"]]
    assert first_ip in net.subnet and second_ip in second.subnet
    assert net.reserved_ips() == {str(first_ip)} and second.reserved_ips() == {str(second_ip)}
    # Inside: one address on each interface, as the status says.
    path = str(s.netns_dir / both["container_id"])
    inside = {i.name: [a.ip for a in i.addresses if a.version == 4] for i in netns.interfaces(path)}
    assert inside == {"lo": [ipaddress.ip_address("127.0.0.1")], "eth0": [first_ip], "eth1": [second_ip]}, inside
    assert wait_file(env.sandbox(both) / "links.txt").split() == ["eth0", "eth1", "lo"]
    hosts = wait_file(env.sandbox(both) / "hosts.txt")
    assert f"{first_ip}\tboth" in hosts and f"{second_ip}\tboth" in hosts, hosts

    (env.manifests / "both.yaml").unlink()
    env.wait_gone("both", timeout=20)
    s.wait_clean(timeout=5)
    env.stop(agent, signal.SIGTERM)
