"""A CNI client: network configuration files, plugin chains, results (CNI spec 0.1.0 to 1.0.0).

It knows nothing of containers: the network/cni isolator hands it a network namespace path, a
container id and an interface name, and checkpoints what it gets back.

Better than Mesos, which speaks CNI 0.2.0 with one plugin per network:

* Configuration files (`.conf`, `.conflist`, `.json`) are read in lexical order of their names, all
  three kinds together (as containerd's and CRI-O's loaders do with libcni's ConfFiles; libcni's own
  LoadConfList looks at `.conflist` files first), and re-read on every call; a `.conf` is a list of
  one plugin, and a `.conf`/`.json` holding `plugins` is taken as the list it is. A file that does not
  parse or validate is reported with its path and reason and skipped; a second file naming a network
  already defined is reported and ignored (the first file wins). Reasons never quote a file's content
  beyond a short snippet: configurations may hold credentials.
* Plugin chains follow the spec: ADD runs the plugins in order, each given the previous one's result
  as `prevResult`; DEL runs them in reverse with the result cached at ADD (CNI >= 0.4.0); CHECK runs
  them in order with it (CNI >= 0.4.0, never where `disableCheck` is set, and not for a plugin whose
  CHECK is known to fail on healthy containers, see KNOWN_BROKEN_CHECKS). An ADD that fails part-way
  is undone at once by a DEL of the whole chain, as the spec recommends, so nothing is left for a
  caller that gives up. DEL is idempotent: plugins succeed when what they would remove is gone, a
  plugin answering "unknown container" (CNI error 3) counts as done, and a namespace that no longer
  exists is not passed (the spec's "without CNI_NETNS, clean up what you can").
* A plugin runs with a clean environment (the CNI_* variables and a fixed PATH, for the iptables
  and ip tools plugins call), in its own process group, for at most `timeout` seconds: a plugin that
  hangs is killed with everything it started, and the error says so.
* Results of every version parse into one `Result`. Each plugin's result is passed on unchanged
  when its version is the list's; otherwise it is converted to the list's version first (see
  `convert_result`), as is a cached result given to DEL or CHECK with a configuration of another
  version.
* `NetworkConfigList.to_json()` and `Result.to_json()` give the exact configuration list an ADD used
  and the result it returned, for a checkpoint (`Attachment` keeps both with the ADD's arguments):
  the DEL that reads them back does what that ADD did, whatever the configuration directory holds
  by then.

Port mappings on 127.0.0.1 (portmap 1.1.1, bridge): they work with portmap's default `snat: true`,
which jumps to its DNAT chain from OUTPUT for local destinations, marks connections from 127.0.0.1 for
masquerade and sets `route_localnet` on the host interface that routes to the container, and with a
bridge that has an address (`isGateway: true`), which the masquerade needs as source and which gives
the host its route to the subnet. With `snat: false`, or a bridge without an address, a connection to
127.0.0.1:<hostPort> goes unanswered (tried here with Debian's 1.1.1).

Error messages keep Mesos's wording where it has one ("Unknown CNI network 'x'", "The CNI plugin
'bridge' failed to attach container ... to CNI network ...").
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from reconciler.fsutil import FileTooLargeError, NotRegularFileError, read_config_file
from reconciler.linux import DEFAULT_PATH
from reconciler.units import quoted

log = logging.getLogger(__name__)

CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
MAX_CONFIG_BYTES = 1 << 20  # far above any real configuration; bounds what a bad file costs
DEFAULT_TIMEOUT = 60.0
# What a plugin may print: results are a few kilobytes; beyond this something is wrong.
MAX_STDOUT_BYTES = 4 << 20
MAX_STDERR_KEPT = 64 << 10
SNIPPET_CHARS = 300  # how much of a plugin's stdout/stderr an error message quotes
# Plugins call iptables, ip, tc, ...; the agent's own PATH is not theirs to inherit.
PLUGIN_PATH_ENV = DEFAULT_PATH

# CNI's rule for network names and container ids (libcni utils.ValidateNetworkName/ContainerID).
_NAME_RE = r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$"
_IFNAME_FORBIDDEN = re.compile(r"[/:\s]")
_CNI_ARG_KEY_RE = re.compile(r"^[A-Za-z0-9_\-.]+$")
_ABOUT_RE = re.compile(r"CNI (\S+) plugin (?:v(\d+)\.(\d+)\.(\d+)|version unknown)")

CniVersion = Literal["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
SUPPORTED_VERSIONS: tuple[str, ...] = get_args(CniVersion)
_LEGACY_RESULT_VERSIONS = ("0.1.0", "0.2.0")  # ip4/ip6 results; later ones have interfaces and ips


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def _at_least(version: str, minimum: str) -> bool:
    return _version_tuple(version) >= _version_tuple(minimum)


# --- errors -------------------------------------------------------------------------------------

class CNIError(Exception):
    """Anything this module refuses or a plugin fails at; the message is meant for an operator."""


class NetworkConfigError(CNIError):
    """The configuration directory, or a configuration list read back from a checkpoint, is unusable."""


class UnknownNetworkError(CNIError):
    """No valid configuration names the network."""


class PluginNotFoundError(CNIError):
    """A plugin's executable is in none of the plugin directories."""


class CNIArgumentError(CNIError, ValueError):
    """A container id, interface name or CNI_ARGS entry the CNI spec does not allow."""


