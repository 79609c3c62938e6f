"""The agent's flags: Mesos names, from the command line, RECONCILER_<FLAG> variables and a YAML --config file.

Precedence: command line over environment over file over default. Every value is validated once,
here; an error names the flag and where its value came from, and the CLI exits 2 on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from reconciler.units import parse_duration

IS_ROOT = os.geteuid() == 0
ROOT_ISOLATION = "filesystem/shared,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"
USER_ISOLATION = "posix/cpu,posix/mem"


class ConfigError(Exception):
    """A bad flag value: one line, naming the flag and the reason."""


def _parse_handle(value: str | int, flag: str) -> int:
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        try:
            number = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            raise ValueError(f"{value!r} is not a decimal or hexadecimal (0x...) number") from None
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"{value!r} is out of range: a net_cls handle is 16 bits (0x0000-0xffff)")
    return number


def _parse_attributes(text: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not of the form key:value (attributes are 'k:v;k:v')")
        attributes[key.strip()] = value.strip()
    return attributes


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); the host keeps its brackets off."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9.-]+):(\d+)", text)
    if not m:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:5051, 0.0.0.0:5051 or [::1]:5051)")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} of {text!r} is out of range 1-65535")
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

    @field_validator("isolation", "image_providers", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("isolation")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"Duplicate entries found in --isolation flag '{','.join(value)}'")
        return value

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, value: str) -> str:
        if value not in ("linux", "posix"):
            raise ValueError(f"unknown launcher {value!r}: expected linux or posix")
        if value == "linux" and not IS_ROOT:
            raise ValueError("the linux launcher needs root (namespaces and cgroups); use --launcher=posix")
        return value

    @field_validator("image_providers")
    @classmethod
    def _image_types(cls, value: list[str]) -> list[str]:
        # Mesos Store::create: the names are case-insensitive; APPC is Mesos's but not ours.
        for name in value:
            if name.upper() not in ("APPC", "DOCKER"):
                raise ValueError(f"Unknown image type '{name}'")
            if name.upper() != "DOCKER":
                raise ValueError(f"Unsupported image type '{name}'")
        return ["docker"] if value else []

    @field_validator("work_dir", "status_dir", "docker_registry", "docker_store_dir", "seccomp_config_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Sandboxes and checkpoints are used by processes whose working directory is not ours.
        return os.path.abspath(value) if value else value

    @field_validator("cgroups_root")
    @classmethod
    def _cgroups_root(cls, value: str) -> str:
        value = value.strip("/")
        if not value or ".." in value.split("/"):
            raise ValueError(f"{value!r} is not a cgroup path below the hierarchy roots")
        return value

    @field_validator("container_disk_watch_interval", "resync_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be longer than zero")
        return seconds

    @field_validator("container_logger_max_stdout_size", "container_logger_max_stderr_size", mode="before")
    @classmethod
    def _log_size(cls, value: Any) -> int:
        from reconciler.logs import parse_size
        return parse_size(value)

    @field_validator("docker_max_image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> int:
        from reconciler.logs import parse_size
        size = parse_size(value)
        if size <= 0:
            raise ValueError("must be more than 0 bytes (Mesos sizes: 512MB, 20GB)")
        return size

    @field_validator("seccomp_profile_name")
    @classmethod
    def _profile_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or value in (".", "..")):
            raise ValueError(f"{value!r} must be a file name in --seccomp_config_dir, or 'unconfined'")
        return value

    @field_validator("container_logger_keep", mode="before")
    @classmethod
    def _log_keep(cls, value: Any) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a whole number of files") from None
        if number < 0 or number > 1000:
            raise ValueError(f"{value!r} must be between 0 (drop rotated output) and 1000")
        return number

    @field_validator("cgroups_net_cls_primary_handle", mode="before")
    @classmethod
    def _primary(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        number = _parse_handle(value, "primary")
        if number == 0:
            raise ValueError("the primary handle must not be 0")
        return number

    @field_validator("cgroups_net_cls_secondary_handles", mode="before")
    @classmethod
    def _secondary(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p for p in value.split(",")]
            if len(parts) != 2:
                raise ValueError(f"{value!r} must be two handles 'low,high', e.g. 0x0001,0xffff")
            value = parts
        low, high = (_parse_handle(v, "secondary") for v in value)
        if low == 0:
            raise ValueError("secondary handle 0 is reserved")
        if low > high:
            raise ValueError(f"the range is empty: {low:#06x} > {high:#06x}")
        return (low, high)

    @field_validator("xfs_project_range", mode="before")
    @classmethod
    def _project_range(cls, value: Any) -> Any:
        if isinstance(value, str):
            m = re.fullmatch(r"\s*\[?\s*(\d+)\s*-\s*(\d+)\s*\]?\s*", value)
            if not m:
                raise ValueError(f"{value!r} must be a range like [5000-10000]")
            value = (int(m.group(1)), int(m.group(2)))
        low, high = value
        if low <= 0 or low > high:
            raise ValueError(f"[{low}-{high}] is not a valid range of project ids")
        return (low, high)

    @field_validator("default_container_info", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
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
            try:
                value = json.loads(value).get("capabilities", [])
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{value!r} is not a comma list nor Mesos's JSON {{\"capabilities\": [...]}}") from None
        if isinstance(value, str):   # an empty value is the empty set: drop every capability
            value = [v for v in value.split(",") if v.strip()]
        names = [str(v).strip().upper() for v in value]
        for name in names:
            if name not in CAPABILITY_NUMBERS:
                hint = f" (use {name[4:]})" if name.startswith("CAP_") and name[4:] in CAPABILITY_NUMBERS else ""
                raise ValueError(f"unknown capability {name!r}{hint}")
        return names

    @field_validator("http_address", mode="before")
    @classmethod
    def _http_address(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        host, port = parse_host_port(str(value))
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @field_validator("xfs_quota_headroom", mode="before")
    @classmethod
    def _headroom(cls, value: Any) -> Any:
        from reconciler.units import parse_megabytes
        return parse_megabytes(value)

    @field_validator("enforce_container_disk_quota", "disallow_sharing_agent_pid_namespace", "xfs_kill_containers",
                     "allow_privileged", "docker_ignore_image_user", "manifests_strict_modes", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes", "on", ""):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not true or false")
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
    def docker_registry_path(self) -> str:
        return self.docker_registry or os.path.join(self.work_dir, "images")

    @property
    def docker_store_path(self) -> str:
        """Mesos --docker_store_dir: where image layers are extracted, shared by every container."""
        return self.docker_store_dir or os.path.join(self.work_dir, "store", "docker")

    def public_flags(self) -> dict[str, Any]:
        """The flags as _agent.json shows them (Mesos /flags)."""
        return json.loads(self.model_dump_json())


FLAG_NAMES = list(AgentConfig.model_fields)
BOOL_FLAGS = {"enforce_container_disk_quota", "disallow_sharing_agent_pid_namespace", "xfs_kill_containers",
              "allow_privileged", "docker_ignore_image_user", "manifests_strict_modes"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags common to `run` and `once`; defaults stay None so we can tell what was given."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of flags (flag names as keys)")
    for name in FLAG_NAMES:
        if name in BOOL_FLAGS:
            parser.add_argument(f"--{name}", nargs="?", const="true", default=None, metavar="BOOL")
        else:
            parser.add_argument(f"--{name}", default=None, metavar=name.upper())


def load(args: argparse.Namespace, environ: dict[str, str] | None = None) -> AgentConfig:
    """Build the config from file < environment < command line. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_file = getattr(args, "config", None) or environ.get("RECONCILER_CONFIG")
    if config_file:
        for key, value in _read_config_file(config_file).items():
            values[key], sources[key] = value, f"config file {config_file}"
    for name in FLAG_NAMES:
        env_name = f"RECONCILER_{name.upper()}"
        if env_name in environ:
            values[name], sources[name] = environ[env_name], f"environment {env_name}"
        given = getattr(args, name, None)
        if given is not None:
            values[name], sources[name] = given, "command line"
    try:
        return AgentConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = str(err["loc"][0]) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        where = f" (from {sources[flag]})" if flag in sources else ""
        if not flag:
            raise ConfigError(message) from None
        raise ConfigError(f"flag --{flag}{where}: {message}") from None


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as exc:
        raise ConfigError(f"flag --config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"flag --config: {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"flag --config: {path} must be a mapping of flag names to values")
    unknown = [k for k in doc if str(k).replace("-", "_") not in FLAG_NAMES]
    if unknown:
        raise ConfigError(f"flag --config: {path}: unknown flag {unknown[0]!r}")
    return {str(k).replace("-", "_"): v for k, v in doc.items()}
