"""The pydantic models at the agent's edges: the manifest (what operators write) and the status documents.

Field names are Mesos's (mesos.proto's JSON form) so an operator can carry a ContainerInfo over
unchanged. Every model forbids unknown fields: a typo such as `resurces` must be an error naming
the field, not a silently ignored key that leaves a container without its limits.

Manifest models are frozen because the source's parse cache hands the same objects to every
listing; status models stay mutable because the loop builds them up field by field.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import resource
from typing import Annotated, Any, Callable, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from reconciler.images.errors import InvalidReference
from reconciler.images.reference import parse_reference
from reconciler.units import format_duration, parse_bytes, parse_duration, parse_megabytes, quoted

API_VERSION = "reconciler/v1"

_MANIFEST_CONFIG = ConfigDict(extra="forbid", frozen=True)
_STATUS_CONFIG = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Bounds: what the kernel can be given. A value past them can never launch, so it is an error of
# the manifest rather than a launch retried for ever.
# --------------------------------------------------------------------------------------------

MAX_MEGABYTES = 2 ** 43          # 8 EiB: a memory or disk limit in bytes must fit the kernel's 64 bits
MAX_DURATION = 365 * 86400.0     # a kill grace period of a year is already a container that never stops
MAX_CPUS = 1_000_000             # the CFS quota of that many CPUs still fits the kernel's bound
MAX_RLIMIT = 2 ** 63 - 1         # rlim_t; leave soft and hard out for unlimited
# execve(2): one argument or environment string is at most MAX_ARG_STRLEN (32 pages) with its NUL;
# all of them together at most ARG_MAX, a quarter of the stack limit (2 MiB with the usual 8 MiB):
# half of that is left for the environment the agent and the isolators add.
MAX_EXEC_STRING = 32 * 4096 - 1
MAX_EXEC_BYTES = 1024 * 1024
MAX_ITEMS = 65_536               # arguments, environment variables
MAX_VOLUMES = 1024
MAX_BYTE_RATE = 1 << 40          # 1TB per second, far past any interface; tc's rates are 64-bit

MAX_QUOTED_CHARS = 80            # of a value in an error line: a whole name (63) or hostname (64)


def _quote(value: Any) -> str:
    """A value a message quotes (units.quoted): one line, whatever the input holds."""
    return quoted(value, MAX_QUOTED_CHARS)


def _cut(text: str) -> str:
    """A path shown without quotes, cut short in its middle (at most 80 characters)."""
    return text if len(text) <= 80 else text[:38] + "..." + text[-39:]


# --------------------------------------------------------------------------------------------
# Scalar types with Mesos spellings
# --------------------------------------------------------------------------------------------

def _to_seconds(value: Any) -> Any:
    # units.parse_duration trusts its caller's type; anything else must become a ValueError so
    # pydantic reports it against the field instead of crashing the listing.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a duration such as 10secs or 500ms, or a number of seconds, got {_quote(value)}")
    return _at_most(_number(parse_duration, value), MAX_DURATION, f"{int(MAX_DURATION // 86400)}days")


def _to_megabytes(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected megabytes as a number, or a string such as 128Mi or 1Gi, got {_quote(value)}")
    return _at_most(_number(parse_megabytes, value), MAX_MEGABYTES, f"{MAX_MEGABYTES} MB (8 EiB)")


def _number(parse: Callable[[Any], float], value: str | int | float) -> float:
    """parse(value) as a float; infinite when it is past a float's range, never an OverflowError."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    try:
        number = float(parse(value))
    except OverflowError:
        return math.inf   # an integer of 309 digits
    if math.isnan(number):
        raise ValueError("expected a finite number, got nan")
    return number


def _at_most(number: float, maximum: float, spelled: str) -> float:
    if number > maximum:
        raise ValueError(f"too large: at most {spelled}")
    return number


def _at_most_number(maximum: int) -> Any:
    """A check before pydantic's own: an integer past a float's range is an OverflowError there,
    which escapes validation, and a bound gives a clearer message than pydantic's."""
    def check(value: Any) -> Any:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)   # pydantic's lax mode takes "1e308" (YAML 1.1 reads it as a string)
            except ValueError:
                return value
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {number}")
        if isinstance(number, (int, float)) and not isinstance(number, bool) and number > maximum:
            raise ValueError(f"too large: at most {maximum}")
        return value
    return BeforeValidator(check)


Duration = Annotated[
    float,
    BeforeValidator(_to_seconds),
    Field(ge=0, allow_inf_nan=False),
    # Written back the way an operator writes it ("10secs"), which also keeps hashes readable.
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": MAX_DURATION},
            {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*[a-zA-Z]+\s*$"},
        ],
        "description": "Seconds, or a Mesos duration: 500ms, 10secs, 1mins, 2hrs; at most 365days",
    }, mode="validation"),
]

