"""The /etc files a container with a network of its own is given (someone else bind-mounts them
read-only): /etc/hosts, /etc/hostname and /etc/resolv.conf, as Mesos's network/cni isolator writes
them into its per-container directory, with Docker's and Kubernetes's habits where Mesos has none.

Where a container's DNS comes from, first that applies:
1. the DNS its networks' CNI results gave (Mesos: "if IPAM has not specified any DNS servers" the
   next source is used, so a result with search domains but no nameserver does not count);
2. --default_container_dns (DefaultContainerDns: Mesos's flag, its `mesos` entries);
3. the host's /etc/resolv.conf, without its loopback nameservers (127.0.0.0/8, ::1): they are
   listening in the host's network namespace, which the container cannot reach; its search domains
   and options are kept. When nothing but loopback was there (systemd-resolved's stub 127.0.0.53),
   or no nameserver at all (the resolver then asks 127.0.0.1), the servers systemd-resolved itself
   uses (/run/systemd/resolve/resolv.conf) are taken instead, as Docker does.
Still no nameserver: the file has none. Docker would add Google's 8.8.8.8 and 8.8.4.4 here; we do
not, on purpose: that would send every name a workload looks up (internal ones included) to a
third party without the operator having said so, and on a node whose egress is filtered it turns
a clear "no DNS" into a five-second timeout per lookup. The resolver then tries 127.0.0.1 in the
container's own namespace and fails at once; an operator who wants public DNS names it in
--default_container_dns. Nameservers given explicitly (1, 2) are kept as given, loopback included:
a container may run its own resolver on its own loopback.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler import fsutil

HOST_RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_RESOLV_CONF = "/run/systemd/resolve/resolv.conf"   # systemd-resolved's upstream servers

HOSTNAME_MAX_LENGTH = 64        # the kernel's UTS nodename (HOST_NAME_MAX), which the same name is set as
MAX_ADDRESSES = 64              # a container has one address per network, two with IPv6
MAX_NAMESERVERS = 16            # glibc uses the first 3; more is a mistake, many more an attack
MAX_SEARCH_DOMAINS = 32
MAX_OPTIONS = 32
MAX_OPTION_LENGTH = 64
MAX_RESOLV_CONF_BYTES = 64 * 1024

HOSTS_FILE, HOSTNAME_FILE, RESOLV_CONF_FILE = "hosts", "hostname", "resolv.conf"

# Docker's loopback lines (Kubernetes writes the same names, with wrong multicast addresses).
_LOCALHOST_LINES = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)
_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
# Search domains may hold '_' (Active Directory's do) and end with the root's '.'.
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?")
_OPTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- /etc/hostname and /etc/hosts --------------------------------------------------------------

def check_hostname(hostname: str) -> str:
    """`hostname`, if it is one: dot-separated labels of letters, digits and '-', at most 64 characters."""
    if not isinstance(hostname, str) or not hostname:
        raise ValueError("a container's hostname cannot be empty")
    if len(hostname) > HOSTNAME_MAX_LENGTH:
        raise ValueError(f"hostname {hostname[:HOSTNAME_MAX_LENGTH]!r}... is longer than {HOSTNAME_MAX_LENGTH} "
                         "characters, the most the kernel keeps as a host name")
    if not all(len(label) <= 63 and _HOSTNAME_LABEL.fullmatch(label) for label in hostname.split(".")):
        raise ValueError(f"hostname {hostname!r} is not valid: dot-separated labels of letters, digits and '-', "
                         "each at most 63 characters and not starting or ending with '-'")
    return hostname


def hostname_text(hostname: str) -> str:
    """The content of /etc/hostname."""
    return check_hostname(hostname) + "\n"


def hosts_text(hostname: str, addresses: Iterable[str | Address]) -> str:
    """The content of /etc/hosts: localhost for IPv4 and IPv6, then each of the container's addresses
    with its hostname (and its first label too, when the hostname is a qualified name, as Kubernetes
    does). Addresses may come with a prefix length ("10.1.2.3/24", as CNI results give them)."""
    names = check_hostname(hostname)
    short = hostname.split(".")[0]
    if short != hostname:
        names += " " + short
    lines = [f"{address}\t{names}\n" for address in parse_addresses(addresses)]
    return _LOCALHOST_LINES + "".join(lines)


def parse_addresses(addresses: Iterable[str | Address]) -> list[Address]:
    """The container's IP addresses, prefix lengths dropped, duplicates removed, order kept."""
    result: list[Address] = []
    for value in addresses:
        address = _parse_address(value)
        if address not in result:
            result.append(address)
        if len(result) > MAX_ADDRESSES:
            raise ValueError(f"a container cannot have more than {MAX_ADDRESSES} IP addresses in /etc/hosts")
    return result


