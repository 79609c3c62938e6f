"""The agent's flags: Mesos names, from the command line, RECONCILER_<FLAG> variables and a YAML --config file.

Precedence: command line over environment over file over default. Every value is validated once,
here; an error names the flag and where its value came from, and the CLI exits 2 on it. The error is
one bounded line whatever the value held: a value must be one line of UTF-8 text (or plain YAML
scalars, lists and mappings), and a message quotes at most MAX_QUOTED_CHARS of it, escaped.
Sizes and durations are Mesos's (reconciler.units).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from reconciler.fsutil import FileTooLargeError, NotRegularFileError, read_config_file
from reconciler.units import MB, format_bytes, megabytes_to_bytes, parse_bytes, parse_duration, quoted
from reconciler.yamlbounds import first_past_limits

IS_ROOT = os.geteuid() == 0
ROOT_ISOLATION = "filesystem/shared,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"
USER_ISOLATION = "posix/cpu,posix/mem"

# What a flag value may be. Refused at start, these cannot reach a later message, file or loop.
MAX_QUOTED_CHARS = 100          # of a bad value, in its error line
MAX_TEXT_CHARS = 4096           # one-line values: PATH_MAX, and far past any name or list of names
MAX_JSON_CHARS = 64 * 1024      # --default_container_info: JSON, which may span lines
MAX_STRUCTURE_VALUES = 10_000   # of a list, mapping or JSON value, YAML aliases expanded
MAX_STRUCTURE_DEPTH = 32
MAX_CONFIG_FILE_BYTES = 1 << 20
PATH_MAX, NAME_MAX = 4096, 255
JSON_FLAGS = {"default_container_info", "default_container_dns"}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Duration flags: (shortest, its spelling, why). Every resync re-lists the manifest directory, refreshes
# every container's statistics and rewrites _agent.json: below 100ms that is a busy loop, not a
# resync (kubelet's file check is 20s, its sync 1m; our own tests go down to 300ms). disk/du and
# disk/xfs measure one sandbox after the other, each measurement rescheduled when it ends: 1ms is
# what Mesos's own DiskQuotaEnforcement tests use, and nothing shorter can be meant.
DURATION_FLOORS: dict[str, tuple[float, str, str]] = {
    "resync_interval": (0.1, "100ms", "each resync re-lists the manifests and rewrites _agent.json"),
    "container_disk_watch_interval": (0.001, "1ms", "Mesos's own tests go down to 1ms"),
    "network_cni_plugin_timeout": (0.1, "100ms", "a plugin is given at least that long to attach a container"),
    "fetcher_stall_timeout": (0.1, "100ms", "a registry is given at least that long to send the next byte"),
}
MAX_FLAG_DURATION = 365 * 86400.0     # past a year is a typo, and past the timers' own range soon after

_REGISTRY_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")
FIRST_PROJECT_ID, LAST_PROJECT_ID = 1, 0xFFFFFFFF   # prid_t is 32 bits; 0 is "no project"
_HANDLE_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")   # ASCII: int() would take '1_000' and '٣'
_WHOLE_RE = re.compile(r"[0-9]+")
_RANGE_RE = re.compile(r"\[\s*([0-9]+)\s*-\s*([0-9]+)\s*\]")

# Validation context of values that come from flags (load()): rules for an operator's input that a
# program building an AgentConfig itself (tests of one isolator) may step past.
FROM_FLAGS = {"from_flags": True}


class ConfigError(Exception):
    """A bad flag value: one line, naming the flag and the reason."""


def _quote(value: Any) -> str:
    return quoted(value, MAX_QUOTED_CHARS)


def _from_flags(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("from_flags"))


def _parse_handle(value: Any) -> int:
    """A net_cls handle as Mesos reads one (numify<uint16_t>): decimal, or hexadecimal with 0x."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a handle, decimal or hexadecimal (0x...), got {_quote(value)}")
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        if not _HANDLE_RE.fullmatch(text):
            raise ValueError(f"{_quote(value)} is not a decimal or hexadecimal (0x...) number")
        number = int(text, 16) if text[:2].lower() == "0x" else int(text, 10)
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"{_quote(value)} is out of range: a net_cls handle is 16 bits (0x0000-0xffff)")
    return number


def _parse_attributes(text: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"{_quote(item)} is not of the form key:value (attributes are 'k:v;k:v')")
        attributes[key.strip()] = value.strip()
    return attributes


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"not {what}: nested too deeply") from None
    except ValueError:         # an integer of more than 4300 digits
        raise ValueError(f"not {what}: a number out of range") from None


def _check_container_info(value: dict[str, Any]) -> None:
    """What the agent merges into manifests must be a ContainerInfo: said at start, with the flag's source."""
    from reconciler.models import ContainerInfo
    from reconciler.source import validation_messages

    try:
        ContainerInfo.model_validate(value)
    except ValidationError as exc:
        raise ValueError("; ".join(validation_messages(exc, ContainerInfo))) from None