Megabytes = Annotated[
    float,
    BeforeValidator(_to_megabytes),
    Field(gt=0, allow_inf_nan=False),
    WithJsonSchema({
        "anyOf": [
            {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_MEGABYTES},
            {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*([KMGTkmgt][iI])?\s*$"},
        ],
        "description": "Megabytes (Mesos units), or a binary quantity such as 128Mi or 1Gi; at most 8 EiB",
    }, mode="validation"),
]

def _to_bytes_per_second(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected bytes per second such as 10MB or 512KB, got {_quote(value)}")
    try:
        rate = parse_bytes(value, bare_unit=1)
    except OverflowError:
        raise ValueError("too large: at most 1TB per second") from None
    return _at_most(rate, MAX_BYTE_RATE, "1TB per second")


ByteRate = Annotated[
    int,
    BeforeValidator(_to_bytes_per_second),
    Field(gt=0),
    WithJsonSchema({
        "anyOf": [{"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_BYTE_RATE},
                  {"type": "string", "pattern": r"^[0-9]+([KkMmGgTt]?[Bb])?$"}],
        "description": "Bytes per second, a Mesos size (10MB, 512KB; binary multiples) or a number of bytes",
    }, mode="validation"),
]

# Matched whole (fullmatch): "web\n" is no name, though `$` matches before a final newline.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
# The same rules in the JSON Schema. Its end is "followed by nothing", not `$`: validators written
# in Python (jsonschema) search with `re`, where `$` also matches before a final newline.
END_OF_TEXT = r"(?![\s\S])"
DNS1123_LABEL_PATTERN = "^" + _DNS1123_LABEL.pattern + END_OF_TEXT
HOSTNAME_PATTERN = "^" + _HOSTNAME_LABEL.pattern + r"(\." + _HOSTNAME_LABEL.pattern + ")*" + END_OF_TEXT


def is_dns1123_label(name: str) -> bool:
    """Whether `name` may name a container; it also becomes a status file name, so it must be path-safe."""
    return len(name) <= 63 and bool(_DNS1123_LABEL.fullmatch(name))


# --------------------------------------------------------------------------------------------
# Manifest: metadata
# --------------------------------------------------------------------------------------------

class Metadata(BaseModel):
    """Identity of the container; `name` is unique across the manifest directory."""

    model_config = _MANIFEST_CONFIG

    name: str = Field(description="DNS-1123 label: lowercase letters, digits and '-', at most 63 characters",
                      json_schema_extra={"pattern": DNS1123_LABEL_PATTERN, "maxLength": 63})
    labels: dict[str, str] = {}

    @field_validator("name")
    @classmethod
    def _name_is_dns1123_label(cls, name: str) -> str:
        if len(name) > 63:
            raise ValueError(f"name {_quote(name)} is longer than 63 characters")
        if not _DNS1123_LABEL.fullmatch(name):
            raise ValueError(
                f"name {_quote(name)} is not a DNS-1123 label: use lowercase letters, digits and '-', "
                "starting and ending with a letter or digit (e.g. 'web', 'batch-job-2')"
            )
        return name


# --------------------------------------------------------------------------------------------
# Manifest: resources and command
# --------------------------------------------------------------------------------------------

class Resources(BaseModel):
    """Mesos scalar resources; unset means not limited."""

    model_config = _MANIFEST_CONFIG

    cpus: Annotated[float, Field(gt=0, le=MAX_CPUS, allow_inf_nan=False), _at_most_number(MAX_CPUS)] | None = None
    mem: Megabytes | None = None
    disk: Megabytes | None = None
    # network/cni: what the container may receive and send, per second, on each CNI network it joins
    # (through the plugins' `bandwidth` capability); changed in place, as every resource.
    net_ingress_rate: ByteRate | None = None
    net_egress_rate: ByteRate | None = None


class EnvironmentVariable(BaseModel):
    model_config = _MANIFEST_CONFIG

    name: str = Field(json_schema_extra={"minLength": 1, "pattern": "^[^=\u0000]+" + END_OF_TEXT})
    type: Literal["VALUE"] = "VALUE"
    value: str

    @field_validator("type", mode="before")
    @classmethod
    def _only_value(cls, value: Any) -> Any:
        if value != "VALUE":
            raise ValueError(f"only VALUE environment variables are supported, got {_quote(value)}")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_settable(cls, name: str) -> str:
        # execve cannot express these: an '=' would split the name, a NUL would truncate it.
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"invalid environment variable name {_quote(name)}: must be non-empty, without '=' or NUL")
        return name


class Environment(BaseModel):
    model_config = _MANIFEST_CONFIG

    variables: list[EnvironmentVariable] = Field(default=[], max_length=MAX_ITEMS)


class CommandInfo(BaseModel):
    """Mesos CommandInfo. shell=true runs `value` with /bin/sh -c (arguments are ignored, as in Mesos);
    shell=false executes `value` with `arguments` as its argv (argv[0] included)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        # What _value_is_given says, for editors: a shell command needs a value with something in it.
        "if": {"not": {"properties": {"shell": {"const": False}}, "required": ["shell"]}},
        "then": {"required": ["value"], "properties": {"value": {"type": "string", "pattern": "\\S"}}},
    })

    shell: bool = True
    value: str | None = None
    arguments: list[str] = Field(default=[], max_length=MAX_ITEMS)
    environment: Environment | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _value_is_given(self) -> CommandInfo:
        if self.shell and not (self.value and self.value.strip()):
            raise ValueError("Shell command is not specified: set command.value")
        # shell=false without a value is checked by ContainerSpec: an image's Entrypoint/Cmd may supply it.
        return self

    @model_validator(mode="after")
    def _fits_execve(self) -> CommandInfo:
        # What execve(2) would refuse with E2BIG or EINVAL (a NUL cuts a string short): refused here,
        # where the operator sees it, rather than a launch failing for ever.
        strings = [("value", self.value or "")]
        strings += [(f"arguments[{i}]", argument) for i, argument in enumerate(self.arguments)]
        if self.environment is not None:
            strings += [(f"environment.variables[{i}]", f"{v.name}={v.value}")
                        for i, v in enumerate(self.environment.variables)]
        total = 0
        for where, text in strings:
            size = len(text.encode("utf-8", "surrogatepass"))
            if "\0" in text:
                raise ValueError(f"{where} contains a NUL character, which no command line can hold")
            if size > MAX_EXEC_STRING:
                raise ValueError(f"{where} is {size} bytes; the kernel takes at most {MAX_EXEC_STRING} in one "
                                 "argument or environment variable (MAX_ARG_STRLEN)")
            total += size + 1 + 8   # its NUL, and its pointer in argv or envp
        if total > MAX_EXEC_BYTES:
            raise ValueError(f"the command line and environment are {total} bytes; at most {MAX_EXEC_BYTES} "
                             "(half of the kernel's usual ARG_MAX, the rest is the agent's environment)")
        return self

    @field_validator("user")
    @classmethod
    def _user_not_empty(cls, user: str | None) -> str | None:
        if user is not None and not user.strip():
            raise ValueError("user must not be empty; leave it out to run as the agent's user")
        return user


# --------------------------------------------------------------------------------------------
# Manifest: ContainerInfo
# --------------------------------------------------------------------------------------------

# reconciler.images.reference's grammar, for editors: registry host first only when it looks like one.
_COMPONENT_PATTERN = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_PATTERN = (r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                 r"(?::[0-9]{1,5})?/)?")
DOCKER_REFERENCE_PATTERN = (f"^{_HOST_PATTERN}{_COMPONENT_PATTERN}(?:/{_COMPONENT_PATTERN})*"
                            r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?" + END_OF_TEXT)


class DockerImage(BaseModel):
    model_config = _MANIFEST_CONFIG

    name: str = Field(min_length=1, description="A Docker image reference: [registry/]repository[:tag][@digest]",
                      json_schema_extra={"pattern": DOCKER_REFERENCE_PATTERN})

    @field_validator("name")
    @classmethod
    def _is_a_reference(cls, name: str) -> str:
        try:
            parse_reference(name)
        except InvalidReference as exc:
            raise ValueError(str(exc).replace(f"'{name}'", _quote(name))) from None
        return name


class Image(BaseModel):
    model_config = _MANIFEST_CONFIG

    type: Literal["DOCKER"]
    docker: DockerImage
    cached: bool = Field(default=True, description=(
        "Mesos's Image.cached: false resolves the reference again at every launch, even when the store has it "
        "(a tag that moves); true uses the stored image (see --docker_tag_refresh_interval)"))


class MesosInfo(BaseModel):
    model_config = _MANIFEST_CONFIG

    image: Image | None = None


def _has_dotdot(path: str) -> bool:
    return ".." in path.split("/")


class Volume(BaseModel):
    """A bind mount. host_path absolute = that host path; relative = a directory in the sandbox."""

    model_config = _MANIFEST_CONFIG

    container_path: str = Field(json_schema_extra={
        "pattern": r"^/", "not": {"pattern": r"(^|/)\.\.(/|$)|^/+$"}})
    host_path: str | None = Field(default=None, json_schema_extra={
        "minLength": 1, "not": {"pattern": r"^[^/](.*/)?\.\.(/|$)|^\.\.(/|$)"}})
    mode: Literal["RW", "RO"] = "RW"

    @field_validator("container_path")
    @classmethod
    def _container_path_is_absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"container_path {_quote(path)} must be an absolute path")
        if _has_dotdot(path):
            raise ValueError(f"container_path {_quote(path)} must not contain a '..' component")
        if posixpath.normpath(path) in ("/", "//"):
            raise ValueError("container_path must not be '/': a volume cannot replace the root filesystem")
        return path

    @field_validator("host_path")
    @classmethod
    def _relative_host_path_stays_in_sandbox(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if not path:
            raise ValueError("host_path must not be empty; leave it out instead")
        # A relative host_path is resolved inside the sandbox; '..' would reach outside it.
        if not path.startswith("/") and _has_dotdot(path):
            raise ValueError(f"relative host_path {_quote(path)} must not contain a '..' component "
                             "(it is a path in the sandbox)")
        return path


CapName = Literal[
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]

# mesos.proto numbers these 1000 + the Linux number, in the order of <linux/capability.h>, so the
# position in CapName is the kernel's capability number.
CAPABILITY_NUMBERS: dict[str, int] = {name: number for number, name in enumerate(get_args(CapName))}


def _check_capability(value: Any) -> Any:
    # A 41-name enum error is unreadable; say what is wrong, and catch the common CAP_ prefix.
    if isinstance(value, str) and value not in CAPABILITY_NUMBERS:
        if value.startswith("CAP_") and value[4:] in CAPABILITY_NUMBERS:
            raise ValueError(f"unknown capability {_quote(value)}: Mesos names have no CAP_ prefix, use {value[4:]!r}")
        raise ValueError(f"unknown capability {_quote(value)}: expected a Linux capability name "
                         "such as NET_BIND_SERVICE")
    return value


Capability = Annotated[CapName, BeforeValidator(_check_capability)]


class CapabilityInfo(BaseModel):
    model_config = _MANIFEST_CONFIG

    capabilities: list[Capability] = []


class SeccompInfo(BaseModel):
    """Mesos SeccompInfo: the container's seccomp profile, by name (a file of --seccomp_config_dir), or none."""

    model_config = _MANIFEST_CONFIG

    profile_name: str | None = Field(
        default=None, description="A Docker-format profile in --seccomp_config_dir, instead of the agent's default")
    unconfined: bool | None = Field(default=None, description="Run without a seccomp filter")

    @field_validator("profile_name")
    @classmethod
    def _plain_file_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or "/" in name or name in (".", "..") or "\0" in name):
            raise ValueError(f"profile_name {_quote(name)} must be a file name in --seccomp_config_dir (no '/')")
        return name

    @model_validator(mode="after")
    def _one_of(self) -> SeccompInfo:
        if self.unconfined and self.profile_name is not None:
            raise ValueError("set either profile_name or unconfined: true, not both")
        return self


class LinuxInfo(BaseModel):
    model_config = _MANIFEST_CONFIG

    privileged: bool | None = Field(
        default=None, description="Every capability the agent holds, every device, no seccomp filter and no "
        "masked /proc paths (as `docker run --privileged`); the agent must run with --allow_privileged")
    seccomp: SeccompInfo | None = None
    share_pid_namespace: bool | None = None
    capability_info: CapabilityInfo | None = Field(
        default=None, description="Deprecated in Mesos in favour of effective_capabilities")
    effective_capabilities: CapabilityInfo | None = None
    bounding_capabilities: CapabilityInfo | None = None
    ipc_mode: Literal["PRIVATE", "SHARE_PARENT"] | None = None
    shm_size: Annotated[int, Field(gt=0, le=MAX_MEGABYTES), _at_most_number(MAX_MEGABYTES)] | None = Field(
        default=None, description="MB of /dev/shm; only with ipc_mode PRIVATE")

    @field_validator("effective_capabilities")
    @classmethod
    def _one_effective_set(cls, value: CapabilityInfo | None, info: ValidationInfo) -> CapabilityInfo | None:
        if value is not None and info.data.get("capability_info") is not None:
            raise ValueError("set only one of capability_info (deprecated) and effective_capabilities")
        return value

    @field_validator("shm_size")
    @classmethod
    def _shm_size_needs_private_ipc(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A shared /dev/shm belongs to the parent; sizing it from a container would resize the host's.
        if value is not None and info.data.get("ipc_mode") != "PRIVATE":
            raise ValueError("shm_size is only allowed with ipc_mode PRIVATE")
        return value

    @model_validator(mode="after")
    def _effective_within_bounding(self) -> LinuxInfo:
        effective = self.effective_capabilities or self.capability_info
        if effective is not None and self.bounding_capabilities is not None:
            beyond = sorted(set(effective.capabilities) - set(self.bounding_capabilities.capabilities))
            if beyond:
                raise ValueError(
                    f"effective capabilities {', '.join(beyond)} are not in bounding_capabilities; "
                    "a process cannot hold a capability outside its bounding set"
                )
        return self


RLimitName = Literal[
    "RLMT_AS", "RLMT_CORE", "RLMT_CPU", "RLMT_DATA", "RLMT_FSIZE", "RLMT_LOCKS", "RLMT_MEMLOCK",
    "RLMT_MSGQUEUE", "RLMT_NICE", "RLMT_NOFILE", "RLMT_NPROC", "RLMT_RSS", "RLMT_RTPRIO",
    "RLMT_RTTIME", "RLMT_SIGPENDING", "RLMT_STACK",
]



def _rlimit_number(name: str) -> int:
    # Python's resource module has no RLIMIT_LOCKS; 10 is its value in <asm-generic/resource.h>.
    if name == "RLMT_LOCKS":
        return int(getattr(resource, "RLIMIT_LOCKS", 10))
    return int(getattr(resource, "RLIMIT_" + name.removeprefix("RLMT_")))


RLIMIT_NUMBERS: dict[str, int] = {name: _rlimit_number(name) for name in get_args(RLimitName)}


def _check_rlimit_type(value: Any) -> Any:
    if isinstance(value, str) and value not in RLIMIT_NUMBERS:
        if value.startswith("RLIMIT_") and "RLMT_" + value[7:] in RLIMIT_NUMBERS:
            raise ValueError(f"unknown rlimit type {_quote(value)}: Mesos spells it {'RLMT_' + value[7:]!r}")
        raise ValueError(f"unknown rlimit type {_quote(value)}: expected one of {', '.join(RLIMIT_NUMBERS)}")
    return value


# Field first: its bounds then reach the JSON Schema (after a validator pydantic keeps them as its own keys).
RLimitValue = Annotated[int, Field(ge=0, le=MAX_RLIMIT), _at_most_number(MAX_RLIMIT)]


class RLimit(BaseModel):
    """Both soft and hard unset = unlimited; otherwise both are required and soft <= hard (as Mesos)."""

    model_config = _MANIFEST_CONFIG

    type: Annotated[RLimitName, BeforeValidator(_check_rlimit_type)]
    soft: RLimitValue | None = None
    hard: RLimitValue | None = None

    @model_validator(mode="after")
    def _soft_and_hard_together(self) -> RLimit:
        if (self.soft is None) != (self.hard is None):
            raise ValueError(f"{self.type}: set both soft and hard, or neither for unlimited")
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise ValueError(f"{self.type}: soft limit {self.soft} is greater than hard limit {self.hard}")
        return self


class RLimitInfo(BaseModel):
    model_config = _MANIFEST_CONFIG

    rlimits: list[RLimit] = []

    @field_validator("rlimits")
    @classmethod
    def _one_per_type(cls, rlimits: list[RLimit]) -> list[RLimit]:
        seen: set[str] = set()
        for rlimit in rlimits:
            if rlimit.type in seen:
                raise ValueError(f"duplicate rlimit type {rlimit.type}")
            seen.add(rlimit.type)
        return rlimits


class Label(BaseModel):
    model_config = _MANIFEST_CONFIG

    key: str = Field(min_length=1, max_length=253)
    value: str = Field(default="", max_length=1024)


class Labels(BaseModel):
    """Mesos Labels: `{labels: [{key, value}]}`; passed to CNI plugins as CNI_ARGS and `args.org.apache.mesos`."""

    model_config = _MANIFEST_CONFIG

    labels: list[Label] = Field(default=[], max_length=64)


class PortMapping(BaseModel):
    """Mesos NetworkInfo.PortMapping: a host port forwarded to the container (CNI `portMappings`)."""

    model_config = _MANIFEST_CONFIG

    host_port: int = Field(ge=1, le=65535)
    container_port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp", "sctp"] = "tcp"


class NetworkInfo(BaseModel):
    """Mesos NetworkInfo: a CNI network the container joins (a file of --network_cni_config_dir).
    No name means the host network, as in Mesos; `none` gives loopback only."""

    model_config = _MANIFEST_CONFIG

    name: str | None = Field(default=None, min_length=1, max_length=128, json_schema_extra={
        "pattern": "^[a-zA-Z0-9][a-zA-Z0-9_.-]*" + END_OF_TEXT})
    labels: Labels | None = None
    port_mappings: list[PortMapping] = Field(default=[], max_length=1024)

    @field_validator("name")
    @classmethod
    def _cni_network_name(cls, name: str | None) -> str | None:
        if name is not None and not _CNI_NAME.fullmatch(name):
            raise ValueError(f"network name {_quote(name)} is not a CNI network name: letters, digits, '_', '.' "
                             "and '-', starting with a letter or digit")
        return name


_CNI_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")


class ContainerInfo(BaseModel):
    """Mesos ContainerInfo (type MESOS only)."""

    model_config = _MANIFEST_CONFIG

    type: Literal["MESOS"] = "MESOS"
    hostname: str | None = Field(default=None, json_schema_extra={"maxLength": 64, "pattern": HOSTNAME_PATTERN})
    mesos: MesosInfo | None = None
    volumes: list[Volume] = Field(default=[], max_length=MAX_VOLUMES)
    network_infos: list[NetworkInfo] = Field(default=[], max_length=16)
    linux_info: LinuxInfo | None = None
    rlimit_info: RLimitInfo | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _only_mesos(cls, value: Any) -> Any:
        if value != "MESOS":
            raise ValueError(f"only MESOS containers are supported, got {_quote(value)}")
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname_is_valid(cls, hostname: str | None) -> str | None:
        if hostname is None:
            return None
        labels = hostname.split(".")
        if len(hostname) > 64 or not all(len(label) <= 63 and _HOSTNAME_LABEL.fullmatch(label) for label in labels):
            raise ValueError(
                f"hostname {_quote(hostname)} is not a valid hostname: dot-separated labels of letters, digits and "
                "'-', each at most 63 characters and not starting or ending with '-', at most 64 in all "
                "(the kernel's limit)"
            )
        return hostname

    @field_validator("volumes")
    @classmethod
    def _volumes_do_not_overlap(cls, volumes: list[Volume]) -> list[Volume]:
        # Mounts are applied in list order, so a volume inside another one would be hidden or
        # shown depending on that order; that is never what the operator meant.
        # Each path against its own ancestors: linear in the volumes, not quadratic.
        paths = [posixpath.normpath(v.container_path) for v in volumes]
        first: dict[str, int] = {}
        for i, path in enumerate(paths):
            if path in first:
                raise ValueError(f"volumes[{i}] and volumes[{first[path]}] both mount at {_cut(path)}")
            first[path] = i
        for i, inner in enumerate(paths):
            ancestor = posixpath.dirname(inner)
            while ancestor not in ("/", "//", ""):
                if ancestor in first:
                    j = first[ancestor]
                    raise ValueError(f"volumes[{i}] ({_cut(inner)}) is nested under volumes[{j}] ({_cut(ancestor)})")
                ancestor = posixpath.dirname(ancestor)
        return volumes

    @field_validator("network_infos")
    @classmethod
    def _networks_joinable(cls, networks: list[NetworkInfo]) -> list[NetworkInfo]:
        names = [n.name for n in networks if n.name is not None]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"Attempted to join CNI network {_quote(name)} multiple times")
        if "none" in names and len(names) > 1:
            raise ValueError("network 'none' (loopback only) cannot be joined with other networks")
        if names and len(names) != len(networks):
            raise ValueError("a network without a name is the host network: it cannot be joined with CNI networks")
        seen: dict[tuple[int, str], int] = {}
        for mapping in (m for n in networks for m in n.port_mappings):
            key = (mapping.host_port, mapping.protocol)
            if key in seen:
                raise ValueError(f"host port {mapping.host_port}/{mapping.protocol} is mapped twice")
            seen[key] = mapping.container_port
        if any(n.port_mappings for n in networks if n.name in (None, "none")):
            raise ValueError("port_mappings need a CNI network: the host network and 'none' map no ports")
        return networks


# --------------------------------------------------------------------------------------------
# Manifest: spec and document
# --------------------------------------------------------------------------------------------

RestartPolicy = Literal["Always", "OnFailure", "Never"]


class ContainerSpec(BaseModel):
    model_config = _MANIFEST_CONFIG

    node_selector: dict[str, str] = Field(default={},
                                          description="Run only on nodes whose --attributes match every key")
    restart_policy: RestartPolicy = "Always"
    kill_grace_period: Duration = Field(default=10.0, description="SIGTERM, then SIGKILL after this long")
    resources: Resources = Resources()
    command: CommandInfo
    container: ContainerInfo | None = None

    @model_validator(mode="after")
    def _executable_is_given(self) -> ContainerSpec:
        # docker/runtime: with an image, shell=false and no value runs the image's Entrypoint/Cmd.
        has_image = self.container is not None and self.container.mesos is not None and self.container.mesos.image
        if not self.command.shell and not self.command.value and not has_image:
            message = "command.value (the executable) is not specified; it is required when shell is false"
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("value_error", message), loc=("command",), input=self.command)])
        return self