class PluginError(CNIError):
    """A plugin failed, printed something unusable, or was killed after the timeout."""

    def __init__(self, message: str, *, plugin: str, network: str, command: str, code: int | None = None,
                 msg: str = "", details: str = "", stdout: str = "", stderr: str = "",
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.network = network
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out


# --- configuration ------------------------------------------------------------------------------

def _plugin_file_name(value: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\x00" in value:
        raise ValueError("must be the file name of a plugin in the plugin directories (no '/')")
    return value


_PluginType = Annotated[str, StringConstraints(max_length=255), AfterValidator(_plugin_file_name)]


class _IpamDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: _PluginType


class _PluginDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: _PluginType
    capabilities: dict[str, bool] = {}
    ipam: _IpamDoc | None = None


class _ListDoc(BaseModel):
    """A configuration list: the edge where a file (or a checkpoint) becomes a NetworkConfigList."""
    model_config = ConfigDict(extra="allow")
    cniVersion: CniVersion
    name: Annotated[str, StringConstraints(max_length=255)]
    disableCheck: bool = False
    plugins: list[_PluginDoc] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _cni_network_name(cls, value: str) -> str:
        if not re.match(_NAME_RE, value):
            raise ValueError("must start with a letter or digit, followed by letters, digits, '_', '.' or '-' "
                             "(CNI's rule for network names)")
        return value

    @field_validator("disableCheck", mode="before")
    @classmethod
    def _true_or_false(cls, value: Any) -> Any:
        # The spec writes it as a string ("true"/"false"); libcni accepts a JSON boolean too.
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value


@dataclass(frozen=True)
class PluginConfig:
    """One plugin of a list: its `type`, the capabilities it declares, and its configuration as written."""
    type: str
    capabilities: Mapping[str, bool]
    conf: Mapping[str, Any]

    @property
    def ipam_type(self) -> str | None:
        ipam = self.conf.get("ipam")
        return ipam.get("type") if isinstance(ipam, dict) else None


@dataclass(frozen=True)
class NetworkConfigList:
    """A CNI network: its name, CNI version and plugin chain. `source` says where it was read."""
    name: str
    cni_version: str
    disable_check: bool
    plugins: tuple[PluginConfig, ...]
    document: Mapping[str, Any]
    source: str = field(default="", compare=False)  # where it was read: not part of what it is

    def to_json(self) -> dict[str, Any]:
        """The configuration list exactly as used (a `.conf` as its one-plugin list), for a checkpoint."""
        return copy.deepcopy(dict(self.document))

    @classmethod
    def from_json(cls, document: Any, source: str = "checkpoint") -> NetworkConfigList:
        """A list read back from `to_json()`; validated as a file is. Raises NetworkConfigError."""
        try:
            return _config_list(document, source)
        except _InvalidConfig as e:
            raise NetworkConfigError(f"{source}: {e}") from None


@dataclass(frozen=True)
class ConfigProblem:
    """A configuration file that was skipped, and why."""
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class NetworkScan:
    """What a configuration directory holds: the valid networks by name, and the files skipped."""
    networks: dict[str, NetworkConfigList] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)


class _InvalidConfig(Exception):
    pass


def _describe_validation_error(error: ValidationError) -> str:
    """Pydantic's errors by field, without the offending values (they may be secrets)."""
    parts = []
    for item in error.errors()[:3]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"field '{where}': {msg}" if where else msg)
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _as_list_document(document: dict[str, Any], path: str) -> dict[str, Any]:
    """A `.conf` is one plugin: it becomes a list of that plugin with its name and version."""
    if path.endswith(".conflist") or "plugins" in document:
        return document  # a list (some put lists in .json files; libcni would refuse those)
    plugin = {k: v for k, v in document.items() if k not in ("name", "cniVersion")}
    return {"cniVersion": document.get("cniVersion"), "name": document.get("name"), "plugins": [plugin]}


def _config_list(document: Any, source: str) -> NetworkConfigList:
    if not isinstance(document, dict):
        raise _InvalidConfig("is not a JSON object")
    document = _as_list_document(document, source)
    if "cniVersion" not in document or document["cniVersion"] is None:
        raise _InvalidConfig(f"has no 'cniVersion'; set it to one of {', '.join(SUPPORTED_VERSIONS)}")
    try:
        doc = _ListDoc.model_validate(document)
    except ValidationError as e:
        raise _InvalidConfig(_describe_validation_error(e)) from None
    plugins = tuple(PluginConfig(type=p.type, capabilities=dict(p.capabilities), conf=raw)
                    for p, raw in zip(doc.plugins, document["plugins"], strict=True))
    return NetworkConfigList(name=doc.name, cni_version=doc.cniVersion, disable_check=doc.disableCheck,
                             plugins=plugins, document=document, source=source)