def _check_value(value: Any, *, json_text: bool) -> None:
    """Refuse what no flag can mean, whatever the flag: text that is not UTF-8, a control character
    (one line per value; JSON may span lines), a value too long, too big or nested too deeply, and
    what YAML builds that a flag does not take (a date, binary data). Aliases are counted expanded."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_STRUCTURE_VALUES or depth > MAX_STRUCTURE_DEPTH:
            raise ValueError(f"more than {MAX_STRUCTURE_VALUES} values, or nested more than "
                             f"{MAX_STRUCTURE_DEPTH} deep: no flag takes that much")
        if isinstance(item, str):
            _check_text(item, json_text=json_text)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"expected a finite number, got {item}")
        elif isinstance(item, dict):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((part, depth + 1) for part in item)
        elif not (item is None or isinstance(item, (bool, int, float))):
            raise ValueError(f"expected text, a number, true or false, a list or a mapping, got {_quote(item)} "
                             "(quote it in the YAML file)")


def _check_text(text: str, *, json_text: bool) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{_quote(text)} is not UTF-8 text") from None
    limit = MAX_JSON_CHARS if json_text else MAX_TEXT_CHARS
    if len(text) > limit:
        raise ValueError(f"{_quote(text)} is too long: at most {limit} characters")
    control = None if json_text else _CONTROL.search(text)
    if control:
        raise ValueError(f"{_quote(text)} contains the control character {_quote(control.group())}: "
                         "a flag value is one line")


def _check_path(path: str) -> None:
    if len(path.encode()) >= PATH_MAX:
        raise ValueError(f"{_quote(path)} is too long for a path: at most {PATH_MAX - 1} bytes (PATH_MAX)")
    for part in path.split("/"):
        if len(part.encode()) > NAME_MAX:
            raise ValueError(f"{_quote(part)} is too long for a file name: at most {NAME_MAX} bytes (NAME_MAX)")


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); the host keeps its brackets off."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([A-Za-z0-9.-]+):([0-9]+)", text)
    if not m:
        raise ValueError(f"{_quote(text)} is not host:port (e.g. 127.0.0.1:5051, 0.0.0.0:5051 or [::1]:5051)")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if len(port) > 5 or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {_quote(port)} of {_quote(text)} is out of range 1-65535")
    return host, int(port)


class AgentConfig(BaseModel):
    """Every flag of `reconciler run` / `once`, already validated and converted."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifests: str = "./manifests"
    work_dir: str = "/var/lib/reconciler" if IS_ROOT else "./.reconciler/work"
    status_dir: str | None = None
    isolation: list[str] = (ROOT_ISOLATION if IS_ROOT else USER_ISOLATION).split(",")
    launcher: str = "linux" if IS_ROOT else "posix"
    cgroups_root: str = "reconciler"
    cgroups_net_cls_primary_handle: int | None = None
    cgroups_net_cls_secondary_handles: tuple[int, int] = (0x0001, 0xFFFF)
    container_disk_watch_interval: float = 15.0
    # Sandbox log rotation (Mesos's logrotate container logger; see reconciler.logs). Bytes; 0: off.
    container_logger_max_stdout_size: int = 10 * 1024 * 1024
    container_logger_max_stderr_size: int = 10 * 1024 * 1024
    container_logger_keep: int = 5
    enforce_container_disk_quota: bool = False
    xfs_project_range: tuple[int, int] = (5000, 10000)
    default_container_info: dict[str, Any] | None = None
    docker_registry: str | None = None
    image_providers: list[str] = []
    docker_store_dir: str | None = None    # layers extracted from images; <work_dir>/store/docker when unset
    resync_interval: float = 10.0
    attributes: dict[str, str] = {}
    disallow_sharing_agent_pid_namespace: bool = False
    effective_capabilities: list[str] | None = None
    bounding_capabilities: list[str] | None = None
    xfs_kill_containers: bool = False
    xfs_quota_headroom: float = 10.0     # MB, Mesos's default: room to pass the soft limit and be seen
    http_address: str | None = None      # host:port of /state, /metrics, /healthz...; off when unset
    # The default security profile (docs/security.md): on for every container of the linux launcher.
    seccomp_config_dir: str | None = None      # Mesos linux/seccomp: Docker-format profiles, by file name
    seccomp_profile_name: str | None = None    # the default profile's file name; unset: the built-in one
    allow_privileged: bool = False             # let a manifest ask for linux_info.privileged
    docker_ignore_image_user: bool = False     # Mesos's behaviour: an image's User is ignored (warning)
    manifests_strict_modes: bool = True        # sshd's StrictModes for the manifest directory and files
    docker_max_image_size: int = 20 * 1024 ** 3   # bytes an image's layers may expand to, all together
    # --docker_registry as a URL: the registry's credentials, CA bundle, plain-http hosts, and stall timeout.
    docker_config: str | None = None
    docker_registry_ca_file: str | None = None
    docker_insecure_registries: list[str] = []
    fetcher_stall_timeout: float = 60.0
    docker_tag_refresh_interval: float | None = None   # a pulled tag is resolved again after this long; None: never
    # network/cni (Mesos's flags): CNI network configurations, and the plugins' search path.
    network_cni_config_dir: str | None = None
    network_cni_plugins_dir: str | None = None      # "dir[:dir...]", as CNI_PATH
    network_cni_metrics: bool = True                # each container's rx/tx counters in its statistics
    network_cni_plugin_timeout: float = 60.0        # a plugin still running after this long is killed
    default_container_dns: dict[str, Any] | None = None   # Mesos's JSON {"mesos": [...]} for networks without DNS
    egress_rate_limit_per_container: int | None = None    # bytes/s a container on CNI networks may send, by default

    @field_validator("isolation", "image_providers", "docker_insecure_registries", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("isolation")
    @classmethod
    def _isolators(cls, value: list[str], info: ValidationInfo) -> list[str]:
        from reconciler.isolators import ALIASES, REGISTRY

        if not value and _from_flags(info):
            default = ROOT_ISOLATION if IS_ROOT else USER_ISOLATION
            raise ValueError(f"is empty: containers would run without isolation; name isolators, "
                             f"or leave the flag out for the default ({default})")
        if len(set(value)) != len(value):
            raise ValueError(f"Duplicate entries found in --isolation flag {_quote(','.join(value))}")
        unknown = [name for name in value if name not in REGISTRY and name not in ALIASES]
        if unknown:
            raise ValueError(f"Unknown or unsupported isolator {_quote(unknown[0])}")
        return value

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, value: str) -> str:
        if value not in ("linux", "posix"):
            raise ValueError(f"unknown launcher {_quote(value)}: expected linux or posix")
        if value == "linux" and not IS_ROOT:
            raise ValueError("the linux launcher needs root (namespaces and cgroups); use --launcher=posix")
        return value

    @field_validator("image_providers")
    @classmethod
    def _image_types(cls, value: list[str]) -> list[str]:
        # Mesos Store::create: the names are case-insensitive; APPC is Mesos's but not ours.
        for name in value:
            if name.upper() not in ("APPC", "DOCKER"):
                raise ValueError(f"Unknown image type {_quote(name)}")
            if name.upper() != "DOCKER":
                raise ValueError(f"Unsupported image type {_quote(name)}")
        return ["docker"] if value else []

    @field_validator("manifests", "work_dir")
    @classmethod
    def _required_path(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            raise ValueError("must not be empty: give a directory, or leave the flag out for the default")
        _check_path(value)
        # Sandboxes and checkpoints are used by processes whose working directory is not ours.
        return value if info.field_name == "manifests" else os.path.abspath(value)

    @field_validator("docker_registry", mode="before")
    @classmethod
    def _registry(cls, value: Any) -> Any:
        """A local directory (Mesos's local registry), or a registry's URL: https://HOST[:PORT], or http://
        for a host named in --docker_insecure_registries (checked when the store is made)."""
        if isinstance(value, str) and value.startswith(("https://", "http://")):
            parts = urllib.parse.urlsplit(value)
            if not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"{_quote(value)} is not a registry URL: https://HOST[:PORT], nothing after it")
            return f"{parts.scheme}://{parts.netloc}"
        if value is None or value == "":
            return None      # empty is unset: <work_dir>/images
        if not isinstance(value, str):
            raise ValueError(f"expected a directory or a registry URL (https://HOST[:PORT]), got {_quote(value)}")
        _check_path(value)
        return os.path.abspath(value)

    @field_validator("docker_insecure_registries")
    @classmethod
    def _registry_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if len(host) > 259 or not _REGISTRY_HOST.fullmatch(host):
                raise ValueError(f"{_quote(host)} is not a registry's HOST[:PORT]")
        return value

    @field_validator("status_dir", "docker_store_dir", "seccomp_config_dir", "network_cni_config_dir",
                     "docker_config", "docker_registry_ca_file")
    @classmethod
    def _optional_path(cls, value: str | None) -> str | None:
        if not value:
            return None      # empty is unset, as leaving the flag out: the default applies
        _check_path(value)
        return os.path.abspath(value)

    @field_validator("cgroups_root")
    @classmethod
    def _cgroups_root(cls, value: str) -> str:
        value = value.strip("/")
        if not value or ".." in value.split("/"):
            raise ValueError(f"{_quote(value)} is not a cgroup path below the hierarchy roots")
        _check_path(value)
        return value

    @field_validator("egress_rate_limit_per_container", mode="before")
    @classmethod
    def _egress_rate(cls, value: Any) -> Any:
        if value is None or value == "":
            return None      # unset, as Mesos: no limit
        rate = parse_bytes(value, bare_unit=1)
        if rate == 0:
            raise ValueError(f"{_quote(value)} would stop every packet: leave the flag out for no limit")
        return rate

    @field_validator("network_cni_plugins_dir")
    @classmethod
    def _search_path(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = [part for part in value.split(":") if part]
        for part in parts:
            _check_path(part)
        return ":".join(os.path.abspath(part) for part in parts) or None

    @field_validator("default_container_dns", mode="before")
    @classmethod
    def _default_dns(cls, value: Any) -> Any:
        from reconciler.network.etc_files import DefaultContainerDns

        if isinstance(value, str):
            if value == "":
                return None
            value = _parse_json(value, "Mesos's JSON {\"mesos\": [...]}")
            _check_value(value, json_text=True)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object ({{\"mesos\": [...]}}, as Mesos), got {_quote(value)}")
        DefaultContainerDns.from_mesos_json(value)   # refused here, with the flag's name, not at a launch
        return value

    @field_validator("container_disk_watch_interval", "resync_interval", "network_cni_plugin_timeout",
                     "fetcher_stall_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: ValidationInfo) -> float:
        seconds = parse_duration(value)
        floor, spelled, why = DURATION_FLOORS[info.field_name or ""]
        if seconds < floor:
            raise ValueError(f"{_quote(value)} is too short: at least {spelled} ({why})")
        if seconds > MAX_FLAG_DURATION:
            raise ValueError(f"{_quote(value)} is too long: at most 365days")
        return seconds

    @field_validator("docker_tag_refresh_interval", mode="before")
    @classmethod
    def _tag_refresh(cls, value: Any) -> float | None:
        if value is None or (isinstance(value, str) and value.strip() == "never"):
            return None
        seconds = parse_duration(value)
        if seconds > MAX_FLAG_DURATION:
            raise ValueError(f"{_quote(value)} is too long: at most 365days (or never)")
        return seconds

    @field_validator("container_logger_max_stdout_size", "container_logger_max_stderr_size", mode="before")
    @classmethod
    def _log_size(cls, value: Any) -> int:
        size = parse_bytes(value, bare_unit=1)      # a bare number: bytes, as this flag took before
        page = os.sysconf("SC_PAGE_SIZE")
        if 0 < size < page:
            raise ValueError(f"{_quote(value)} is less than one page ({page} bytes); use 0 to turn rotation off")
        return size

    @field_validator("docker_max_image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> int:
        size = parse_bytes(value, bare_unit=1)      # a bare number: bytes, as this flag took before
        if size <= 0:
            raise ValueError("must be more than 0 bytes (Mesos sizes: 512MB, 20GB)")
        return size

    @field_validator("xfs_quota_headroom", mode="before")
    @classmethod
    def _headroom(cls, value: Any) -> float:
        # Kept in MB, the unit disk/xfs reads; a bare number is MB, as this flag took before.
        return parse_bytes(value, bare_unit=MB) / MB

    @field_validator("seccomp_profile_name")
    @classmethod
    def _profile_name(cls, value: str | None) -> str | None:
        if value == "":
            return None      # empty is unset: the agent's own default profile
        if value is not None and (not value.strip() or "/" in value or value in (".", "..")):
            raise ValueError(f"{_quote(value)} must be a file name in --seccomp_config_dir, or 'unconfined'")
        if value is not None:
            _check_path(value)
        return value

    @field_validator("container_logger_keep", mode="before")
    @classmethod
    def _log_keep(cls, value: Any) -> int:
        if isinstance(value, str) and _WHOLE_RE.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{_quote(value)} is not a whole number of files")
        if value < 0 or value > 1000:
            raise ValueError(f"{_quote(value)} must be between 0 (drop rotated output) and 1000")
        return value

    @field_validator("cgroups_net_cls_primary_handle", mode="before")
    @classmethod
    def _primary(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        number = _parse_handle(value)
        if number == 0:
            raise ValueError("the primary handle must not be 0")
        return number

    @field_validator("cgroups_net_cls_secondary_handles", mode="before")
    @classmethod
    def _secondary(cls, value: Any) -> Any:
        handles = value.split(",") if isinstance(value, str) else value
        if not isinstance(handles, (list, tuple)) or len(handles) != 2:
            raise ValueError(f"{_quote(value)} must be two handles 'low,high', e.g. 0x0001,0xffff")
        low, high = (_parse_handle(v) for v in handles)
        if low == 0:
            raise ValueError("secondary handle 0 is reserved")
        if low > high:
            raise ValueError(f"the range is empty: {low:#06x} > {high:#06x}")
        return (low, high)

    @field_validator("xfs_project_range", mode="before")
    @classmethod
    def _project_range(cls, value: Any, info: ValidationInfo) -> Any:
        # Mesos's form, brackets and all: [5000-10000]. In a YAML file, a list of two ids too.
        if isinstance(value, str):
            m = _RANGE_RE.fullmatch(value.strip())
            if not m:
                raise ValueError(f"{_quote(value)} must be a range like [5000-10000]")
            value = (int(m.group(1)), int(m.group(2)))
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
            raise ValueError(f"{_quote(value)} must be a range like [5000-10000]")
        low, high = value
        if low < FIRST_PROJECT_ID:
            raise ValueError(f"project id {_quote(low)} is not a project (0 is XFS's 'no project'): "
                             f"start at {FIRST_PROJECT_ID} or more")
        if low > high:
            raise ValueError(f"[{_quote(low)}-{_quote(high)}] is an empty range of project ids")
        if high > LAST_PROJECT_ID and _from_flags(info):
            raise ValueError(f"project id {_quote(high)} is out of range: project ids are 32 bits "
                             f"(at most {LAST_PROJECT_ID})")
        return (low, high)

    @field_validator("default_container_info", mode="before")
    @classmethod
    def _container_info(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value == "":
                return None      # empty is unset
            value = _parse_json(value, "a ContainerInfo")
            _check_value(value, json_text=True)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"expected a JSON object (a Mesos ContainerInfo), got {_quote(value)}")
        if value is not None:
            _check_container_info(value)
        return value

    @field_validator("attributes", mode="before")
    @classmethod
    def _attributes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _parse_attributes(value)
        return value

    @field_validator("effective_capabilities", "bounding_capabilities", mode="before")
    @classmethod
    def _capabilities(cls, value: Any) -> Any:
        from reconciler.models import CAPABILITY_NUMBERS
        if value is None:
            return None
        if isinstance(value, str) and value.strip().startswith("{"):
            # Mesos's own form: {"capabilities": ["NET_ADMIN", ...]}
            parsed = _parse_json(value, "Mesos's JSON {\"capabilities\": [...]}")
            _check_value(parsed, json_text=False)
            names = parsed.get("capabilities") if isinstance(parsed, dict) else None
            if not isinstance(names, list):
                raise ValueError(f"{_quote(value)} is not a comma list nor Mesos's JSON {{\"capabilities\": [...]}}")
            value = names
        if isinstance(value, str):   # an empty value is the empty set: drop every capability
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected capability names, got {_quote(value)}")
        names = [v.strip().upper() for v in value]
        for name in names:
            if name not in CAPABILITY_NUMBERS:
                hint = f" (use {name[4:]})" if name.startswith("CAP_") and name[4:] in CAPABILITY_NUMBERS else ""
                raise ValueError(f"unknown capability {_quote(name)}{hint}")
        return names

    @field_validator("http_address", mode="before")
    @classmethod
    def _http_address(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise ValueError(f"expected host:port, got {_quote(value)}")
        host, port = parse_host_port(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @field_validator("enforce_container_disk_quota", "disallow_sharing_agent_pid_namespace", "xfs_kill_containers",
                     "allow_privileged", "docker_ignore_image_user", "manifests_strict_modes", "network_cni_metrics",
                     mode="before")
    @classmethod
    def _bool(cls, value: Any) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            if not lowered:
                # An empty RECONCILER_ALLOW_PRIVILEGED= reads as "not set" to a person: never as true.
                raise ValueError("an empty value is neither true nor false: give true or false "
                                 "(the flag alone on the command line means true)")
            raise ValueError(f"{_quote(value)} is not true or false")
        return value

    # Defined last, so that pydantic runs it before every other check of a field.
    @field_validator("*", mode="before")
    @classmethod
    def _flag_value(cls, value: Any, info: ValidationInfo) -> Any:
        _check_value(value, json_text=info.field_name in JSON_FLAGS)
        return value

    @model_validator(mode="after")
    def _derived(self) -> "AgentConfig":
        if self.image_providers:
            # Mesos's refusals, in its order (MesosContainerizer::create, then the provisioner's Store::create).
            if "filesystem/linux" not in self.isolation:
                raise ValueError("The 'filesystem/linux' isolator must be enabled for container image support")
            if self.launcher != "linux":
                raise ValueError("The 'linux' launcher must be used for container image support")
            if "docker/runtime" not in self.isolation:
                raise ValueError("Docker runtime isolator has to be specified if 'DOCKER' is included in "
                                 "'image_providers'. Please add 'docker/runtime' to '--isolation' flags")
        if self.launcher == "posix":
            # disk/du (Mesos "posix/disk") only walks sandboxes: it works with any launcher, as in Mesos.
            linux_only = [i for i in self.isolation if not i.startswith("posix/") and i != "disk/du"]
            if linux_only:
                raise ValueError(
                    f"isolator '{linux_only[0]}' needs --launcher=linux (the posix launcher supports "
                    f"only posix/cpu and posix/mem)"
                )
        return self

    # Derived paths ---------------------------------------------------------------------------
    @property
    def status_path(self) -> str:
        return self.status_dir or os.path.join(self.work_dir, "status")

    @property
    def containers_path(self) -> str:
        """Checkpoints: one directory per container id (Mesos runtime_dir/containers)."""
        return os.path.join(self.work_dir, "containers")

    @property
    def sandboxes_path(self) -> str:
        return os.path.join(self.work_dir, "sandboxes")

    @property
    def docker_registry_url(self) -> str | None:
        """--docker_registry when it is a registry's URL rather than a directory."""
        return self.docker_registry if self.docker_registry and "://" in self.docker_registry else None

    @property
    def docker_registry_path(self) -> str:
        """The local registry's directory (unused when --docker_registry is a URL)."""
        if self.docker_registry and self.docker_registry_url is None:
            return self.docker_registry
        return os.path.join(self.work_dir, "images")

    @property
    def network_cni_plugin_path(self) -> list[str]:
        return self.network_cni_plugins_dir.split(":") if self.network_cni_plugins_dir else []

    @property
    def network_path(self) -> str:
        """network/cni: each container's networks, results and /etc files (Mesos's --network_cni_root_dir)."""
        return os.path.join(self.work_dir, "cni")

    @property
    def docker_store_path(self) -> str:
        """Mesos --docker_store_dir: where image layers are extracted, shared by every container."""
        return self.docker_store_dir or os.path.join(self.work_dir, "store", "docker")

    def public_flags(self) -> dict[str, Any]:
        """The flags as _agent.json shows them (Mesos /flags)."""
        return json.loads(self.model_dump_json())


FLAG_NAMES = list(AgentConfig.model_fields)
BOOL_FLAGS = {"enforce_container_disk_quota", "disallow_sharing_agent_pid_namespace", "xfs_kill_containers",
              "allow_privileged", "docker_ignore_image_user", "manifests_strict_modes", "network_cni_metrics"}


# What each flag is for, in the operator's words ---------------------------------------------------
# One table feeds `reconciler run --help` (a group per section) and docs/flags.md (a table per section,
# python3 docs/generate_flags.py), in this order. The text is Markdown as the page shows it; --help
# drops the backticks. tests/test_docs.py fails when a field of AgentConfig has no entry here.

@dataclass(frozen=True)
class FlagHelp:
    """What --help and docs/flags.md say of one flag."""
    section: str
    meaning: str
    # The default as the operator reads it where AgentConfig's own value would mislead: it depends on
    # who runs the agent, or on another flag. Markdown.
    default: str | None = None
    # How AgentConfig's default is spelled otherwise: as it is, or in the flag's own syntax.
    spelled: Literal["", "duration", "bytes", "MB", "handles", "range"] = ""


def _as_root(root: str, user: str) -> str:
    return f"`{root}` as root, else `{user}`"


FLAG_HELP: dict[str, FlagHelp] = {
    "manifests": FlagHelp(
        "Manifests and state",
        "The watched directory of manifests (`*.yaml`, `*.yml`, `*.json`). A ConfigMap volume or a git-sync "
        "link works: the swap of `..data` or of the link is seen."),
    "work_dir": FlagHelp(
        "Manifests and state",
        "Checkpoints (`containers/<id>/`) and sandboxes (`sandboxes/<id>/`). Keep it across agent restarts and "
        "upgrades: the next agent adopts containers from it.",
        default=_as_root("/var/lib/reconciler", "./.reconciler/work")),
    "status_dir": FlagHelp(
        "Manifests and state",
        "One `<name>.json` per container and the agent's `_agent.json`.",
        default="`<work_dir>/status`"),
    "default_container_info": FlagHelp(
        "Manifests and state",
        "JSON of a Mesos `ContainerInfo`, merged into manifests that give no `container`."),
    "resync_interval": FlagHelp(
        "Manifests and state",
        "Full re-list and re-check, besides file events; also the statistics refresh. At least `100ms`: each "
        "one re-lists the manifests and rewrites `_agent.json`.",
        spelled="duration"),
    "attributes": FlagHelp(
        "Manifests and state",
        "This node's attributes `k:v;k:v`, matched by a manifest's `spec.node_selector`; a manifest that does "
        "not match is not run here."),

    "isolation": FlagHelp(
        "Isolation and cgroups",
        "Mesos isolator names, comma-separated; they run in Mesos's fixed order whatever the order given. An "
        "empty value is an error (leave the flag out for the default).",
        default=_as_root(ROOT_ISOLATION, USER_ISOLATION)),
    "launcher": FlagHelp(
        "Isolation and cgroups",
        "`linux` (namespaces, a cgroup per container, needs root) or `posix` (a process session).",
        default=_as_root("linux", "posix")),
    "cgroups_root": FlagHelp(
        "Isolation and cgroups",
        "Every container is `<hierarchy>/<cgroups_root>/<id>`; nothing outside it is touched. Use a different "
        "root per agent on one host."),
    "disallow_sharing_agent_pid_namespace": FlagHelp(
        "Isolation and cgroups",
        "Refuse `linux_info.share_pid_namespace: true`."),
    "effective_capabilities": FlagHelp(
        "Isolation and cgroups",
        "With `linux/capabilities`: what containers get (`NET_ADMIN,CHOWN` or Mesos's "
        "`{\"capabilities\": [...]}`; empty = none)."),
    "bounding_capabilities": FlagHelp(
        "Isolation and cgroups",
        "With `linux/capabilities`: the most a container may ask for."),

    "cgroups_net_cls_primary_handle": FlagHelp(
        "net_cls",
        "With `cgroups/net_cls`: the primary handle (16 bits, decimal or hexadecimal, e.g. `0x0100`) of the "
        "classids it hands out."),
    "cgroups_net_cls_secondary_handles": FlagHelp(
        "net_cls",
        "With `cgroups/net_cls`: the range of secondary handles, one per container.",
        spelled="handles"),

    "container_disk_watch_interval": FlagHelp(
        "Disk",
        "With `disk/du` and `disk/xfs`: how often sandboxes' usage is read (at least `1ms`).",
        spelled="duration"),
    "enforce_container_disk_quota": FlagHelp(
        "Disk",
        "With `disk/du`: a container over its `disk` resource is destroyed (`Failed`, reason `DiskLimitation`). "
        "With `disk/xfs`: writes past `disk` fail (EDQUOT)."),
    "xfs_project_range": FlagHelp(
        "Disk",
        "With `disk/xfs`: the XFS project ids it may use, one per container: `[low-high]`, within "
        "`[1-4294967295]` (32 bits; 0 is no project).",
        spelled="range"),
    "xfs_kill_containers": FlagHelp(
        "Disk",
        "With `disk/xfs` and `--enforce_container_disk_quota`: the soft limit is `disk`, the hard one `disk` + "
        "headroom, and a container past the soft limit is destroyed (`DiskLimitation`)."),
    "xfs_quota_headroom": FlagHelp(
        "Disk",
        "With `disk/xfs`: the room between the soft and the hard limit, a size (`10MB`, `512KB`); a bare "
        "number is MB, as it always was.",
        spelled="MB"),

    "container_logger_max_stdout_size": FlagHelp(
        "Container logs",
        "A sandbox's `stdout` is rotated past this size (at least a page; a bare number is bytes), checked "
        "every `--resync_interval` (Mesos's logrotate container logger; 0: never rotated).",
        spelled="bytes"),
    "container_logger_max_stderr_size": FlagHelp(
        "Container logs",
        "The same for `stderr`.",
        spelled="bytes"),
    "container_logger_keep": FlagHelp(
        "Container logs",
        "Rotated files kept (`stdout.1` ... `stdout.N`); 0 drops rotated output."),

    "docker_registry": FlagHelp(
        "Images",
        "Where images come from: a local directory of `<reference>.tar` archives or OCI layouts (Mesos's local "
        "registry), or a registry's URL, `https://HOST[:PORT]` (Docker Registry v2 / OCI distribution; a "
        "reference without a host is looked up there).",
        default="`<work_dir>/images`"),
    "docker_config": FlagHelp(
        "Images",
        "With `--docker_registry` a URL: Docker's `config.json`, whose `auths` give the registry's credentials "
        "(Basic, or for its token server)."),
    "docker_registry_ca_file": FlagHelp(
        "Images",
        "With `--docker_registry` a URL: a CA bundle (PEM) for a registry whose certificate the host does not trust."),
    "docker_insecure_registries": FlagHelp(
        "Images",
        "Registries (`HOST:PORT`, comma-separated) that `--docker_registry http://...` may name: plain http is "
        "refused for any other."),
    "fetcher_stall_timeout": FlagHelp(
        "Images",
        "With `--docker_registry` a URL: a download with no byte for this long fails (and is retried, resuming "
        "where it stopped); Mesos's flag.",
        spelled="duration"),
    "docker_tag_refresh_interval": FlagHelp(
        "Images",
        "With `--docker_registry` a URL: how long a pulled tag is trusted before the next launch asks the "
        "registry where it points again (`0s`: at every launch). `never` keeps it until `reconciler images "
        "pull` or a manifest's `image.cached: false` (Mesos's Image.cached) asks again; a digest never moves.",
        default="`never`", spelled="duration"),
    "image_providers": FlagHelp(
        "Images",
        "`docker` to run `container.image` (needs `filesystem/linux` and `docker/runtime` in `--isolation`)."),
    "docker_store_dir": FlagHelp(
        "Images",
        "Where image layers are extracted, shared by every container.",
        default="`<work_dir>/store/docker`"),
    "docker_max_image_size": FlagHelp(
        "Images",
        "The most an image's layers may expand to, all together (sparse files counted at their full size); a "
        "bigger image is refused. A bare number is bytes.",
        spelled="bytes"),

    "http_address": FlagHelp(
        "HTTP",
        "`host:port` of `/healthz`, `/readyz`, `/metrics`, `/state`, `/monitor/statistics`; off when unset."),

    "seccomp_config_dir": FlagHelp(
        "Security",
        "Mesos's `linux/seccomp`: a directory of seccomp profiles in Docker's JSON format, named by "
        "`--seccomp_profile_name` and a manifest's `linux_info.seccomp.profile_name`."),
    "seccomp_profile_name": FlagHelp(
        "Security",
        "The seccomp profile of every container that names none: a file of `--seccomp_config_dir`, or "
        "`unconfined` for none. Unset: the agent's own default profile (docs/security.md)."),
    "allow_privileged": FlagHelp(
        "Security",
        "Let a manifest ask for `linux_info.privileged: true` (every capability, every device, no seccomp "
        "filter, no masked paths). Refused otherwise."),
    "docker_ignore_image_user": FlagHelp(
        "Security",
        "Mesos's behaviour: an image's `User` is ignored (with a warning) and the command runs as "
        "`command.user`, else root. Off: the image's `User` applies as in Docker."),
    "manifests_strict_modes": FlagHelp(
        "Security",
        "As sshd's StrictModes: manifests are read only from a directory (and its ancestors) and files owned by "
        "root (or the agent's user) and writable by nobody else; a sticky ancestor such as /tmp, and a "
        "read-only mount, are accepted. A refused directory destroys nothing. `false` relaxes it (also a flag "
        "of `reconciler validate`)."),

    "network_cni_config_dir": FlagHelp(
        "Networking",
        "With `network/cni`: the CNI network configurations (`.conf`, `.conflist`, `.json`; CNI spec up to "
        "1.0.0), re-read at every launch. Required with `network/cni`."),
    "network_cni_plugins_dir": FlagHelp(
        "Networking",
        "With `network/cni`: where CNI plugins are found, a search path (`/usr/lib/cni:/opt/cni/bin`). Required "
        "with `network/cni`; a missing directory stops the agent at start."),
    "network_cni_metrics": FlagHelp(
        "Networking",
        "With `network/cni`: each container's interface counters (`net_rx_bytes`, ... `net_tx_dropped`) in its "
        "statistics."),
    "network_cni_plugin_timeout": FlagHelp(
        "Networking",
        "With `network/cni`: a plugin still running after this long is killed with its process group, and its "
        "ADD or DEL fails (at least `100ms`).",
        spelled="duration"),
    "default_container_dns": FlagHelp(
        "Networking",
        "With `network/cni`: Mesos's JSON (`{\"mesos\": [{\"network_mode\": \"CNI\", \"network_name\": \"net1\", "
        "\"dns\": {\"nameservers\": [...]}}]}`) for networks whose plugins give no DNS; else the host's "
        "`/etc/resolv.conf` without loopback nameservers."),
    "egress_rate_limit_per_container": FlagHelp(
        "Networking",
        "With `network/cni`: what a container on CNI networks may send per second (`10MB`), unless its "
        "`resources.net_egress_rate` says; Mesos's flag. Needs a plugin with the `bandwidth` capability in the "
        "network's chain. Unset: no limit."),
}

# A flag added to AgentConfig before its entry above still works, in this section (and fails the docs test).
_UNDESCRIBED = FlagHelp("Other", "")


def flag_help(name: str) -> FlagHelp:
    return FLAG_HELP.get(name, _UNDESCRIBED)


def described_flags() -> list[str]:
    """Every flag, in the order --help and docs/flags.md show them: the table's, then any not in it."""
    return [name for name in FLAG_HELP if name in AgentConfig.model_fields] + \
        [name for name in FLAG_NAMES if name not in FLAG_HELP]


def shown_default(name: str) -> str:
    """A flag's default as docs/flags.md shows it (Markdown)."""
    entry = flag_help(name)
    if entry.default is not None:
        return entry.default
    value: Any = AgentConfig.model_fields[name].default
    if entry.spelled == "duration":
        return f"`{value:g}secs`"
    if entry.spelled == "bytes":
        return f"`{format_bytes(value)}`"
    if entry.spelled == "MB":
        return f"`{format_bytes(megabytes_to_bytes(value))}`"
    if entry.spelled == "handles":
        return f"`{value[0]:#06x},{value[1]:#06x}`"
    if entry.spelled == "range":
        return f"`[{value[0]}-{value[1]}]`"
    if value is None or value == [] or value == {}:
        return "unset"
    if value is False:
        return "off"
    return f"`{value}`"


def _terminal(markdown: str) -> str:
    """Markdown as --help prints it: no backticks, and argparse's own % escaped."""
    return markdown.replace("`", "").replace("%", "%%")


FLAGS_EPILOG = ("Each flag may also be given as RECONCILER_<FLAG> in the environment or as a key of the --config "
                "file: the command line wins over the environment, and the environment over the file. Durations: "
                "500ms, 15secs, 1mins; sizes: 512KB, 10MB, 20GB. docs/flags.md says more.")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags common to `run` and `once`, a group per section with their help; defaults stay None so we
    can tell what was given (the help says the real one)."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of flags, flag names as keys (also RECONCILER_CONFIG)")
    if parser.epilog is None:
        parser.epilog = FLAGS_EPILOG
    groups: dict[str, Any] = {}
    for name in described_flags():
        entry = flag_help(name)
        if entry.section not in groups:
            groups[entry.section] = parser.add_argument_group(entry.section)
        group = groups[entry.section]
        meaning = _terminal(entry.meaning or "(not described yet)")
        text = f"{meaning} (default: {_terminal(shown_default(name))})"
        if name in BOOL_FLAGS:
            group.add_argument(f"--{name}", nargs="?", const="true", default=None, metavar="BOOL", help=text)
        else:
            group.add_argument(f"--{name}", default=None, metavar=name.upper(), help=text)


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Build the config from file < environment < command line. Raises ConfigError."""
    if environ is None:
        environ = os.environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_file = getattr(args, "config", None) or environ.get("RECONCILER_CONFIG")
    if config_file:
        for key, value in _read_config_file(config_file).items():
            values[key], sources[key] = value, f"config file {_shown_path(config_file)}"
    for name in FLAG_NAMES:
        env_name = f"RECONCILER_{name.upper()}"
        if env_name in environ:
            values[name], sources[name] = environ[env_name], f"environment {env_name}"
        given = getattr(args, name, None)
        if given is not None:
            values[name], sources[name] = given, "command line"
    try:
        return AgentConfig.model_validate(values, context=FROM_FLAGS)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = str(err["loc"][0]) if err["loc"] else ""
        message = _one_line(err["msg"].removeprefix("Value error, "))
        where = f" (from {sources[flag]})" if flag in sources else ""
        if not flag:
            raise ConfigError(message) from None
        raise ConfigError(f"flag --{flag}{where}: {message}") from None


def _one_line(message: str, limit: int = 400) -> str:
    """A message as one bounded line, whatever a value it quotes held (our own messages quote safely)."""
    if len(message) > limit:
        message = message[:limit - 3] + "..."
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)


def _shown_path(path: str) -> str:
    """A path as messages show it: as it is, unless it needs escaping or is too long to read."""
    return path if path.isprintable() and len(path) <= 2 * MAX_QUOTED_CHARS else _quote(path)


def _read_config_file(path: str) -> dict[str, Any]:
    shown = _shown_path(path)
    data = _config_file_bytes(path, shown)
    try:
        _check_yaml_size(data, shown)
        doc = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "a syntax error"
        raise ConfigError(_one_line(f"flag --config: {shown} is not valid YAML{where}: {problem}")) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"flag --config: {shown} is not YAML text: {exc.reason} at byte {exc.position}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_one_line(f"flag --config: {shown} is not valid YAML: {exc}")) from None
    except Exception:  # noqa: BLE001 - a YAML constructor's own failure (a 5000-digit int, a bad !!timestamp)
        raise ConfigError(f"flag --config: {shown} holds a value YAML cannot build: a number of more than "
                          "4300 digits, or a value that is not of its explicit !!tag") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"flag --config: {shown} must be a mapping of flag names to values")
    unknown = [k for k in doc if not isinstance(k, str) or k.replace("-", "_") not in FLAG_NAMES]
    if unknown:
        raise ConfigError(f"flag --config: {shown}: unknown flag {_quote(unknown[0])}")
    return {k.replace("-", "_"): v for k, v in doc.items()}


def _config_file_bytes(path: str, shown: str) -> bytes:
    try:
        _, data = read_config_file(path, limit=MAX_CONFIG_FILE_BYTES)
    except NotRegularFileError:
        raise ConfigError(f"flag --config: {shown} is not a regular file") from None
    except FileTooLargeError:
        raise ConfigError(f"flag --config: {shown} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB: "
                          "a file of flags is a few lines") from None
    except OSError as exc:
        raise ConfigError(f"flag --config: cannot read {shown}: {exc.strerror}") from None
    return data


def _check_yaml_size(data: bytes, shown: str) -> None:
    """Refuse, before anything is built, a file nested too deeply or of too many values once its
    aliases are expanded (see reconciler.yamlbounds); a syntax error is left to the loader."""
    try:
        past = first_past_limits(data, MAX_STRUCTURE_VALUES, MAX_STRUCTURE_DEPTH)
    except yaml.YAMLError:
        return
    if past is not None:
        raise ConfigError(f"flag --config: {shown}: more than {MAX_STRUCTURE_VALUES} values (YAML aliases "
                          f"expanded), or nested more than {MAX_STRUCTURE_DEPTH} deep, past line "
                          f"{past.line}: a file of flags is a few lines")