class Manifest(BaseModel):
    """A reconciler manifest: one container declared in Mesos ContainerInfo terms."""

    model_config = _MANIFEST_CONFIG

    apiVersion: Literal["reconciler/v1"]
    kind: Literal["Container"]
    metadata: Metadata
    spec: ContainerSpec


def _canonical_hash(doc: dict[str, Any]) -> str:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def _hashable_dump(spec: ContainerSpec) -> dict[str, Any]:
    # exclude_defaults: a field added later with a default must not change the hash of every
    # existing container (and so restart it) on upgrade; kubelet learnt this in #116080.
    return spec.model_dump(mode="json", exclude_defaults=True)


def spec_hash(spec: ContainerSpec) -> str:
    """Identity of a spec: equal specs hash equal whatever their key order or spelling (10secs vs 10)."""
    return _canonical_hash(_hashable_dump(spec))


def spec_hash_without_resources(spec: ContainerSpec) -> str:
    """spec_hash ignoring `resources`: unchanged while only resources changed (update in place)."""
    doc = _hashable_dump(spec)
    doc.pop("resources", None)
    return _canonical_hash(doc)


# --------------------------------------------------------------------------------------------
# Status documents
# --------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "BackOff", "Terminating", "Invalid"]
PHASES: tuple[str, ...] = get_args(Phase)