def _parse_address(value: str | Address) -> Address:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        if isinstance(value, str):
            return ipaddress.ip_interface(value).ip
    except ValueError:
        pass
    raise ValueError(f"{str(value)[:64]!r} is not an IP address (as 10.1.2.3, 10.1.2.3/24 or fd00::2)")


# --- DNS -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DnsConfig:
    """What resolv.conf says: a CNI result's `dns` object, an entry of --default_container_dns, or
    what the host's file holds. Validated when made; `where` names its source in error messages."""

    nameservers: tuple[str, ...] = ()
    domain: str | None = None
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    where: str = field(default="the DNS configuration", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("nameservers", "search", "options"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"{name} in {self.where} must be a list of strings")
            object.__setattr__(self, name, tuple(value))
        _bounded(self.nameservers, MAX_NAMESERVERS, "nameservers", self.where)
        _bounded(self.search, MAX_SEARCH_DOMAINS, "search domains", self.where)
        _bounded(self.options, MAX_OPTIONS, "options", self.where)
        object.__setattr__(self, "nameservers", tuple(_check_nameserver(n, self.where) for n in self.nameservers))
        if self.domain is not None:
            if not isinstance(self.domain, str):
                raise ValueError(f"domain in {self.where} must be a string")
            _check_domain(self.domain, "domain", self.where)
        for domain in self.search:
            _check_domain(domain, "search domain", self.where)
        for option in self.options:
            _check_option(option, self.where)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None, where: str) -> DnsConfig:
        """From a CNI result's `dns` object, or a `dns` of --default_container_dns: nameservers,
        domain, search, options (all optional; other keys are refused, to catch a misspelling)."""
        if doc is None:
            return cls(where=where)
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where} must be an object with nameservers, domain, search and options")
        unknown = sorted(set(doc) - {"nameservers", "domain", "search", "options"})
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}: "
                             "expected nameservers, domain, search and options")
        domain = doc.get("domain") or None
        if domain is not None and not isinstance(domain, str):
            raise ValueError(f"domain in {where} must be a string")
        return cls(nameservers=_strings(doc, "nameservers", where), domain=domain,
                   search=_strings(doc, "search", where), options=_strings(doc, "options", where), where=where)

    @classmethod
    def merged(cls, configs: Iterable[DnsConfig], where: str = "the networks' DNS") -> DnsConfig:
        """Several networks' DNS as one, as Mesos merges its CNI results: lists joined in network order
        (duplicates dropped), the last domain given wins."""
        nameservers: list[str] = []
        search: list[str] = []
        options: list[str] = []
        domain = None
        for config in configs:
            _extend_unique(nameservers, config.nameservers)
            _extend_unique(search, config.search)
            _extend_unique(options, config.options)
            domain = config.domain or domain
        return cls(tuple(nameservers), domain, tuple(search), tuple(options), where=where)


@dataclass(frozen=True)
class DefaultContainerDns:
    """--default_container_dns for containers on CNI networks (Mesos's ContainerDNSInfo, its `mesos`
    entries with network_mode CNI): the DNS of one named network, else that of any network."""

    any_network: DnsConfig | None = None
    by_network: Mapping[str, DnsConfig] = field(default_factory=dict)

    def for_networks(self, networks: Sequence[str]) -> DnsConfig | None:
        """The default for a container on `networks` (in its order): the first one named, else any."""
        for network in networks:
            if network in self.by_network:
                return self.by_network[network]
        return self.any_network

    @classmethod
    def from_mesos_json(cls, doc: Mapping[str, Any], flag: str = "--default_container_dns") -> DefaultContainerDns:
        """From Mesos's flag value: {"mesos": [{"network_mode": "CNI", "network_name": "net1", "dns": {...}},
        {"network_mode": "HOST", ...}], "docker": [...]}. HOST entries concern containers on the host
        network, which are given no such files, and `docker` entries Docker containers: both ignored."""
        entries = doc.get("mesos", []) if isinstance(doc, Mapping) else None
        if not isinstance(entries, list):
            raise ValueError(f"{flag} must be an object whose 'mesos' field is a list")
        any_network: DnsConfig | None = None
        by_network: dict[str, DnsConfig] = {}
        for i, entry in enumerate(entries):
            where = f"{flag} mesos[{i}]"
            if not isinstance(entry, Mapping) or entry.get("network_mode") not in ("CNI", "HOST"):
                raise ValueError(f"{where} needs a network_mode of CNI or HOST")
            if entry["network_mode"] == "HOST":
                continue
            name = entry.get("network_name")
            dns = DnsConfig.from_json(entry.get("dns"), f"{where}.dns")
            if name is None:
                if any_network is not None:
                    raise ValueError(f"{where}: more than one CNI entry without a network_name")
                any_network = dns
            elif not isinstance(name, str) or not name or name in by_network:
                raise ValueError(f"{where}: network_name {name!r} is empty, not a string, or given twice")
            else:
                by_network[name] = dns
        return cls(any_network, by_network)


