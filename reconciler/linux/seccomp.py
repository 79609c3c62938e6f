"""Seccomp profiles in Docker's JSON format, compiled by libseccomp (through pyseccomp) into a raw BPF program.

A profile (moby's profiles/seccomp/types.go) has a `defaultAction` and `syscalls` rules: names, an
action (SCMP_ACT_ALLOW, _ERRNO with `errnoRet`, _KILL_PROCESS, _KILL_THREAD/_KILL, _TRAP, _TRACE,
_LOG), optional argument comparisons (`args`: index, value, valueTwo, op), and conditions: a rule
applies only if the container holds every capability of `includes.caps` and none of
`excludes.caps`, on the architectures of `includes.arches`/`excludes.arches`, and on a kernel at
least `includes.minKernel`. Capabilities are those the container's command will hold, as Docker
judges them by the container's capability set. Architectures: the machine's own and its compat ones
(x86_64: x86 and x32, as Docker's archMap; aarch64: arm); a syscall made with any other is killed.
A syscall name this machine does not know is skipped, as Docker does; an unknown action or operator
is an error naming the file and the field.

libseccomp does the hard part (syscall numbers per architecture, x32's offset, the multiplexed
socketcall/ipc of 32-bit x86, the BPF itself) and pyseccomp is a plain ctypes binding of it, so this
module holds no syscall table. The compiled program is cached by profile file identity and
capabilities: it is compiled once per profile and capability set, not per launch. The container's
command loads it (reconciler/launcher/seccomp_filter.py), the last thing before exec.

The agent's own default profile (seccomp_default.json beside this file) is a deny list, not Docker's
allow list: it refuses, with EPERM, what lets a container reach past its namespaces or into the
kernel's less guarded parts (keyrings, mounts and namespaces without CAP_SYS_ADMIN, file handles,
modules, kexec, bpf, perf, ptrace without CAP_SYS_PTRACE, io_uring, userfaultfd, clock and swap
changes, ...) and allows everything else. Why not an allow list: capabilities already gate most
privileged calls, and a deny list does not break the long tail of ordinary programs on a call a list
forgot (Docker's list has grown by dozens of calls since it was written). The price: a syscall added
to a future kernel is allowed until it is listed here. An operator who wants Docker's allow list can
put Docker's default.json in --seccomp_config_dir and name it with --seccomp_profile_name.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp_default.json")
MAX_PROFILE_BYTES = 1 << 20

# This machine's architecture (uname -m) → its libseccomp name, its compat architectures, its Go name
# (what Docker's `includes.arches` say).
_MACHINES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "x86_64": ("SCMP_ARCH_X86_64", ("SCMP_ARCH_X86", "SCMP_ARCH_X32"), "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", ("SCMP_ARCH_ARM",), "arm64"),
    "riscv64": ("SCMP_ARCH_RISCV64", (), "riscv64"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", (), "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", ("SCMP_ARCH_S390",), "s390x"),
}
_GO_ARCH = {"SCMP_ARCH_X86": "386", "SCMP_ARCH_X32": "x32", "SCMP_ARCH_ARM": "arm", "SCMP_ARCH_S390": "s390"}
Action = Literal["SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
                 "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG"]
Operator = Literal["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
                   "SCMP_CMP_MASKED_EQ"]


class SeccompError(Exception):
    """A profile that cannot be read, parsed or compiled; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        # Docker writes CAP_SYS_ADMIN, Mesos and our manifests SYS_ADMIN: compare without the prefix.
        return [cap.upper().removeprefix("CAP_") for cap in caps]


class SyscallRule(_Model):
    names: list[str] = []
    name: str | None = None       # Docker's older form: one name
    action: Action
    errnoRet: int | None = Field(default=None, ge=0, le=4095)
    args: list[ArgCondition] | None = None
    includes: Conditions = Conditions()
    excludes: Conditions = Conditions()
    comment: str = ""


class ArchMap(_Model):
    architecture: str
    subArchitectures: list[str] = []


class Profile(_Model):
    defaultAction: Action
    defaultErrnoRet: int | None = Field(default=None, ge=0, le=4095)
    architectures: list[str] = []
    archMap: list[ArchMap] = []
    syscalls: list[SyscallRule] = []
    flags: list[str] = []
    listenerPath: str = ""
    listenerMetadata: str = ""
    comment: str = ""


