"""Network namespaces under a directory (reconciler/network/netns.py), on the real kernel, as root.

Every namespace lives under the test's tmp_path; veths join only namespaces the test made, with
addresses from TEST-NET-1 (192.0.2.0/24) that exist nowhere else; traffic stays between them. The
fixture removes every namespace and unmounts everything under tmp_path, even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from reconciler.linux import syscalls
from reconciler.linux.mountinfo import read_mountinfo
from reconciler.network import netns
from reconciler.network.netns import NetworkNamespaceError

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent


def thread_namespace() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture
def netns_dir(tmp_path: Path) -> Iterator[str]:
    directory = str(tmp_path / "netns")
    before = thread_namespace()
    try:
        yield directory
    finally:
        for name in netns.list_names(directory):
            with contextlib.suppress(OSError):
                netns.remove(directory, name)
        unmount_everything_under(str(tmp_path))
    assert thread_namespace() == before, "the test thread was left in another network namespace"


def unmount_everything_under(directory: str) -> None:
    real = os.path.realpath(directory)
    for entry in reversed(read_mountinfo()):
        if entry.mount_point == real or entry.mount_point.startswith(real + "/"):
            with contextlib.suppress(OSError):
                syscalls.umount2(entry.mount_point, syscalls.MNT_DETACH)


def mounts_at(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The roots of the mounts at `path` ("net:[4026532281]" for a network namespace)."""
    return [e.root for e in read_mountinfo(mountinfo) if e.mount_point == os.path.realpath(path)]


def namespace_id(path: str) -> str:
    return f"net:[{os.stat(path).st_ino}]"


@contextlib.contextmanager
def other_thread_watched() -> Iterator[set[str]]:
    """The network namespaces another thread of this process found itself in while the block ran."""
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(thread_namespace())
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def names_in(path: str) -> list[str]:
    return [interface.name for interface in netns.interfaces(path)]


# --- a veth pair between two of our namespaces ----------------------------------------------------

def connect(a_path: str, b_path: str) -> None:
    """veth a0 (192.0.2.1/24) in A, its peer b0 (192.0.2.2/24) in B, both up, IPv6 off (no chatter)."""
    b_fd = os.open(b_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.run_in(a_path, lambda: _add_veth(b_fd))
    finally:
        os.close(b_fd)
    netns.run_in(b_path, lambda: _configure("b0", "192.0.2.2"))
    netns.run_in(a_path, lambda: _configure("a0", "192.0.2.1"))
    wait_until(lambda: netns.run_in(a_path, lambda: _operstate("a0")) == "UP", what="a0 to have a carrier")


def _add_veth(peer_namespace_fd: int) -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname="a0", kind="veth", peer={"ifname": "b0", "net_ns_fd": peer_namespace_fd})


def _configure(ifname: str, address: str) -> None:
    # /proc/sys/net is the namespace of the thread that opens it: this one.
    with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
        f.write("1")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=address, prefixlen=24)
        ipr.link("set", index=index, state="up")


def _operstate(ifname: str) -> str:
    with IPRoute() as ipr:
        return ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])[0].get("IFLA_OPERSTATE")


def loopback_echo(path: str) -> bytes:
    """A datagram sent to 127.0.0.1 and received back, inside the namespace at `path` (lo must be up)."""
    def echo() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
            sock.sendto(b"ping", sock.getsockname())
            return sock.recv(16)
    return netns.run_in(path, echo)


def udp_receiver(path: str, address: str) -> socket.socket:
    def bind() -> socket.socket:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((address, 0))
        return receiver
    return netns.run_in(path, bind)


def send_udp(path: str, target: tuple[str, int], count: int, size: int) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(count):
                sender.sendto(b"x" * size, target)
    netns.run_in(path, send)


# --- create ---------------------------------------------------------------------------------

def test_a_new_namespace_has_only_lo_and_lo_is_up(netns_dir: str) -> None:
    path = netns.create(netns_dir, "web")

    assert path == os.path.join(os.path.realpath(netns_dir), "web")
    assert netns.is_mounted(path)
    assert namespace_id(path) != thread_namespace()
    [lo] = netns.interfaces(path)
    assert (lo.name, lo.loopback, lo.up) == ("lo", True, True)
    assert {str(a) for a in lo.addresses} == {"127.0.0.1/8", "::1/128"}


