"""Seccomp profiles in Docker's JSON format, compiled by libseccomp (through pyseccomp) into a raw BPF program.

A profile (moby's profiles/seccomp/types.go) has a `defaultAction` (and `defaultErrnoRet`) and
`syscalls` rules: `names` (or Docker's older single `name`), an `action` (SCMP_ACT_ALLOW, _ERRNO
with `errnoRet`, default EPERM, _KILL_PROCESS, _KILL_THREAD/_KILL, _TRAP, _TRACE, _LOG), optional
argument comparisons (`args`: index, value, valueTwo, op; comparisons on distinct arguments must all
hold, two on the same argument are alternatives, as runc reads them) and conditions, read as Docker
reads them: a rule applies only if the command holds every capability of `includes.caps` and none of
`excludes.caps`, if the machine's own architecture (Go's name: amd64, arm64...) is in
`includes.arches` and not in `excludes.arches`, and if the kernel is at least `includes.minKernel`
and older than `excludes.minKernel`. Capabilities are written either way (CAP_SYS_ADMIN or
SYS_ADMIN).

Architectures: the machine's own and the compat ones the profile's `archMap` (or `architectures`)
lists for it (x86_64: x86 and x32; aarch64: arm), none but the native one if it lists none, as
Docker; a call made with any other architecture kills the process. A syscall name this machine does
not know is skipped, as Docker does; an unknown action, operator or architecture, a `flags` or
`listenerPath` (a seccomp agent: not supported) is a load error naming the file and the field.

An allow-list profile (a default action that refuses) gets runc's ENOSYS stub (libcontainer/seccomp/
patchbpf): a call numbered above every call the profile names, for its architecture, fails with
ENOSYS rather than the default error, so that a program newer than the profile falls back from a
call the kernel may lack (clone3 -> clone, faccessat2 -> faccessat) instead of failing.

libseccomp does the hard part (syscall numbers per architecture, x32's offset, the multiplexed
socketcall/ipc of 32-bit x86, the BPF itself) and pyseccomp is a plain ctypes binding of it, so this
module holds no syscall table. The compiled program is cached by profile file identity (device,
inode, mtime, size) and capability set: compiled once per profile and capability set, not per
launch. The container's command loads it (reconciler/launcher/seccomp_filter.py), the last thing
before exec.

The agent's own default profile (seccomp_default.json beside this file) is a deny list, not Docker's
allow list: it refuses, with EPERM, what lets a container reach past its namespaces or into the
kernel's less guarded parts and allows everything else:

- always: the kernel keyrings (keyctl, add_key, request_key: not namespaced, host root's keyring is
  the container root's), kexec (a new host kernel: Docker never allows it either), io_uring (a large
  surface that also does I/O no filter sees), userfaultfd (a tool of kernel exploits, never allowed
  by Docker), and obsolete calls;
- unless CAP_SYS_ADMIN: every mount call (the new mount API included), umount, pivot_root, unshare,
  setns, clone with a namespace flag, clone3 (ENOSYS: its flags are in memory a filter cannot read,
  and libc then falls back to clone), quotas, swap, fanotify_init, lookup_dcookie;
- unless CAP_DAC_READ_SEARCH: open_by_handle_at (the "shocker" escape); unless CAP_SYS_MODULE:
  modules; unless CAP_SYS_BOOT: reboot; unless CAP_SYS_ADMIN or CAP_BPF: bpf; unless CAP_PERFMON or
  CAP_SYS_ADMIN: perf_event_open; unless CAP_SYS_PTRACE: ptrace, process_vm_readv/writev,
  process_madvise, kcmp, pidfd_getfd; and Docker's other capability-gated calls (clock setting,
  acct, I/O ports, syslog, vhangup, NUMA memory policy).

Why a deny list: capabilities and namespaces already gate most privileged calls, what this profile
adds is the calls they do not gate well (keyrings, user namespaces, file handles, kernel attack
surface), and a deny list does not break the long tail of ordinary programs on a call an allow list
forgot (Docker's list has grown by dozens of calls since it was written, each addition a bug report
of a program refused). The price: a call added by a future kernel is allowed until it is listed
here. Left out on purpose: Docker's personality() restriction (it only changes the caller's own
layout, and is cleared across a setuid exec) and its socket(AF_VSOCK) refusal (on 32-bit x86 a
socket() argument rule becomes a rule on every socketcall(SYS_SOCKET), which would refuse all
sockets to i386 programs). An operator who wants Docker's allow list can put Docker's default.json
in --seccomp_config_dir and name it with --seccomp_profile_name.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import struct
import threading
from collections import OrderedDict
from typing import Any, Iterable, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from reconciler.fsutil import FileTooLargeError, NotRegularFileError, read_config_file

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp_default.json")
MAX_PROFILE_BYTES = 1 << 20
CACHE_SIZE = 64

# uname -m -> this machine's libseccomp architecture, its compat architectures, its Go name (what
# Docker's `includes.arches` compare). Others: not supported (--seccomp_profile_name=unconfined).
_MACHINES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "x86_64": ("SCMP_ARCH_X86_64", ("SCMP_ARCH_X86", "SCMP_ARCH_X32"), "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", ("SCMP_ARCH_ARM",), "arm64"),
    "riscv64": ("SCMP_ARCH_RISCV64", (), "riscv64"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", (), "ppc64le"),
}
Action = Literal["SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
                 "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG"]
Operator = Literal["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
                   "SCMP_CMP_MASKED_EQ"]
Arch = Literal["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
               "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64",
               "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390",
               "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64"]
_RETURNS_ERRNO = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
# runc's patchbpf: no ENOSYS stub when the default lets calls through (a tracer handles new calls itself).
_PERMISSIVE = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE")


class SeccompError(Exception):
    """A profile that cannot be read, parsed or compiled; the message names the file and the field."""


def default_profile_path() -> str:
    """The agent's own default profile (a deny list; see this module's docstring)."""
    return DEFAULT_PROFILE


def _cap(name: str) -> str:
    # Docker writes CAP_SYS_ADMIN, Mesos and our manifests SYS_ADMIN.
    return name.upper().removeprefix("CAP_")


class _Model(BaseModel):
    # Frozen: a compiled program is cached by the profile it came from, which must not change under it.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info: ValidationInfo) -> Any:
        # Docker's Go encoder writes an empty list as null (its own default.json: "subArchitectures": null).
        field = cls.model_fields.get(info.field_name or "")
        return [] if value is None and field is not None and isinstance(field.default, list) else value


class ArgCondition(_Model):
    index: int = Field(ge=0, le=5)
    value: int = Field(ge=0, lt=1 << 64)
    valueTwo: int = Field(default=0, ge=0, lt=1 << 64)
    op: Operator


class Conditions(_Model):
    caps: list[str] = []
    arches: list[str] = []
    minKernel: str | None = None

    @field_validator("caps")
    @classmethod
    def _cap_names(cls, caps: list[str]) -> list[str]:
        return [_cap(cap) for cap in caps]

    @field_validator("minKernel")
    @classmethod
    def _kernel(cls, version: str | None) -> str | None:
        if version is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?", version):
            raise ValueError(f"{version!r} is not a kernel version (as 4.8 or 5.10.1)")
        return version


class SyscallRule(_Model):
    names: list[str] = []
    name: str | None = None       # Docker's older form: one name
    action: Action
    errnoRet: int | None = Field(default=None, ge=0, le=4095)
    args: list[ArgCondition] = []
    includes: Conditions = Conditions()
    excludes: Conditions = Conditions()
    comment: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> SyscallRule:
        if self.name is not None and self.names:
            raise ValueError("set either 'name' or 'names', not both (as Docker)")
        if self.errnoRet is not None and self.action not in _RETURNS_ERRNO:
            raise ValueError(f"errnoRet is only for SCMP_ACT_ERRNO and SCMP_ACT_TRACE, not {self.action}")
        return self

    @property
    def syscalls(self) -> list[str]:
        return self.names or ([self.name] if self.name else [])


class ArchMap(_Model):
    architecture: Arch
    subArchitectures: list[Arch] = []


class Profile(_Model):
    defaultAction: Action
    defaultErrnoRet: int | None = Field(default=None, ge=0, le=4095)
    architectures: list[Arch] = []
    archMap: list[ArchMap] = []
    syscalls: list[SyscallRule] = []
    flags: list[str] = []
    listenerPath: str = ""
    listenerMetadata: str = ""
    comment: str = ""
    # (path, device, inode, mtime_ns, size) of the file it was read from: the key of the compiled programs.
    _source: tuple[str, int, int, int, int] | None = PrivateAttr(default=None)

    @field_validator("flags", "listenerPath")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported (seccomp(2) filter flags and seccomp agents are not implemented)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.architectures and self.archMap:
            raise ValueError("set either 'architectures' or 'archMap', not both (as Docker)")
        if self.defaultErrnoRet is not None and self.defaultAction not in _RETURNS_ERRNO:
            raise ValueError(f"defaultErrnoRet is only for SCMP_ACT_ERRNO and SCMP_ACT_TRACE, "
                             f"not {self.defaultAction}")
        return self


def load_profile(path: str) -> Profile:
    """The profile in the file at `path`; SeccompError naming the file (and the field) otherwise."""
    try:
        # A FIFO put in the profile directory does not hang the agent: read_config_file refuses it.
        st, data = read_config_file(path, limit=MAX_PROFILE_BYTES)
    except NotRegularFileError:
        raise SeccompError(f"seccomp profile {path}: not a regular file") from None
    except FileTooLargeError:
        raise SeccompError(f"seccomp profile {path}: larger than {MAX_PROFILE_BYTES} bytes") from None
    except OSError as exc:
        raise SeccompError(f"seccomp profile {path}: cannot read it: {exc.strerror}") from None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        # The position only: the message must not quote the file (it may be anything the agent can read).
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise SeccompError(f"seccomp profile {path}: not valid JSON{where}") from None
    try:
        profile = Profile.model_validate(doc)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "(document)"
        message = error["msg"].removeprefix("Value error, ")
        raise SeccompError(f"seccomp profile {path}: {field}: {message}") from None
    profile._source = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    return profile


def kernel_version(release: str | None = None) -> tuple[int, ...]:
    """(major, minor, patch) of `release` (uname -r by default); '5.10.0-21-amd64' -> (5, 10, 0)."""
    numbers = []
    for part in (release or platform.release()).split("-")[0].split(".")[:3]:
        digits = re.match(r"\d+", part)
        numbers.append(int(digits.group()) if digits else 0)
    return tuple(numbers + [0] * (3 - len(numbers)))


def _applies(rule: SyscallRule, capabilities: frozenset[str], arch: str, kernel: tuple[int, ...]) -> bool:
    """Docker's conditions (moby profiles/seccomp/seccomp_linux.go)."""
    if set(rule.excludes.caps) & capabilities or not set(rule.includes.caps) <= capabilities:
        return False
    if arch in rule.excludes.arches or (rule.includes.arches and arch not in rule.includes.arches):
        return False
    if rule.excludes.minKernel and kernel >= kernel_version(rule.excludes.minKernel):
        return False
    if rule.includes.minKernel and kernel < kernel_version(rule.includes.minKernel):
        return False
    return True