class Condition(BaseModel):
    model_config = _STATUS_CONFIG

    type: str
    status: bool
    reason: str = ""
    message: str = ""
    since: str


class NetClsInfo(BaseModel):
    model_config = _STATUS_CONFIG

    classid: str
    classid_int: int
    primary: str
    secondary: str


class IPAddressStatus(BaseModel):
    model_config = _STATUS_CONFIG

    protocol: Literal["IPv4", "IPv6"]
    ip_address: str


class PortMappingStatus(BaseModel):
    model_config = _STATUS_CONFIG

    host_port: int
    container_port: int
    protocol: str


class NetworkInfoStatus(BaseModel):
    """Mesos ContainerStatus.network_infos: a network the container joined, and its addresses there."""

    model_config = _STATUS_CONFIG

    name: str
    interface: str = Field(description="The container's interface on this network (eth0, eth1, ...; lo for none)")
    ip_addresses: list[IPAddressStatus] = []
    port_mappings: list[PortMappingStatus] = []


class DiskInfo(BaseModel):
    model_config = _STATUS_CONFIG

    used_bytes: int | None = None
    limit_bytes: int | None = None
    checked_at: str | None = None
    enforced: bool = False


class ResourceStatistics(BaseModel):
    """Mesos ResourceStatistics; a field that is absent was not measured (never written as null)."""

    model_config = _STATUS_CONFIG

    timestamp: float | None = None
    processes: int | None = None
    threads: int | None = None
    cpus_user_time_secs: float | None = None
    cpus_system_time_secs: float | None = None
    cpus_limit: float | None = None
    cpus_soft_limit: float | None = None
    cpus_nr_periods: int | None = None
    cpus_nr_throttled: int | None = None
    cpus_throttled_time_secs: float | None = None
    mem_total_bytes: int | None = None
    mem_rss_bytes: int | None = None
    mem_cache_bytes: int | None = None
    mem_limit_bytes: int | None = None
    mem_soft_limit_bytes: int | None = None
    mem_swap_bytes: int | None = None
    mem_mapped_file_bytes: int | None = None
    mem_unevictable_bytes: int | None = None
    disk_used_bytes: int | None = None
    disk_limit_bytes: int | None = None
    # network/cni with --network_cni_metrics: the container's interfaces, loopback left out.
    net_rx_packets: int | None = None
    net_rx_bytes: int | None = None
    net_rx_errors: int | None = None
    net_rx_dropped: int | None = None
    net_tx_packets: int | None = None
    net_tx_bytes: int | None = None
    net_tx_errors: int | None = None
    net_tx_dropped: int | None = None

    @model_serializer(mode="wrap")
    def _omit_unmeasured(self, handler: Any) -> Any:
        # Dropping None here, not at each call site, keeps "absent = not measured" true however
        # the enclosing ContainerStatus is dumped.
        return {key: value for key, value in handler(self).items() if value is not None}


