"""The /etc files of a container with its own network (reconciler/network/etc_files.py): what each file
says, where DNS comes from (the network, --default_container_dns, the host without its loopback
nameservers, systemd-resolved's servers, or nowhere), validation, and the atomic 0644 writes."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest

from reconciler.network import etc_files
from reconciler.network.etc_files import DefaultContainerDns, DnsChoice, DnsConfig

LOCALHOST = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


@pytest.fixture
def host(tmp_path: Path) -> dict[str, str]:
    """Paths standing for the host's /etc/resolv.conf and systemd-resolved's file (neither exists yet)."""
    return {"host_resolv_conf": str(tmp_path / "etc-resolv.conf"),
            "resolved_resolv_conf": str(tmp_path / "resolved-resolv.conf")}


def choose(host: dict[str, str], network: DnsConfig | None = None, default: DnsConfig | None = None) -> DnsChoice:
    return etc_files.choose_dns(network, default, **host)


def nameserver_lines(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("nameserver ")]


# --- /etc/hostname and /etc/hosts --------------------------------------------------------------

def test_hostname_file_is_the_name_and_a_newline() -> None:
    assert etc_files.hostname_text("web-1") == "web-1\n"
    assert etc_files.hostname_text("web-1.prod.example.com") == "web-1.prod.example.com\n"


def test_hosts_maps_localhost_and_each_container_address_to_its_hostname() -> None:
    text = etc_files.hosts_text("web", ["10.1.2.3/24", "fd00::2/64", "10.1.2.3"])
    assert text == LOCALHOST + "10.1.2.3\tweb\nfd00::2\tweb\n"


def test_hosts_gives_a_qualified_hostname_its_short_name_too() -> None:
    text = etc_files.hosts_text("web.prod.example.com", [ipaddress.ip_address("192.0.2.7")])
    assert text.endswith("192.0.2.7\tweb.prod.example.com web\n")


def test_hosts_without_addresses_is_localhost_only() -> None:
    assert etc_files.hosts_text("web", []) == LOCALHOST


@pytest.mark.parametrize("hostname, message", [
    ("", "cannot be empty"),
    ("-web", "is not valid"),
    ("web-", "is not valid"),
    ("we_b", "is not valid"),
    ("web\nevil", "is not valid"),
    ("web..com", "is not valid"),
    ("a" * 64 + ".b", "longer than 64 characters"),
    ("a" * 65, "longer than 64 characters"),
    ("a" * 64, "each at most 63 characters"),
])
def test_bad_hostnames_are_refused(hostname: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        etc_files.hostname_text(hostname)
    with pytest.raises(ValueError, match=message):
        etc_files.hosts_text(hostname, ["10.1.2.3"])


def test_a_64_character_hostname_is_the_longest_allowed() -> None:
    name = "a" * 31 + "." + "b" * 32
    assert etc_files.hostname_text(name) == name + "\n"


@pytest.mark.parametrize("address", ["10.1.2", "10.1.2.3/33", "web", "10.1.2.3 evil", "", 167837955])
def test_bad_addresses_are_refused(address: object) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        etc_files.hosts_text("web", [address])  # type: ignore[list-item]


def test_too_many_addresses_are_refused() -> None:
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(etc_files.MAX_ADDRESSES + 1)]
    with pytest.raises(ValueError, match=f"more than {etc_files.MAX_ADDRESSES} IP addresses"):
        etc_files.hosts_text("web", addresses)


# --- DNS from the network (CNI result) -----------------------------------------------------------

def test_the_networks_dns_comes_first_and_is_written_in_mesos_order(host: dict[str, str]) -> None:
    Path(host["host_resolv_conf"]).write_text("nameserver 192.0.2.53\n")
    network = DnsConfig.from_json({"nameservers": ["10.0.0.10", "fd00::10"], "domain": "prod.example.com",
                                   "search": ["svc.cluster.local", "corp."], "options": ["ndots:5", "edns0"]},
                                  "the CNI result of network 'bridge'")
    default = DnsConfig(("192.0.2.1",))

    choice = choose(host, network, default)
    assert choice.source == "network"
    assert etc_files.resolv_conf_text(choice) == (
        "# Written by reconciler from the DNS of the container's CNI network(s).\n"
        "domain prod.example.com\n"
        "search svc.cluster.local corp.\n"
        "options ndots:5 edns0\n"
        "nameserver 10.0.0.10\n"
        "nameserver fd00::10\n")


def test_a_network_dns_without_nameservers_does_not_count(host: dict[str, str]) -> None:
    network = DnsConfig(search=("svc.cluster.local",))
    choice = choose(host, network, DnsConfig(("192.0.2.1",)))
    assert choice.source == "default_container_dns"
    assert nameserver_lines(etc_files.resolv_conf_text(choice)) == ["192.0.2.1"]


def test_explicit_loopback_nameservers_are_kept(host: dict[str, str]) -> None:
    # A container may run its own resolver on its own loopback: what a network or operator names is kept.
    choice = choose(host, DnsConfig(("127.0.0.1",)))
    assert nameserver_lines(etc_files.resolv_conf_text(choice)) == ["127.0.0.1"]
    assert choice.dropped == ()


def test_several_networks_dns_merge_in_order(host: dict[str, str]) -> None:
    merged = DnsConfig.merged([
        DnsConfig(("10.0.0.10",), "a.example.com", ("a.example.com",), ("ndots:2",)),
        DnsConfig(("10.1.0.10", "10.0.0.10"), "b.example.com", ("b.example.com",), ("ndots:2", "rotate")),
    ])
    assert merged == DnsConfig(("10.0.0.10", "10.1.0.10"), "b.example.com", ("a.example.com", "b.example.com"),
                               ("ndots:2", "rotate"))


@pytest.mark.parametrize("doc, message", [
    ({"nameservers": ["10.0.0"]}, r"nameserver '10.0.0' in the CNI result of network 'n' is not an IP address"),
    ({"nameservers": "10.0.0.1"}, r"nameservers in the CNI result of network 'n' must be a list"),
    ({"nameservers": [10]}, r"nameservers in the CNI result of network 'n' must be strings"),
    ({"search": ["ok.com", "bad domain"]}, r"search domain 'bad domain' in .* is not a domain name"),
    ({"search": ["x" * 64 + ".com"]}, r"is not a domain name"),
    ({"domain": "evil\nnameserver 6.6.6.6"}, r"domain .* is not a domain name"),
    ({"options": ["ndots:5\nnameserver 6.6.6.6"]}, r"option .* is not a resolver option"),
    ({"options": ["a" * 65]}, r"is not a resolver option"),
    ({"nameservers": ["10.0.0.1"] * 17}, r"has 17 nameservers; at most 16 are allowed"),
    ({"nameserver": ["10.0.0.1"]}, r"unknown field\(s\) 'nameserver'"),
    (["10.0.0.1"], r"must be an object"),
])
def test_bad_dns_is_refused_naming_where_it_came_from(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DnsConfig.from_json(doc, "the CNI result of network 'n'")  # type: ignore[arg-type]


def test_scoped_ipv6_nameservers_are_accepted() -> None:
    assert DnsConfig(("fe80::1%eth0",)).nameservers == ("fe80::1%eth0",)


# --- --default_container_dns ---------------------------------------------------------------------

def test_default_container_dns_is_used_when_the_network_gives_none(host: dict[str, str]) -> None:
    Path(host["host_resolv_conf"]).write_text("nameserver 192.0.2.53\n")
    choice = choose(host, None, DnsConfig(("192.0.2.1", "192.0.2.2"), search=("corp.example.com",)))
    text = etc_files.resolv_conf_text(choice)
    assert choice.source == "default_container_dns"
    assert "# Written by reconciler from --default_container_dns.\n" in text
    assert nameserver_lines(text) == ["192.0.2.1", "192.0.2.2"]
    assert "search corp.example.com\n" in text


def test_default_container_dns_reads_mesos_flag_format() -> None:
    flag = DefaultContainerDns.from_mesos_json({
        "mesos": [
            {"network_mode": "CNI", "network_name": "net1", "dns": {"nameservers": ["192.0.2.1"]}},
            {"network_mode": "CNI", "dns": {"nameservers": ["192.0.2.9"], "search": ["example.com"]}},
            {"network_mode": "HOST", "dns": {"nameservers": ["192.0.2.8"]}},
        ],
        "docker": [{"network_mode": "BRIDGE", "dns": {"nameservers": ["8.8.8.8"]}}],
    })
    assert flag.for_networks(["net1"]) == DnsConfig(("192.0.2.1",))
    assert flag.for_networks(["net2", "net1"]) == DnsConfig(("192.0.2.1",))
    assert flag.for_networks(["net2"]) == DnsConfig(("192.0.2.9",), search=("example.com",))
    assert DefaultContainerDns().for_networks(["net1"]) is None


@pytest.mark.parametrize("doc, message", [
    ({"mesos": {}}, r"'mesos' field is a list"),
    ({"mesos": [{"network_mode": "BRIDGE"}]}, r"mesos\[0\] needs a network_mode of CNI or HOST"),
    ({"mesos": [{"network_mode": "CNI"}, {"network_mode": "CNI"}]}, r"mesos\[1\]: more than one CNI entry"),
    ({"mesos": [{"network_mode": "CNI", "network_name": "n"}, {"network_mode": "CNI", "network_name": "n"}]},
     r"network_name 'n' is empty, not a string, or given twice"),
    ({"mesos": [{"network_mode": "CNI", "dns": {"nameservers": ["x"]}}]},
     r"nameserver 'x' in --default_container_dns mesos\[0\].dns is not an IP address"),
])
def test_bad_default_container_dns_is_refused(doc: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DefaultContainerDns.from_mesos_json(doc)


# --- the host's resolv.conf --------------------------------------------------------------------

def test_the_hosts_file_is_used_without_its_loopback_nameservers(host: dict[str, str]) -> None:
    Path(host["host_resolv_conf"]).write_text(
        "# managed by someone\n"
        "nameserver 127.0.0.53\n"
        "nameserver 192.0.2.53\n"
        "nameserver ::1\n"
        "nameserver 127.1.2.3\n"
        "nameserver 2001:db8::53\n"
        "search corp.example.com lab.example.com\n"
        "options edns0 trust-ad\n"
        "sortlist 130.155.160.0/255.255.240.0\n")

    choice = choose(host)
    text = etc_files.resolv_conf_text(choice)
    assert choice.source == "host"
    assert choice.dropped == ("127.0.0.53", "::1", "127.1.2.3")
    assert nameserver_lines(text) == ["192.0.2.53", "2001:db8::53"]
    assert "search corp.example.com lab.example.com\n" in text
    assert "options edns0 trust-ad\n" in text
    assert "# Left out, unreachable from this network namespace: 127.0.0.53 ::1 127.1.2.3\n" in text


def test_a_systemd_resolved_stub_is_replaced_by_its_upstream_servers(host: dict[str, str]) -> None:
    Path(host["host_resolv_conf"]).write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n")
    Path(host["resolved_resolv_conf"]).write_text("nameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch lan\n")

    choice = choose(host)
    text = etc_files.resolv_conf_text(choice)
    assert choice.source == "systemd-resolved"
    assert nameserver_lines(text) == ["192.0.2.1", "192.0.2.2"]
    assert "search lan\n" in text
    assert "127.0.0.53" not in nameserver_lines(text)


def test_no_reachable_nameserver_anywhere_gives_none_not_a_public_one(host: dict[str, str]) -> None:
    Path(host["host_resolv_conf"]).write_text("nameserver 127.0.0.53\nsearch lan\n")
    Path(host["resolved_resolv_conf"]).write_text("nameserver 127.0.0.1\n")

    choice = choose(host)
    text = etc_files.resolv_conf_text(choice)
    assert choice.source == "none"
    assert nameserver_lines(text) == []
    assert "8.8.8.8" not in text
    assert "search lan\n" in text
    assert "set --default_container_dns" in text


def test_a_missing_host_file_gives_no_nameserver(host: dict[str, str]) -> None:
    choice = choose(host)
    assert choice.source == "none"
    assert nameserver_lines(etc_files.resolv_conf_text(choice)) == []


def test_the_host_file_is_read_as_the_resolver_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "; a comment\n"
        "nameserver not-an-address\n"
        "nameserver 192.0.2.1 trailing words\n"
        "nameserver 192.0.2.1\n"
        "search one.example.com\n"
        "domain two.example.com\n"            # the last of domain and search wins
        "options ndots:2 bad\x01option\n")
    config = etc_files.read_resolv_conf(str(path))
    assert config == DnsConfig(("192.0.2.1",), "two.example.com", (), ("ndots:2",))


def test_a_huge_host_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"#" * (etc_files.MAX_RESOLV_CONF_BYTES + 1))
    with pytest.raises(ValueError, match=r"resolv.conf is larger than 65536 bytes"):
        etc_files.read_resolv_conf(str(path))


def test_the_hosts_file_is_read_through_a_link(tmp_path: Path) -> None:
    # /etc/resolv.conf is often a link (to systemd-resolved's stub-resolv.conf).
    (tmp_path / "stub").write_text("nameserver 192.0.2.1\n")
    (tmp_path / "resolv.conf").symlink_to(tmp_path / "stub")
    assert etc_files.read_resolv_conf(str(tmp_path / "resolv.conf")).nameservers == ("192.0.2.1",)


@pytest.mark.parametrize("nameserver, loopback", [
    ("127.0.0.53", True), ("127.255.255.254", True), ("::1", True),
    ("128.0.0.1", False), ("10.0.0.1", False), ("::2", False), ("fe80::1%eth0", False),
])
def test_which_nameservers_count_as_loopback(nameserver: str, loopback: bool) -> None:
    assert etc_files.is_loopback(nameserver) is loopback


# --- write_files --------------------------------------------------------------------------------

def test_write_files_writes_the_three_files_0644(tmp_path: Path, host: dict[str, str]) -> None:
    Path(host["host_resolv_conf"]).write_text("nameserver 192.0.2.53\n")
    directory = tmp_path / "container"
    directory.mkdir()
    old_umask = os.umask(0o077)
    try:
        written = etc_files.write_files(str(directory), hostname="web", addresses=["10.1.2.3/24"], **host)
    finally:
        os.umask(old_umask)

    assert Path(written.hosts).read_text() == LOCALHOST + "10.1.2.3\tweb\n"
    assert Path(written.hostname).read_text() == "web\n"
    assert nameserver_lines(Path(written.resolv_conf).read_text()) == ["192.0.2.53"]
    assert written.dns.source == "host"
    assert sorted(os.listdir(directory)) == ["hostname", "hosts", "resolv.conf"]   # no temp file left
    for path in (written.hosts, written.hostname, written.resolv_conf):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_write_files_replaces_the_files_and_never_follows_a_planted_link(tmp_path: Path, host: dict[str, str]) -> None:
    directory = tmp_path / "container"
    directory.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (directory / "hosts").symlink_to(victim)

    etc_files.write_files(str(directory), hostname="web", addresses=["10.1.2.3"], network_dns=DnsConfig(("10.0.0.10",)),
                          **host)
    assert victim.read_text() == "keep me\n"
    assert not (directory / "hosts").is_symlink()

    etc_files.write_files(str(directory), hostname="db", addresses=["10.1.2.4"], network_dns=DnsConfig(("10.0.0.10",)),
                          **host)
    assert (directory / "hostname").read_text() == "db\n"
    assert (directory / "hosts").read_text().endswith("10.1.2.4\tdb\n")


def test_write_files_writes_nothing_when_an_input_is_bad(tmp_path: Path, host: dict[str, str]) -> None:
    directory = tmp_path / "container"
    directory.mkdir()
    with pytest.raises(ValueError, match="is not an IP address"):
        etc_files.write_files(str(directory), hostname="web", addresses=["10.1.2.3", "nope"], **host)
    with pytest.raises(ValueError, match="is not valid"):
        etc_files.write_files(str(directory), hostname="-web", addresses=["10.1.2.3"], **host)
    assert os.listdir(directory) == []


def test_a_resolv_conf_linked_to_dev_null_says_nothing_and_a_fifo_is_refused(tmp_path) -> None:
    import os

    import pytest

    from reconciler import fsutil
    from reconciler.network.etc_files import read_resolv_conf
    null = tmp_path / "resolv-null.conf"
    null.symlink_to(os.devnull)
    assert read_resolv_conf(str(null)).nameservers == ()
    fifo = tmp_path / "resolv-fifo.conf"
    os.mkfifo(fifo)
    with pytest.raises(fsutil.NotRegularFileError):
        read_resolv_conf(str(fifo))     # refused at once, not read (a FIFO would hang the launch)