def test_the_namespace_outlives_the_thread_that_made_it(netns_dir: str) -> None:
    threads = threading.active_count()
    path = netns.create(netns_dir, "web")

    assert threading.active_count() == threads, "a thread is left running in the namespace"
    assert mounts_at(path) == [namespace_id(path)]
    inside = netns.run_in(path, thread_namespace)
    assert inside == namespace_id(path)
    assert loopback_echo(path) == b"ping"


def test_the_namespace_outlives_the_process_that_made_it(netns_dir: str) -> None:
    code = ("import sys; from reconciler.network import netns; "
            "print(netns.create(sys.argv[1], 'web'))")
    made = subprocess.run([sys.executable, "-c", code, netns_dir], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr

    path = made.stdout.strip()
    assert netns.is_mounted(path)
    [lo] = netns.interfaces(path)
    assert lo.name == "lo" and lo.up
    assert loopback_echo(path) == b"ping"


def test_create_is_idempotent(netns_dir: str) -> None:
    first = netns.create(netns_dir, "web")
    identity = namespace_id(first)

    assert netns.create(netns_dir, "web") == first
    assert namespace_id(first) == identity
    assert mounts_at(first) == [identity], "a second create stacked a second mount"


def test_concurrent_creates_of_one_name_make_one_namespace(netns_dir: str) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(netns.create(netns_dir, "web"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 8 and len(set(results)) == 1
    assert len(mounts_at(results[0])) == 1


def test_many_namespaces_created_at_once_are_each_complete(netns_dir: str) -> None:
    names = [f"c{i}" for i in range(32)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        paths = list(pool.map(lambda name: netns.create(netns_dir, name), names))

    assert netns.list_names(netns_dir) == sorted(names)
    assert len({namespace_id(path) for path in paths}) == 32
    for path in paths:
        [lo] = netns.interfaces(path)
        assert lo.name == "lo" and lo.up


def test_create_reuses_a_file_left_by_a_create_cut_short(netns_dir: str) -> None:
    os.makedirs(netns_dir)
    Path(netns_dir, "web").touch()
    assert not netns.is_mounted(os.path.join(netns_dir, "web"))

    path = netns.create(netns_dir, "web")
    assert netns.is_mounted(path)
    assert names_in(path) == ["lo"]


def test_a_failed_create_leaves_nothing(netns_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise OSError(errno.EPERM, "lo: Operation not permitted")
    monkeypatch.setattr(netns, "_bring_up_loopback", fail)

    with pytest.raises(NetworkNamespaceError, match=r"cannot create the network namespace 'web' at .*/web: "
                                                     r"lo: Operation not permitted"):
        netns.create(netns_dir, "web")
    assert netns.list_names(netns_dir) == []
    assert mounts_at(os.path.join(netns_dir, "web")) == []


def test_create_refuses_what_is_not_a_plain_file_at_the_name(netns_dir: str) -> None:
    os.makedirs(os.path.join(netns_dir, "web"))
    os.symlink("/etc/hostname", os.path.join(netns_dir, "db"))
    mounted_on_target = mounts_at("/etc/hostname")

    with pytest.raises(NetworkNamespaceError, match=r"/web: a directory is there, not a namespace file; remove it"):
        netns.create(netns_dir, "web")
    with pytest.raises(NetworkNamespaceError, match=r"/db: a symbolic link is there, not a namespace file"):
        netns.create(netns_dir, "db")
    assert mounts_at("/etc/hostname") == mounted_on_target, "create mounted through the link"


@pytest.mark.parametrize("name", ["", ".", "..", "../web", "a/b", "web\n", ".hidden", "x" * 65, "we b"])
def test_names_are_validated(netns_dir: str, name: str) -> None:
    with pytest.raises(ValueError, match="network namespace"):
        netns.create(netns_dir, name)
    with pytest.raises(ValueError, match="network namespace"):
        netns.remove(netns_dir, name)
    assert not os.path.exists(netns_dir) or os.listdir(netns_dir) == []


# --- the directory's mount propagation ---------------------------------------------------------------

def peer_group(mount_point: str) -> int | None:
    """The N of "shared:N" of the top mount at `mount_point` (None: not shared, or no mount there)."""
    real = os.path.realpath(mount_point)
    group = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.partition(" - ")[0].split(" ")
            if fields[4] == real:
                group = next((int(f[7:]) for f in fields[6:] if f.startswith("shared:")), None)
    return group


def test_the_directory_becomes_a_shared_mount_of_its_own_under_a_shared_parent(tmp_path: Path) -> None:
    host = str(tmp_path / "host")   # stands for a / that systemd made shared
    os.makedirs(host)
    try:
        syscalls.mount(host, host, None, syscalls.MS_BIND)
        syscalls.mount(None, host, None, syscalls.MS_SHARED)
        directory = os.path.join(host, "netns")

        path = netns.create(directory, "web")
        group = peer_group(directory)
        assert group is not None and group != peer_group(host)
        assert len(mounts_at(path)) == 1, "the netns mount was propagated onto the directory underneath"

        netns.create(directory, "db")
        assert peer_group(directory) == group, "a later create changed the peer group running containers share"
    finally:
        for name in netns.list_names(os.path.join(host, "netns")):
            netns.remove(os.path.join(host, "netns"), name)
        unmount_everything_under(str(tmp_path))


@pytest.mark.parametrize("propagation", ["slave", "private"])
def test_removal_reaches_mount_namespaces_copied_from_the_agent(netns_dir: str, propagation: str) -> None:
    """A container's mount namespace starts as a copy of the agent's, netns mounts included; whether its
    launcher makes that copy a slave or private, remove() must not leave the namespace held there."""
    path = netns.create(netns_dir, "web")
    copy = subprocess.Popen(["unshare", "--mount", "--propagation", propagation, "sleep", "60"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{copy.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"),
                   what="the copied mount namespace")
        theirs = f"/proc/{copy.pid}/mountinfo"
        assert mounts_at(path, theirs) == [namespace_id(path)]

        netns.remove(netns_dir, "web")
        assert mounts_at(path, theirs) == [], "the copy still holds the namespace"
    finally:
        copy.kill()
        copy.wait()


# --- remove and orphans ----------------------------------------------------------------------------

def test_remove_frees_the_namespace(netns_dir: str) -> None:
    a = netns.create(netns_dir, "a")
    b = netns.create(netns_dir, "b")
    connect(a, b)
    assert "a0" in names_in(a)

    netns.remove(netns_dir, "b")

    assert mounts_at(b) == []
    assert not os.path.exists(b)
    assert netns.list_names(netns_dir) == ["a"]
    # The kernel destroys a veth with the namespace its end is in: a0 going away proves B was freed.
    wait_until(lambda: "a0" not in names_in(a), what="the kernel to free namespace b")
    netns.remove(netns_dir, "b")   # again: nothing to do, no error


def test_remove_cleans_a_half_created_namespace(netns_dir: str) -> None:
    os.makedirs(netns_dir)
    Path(netns_dir, "web").touch()

    netns.remove(netns_dir, "web")
    assert netns.list_names(netns_dir) == []
    netns.remove(netns_dir, "never-made")


def test_list_names_and_is_mounted_find_orphans(netns_dir: str) -> None:
    netns.create(netns_dir, "a")
    netns.create(netns_dir, "b")
    Path(netns_dir, "half").touch()                         # a create cut short
    Path(netns_dir, "other").touch()                        # something else mounted at a name
    syscalls.mount("/etc/hostname", os.path.join(netns_dir, "other"), None, syscalls.MS_BIND)
    os.makedirs(os.path.join(netns_dir, "subdir"))           # not namespace files: never listed
    Path(netns_dir, ".web.0123456789abcdef0123456789abcdef.tmp").touch()

    names = netns.list_names(netns_dir)
    assert names == ["a", "b", "half", "other"]
    assert [netns.is_mounted(os.path.join(netns_dir, n)) for n in names] == [True, True, False, False]

    for name in names:
        netns.remove(netns_dir, name)
    assert netns.list_names(netns_dir) == []
    assert [e for e in read_mountinfo() if e.mount_point.startswith(os.path.realpath(netns_dir) + "/")] == []


def test_remove_refuses_a_directory_at_the_name(netns_dir: str) -> None:
    os.makedirs(os.path.join(netns_dir, "web"))
    with pytest.raises(NetworkNamespaceError, match=r"cannot remove the network namespace 'web' at .*/web: "
                                                     r"a directory is there"):
        netns.remove(netns_dir, "web")


# --- run_in ----------------------------------------------------------------------------------------

def test_run_in_runs_inside_and_hands_back_result_and_exceptions(netns_dir: str) -> None:
    path = netns.create(netns_dir, "web")

    assert netns.run_in(path, thread_namespace) == namespace_id(path)

    class Boom(Exception):
        pass

    def fail() -> None:
        raise Boom("inside")
    with pytest.raises(Boom, match="inside"):
        netns.run_in(path, fail)


def test_run_in_refuses_what_is_not_a_namespace(netns_dir: str) -> None:
    os.makedirs(netns_dir)
    Path(netns_dir, "half").touch()

    with pytest.raises(NetworkNamespaceError, match=r"/half is not a network namespace \(nothing is mounted on it\)"):
        netns.run_in(os.path.join(netns_dir, "half"), thread_namespace)
    with pytest.raises(NetworkNamespaceError, match=r"cannot open the network namespace .*/gone: No such file"):
        netns.interfaces(os.path.join(netns_dir, "gone"))


def test_no_thread_of_the_caller_ever_changes_namespace(netns_dir: str) -> None:
    mine = thread_namespace()
    with other_thread_watched() as seen:
        path = netns.create(netns_dir, "web")
        assert thread_namespace() == mine
        netns.create(netns_dir, "web")
        assert thread_namespace() == mine
        netns.interfaces(path)
        assert thread_namespace() == mine
        netns.statistics(path)
        assert thread_namespace() == mine
        netns.run_in(path, thread_namespace)
        assert thread_namespace() == mine
        with pytest.raises(ZeroDivisionError):
            netns.run_in(path, lambda: 1 // 0)
        assert thread_namespace() == mine
        netns.list_names(netns_dir)
        netns.remove(netns_dir, "web")
        assert thread_namespace() == mine
    assert seen == {mine}


# --- interfaces and statistics -----------------------------------------------------------------

def test_interfaces_show_a_veth_with_its_address_and_counters(netns_dir: str) -> None:
    a = netns.create(netns_dir, "a")
    b = netns.create(netns_dir, "b")
    connect(a, b)
    receiver = udp_receiver(b, "192.0.2.2")
    try:
        a_before, b_before = netns.statistics(a), netns.statistics(b)
        send_udp(a, receiver.getsockname(), count=5, size=100)
        receiver.settimeout(5)
        assert [len(receiver.recv(1000)) for _ in range(5)] == [100] * 5
    finally:
        receiver.close()

    by_name = {i.name: i for i in netns.interfaces(a)}
    assert set(by_name) == {"lo", "a0"}
    a0 = by_name["a0"]
    assert a0.up and not a0.loopback and a0.mtu == 1500 and a0.mac
    assert [str(address) for address in a0.addresses] == ["192.0.2.1/24"]
    wire = 14 + 20 + 8 + 100   # Ethernet, IPv4 and UDP headers around each payload
    a_sent = netns.statistics(a)
    assert a_sent.tx_packets - a_before.tx_packets >= 5
    assert a_sent.tx_bytes - a_before.tx_bytes >= 5 * wire
    b_got = netns.statistics(b)
    assert b_got.rx_packets - b_before.rx_packets >= 5
    assert b_got.rx_bytes - b_before.rx_bytes >= 5 * wire
    assert (a_sent.tx_errors, a_sent.tx_dropped, b_got.rx_errors, b_got.rx_dropped) == (0, 0, 0, 0)

    stats = a_sent.as_resource_statistics()
    assert set(stats) == {"net_rx_packets", "net_rx_bytes", "net_rx_errors", "net_rx_dropped",
                          "net_tx_packets", "net_tx_bytes", "net_tx_errors", "net_tx_dropped"}
    assert stats["net_tx_bytes"] == a_sent.tx_bytes


def test_statistics_leave_loopback_traffic_out(netns_dir: str) -> None:
    a = netns.create(netns_dir, "a")
    b = netns.create(netns_dir, "b")
    connect(a, b)
    receiver = udp_receiver(a, "127.0.0.1")
    try:
        before = netns.statistics(a)
        lo_before = next(i for i in netns.interfaces(a) if i.loopback).statistics
        send_udp(a, receiver.getsockname(), count=50, size=1000)
    finally:
        receiver.close()

    lo_after = next(i for i in netns.interfaces(a) if i.loopback).statistics
    assert lo_after.rx_bytes - lo_before.rx_bytes >= 50 * 1000
    after = netns.statistics(a)
    assert after.rx_bytes - before.rx_bytes < 50 * 1000
    assert after.tx_bytes - before.tx_bytes < 50 * 1000