class SecurityInfo(BaseModel):
    """The security profile a container runs with (each part from its isolator: linux/capabilities,
    linux/seccomp, linux/devices, filesystem/linux); a part that is not managed is left out."""

    model_config = _STATUS_CONFIG

    privileged: bool | None = Field(default=None, description="linux_info.privileged (allowed by --allow_privileged)")
    bounding_capabilities: list[str] | None = Field(
        default=None, description="The most the command may hold (its bounding set)")
    effective_capabilities: list[str] | None = Field(
        default=None, description="Exactly what the command holds when granted; absent: the user's default "
        "(root holds the bounding set, any other user none)")
    no_new_privs: bool | None = Field(default=None, description="No setuid or file capability gains privileges")
    seccomp: str | None = Field(
        default=None, description="The seccomp profile: 'default' (the agent's own), a file of "
        "--seccomp_config_dir, or 'unconfined'")
    devices: str | None = Field(
        default=None, description="'default' (runc's allowlist: null, zero, full, random, urandom, tty, "
        "pts, ptmx, net/tun) or 'unrestricted'")
    masked_paths: list[str] | None = Field(
        default=None, description="Paths hidden from the container (its /proc and /sys), as runc masks them")
    read_only_paths: list[str] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class PullStatus(BaseModel):
    """The container's image while it is pulled, or why its last pull failed."""

    model_config = _STATUS_CONFIG

    image: str
    state: Literal["Pulling", "Failed"]
    registry: str | None = Field(default=None,
                                 description="host[:port] of --docker_registry as a URL; absent for a directory")
    started_at: str
    bytes_done: int = Field(default=0, description="Layer bytes fetched so far (layers the store lacks only)")
    bytes_total: int = Field(default=0, description="Layer bytes to fetch (0 until the manifest is read)")
    http_status: int | None = Field(default=None,
                                    description="A failed pull: the registry's HTTP status, if it answered")
    code: str | None = Field(default=None,
                             description="A failed pull: the registry's error code, e.g. MANIFEST_UNKNOWN")
    error: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ContainerStatus(BaseModel):
    """<status_dir>/<name>.json"""

    model_config = _STATUS_CONFIG

    apiVersion: Literal["reconciler/v1"] = "reconciler/v1"
    kind: Literal["ContainerStatus"] = "ContainerStatus"
    name: str
    container_id: str | None = None
    manifest: str | None = None
    spec_hash: str | None = None
    phase: Phase
    pid: int | None = None
    started_at: str | None = None
    restarts: int = 0
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str = Field(default="", description="Mesos-style termination reason, e.g. MemoryLimit")
    message: str = ""
    conditions: list[Condition] = []
    isolators: list[str] = []
    image: str | None = Field(default=None,
                              description="The image reference the container runs (container.mesos.image)")
    image_id: str | None = Field(default=None,
                                 description="The image it resolved to in the store (sha256 of its config)")
    pull: PullStatus | None = None
    net_cls: NetClsInfo | None = None
    disk: DiskInfo | None = None
    security: SecurityInfo | None = None
    network_infos: list[NetworkInfoStatus] | None = Field(
        default=None, description="network/cni: the CNI networks joined and the addresses given (absent: host network)")
    statistics: ResourceStatistics | None = None
    updated_at: str