def _load_config_file(path: str) -> NetworkConfigList:
    try:
        _, data = read_config_file(path, limit=MAX_CONFIG_BYTES)
    except NotRegularFileError:
        raise _InvalidConfig("is not a regular file") from None
    except FileTooLargeError as e:
        if e.size is None:        # it grew past the limit while read
            raise _InvalidConfig(f"is more than the {MAX_CONFIG_BYTES} bytes a CNI configuration may have "
                                 "here") from None
        raise _InvalidConfig(f"is {e.size} bytes, more than the {MAX_CONFIG_BYTES} a CNI configuration may have "
                             "here") from None
    except OSError as e:
        raise _InvalidConfig(f"cannot be read: {e.strerror}") from None
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _InvalidConfig("is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _InvalidConfig(f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return _config_list(document, path)


def _config_file_names(config_dir: str) -> list[str]:
    try:
        names = os.listdir(config_dir)
    except FileNotFoundError:
        raise NetworkConfigError(f"The CNI network configuration directory '{config_dir}' does not exist") from None
    except NotADirectoryError:
        raise NetworkConfigError(f"The CNI network configuration directory '{config_dir}' is not a directory") from None
    except PermissionError:
        raise NetworkConfigError(f"The CNI network configuration directory '{config_dir}' cannot be read "
                                 "(permission denied)") from None
    return sorted(n for n in names if n.endswith(CONFIG_EXTENSIONS))


def scan_networks(config_dir: str) -> NetworkScan:
    """Every network in `config_dir`, read now, with the files that had to be skipped and why."""
    scan = NetworkScan()
    for name in _config_file_names(config_dir):
        path = os.path.join(config_dir, name)
        try:
            network = _load_config_file(path)
        except _InvalidConfig as e:
            scan.problems.append(ConfigProblem(path, str(e)))
            continue
        first = scan.networks.get(network.name)
        if first is not None:
            scan.problems.append(ConfigProblem(
                path, f"defines CNI network '{network.name}' again; {first.source} defines it first, so "
                      "this file is ignored"))
            continue
        scan.networks[network.name] = network
    return scan


def load_networks(config_dir: str) -> dict[str, NetworkConfigList]:
    """The valid networks in `config_dir` by name; every skipped file is logged as an error."""
    scan = scan_networks(config_dir)
    for problem in scan.problems:
        log.error("Skipping CNI network configuration %s", problem)
    return scan.networks


def get_network(config_dir: str, name: str) -> NetworkConfigList:
    """The network `name` as `config_dir` defines it now; UnknownNetworkError (Mesos's words) if none does."""
    scan = scan_networks(config_dir)
    network = scan.networks.get(name)
    if network is not None:
        return network
    message = f"Unknown CNI network '{name}'"
    if scan.problems:
        skipped = "; ".join(str(p) for p in scan.problems[:3])
        message += f" ({len(scan.problems)} configuration file(s) in {config_dir} were skipped: {skipped})"
    raise UnknownNetworkError(message)


# --- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path for an interface inside the container; empty on the host


@dataclass(frozen=True)
class IPConfig:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface  # with its prefix length
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    interface: int | None = None  # index into Result.interfaces; None when the plugin did not say


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def _field(doc: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"'{where}{key}' is not a {kind.__name__}")
    return value


def _parse_address(text: Any, where: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if not isinstance(text, str) or "/" not in text:
        raise ValueError(f"'{where}' is not an address with a prefix length")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"'{where}' ({quoted(text)}) is not an address with a prefix length") from None


def _parse_ip(text: Any, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text in (None, ""):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"'{where}' ({quoted(text)}) is not an IP address") from None


def _parse_route(doc: Any, where: str) -> Route:
    if not isinstance(doc, dict):
        raise ValueError(f"'{where}' is not an object")
    try:
        dst = ipaddress.ip_network(str(doc["dst"]), strict=False)
    except (KeyError, ValueError):
        raise ValueError(f"'{where}.dst' is not a network in CIDR notation") from None
    return Route(dst=dst, gw=_parse_ip(doc.get("gw"), f"{where}.gw"))


def _parse_dns(doc: Any) -> DNS:
    if doc is None:
        return DNS()
    if not isinstance(doc, dict):
        raise ValueError("'dns' is not an object")
    lists = {}
    for key in ("nameservers", "search", "options"):
        value = _field(doc, key, list, "dns.", [])
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"'dns.{key}' is not a list of strings")
        lists[key] = tuple(value)
    return DNS(domain=_field(doc, "domain", str, "dns.", "") or "", **lists)


def _parse_legacy(doc: Mapping[str, Any]) -> tuple[tuple[IPConfig, ...], tuple[Route, ...]]:
    """0.1.0/0.2.0: one `ip4` and one `ip6`, each with its routes, no interfaces."""
    ips, routes = [], []
    for key in ("ip4", "ip6"):
        entry = _field(doc, key, dict, "")
        if entry is None:
            continue
        ips.append(IPConfig(address=_parse_address(entry.get("ip"), f"{key}.ip"),
                            gateway=_parse_ip(entry.get("gateway"), f"{key}.gateway")))
        entry_routes = _field(entry, "routes", list, f"{key}.", [])
        routes += [_parse_route(r, f"{key}.routes[{i}]") for i, r in enumerate(entry_routes)]
    return tuple(ips), tuple(routes)