def _libseccomp() -> Any:
    try:
        import pyseccomp
        pyseccomp.system_arch()        # the library itself, not only the binding
    except (ImportError, OSError, AttributeError) as exc:
        raise SeccompError(f"libseccomp is not available ({exc}): install libseccomp2 "
                           "(Debian: apt-get install libseccomp2)") from None
    return pyseccomp


def check_libseccomp() -> None:
    """SeccompError (saying what to install) when libseccomp cannot be loaded."""
    _libseccomp()


def _action(seccomp: Any, action: str, errno_ret: int | None) -> int:
    # runc: an ERRNO or TRACE without its number returns EPERM.
    if action == "SCMP_ACT_ERRNO":
        return int(seccomp.ERRNO(errno.EPERM if errno_ret is None else errno_ret))
    if action == "SCMP_ACT_TRACE":
        return int(seccomp.TRACE(errno.EPERM if errno_ret is None else errno_ret))
    return int({"SCMP_ACT_KILL": seccomp.KILL_THREAD, "SCMP_ACT_KILL_THREAD": seccomp.KILL_THREAD,
                "SCMP_ACT_KILL_PROCESS": seccomp.KILL_PROCESS, "SCMP_ACT_TRAP": seccomp.TRAP,
                "SCMP_ACT_ALLOW": seccomp.ALLOW, "SCMP_ACT_LOG": seccomp.LOG}[action])