@dataclass(frozen=True)
class DnsChoice:
    """The DNS a container gets, where it came from (network, default_container_dns, host,
    systemd-resolved or none: worth a log line), and the host's loopback nameservers left out."""

    config: DnsConfig
    source: str
    dropped: tuple[str, ...] = ()


def choose_dns(network_dns: DnsConfig | None = None, default_dns: DnsConfig | None = None, *,
               host_resolv_conf: str = HOST_RESOLV_CONF,
               resolved_resolv_conf: str = RESOLVED_RESOLV_CONF) -> DnsChoice:
    """The container's DNS, from the first source that has a nameserver (see the module's notes)."""
    if network_dns is not None and network_dns.nameservers:
        return DnsChoice(network_dns, "network")
    if default_dns is not None and default_dns.nameservers:
        return DnsChoice(default_dns, "default_container_dns")
    host, dropped = _without_loopback(read_resolv_conf(host_resolv_conf))
    if host.nameservers:
        return DnsChoice(host, "host", dropped)
    # Only loopback there, or nothing (the resolver then asks 127.0.0.1): a local stub, whose own
    # servers systemd-resolved lists in its other file.
    resolved, _ = _without_loopback(read_resolv_conf(resolved_resolv_conf))
    if resolved.nameservers:
        return DnsChoice(resolved, "systemd-resolved", dropped)
    return DnsChoice(host, "none", dropped)


def resolv_conf_text(choice: DnsChoice) -> str:
    """The content of /etc/resolv.conf (domain, search, options, nameservers, in Mesos's order)."""
    config = choice.config
    lines = [f"# Written by reconciler {_SOURCE_WORDS[choice.source]}\n"]
    if choice.dropped:
        lines.append(f"# Left out, unreachable from this network namespace: {' '.join(choice.dropped)}\n")
    if config.domain:
        lines.append(f"domain {config.domain}\n")
    if config.search:
        lines.append(f"search {' '.join(config.search)}\n")
    if config.options:
        lines.append(f"options {' '.join(config.options)}\n")
    lines.extend(f"nameserver {nameserver}\n" for nameserver in config.nameservers)
    return "".join(lines)


_SOURCE_WORDS = {
    "network": "from the DNS of the container's CNI network(s).",
    "default_container_dns": "from --default_container_dns.",
    "host": "from the host's resolv.conf.",
    "systemd-resolved": "from systemd-resolved's upstream servers (the host's resolv.conf names only a local stub).",
    "none": "without a nameserver: none this container can reach was found in its network's DNS, "
            "--default_container_dns or the host's resolv.conf; set --default_container_dns.",
}


def read_resolv_conf(path: str = HOST_RESOLV_CONF) -> DnsConfig:
    """What a host's resolv.conf says, read as the resolver reads it: unknown lines and nameservers
    that are no IP address are skipped, the last domain or search line wins, lists are cut at the
    bounds. A missing file says nothing, nor does /dev/null (how some hosts say "no resolver"). Follows
    a link (/etc/resolv.conf often is one); anything else that is not a regular file (a FIFO, a
    directory, another device) is refused: fsutil.NotRegularFileError."""
    try:
        _, data = fsutil.read_config_file(path, limit=MAX_RESOLV_CONF_BYTES)
    except FileNotFoundError:
        return DnsConfig(where=path)
    except fsutil.NotRegularFileError:
        if os.path.realpath(path) == os.devnull:
            return DnsConfig(where=path)
        raise
    except fsutil.FileTooLargeError:
        raise ValueError(f"{path} is larger than {MAX_RESOLV_CONF_BYTES} bytes; "
                         "it cannot be a resolver configuration") from None
    nameservers: list[str] = []
    domain: str | None = None
    search: list[str] = []
    options: list[str] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        words = raw.split()
        if not words or words[0][0] in "#;":
            continue
        keyword, values = words[0], words[1:]
        if keyword == "nameserver" and values and _is_address(values[0]):
            _extend_unique(nameservers, values[:1])
        elif keyword == "domain" and values and _is_domain(values[0]):
            domain, search = values[0], []
        elif keyword == "search":
            domain, search = None, [v for v in values if _is_domain(v)]
        elif keyword == "options":
            _extend_unique(options, [v for v in values if _OPTION.fullmatch(v) and len(v) <= MAX_OPTION_LENGTH])
    return DnsConfig(tuple(nameservers[:MAX_NAMESERVERS]), domain, tuple(search[:MAX_SEARCH_DOMAINS]),
                     tuple(options[:MAX_OPTIONS]), where=path)