def _parse_current(doc: Mapping[str, Any]) -> tuple[tuple[Interface, ...], tuple[IPConfig, ...], tuple[Route, ...]]:
    """0.3.0 and later: interfaces, ips indexing them, routes. (0.3.0 plugins may say `ip` for `ips`.)"""
    interfaces = []
    for i, entry in enumerate(_field(doc, "interfaces", list, "", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"'interfaces[{i}]' has no name")
        interfaces.append(Interface(name=entry["name"], mac=str(entry.get("mac") or ""),
                                    sandbox=str(entry.get("sandbox") or "")))
    ips = []
    key = "ips" if "ips" in doc else "ip"
    for i, entry in enumerate(_field(doc, key, list, "", [])):
        if not isinstance(entry, dict):
            raise ValueError(f"'{key}[{i}]' is not an object")
        index = entry.get("interface")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            raise ValueError(f"'{key}[{i}].interface' is not an index into 'interfaces'")
        ips.append(IPConfig(address=_parse_address(entry.get("address"), f"{key}[{i}].address"),
                            gateway=_parse_ip(entry.get("gateway"), f"{key}[{i}].gateway"), interface=index))
    routes = tuple(_parse_route(r, f"routes[{i}]") for i, r in enumerate(_field(doc, "routes", list, "", [])))
    return tuple(interfaces), tuple(ips), routes


@dataclass(frozen=True)
class Result:
    """A plugin chain's result, whatever its CNI version; `document` is the JSON exactly as received."""
    cni_version: str
    interfaces: tuple[Interface, ...]
    ips: tuple[IPConfig, ...]
    routes: tuple[Route, ...]
    dns: DNS
    document: Mapping[str, Any]

    @classmethod
    def from_json(cls, document: Any, default_version: str | None = None) -> Result:
        """Parse a result; `default_version` stands in for a missing cniVersion (as libcni does).
        Raises ValueError naming the bad field."""
        if not isinstance(document, dict):
            raise ValueError("the result is not a JSON object")
        version = document.get("cniVersion") or default_version
        if not isinstance(version, str) or not version:
            raise ValueError("the result has no 'cniVersion'")
        document = {**document, "cniVersion": version}
        if version in _LEGACY_RESULT_VERSIONS:
            interfaces: tuple[Interface, ...] = ()
            ips, routes = _parse_legacy(document)
        else:
            interfaces, ips, routes = _parse_current(document)
        return cls(cni_version=version, interfaces=interfaces, ips=ips, routes=routes,
                   dns=_parse_dns(document.get("dns")), document=document)

    def to_json(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.document))

    def in_sandbox(self, ip: IPConfig) -> bool:
        """Whether `ip` is on an interface inside the container (or the plugin did not say where)."""
        if ip.interface is None or ip.interface >= len(self.interfaces):
            return True  # not indexed (0.2.0 results, IPAM results): the plugin gave it to the container
        return bool(self.interfaces[ip.interface].sandbox)

    def ip_addresses(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        """The container's addresses, with prefix lengths: those on interfaces in its network namespace
        (a bridge's gateway address on the host is not the container's), or all when not indexed."""
        return [ip.address for ip in self.ips if self.in_sandbox(ip)]

    def as_version(self, version: str) -> dict[str, Any]:
        """This result as a JSON document of CNI `version` (see convert_result)."""
        if version == self.cni_version:
            return self.to_json()
        if version in _LEGACY_RESULT_VERSIONS:
            return self._legacy_document(version)
        if self.cni_version in _LEGACY_RESULT_VERSIONS:
            return self._current_document(version)
        return self._relabelled_document(version)

    def _legacy_document(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version}
        for key, family in (("ip4", 4), ("ip6", 6)):
            ip = next((ip for ip in self.ips if ip.address.version == family and self.in_sandbox(ip)), None)
            if ip is None:
                continue
            entry: dict[str, Any] = {"ip": str(ip.address)}
            if ip.gateway is not None:
                entry["gateway"] = str(ip.gateway)
            routes = [_route_json(r) for r in self.routes if r.dst.version == family]
            if routes:
                entry["routes"] = routes
            doc[key] = entry
        if "dns" in self.document:
            doc["dns"] = copy.deepcopy(self.document["dns"])
        return doc

    def _current_document(self, version: str) -> dict[str, Any]:
        ips = []
        for ip in self.ips:
            entry: dict[str, Any] = {"address": str(ip.address)}
            if not _at_least(version, "1.0.0"):
                entry["version"] = str(ip.address.version)
            if ip.gateway is not None:
                entry["gateway"] = str(ip.gateway)
            ips.append(entry)
        doc: dict[str, Any] = {"cniVersion": version, "ips": ips}
        if self.routes:
            doc["routes"] = [_route_json(r) for r in self.routes]
        if "dns" in self.document:
            doc["dns"] = copy.deepcopy(self.document["dns"])
        return doc

    def _relabelled_document(self, version: str) -> dict[str, Any]:
        """Between 0.3.x, 0.4.0 and 1.0.0 only `ips[].version` differs (gone in 1.0.0): lossless."""
        doc = self.to_json()
        doc["cniVersion"] = version
        ips = doc.pop("ip", None) if "ips" not in doc else doc.get("ips")
        if ips is not None:
            doc["ips"] = ips
        for entry, ip in zip(doc.get("ips", []), self.ips, strict=True):
            if _at_least(version, "1.0.0"):
                entry.pop("version", None)
            else:
                entry["version"] = str(ip.address.version)
        return doc


def _route_json(route: Route) -> dict[str, str]:
    return {"dst": str(route.dst), **({"gw": str(route.gw)} if route.gw is not None else {})}


def convert_result(document: Mapping[str, Any], version: str) -> dict[str, Any]:
    """A result document in another CNI version (libcni's GetAsVersion, in both directions).

    * Same version: unchanged.
    * 0.3.x, 0.4.0 and 1.0.0 among themselves: lossless; only `ips[].version` is added or dropped.
    * 0.1.0/0.2.0 to later: `ip4`/`ip6` become `ips` without interface indexes (so all count as the
      container's), their routes are merged into `routes`; `interfaces` is empty.
    * Later to 0.1.0/0.2.0: `ip4`/`ip6` are the first address of each family on an interface in the
      container, routes are split between them by family. Interfaces, other addresses and fields
      0.2.0 has no place for are dropped: such a result describes the container for a 0.2.0 plugin,
      not the whole attachment.
    Raises ValueError if the document does not parse.
    """
    return Result.from_json(dict(document)).as_version(version)


# --- plugins ------------------------------------------------------------------------------------

def find_plugin(plugin_type: str, search_path: Sequence[str]) -> str:
    """The executable for `plugin_type` in the first directory of `search_path` that has one (CNI_PATH)."""
    if not plugin_type or "/" in plugin_type or plugin_type in (".", ".."):
        raise PluginNotFoundError(f"{quoted(plugin_type)} is not a CNI plugin name (a file name in the "
                                  "plugin directories)")
    not_executable = []
    for directory in search_path:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            not_executable.append(candidate)
    searched = ", ".join(search_path) or "(no directories)"
    hint = f"; {', '.join(not_executable)} exists but is not executable" if not_executable else ""
    raise PluginNotFoundError(f"The CNI plugin '{plugin_type}' was not found in the CNI plugin path "
                              f"(searched: {searched}){hint}")


@dataclass(frozen=True)
class PluginVersion:
    """A plugin's VERSION answer: the CNI versions it speaks."""
    plugin: str
    cni_version: str
    supported_versions: tuple[str, ...]


@dataclass(frozen=True)
class KnownBrokenCheck:
    """A plugin whose CHECK fails on healthy containers before release `fixed_in`."""
    plugin: str
    fixed_in: tuple[int, int, int]
    why: str


KNOWN_BROKEN_CHECKS = {
    # portmap before 1.3.0 checks for its IPv6 DNAT chain even when it made none (no IPv6 address),
    # so CHECK fails with "could not check ipv6 dnat: chain CNI-DN-... not found" on every healthy
    # container with IPv4 only. Debian bookworm ships 1.1.1.
    "portmap": KnownBrokenCheck("portmap", (1, 3, 0), "its CHECK fails on healthy containers "
                                "(\"could not check ipv6 dnat\" without IPv6)"),
}


def _check_skip_reason(info: PluginVersion, release: tuple[int, int, int] | None,
                       broken: KnownBrokenCheck) -> str | None:
    """Why CHECK of this plugin is skipped, or None if its release is known to be fixed."""
    fixed = ".".join(map(str, broken.fixed_in))
    # Plugins built with libcni >= 1.2 speak CNI 1.1.0; those are releases well after the fix.
    if any(_at_least(v, "1.1.0") for v in info.supported_versions):
        return None
    if release is not None:
        if release >= broken.fixed_in:
            return None
        release_text = ".".join(map(str, release))
        return f"CHECK skipped for plugin '{broken.plugin}' v{release_text}: before {fixed} {broken.why}"
    return (f"CHECK skipped for plugin '{broken.plugin}': its release is unknown (it says 'version unknown', "
            f"as Debian's builds do) and may be before {fixed}, where {broken.why}")


@dataclass(frozen=True)
class CheckReport:
    """What a CHECK did: the plugins that passed it, and why others (or all) were not checked."""
    checked: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass
class _Completed:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    stdout_overflow: bool = False
    exited_before_kill: bool = False  # the plugin ended, but something it started held its output open


class _Capture:
    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.overflow = limit, bytearray(), False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.overflow = self.overflow or len(chunk) > room


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the plugin is its group's leader (start_new_session)
    except ProcessLookupError:
        pass


def _pump(proc: subprocess.Popen[bytes], stdin: bytes, deadline: float, out: _Capture, err: _Capture) -> bool:
    """Feed stdin and drain stdout/stderr until both close; False if the deadline came first."""
    assert proc.stdin and proc.stdout and proc.stderr
    with selectors.DefaultSelector() as sel:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        if stdin:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        view = memoryview(stdin)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(remaining):
                if key.fileobj is proc.stdin:
                    try:
                        view = view[os.write(key.fd, view[:65536]):]
                    except BrokenPipeError:
                        view = view[len(view):]  # the plugin does not read its config: its business
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.add(chunk)
                else:
                    sel.unregister(key.fileobj)
    return True


def _run(path: str, env: dict[str, str], stdin: bytes, timeout: float) -> _Completed:
    """Run a plugin in its own session and process group; kill the group at the deadline."""
    deadline = time.monotonic() + timeout
    out, err = _Capture(MAX_STDOUT_BYTES), _Capture(MAX_STDERR_KEPT)
    proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd="/", start_new_session=True)
    timed_out = exited = False
    try:
        finished = _pump(proc, stdin, deadline, out, err)
        if finished:
            try:
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                finished = False
        if not finished:
            timed_out, exited = True, proc.poll() is not None
            _kill_group(proc)
            proc.wait()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
    return _Completed(None if timed_out else proc.returncode, bytes(out.data), bytes(err.data),
                      timed_out=timed_out, stdout_overflow=out.overflow, exited_before_kill=exited)