def _arches(profile: Profile, native: str, compat: tuple[str, ...]) -> list[str]:
    """The filter's architectures, native first: Docker's archMap entry of the native one (or the
    `architectures` list), kept to those this machine can run."""
    listed = set(profile.architectures)
    for entry in profile.archMap:
        if entry.architecture == native:
            listed |= set(entry.subArchitectures)
    return [native, *(arch for arch in compat if arch in listed)]


_programs: OrderedDict[tuple[Any, frozenset[str]], bytes] = OrderedDict()
_profiles: OrderedDict[tuple[str, int, int, int, int], Profile] = OrderedDict()
_cache_lock = threading.Lock()


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    with _cache_lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)


def _recall(cache: OrderedDict, key: Any) -> Any:
    with _cache_lock:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
        return value


def compile_profile(profile: Profile, capabilities: Iterable[str]) -> bytes:
    """The raw BPF program (struct sock_filter[], as seccomp_export_bpf writes it) of `profile` for a
    command holding `capabilities`, on this machine. Cached by the profile's file (identity and mtime;
    a profile not read from a file: by its content) and the capability set."""
    caps = frozenset(_cap(cap) for cap in capabilities)
    key = (profile._source or profile.model_dump_json(), caps)
    program = _recall(_programs, key)
    if program is None:
        where = f"profile {profile._source[0]}" if profile._source else "profile"
        program = _compile(profile, caps, where)
        _remember(_programs, key, program)
    return program