def load_profile(path: str) -> Profile:
    """The profile in the file at `path`; SeccompError naming the file (and the field) otherwise."""
    import json
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise SeccompError(f"seccomp profile {path}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise SeccompError(f"seccomp profile {path}: larger than {MAX_PROFILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SeccompError(f"seccomp profile {path}: not valid JSON: {exc}") from None
    try:
        return Profile.model_validate(doc)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "(document)"
        raise SeccompError(f"seccomp profile {path}: {field}: {error['msg']}") from None


def kernel_version(release: str | None = None) -> tuple[int, ...]:
    numbers = []
    for part in (release or platform.release()).split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def _applies(rule: SyscallRule, capabilities: frozenset[str], arches: set[str], kernel: tuple[int, ...]) -> bool:
    """Docker's conditions: every `includes.caps` held, no `excludes.caps` held, the architecture, the kernel."""
    if not set(rule.includes.caps) <= capabilities or set(rule.excludes.caps) & capabilities:
        return False
    if rule.includes.arches and not set(rule.includes.arches) & arches:
        return False
    if rule.excludes.arches and set(rule.excludes.arches) & arches:
        return False
    if rule.includes.minKernel and kernel < kernel_version(rule.includes.minKernel):
        return False
    return True


def _action(seccomp: Any, action: str, errno_ret: int | None, default_errno: int | None) -> int:
    if action == "SCMP_ACT_ERRNO":
        return int(seccomp.ERRNO(errno_ret if errno_ret is not None else (default_errno or errno.EPERM)))
    if action == "SCMP_ACT_TRACE":
        return int(seccomp.TRACE(errno_ret or errno.EPERM))
    return int({"SCMP_ACT_KILL": seccomp.KILL_THREAD, "SCMP_ACT_KILL_THREAD": seccomp.KILL_THREAD,
                "SCMP_ACT_KILL_PROCESS": seccomp.KILL_PROCESS, "SCMP_ACT_TRAP": seccomp.TRAP,
                "SCMP_ACT_ALLOW": seccomp.ALLOW, "SCMP_ACT_LOG": seccomp.LOG}[action])


def _libseccomp() -> Any:
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:
        raise SeccompError(f"libseccomp is not available ({exc}): install it (Debian: apt-get install libseccomp2)") \
            from None
    return pyseccomp


def compile_profile(profile: Profile, capabilities: frozenset[str], where: str = "profile") -> bytes:
    """The raw BPF program of `profile` for a command holding `capabilities`, for this machine."""
    seccomp = _libseccomp()
    machine = platform.machine()
    if machine not in _MACHINES:
        raise SeccompError(f"seccomp {where}: architecture {machine} is not supported")
    native, compat, go_native = _MACHINES[machine]
    wanted = [arch for arch in (native, *compat) if _arch_wanted(profile, native, arch)]
    default = _action(seccomp, profile.defaultAction, profile.defaultErrnoRet, profile.defaultErrnoRet)
    flt = seccomp.SyscallFilter(default)
    # A syscall made with an architecture the filter does not list is killed.
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for arch in wanted:
        if arch != native:
            flt.add_arch(getattr(seccomp.Arch, arch.removeprefix("SCMP_ARCH_")))
    arch_names = {go_native, *(_GO_ARCH.get(arch, "") for arch in wanted)} - {""}
    kernel = kernel_version()
    for index, rule in enumerate(profile.syscalls):
        if not _applies(rule, capabilities, arch_names, kernel):
            continue
        action = _action(seccomp, rule.action, rule.errnoRet, profile.defaultErrnoRet)
        if action == default:
            continue   # libseccomp refuses a rule that repeats the default; Docker skips it too
        for name in rule.names or ([rule.name] if rule.name else []):
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number == -1:
                # Not a call of any architecture libseccomp knows, on this machine: skipped, as Docker does.
                continue
            try:
                _add_rule(seccomp, flt, action, number, rule.args or [])
            except OSError as exc:
                raise SeccompError(f"seccomp {where}: syscalls.{index} ({name}): libseccomp refused the rule: "
                                   f"{exc.strerror or exc}") from None
    read_fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    with os.fdopen(read_fd, "w+b") as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


def _arch_wanted(profile: Profile, native: str, arch: str) -> bool:
    """Docker's rule: a profile with an archMap or architectures lists the ones it covers; none: all ours."""
    if not profile.archMap and not profile.architectures:
        return True
    listed = set(profile.architectures)
    for entry in profile.archMap:
        if entry.architecture == native:
            listed |= {entry.architecture, *entry.subArchitectures}
    return arch == native or arch in listed


def _add_rule(seccomp: Any, flt: Any, action: int, number: int, args: list[ArgCondition]) -> None:
    ops = {"SCMP_CMP_NE": seccomp.NE, "SCMP_CMP_LT": seccomp.LT, "SCMP_CMP_LE": seccomp.LE, "SCMP_CMP_EQ": seccomp.EQ,
           "SCMP_CMP_GE": seccomp.GE, "SCMP_CMP_GT": seccomp.GT, "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ}
    conditions = [seccomp.Arg(a.index, ops[a.op], a.value, a.valueTwo) for a in args]
    if len({a.index for a in args}) < len(args):
        # Docker: two conditions on one argument cannot both hold, so each is a rule of its own (OR).
        for condition in conditions:
            flt.add_rule(action, number, condition)
    else:
        flt.add_rule(action, number, *conditions)    # all of them (AND)


@functools.lru_cache(maxsize=64)
def _compiled(path: str, identity: tuple[int, int, int, int], capabilities: frozenset[str]) -> bytes:
    return compile_profile(load_profile(path), capabilities, where=f"profile {path}")


def compile_for(path: str | None, capabilities: frozenset[str]) -> bytes:
    """The program of the profile file at `path` (None: the agent's default) for `capabilities`, cached
    until the file changes."""
    path = path or DEFAULT_PROFILE
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SeccompError(f"seccomp profile {path}: {exc.strerror}") from None
    return _compiled(path, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size), capabilities)