def _quote(data: bytes, limit: int = SNIPPET_CHARS) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def _cni_error(stdout: bytes) -> tuple[int | None, str, str]:
    """The plugin's CNI error {code, msg, details} from its stdout, if it printed one."""
    try:
        doc = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        return None, "", ""
    if not isinstance(doc, dict) or "code" not in doc:
        return None, "", ""
    code = doc.get("code") if isinstance(doc.get("code"), int) else None
    return code, str(doc.get("msg") or ""), str(doc.get("details") or "")


def _format_args(args: Mapping[str, str]) -> str:
    """CNI_ARGS: "K1=V1;K2=V2", keys alphanumeric, no ';' in values (libcni passes them as given)."""
    pairs = []
    for key, value in args.items():
        value = str(value)
        if not _CNI_ARG_KEY_RE.match(key):
            raise CNIArgumentError(f"CNI_ARGS key {quoted(key)} must be letters, digits, '_', '-' or '.'")
        if ";" in value or "\x00" in value:
            raise CNIArgumentError(f"CNI_ARGS value of '{key}' must not contain ';'")
        pairs.append(f"{key}={value}")
    return ";".join(pairs)


def validate_container_id(container_id: str) -> None:
    if not re.match(_NAME_RE, container_id or ""):
        raise CNIArgumentError(f"container id {quoted(container_id)} is not a CNI container id: it must start "
                               "with a letter or digit, followed by letters, digits, '_', '.' or '-'")


def validate_ifname(ifname: str) -> None:
    if not ifname or ifname in (".", "..") or len(ifname) > 15 or _IFNAME_FORBIDDEN.search(ifname):
        raise CNIArgumentError(f"interface name {quoted(ifname)} is not a Linux interface name: 1 to 15 "
                               "characters, not '.' or '..', without '/', ':' or spaces")