def compile_for(path: str | None, capabilities: Iterable[str]) -> bytes:
    """The program of the profile file at `path` (None: the agent's default) for `capabilities`; the file
    is read again only when it changed."""
    path = os.path.abspath(path or DEFAULT_PROFILE)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SeccompError(f"seccomp profile {path}: cannot read it: {exc.strerror}") from None
    identity = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    profile = _recall(_profiles, identity)
    if profile is None:
        profile = load_profile(path)
        _remember(_profiles, identity, profile)
    return compile_profile(profile, capabilities)


def _compile(profile: Profile, capabilities: frozenset[str], where: str) -> bytes:
    seccomp = _libseccomp()
    machine = platform.machine()
    if machine not in _MACHINES:
        raise SeccompError(f"seccomp {where}: architecture {machine} is not supported")
    native, compat, go_arch = _MACHINES[machine]
    arches = _arches(profile, native, compat)
    default = _action(seccomp, profile.defaultAction, profile.defaultErrnoRet)
    flt = seccomp.SyscallFilter(default)
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    try:
        # A binary tree of syscall numbers rather than a list: the kernel runs the filter over every
        # syscall number when it loads it (to cache the calls whose answer is fixed), which costs a
        # third as much with the tree (50 us rather than 160 us for our default profile, on each launch).
        flt.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    except (OSError, ValueError):
        pass   # libseccomp older than 2.5: the list, slower to load, same decisions
    for arch in arches[1:]:
        flt.add_arch(getattr(seccomp.Arch, arch.removeprefix("SCMP_ARCH_")))
    kernel = kernel_version()
    named: set[str] = set()
    for index, rule in enumerate(profile.syscalls):
        if not _applies(rule, capabilities, go_arch, kernel):
            continue
        action = _action(seccomp, rule.action, rule.errnoRet)
        for name in rule.syscalls:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number == -1:
                continue   # no such call on this machine: skipped, as Docker does
            named.add(name)
            if action == default:
                continue   # libseccomp refuses a rule that repeats the default; runc skips it too
            try:
                _add_rule(seccomp, flt, action, number, rule.args)
            except OSError as exc:
                raise SeccompError(f"seccomp {where}: syscalls.{index} ({name}): libseccomp refused the rule: "
                                   f"{exc.strerror or exc}") from None
    out_fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    with os.fdopen(out_fd, "w+b") as out:
        flt.export_bpf(out)
        out.seek(0)
        program = out.read()
    enosys = profile.defaultAction not in _PERMISSIVE and not (
        profile.defaultAction == "SCMP_ACT_ERRNO" and profile.defaultErrnoRet == errno.ENOSYS)
    return (_enosys_stub(seccomp, arches, named) if enosys else b"") + program