class SourceStatus(BaseModel):
    model_config = _STATUS_CONFIG

    ready: bool
    error: str | None = None
    last_listed_at: str | None = None
    files: list[str] = Field(default=[], description="Manifest files considered in the last listing")
    watch_mode: str = Field(default="", description="How changes are noticed, e.g. inotify or poll")


class InvalidFileEntry(BaseModel):
    model_config = _STATUS_CONFIG

    file: str
    error: str


class InvalidDocumentEntry(BaseModel):
    model_config = _STATUS_CONFIG

    file: str
    document: int
    name: str | None = None
    error: str


class AgentStatus(BaseModel):
    """<status_dir>/_agent.json: the agent's own state, as Mesos's /state."""

    model_config = _STATUS_CONFIG

    apiVersion: Literal["reconciler/v1"] = "reconciler/v1"
    kind: Literal["AgentStatus"] = "AgentStatus"
    version: str
    pid: int
    started_at: str
    isolators: list[str] = []
    launcher: str
    flags: dict[str, Any] = {}
    manifests_dir: str
    source: SourceStatus
    invalid_files: list[InvalidFileEntry] = []
    invalid_documents: list[InvalidDocumentEntry] = []
    last_reconcile_duration_secs: float | None = None
    counts: dict[Phase, int] = {}
    destroy_errors: int = Field(default=0, description="Destroys that failed since the agent started")
    isolator_status: dict[str, dict[str, Any]] = Field(
        default={},
        description="What each isolator reports of itself, by isolator name (e.g. net_cls handles used and free)")
    updated_at: str