def _file_key(path: str) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (path, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class _Runtime:
    """What stays the same for every plugin of one chain invocation (the spec requires it)."""
    network: NetworkConfigList
    container_id: str
    netns_path: str
    ifname: str
    cni_args: str
    capabilities: Mapping[str, Any]


_VERBS = {"ADD": "attach container {id} to", "DEL": "detach container {id} from",
          "CHECK": "check container {id} on"}


class CNIClient:
    """Runs CNI plugin chains: plugins from `plugin_dirs` (Mesos's --network_cni_plugins_dir, a
    search path), each killed with its process group if it takes longer than `timeout` seconds."""

    def __init__(self, plugin_dirs: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 path_env: str = PLUGIN_PATH_ENV) -> None:
        self.plugin_dirs = list(plugin_dirs)
        self.timeout = timeout
        self.path_env = path_env
        self._versions: dict[tuple[str, int, int, int], PluginVersion] = {}
        self._releases: dict[tuple[str, int, int, int], tuple[int, int, int] | None] = {}

    # Public API ---------------------------------------------------------------------------------
    def find_plugin(self, plugin_type: str) -> str:
        return find_plugin(plugin_type, self.plugin_dirs)

    def add(self, network: NetworkConfigList, container_id: str, netns_path: str, ifname: str,
            args: Mapping[str, str] | None = None, capabilities: Mapping[str, Any] | None = None) -> Result:
        """Attach: ADD through the chain in order, each plugin given the previous result. On failure the
        whole chain is DELeted (in reverse) before the error is raised, so nothing is left behind."""
        rt = self._runtime(network, container_id, netns_path, ifname, args, capabilities)
        plugins = self._resolve(network, "attach", container_id)
        prev: dict[str, Any] | None = None
        for plugin, path in plugins:
            try:
                prev = self._add_one(rt, plugin, path, prev)
            except PluginError as e:
                raise self._rolled_back(e, rt, plugins, prev) from None
        if prev is None:  # a list has at least one plugin; this only keeps the type checker honest
            raise CNIError(f"CNI network '{network.name}' has no plugins")
        return Result.from_json(prev)

    def delete(self, network: NetworkConfigList, container_id: str, netns_path: str, ifname: str,
               args: Mapping[str, str] | None = None, capabilities: Mapping[str, Any] | None = None,
               cached_result: Result | Mapping[str, Any] | None = None) -> list[str]:
        """Detach: DEL through the chain in reverse, with the cached ADD result as prevResult (CNI >= 0.4.0).
        Idempotent: plugins release what is left and succeed when it is gone. Returns notes."""
        rt = self._runtime(network, container_id, netns_path, ifname, args, capabilities)
        plugins = self._resolve(network, "detach", container_id)
        notes: list[str] = []
        if netns_path and not os.path.exists(netns_path):
            # Spec: without CNI_NETNS a plugin cleans up what it can; some refuse a path that is gone.
            rt = _Runtime(network, container_id, "", ifname, rt.cni_args, rt.capabilities)
            notes.append(f"network namespace {netns_path} is gone; plugins were called without CNI_NETNS")
        prev = self._prev_result_for(network, cached_result, "DEL", notes)
        for plugin, path in reversed(plugins):
            notes += self._del_one(rt, plugin, path, prev)
        for note in notes:
            log.info("CNI network '%s', container %s: %s", network.name, container_id, note)
        return notes

    def check(self, network: NetworkConfigList, container_id: str, netns_path: str, ifname: str,
              args: Mapping[str, str] | None = None, capabilities: Mapping[str, Any] | None = None,
              cached_result: Result | Mapping[str, Any] | None = None) -> CheckReport:
        """CHECK in order with the cached ADD result. Not run below CNI 0.4.0, where `disableCheck` is set,
        or for a plugin whose CHECK is known to fail on healthy containers (the report says which)."""
        if not _at_least(network.cni_version, "0.4.0"):
            return CheckReport((), (f"CHECK not run: CNI network '{network.name}' uses CNI "
                                    f"{network.cni_version}, and CHECK needs 0.4.0 or later",))
        if network.disable_check:
            return CheckReport((), (f"CHECK not run: CNI network '{network.name}' sets disableCheck",))
        if cached_result is None:
            raise CNIArgumentError("CHECK needs the result of the ADD it checks (the spec forbids CHECK "
                                   "without prevResult)")
        rt = self._runtime(network, container_id, netns_path, ifname, args, capabilities)
        plugins = self._resolve(network, "check", container_id)
        notes: list[str] = []
        prev = self._prev_result_for(network, cached_result, "CHECK", notes)
        checked = []
        for plugin, path in plugins:
            reason = self._known_broken_check(plugin.type, path)
            if reason:
                log.info("CNI network '%s': %s", network.name, reason)
                notes.append(reason)
                continue
            self._call(rt, "CHECK", plugin, path, prev)
            checked.append(plugin.type)
        return CheckReport(tuple(checked), tuple(notes))

    def validate(self, network: NetworkConfigList) -> list[str]:
        """What would stop this network from working here: plugins (and IPAM plugins) missing from the
        plugin path, or not speaking the network's CNI version. Empty when all is well (libcni's
        ValidateNetworkList; Mesos skips such networks when it loads them)."""
        problems = []
        for plugin in network.plugins:
            for plugin_type in filter(None, (plugin.type, plugin.ipam_type)):
                try:
                    info = self.version(plugin_type)
                except CNIError as e:
                    problems.append(str(e))
                    continue
                if network.cni_version not in info.supported_versions:
                    speaks = ", ".join(info.supported_versions)
                    problems.append(f"The CNI plugin '{plugin_type}' does not speak CNI {network.cni_version}, which "
                                    f"CNI network '{network.name}' uses (it speaks {speaks})")
        return problems

    def version(self, plugin_type: str) -> PluginVersion:
        """The plugin's VERSION answer (asked once per executable: a replaced file is asked again)."""
        path = self.find_plugin(plugin_type)
        key = _file_key(path)
        if key not in self._versions:
            self._versions[key] = self._query_version(plugin_type, path)
        return self._versions[key]

    # ADD / DEL steps ----------------------------------------------------------------------------
    def _add_one(self, rt: _Runtime, plugin: PluginConfig, path: str, prev: dict[str, Any] | None) -> dict[str, Any]:
        done = self._call(rt, "ADD", plugin, path, prev)
        if not done.stdout.strip():
            raise self._error(rt, "ADD", plugin, done, "printed no result (the CNI spec requires one on ADD)")
        try:
            result = Result.from_json(json.loads(done.stdout), default_version=rt.network.cni_version)
        except (ValueError, UnicodeDecodeError) as e:
            raise self._error(rt, "ADD", plugin, done, f"printed a result that cannot be used: {e}") from None
        if result.cni_version == rt.network.cni_version:
            return result.to_json()  # passed on exactly as printed
        log.info("CNI network '%s': plugin '%s' answered CNI %s to a %s configuration; its result is "
                 "converted to %s", rt.network.name, plugin.type, result.cni_version, rt.network.cni_version,
                 rt.network.cni_version)
        return result.as_version(rt.network.cni_version)

    def _del_one(self, rt: _Runtime, plugin: PluginConfig, path: str, prev: dict[str, Any] | None) -> list[str]:
        try:
            self._call(rt, "DEL", plugin, path, prev)
        except PluginError as e:
            if e.code == 3:  # "container unknown": the spec says there is nothing to clean up
                return [f"plugin '{plugin.type}' does not know container {rt.container_id} (CNI error 3): "
                        "nothing to detach"]
            raise
        return []

    def _rolled_back(self, error: PluginError, rt: _Runtime, plugins: list[tuple[PluginConfig, str]],
                     partial: dict[str, Any] | None) -> PluginError:
        """Undo a failed ADD with a DEL of every plugin, even those not reached (the spec's advice)."""
        prev = partial if _at_least(rt.network.cni_version, "0.4.0") else None
        try:
            for plugin, path in reversed(plugins):
                self._del_one(rt, plugin, path, prev)
        except PluginError as undo:
            error.args = (f"{error}; undoing the attachment failed too, DEL it again later: {undo}",)
        else:
            error.args = (f"{error}; the attachment was undone (DEL of every plugin succeeded)",)
        return error

    def _prev_result_for(self, network: NetworkConfigList, cached: Result | Mapping[str, Any] | None,
                         command: str, notes: list[str]) -> dict[str, Any] | None:
        """The cached result in the network's version, for DEL (>= 0.4.0 only) and CHECK."""
        if cached is None or (command == "DEL" and not _at_least(network.cni_version, "0.4.0")):
            return None
        try:
            result = cached if isinstance(cached, Result) else Result.from_json(dict(cached), network.cni_version)
            return result.as_version(network.cni_version)
        except ValueError as e:
            if command == "CHECK":
                raise CNIArgumentError(f"the cached result cannot be used for CHECK: {e}") from None
            notes.append(f"the cached result cannot be used ({e}); DEL ran without prevResult")
            return None

    # One plugin invocation ----------------------------------------------------------------------
    def _call(self, rt: _Runtime, command: str, plugin: PluginConfig, path: str,
              prev: dict[str, Any] | None) -> _Completed:
        stdin = json.dumps(self._plugin_config(rt, plugin, prev)).encode()
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": rt.container_id, "CNI_NETNS": rt.netns_path,
               "CNI_IFNAME": rt.ifname, "CNI_ARGS": rt.cni_args, "CNI_PATH": os.pathsep.join(self.plugin_dirs),
               "PATH": self.path_env}
        started = time.monotonic()
        try:
            done = _run(path, env, stdin, self.timeout)
        except OSError as e:  # not executable after all, a script without its interpreter, ...
            raise self._error(rt, command, plugin, _Completed(None, b"", b""),
                              f"{path} could not be started: {e.strerror}") from None
        log.debug("CNI %s of plugin '%s' for container %s on network '%s': %s in %.0f ms", command, plugin.type,
                  rt.container_id, rt.network.name, "timed out" if done.timed_out else f"exit {done.returncode}",
                  (time.monotonic() - started) * 1000)
        if done.timed_out:
            raise self._error(rt, command, plugin, done, self._timeout_text(done))
        if done.returncode != 0:
            code, msg, details = _cni_error(done.stdout)
            text = msg or f"it exited with status {done.returncode}"
            if details:
                text += f": {_quote(details.encode(), 500)}"
            if code is not None:
                text += f" (CNI error code {code})"
            raise self._error(rt, command, plugin, done, text, code=code, msg=msg, details=details)
        if done.stdout_overflow:
            raise self._error(rt, command, plugin, done, f"it printed more than {MAX_STDOUT_BYTES} bytes")
        return done

    def _timeout_text(self, done: _Completed) -> str:
        if done.exited_before_kill:
            return (f"it exited, but a process it started kept its output open for more than {self.timeout:g} s; "
                    "that process group was killed")
        return f"it did not finish within {self.timeout:g} s and was killed (with every process in its process group)"

    @staticmethod
    def _plugin_config(rt: _Runtime, plugin: PluginConfig, prev: dict[str, Any] | None) -> dict[str, Any]:
        """The plugin's own configuration with the list's name and version, the previous result, and
        `runtimeConfig` holding only the capabilities this plugin declares (as libcni does)."""
        conf = copy.deepcopy(dict(plugin.conf))
        conf["name"] = rt.network.name
        conf["cniVersion"] = rt.network.cni_version
        if prev is not None:
            conf["prevResult"] = prev
        runtime_config = {cap: rt.capabilities[cap] for cap, declared in plugin.capabilities.items()
                          if declared and cap in rt.capabilities}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        return conf

    def _error(self, rt: _Runtime, command: str, plugin: PluginConfig, done: _Completed, text: str,
               **fields: Any) -> PluginError:
        verb = _VERBS[command].format(id=rt.container_id)
        message = (f"The CNI plugin '{plugin.type}' failed to {verb} CNI network '{rt.network.name}': {text} "
                   f"(stdout='{_quote(done.stdout)}', stderr='{_quote(done.stderr)}')")
        return PluginError(message, plugin=plugin.type, network=rt.network.name, command=command,
                           stdout=done.stdout.decode("utf-8", "replace"), stderr=done.stderr.decode("utf-8", "replace"),
                           timed_out=done.timed_out, **fields)

    # Helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _runtime(network: NetworkConfigList, container_id: str, netns_path: str, ifname: str,
                 args: Mapping[str, str] | None, capabilities: Mapping[str, Any] | None) -> _Runtime:
        validate_container_id(container_id)
        validate_ifname(ifname)
        return _Runtime(network, container_id, netns_path, ifname, _format_args(args or {}), dict(capabilities or {}))

    def _resolve(self, network: NetworkConfigList, action: str, container_id: str) -> list[tuple[PluginConfig, str]]:
        """Every plugin's executable, found before any runs: a missing one fails the call, not half of it."""
        resolved = []
        for plugin in network.plugins:
            try:
                resolved.append((plugin, self.find_plugin(plugin.type)))
            except PluginNotFoundError as e:
                raise PluginNotFoundError(f"Cannot {action} container {container_id} (CNI network "
                                          f"'{network.name}'): {e}") from None
        return resolved

    def _known_broken_check(self, plugin_type: str, path: str) -> str | None:
        broken = KNOWN_BROKEN_CHECKS.get(plugin_type)
        if broken is None:
            return None
        try:
            info = self.version(plugin_type)
        except CNIError as e:
            return f"CHECK skipped for plugin '{plugin_type}': its version could not be read ({e})"
        key = _file_key(path)
        if key not in self._releases:
            self._releases[key] = self._release(path)
        return _check_skip_reason(info, self._releases[key], broken)

    def _query_version(self, plugin_type: str, path: str) -> PluginVersion:
        env = {"CNI_COMMAND": "VERSION", "CNI_PATH": os.pathsep.join(self.plugin_dirs), "PATH": self.path_env}
        stdin = json.dumps({"cniVersion": SUPPORTED_VERSIONS[-1]}).encode()
        try:
            done = _run(path, env, stdin, min(self.timeout, 10.0))
        except OSError as e:
            raise PluginError(f"The CNI plugin '{plugin_type}' ({path}) could not be started: {e.strerror}",
                              plugin=plugin_type, network="", command="VERSION") from None
        try:
            doc = json.loads(done.stdout) if done.returncode == 0 else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("supportedVersions"), list):
            raise PluginError(f"The CNI plugin '{plugin_type}' gave no usable VERSION answer "
                              f"(stdout='{_quote(done.stdout)}', stderr='{_quote(done.stderr)}')",
                              plugin=plugin_type, network="", command="VERSION", timed_out=done.timed_out)
        return PluginVersion(plugin=plugin_type, cni_version=str(doc.get("cniVersion", "")),
                             supported_versions=tuple(str(v) for v in doc["supportedVersions"]))

    def _release(self, path: str) -> tuple[int, int, int] | None:
        """The release in the plugin's about string, which skel-based plugins print on stderr when run
        without CNI_COMMAND ("CNI portmap plugin v1.3.0"; Debian's builds say "version unknown").
        Asked only of plugins in KNOWN_BROKEN_CHECKS: the spec does not say what others do then."""
        try:
            done = _run(path, {"PATH": self.path_env}, b"", min(self.timeout, 10.0))
        except OSError:
            return None
        match = _ABOUT_RE.search(done.stderr.decode("utf-8", "replace"))
        if match is None or match.group(2) is None:
            return None
        return (int(match.group(2)), int(match.group(3)), int(match.group(4)))