def _add_rule(seccomp: Any, flt: Any, action: int, number: int, args: list[ArgCondition]) -> None:
    ops = {"SCMP_CMP_NE": seccomp.NE, "SCMP_CMP_LT": seccomp.LT, "SCMP_CMP_LE": seccomp.LE, "SCMP_CMP_EQ": seccomp.EQ,
           "SCMP_CMP_GE": seccomp.GE, "SCMP_CMP_GT": seccomp.GT, "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ}
    conditions = [seccomp.Arg(a.index, ops[a.op], a.value, a.valueTwo) for a in args]
    if len({a.index for a in args}) < len(args):
        # runc: two conditions on one argument cannot both hold, so each is a rule of its own (OR).
        for condition in conditions:
            flt.add_rule(action, number, condition)
    else:
        flt.add_rule(action, number, *conditions)    # all of them (AND)


# Classic BPF, as <linux/filter.h> and <linux/seccomp.h> define it.
_LD_W_ABS, _JA, _JEQ_K, _JGT_K, _JSET_K, _RET_K = 0x20, 0x05, 0x15, 0x25, 0x45, 0x06
_SECCOMP_DATA_NR, _SECCOMP_DATA_ARCH = 0, 4
_SECCOMP_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000


def _enosys_stub(seccomp: Any, arches: list[str], named: set[str]) -> bytes:
    """runc's patchbpf stub, in front of libseccomp's program: per architecture, a call numbered above
    the highest the profile names returns ENOSYS; any other call goes on into the program.

    x32 shares x86_64's AUDIT_ARCH and marks its calls with bit 30: one section for both, which sends
    an x32 call on to the program (whose bad-architecture action applies) when x32 is not filtered."""
    highest: dict[str, int] = {}
    for arch in arches:
        token = getattr(seccomp.Arch, arch.removeprefix("SCMP_ARCH_"))
        numbers = [seccomp.resolve_syscall(token, name) for name in named]
        top = max([n for n in numbers if n >= 0], default=-1)
        if top >= 0:
            highest[arch] = top
    audit = {arch: getattr(seccomp.Arch, arch.removeprefix("SCMP_ARCH_")) for arch in highest}
    if "SCMP_ARCH_X32" in audit:
        audit["SCMP_ARCH_X32"] = seccomp.Arch.X86_64
    # Instructions as (code, jump-true, jump-false, k), jumps by label; resolved below.
    code: list[tuple[int, Any, Any, Any]] = [(_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH)]
    labels: dict[str, int] = {}
    sections = [arch for arch in highest if arch != "SCMP_ARCH_X32"]
    for i, arch in enumerate(sections):
        following = f"arch{i + 1}" if i + 1 < len(sections) else "filter"
        labels[f"arch{i}"] = len(code)
        code.append((_JEQ_K, 0, following, audit[arch]))
        code.append((_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR))
        if arch == "SCMP_ARCH_X86_64":
            code.append((_JSET_K, "x32" if "SCMP_ARCH_X32" in highest else "filter", 0, _X32_SYSCALL_BIT))
            code.append((_JGT_K, "enosys", "filter", highest[arch]))
            if "SCMP_ARCH_X32" in highest:
                labels["x32"] = len(code)
                code.append((_JGT_K, "enosys", "filter", highest["SCMP_ARCH_X32"]))
        else:
            code.append((_JGT_K, "enosys", "filter", highest[arch]))
    code.append((_JA, 0, 0, "filter"))
    labels["enosys"] = len(code)
    code.append((_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS))
    labels["filter"] = len(code)

    def offset(at: int, target: Any) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    out = bytearray()
    for at, (op, jt, jf, k) in enumerate(code):
        if op == _JA:
            k = offset(at, k)
        out += struct.pack("=HBBI", op, offset(at, jt), offset(at, jf), k)
    return bytes(out)