def is_loopback(nameserver: str) -> bool:
    """Whether `nameserver` listens on loopback (127.0.0.0/8, ::1): only reachable in its own namespace."""
    return ipaddress.ip_address(nameserver).is_loopback


def _without_loopback(config: DnsConfig) -> tuple[DnsConfig, tuple[str, ...]]:
    dropped = tuple(n for n in config.nameservers if is_loopback(n))
    kept = tuple(n for n in config.nameservers if not is_loopback(n))
    return DnsConfig(kept, config.domain, config.search, config.options, where=config.where), dropped


# --- writing them --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EtcFiles:
    """The paths written, to bind-mount read-only on the container's /etc/hosts, /etc/hostname and
    /etc/resolv.conf, and the DNS choice (for a log line)."""

    hosts: str
    hostname: str
    resolv_conf: str
    dns: DnsChoice


def write_files(directory: str, *, hostname: str, addresses: Iterable[str | Address],
                network_dns: DnsConfig | None = None, default_dns: DnsConfig | None = None,
                host_resolv_conf: str = HOST_RESOLV_CONF,
                resolved_resolv_conf: str = RESOLVED_RESOLV_CONF) -> EtcFiles:
    """Write hosts, hostname and resolv.conf into `directory`, each atomically, mode 0644.

    Everything is validated before the first write: bad input writes nothing. Not fsynced: a file is
    only ever used by a running container, and none survives the power loss that fsync guards against.
    A file is replaced, not rewritten: a container that has it mounted keeps the old one.
    """
    dns = choose_dns(network_dns, default_dns, host_resolv_conf=host_resolv_conf,
                     resolved_resolv_conf=resolved_resolv_conf)
    contents = {HOSTS_FILE: hosts_text(hostname, addresses), HOSTNAME_FILE: hostname_text(hostname),
                RESOLV_CONF_FILE: resolv_conf_text(dns)}
    paths = {name: os.path.join(directory, name) for name in contents}
    for name, text in contents.items():
        fsutil.atomic_write(paths[name], text.encode(), durable=False, mode=0o644)
    return EtcFiles(paths[HOSTS_FILE], paths[HOSTNAME_FILE], paths[RESOLV_CONF_FILE], dns)


# --- validation helpers ----------------------------------------------------------------------------

def _bounded(values: tuple[Any, ...], limit: int, what: str, where: str) -> None:
    if len(values) > limit:
        raise ValueError(f"{where} has {len(values)} {what}; at most {limit} are allowed")
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"{what} in {where} must be strings, got {value!r}")


def _check_nameserver(value: str, where: str) -> str:
    if not _is_address(value):
        raise ValueError(f"nameserver {value[:64]!r} in {where} is not an IP address")
    return str(ipaddress.ip_address(value))


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_domain(value: str, what: str, where: str) -> None:
    if not _is_domain(value):
        raise ValueError(f"{what} {value[:64]!r} in {where} is not a domain name: dot-separated labels of "
                         "letters, digits, '-' and '_', at most 253 characters")


def _is_domain(value: str) -> bool:
    name = value[:-1] if value.endswith(".") and value != "." else value
    return (0 < len(name) <= 253 and
            all(len(label) <= 63 and _DOMAIN_LABEL.fullmatch(label) for label in name.split(".")))


def _check_option(value: str, where: str) -> None:
    if len(value) > MAX_OPTION_LENGTH or not _OPTION.fullmatch(value):
        raise ValueError(f"option {value[:MAX_OPTION_LENGTH]!r} in {where} is not a resolver option "
                         "(as ndots:2, timeout:1, edns0, rotate)")


def _strings(doc: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"{key} in {where} must be a list of strings")
    return tuple(value)


def _extend_unique(target: list[str], values: Iterable[str]) -> None:
    for value in values:
        if value not in target:
            target.append(value)