# --- checkpointing ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """One container's attachment to one network, as a checkpoint keeps it: the configuration list the
    ADD used, the arguments it was given, and its result (None until the ADD returned)."""
    network: NetworkConfigList
    container_id: str
    netns_path: str
    ifname: str
    args: Mapping[str, str] = field(default_factory=dict)
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    result: Result | None = None

    def to_json(self) -> dict[str, Any]:
        return {"network": self.network.to_json(), "containerId": self.container_id, "netns": self.netns_path,
                "ifName": self.ifname, "cniArgs": dict(self.args),
                "capabilityArgs": copy.deepcopy(dict(self.capabilities)),
                "result": self.result.to_json() if self.result is not None else None}

    @classmethod
    def from_json(cls, document: Any, source: str = "checkpoint") -> Attachment:
        """Raises NetworkConfigError naming `source` if the document is not an attachment."""
        if not isinstance(document, dict):
            raise NetworkConfigError(f"{source}: is not a JSON object")
        try:
            result = document.get("result")
            return cls(network=NetworkConfigList.from_json(document.get("network"), source),
                       container_id=str(document["containerId"]), netns_path=str(document.get("netns", "")),
                       ifname=str(document["ifName"]), args=dict(document.get("cniArgs") or {}),
                       capabilities=dict(document.get("capabilityArgs") or {}),
                       result=Result.from_json(result) if result is not None else None)
        except KeyError as e:
            raise NetworkConfigError(f"{source}: has no '{e.args[0]}'") from None
        except (ValueError, TypeError) as e:
            raise NetworkConfigError(f"{source}: {e}") from None

    def add(self, client: CNIClient) -> Attachment:
        """ADD, and this attachment with its result: what to checkpoint next (this one goes first,
        write-ahead, so that a crash during the ADD leaves enough for a DEL)."""
        result = client.add(self.network, self.container_id, self.netns_path, self.ifname, self.args,
                            self.capabilities)
        return dataclasses.replace(self, result=result)

    def delete(self, client: CNIClient) -> list[str]:
        return client.delete(self.network, self.container_id, self.netns_path, self.ifname, self.args,
                             self.capabilities, self.result)
