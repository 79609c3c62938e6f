"""Device access rules for a cgroup: the v1 devices controller, or on cgroup v2 a BPF device program.

A rule is runc's: a type (`c` char, `b` block, `a` all), a major and a minor number (`*`: any) and
the access it allows (`r`, `w`, `m` for mknod). Anything no rule allows is refused (EPERM at open or
mknod), whatever the process's capabilities: it is what keeps a root container from making a node of
the host's disk and reading it.

cgroup v1: "a" written to devices.deny clears the cgroup's list, then each rule goes to devices.allow.
cgroup v2 has no devices controller: the kernel asks a program of type BPF_PROG_TYPE_CGROUP_DEVICE
attached to the cgroup (and every one attached above it, BPF_F_ALLOW_MULTI), which gets
{access_type, major, minor} and returns 1 to allow. The program is assembled here from the rules,
as runc's libcontainer/cgroups/devices does with cilium/ebpf; it goes away with the cgroup.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# bpf(2): its number per architecture, commands and constants (<linux/bpf.h>).
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "ppc64": 361, "s390x": 351}
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_QUERY = 5, 8, 9, 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2
BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4
_ATTR_SIZE = 128


@dataclass(frozen=True)
class DeviceRule:
    kind: str            # "c", "b" or "a"
    major: int | None    # None: any
    minor: int | None
    access: str          # a subset of "rwm"

    def __str__(self) -> str:
        number = lambda n: "*" if n is None else str(n)  # noqa: E731
        return f"{self.kind} {number(self.major)}:{number(self.minor)} {self.access}"


# runc 1.2's default allowlist (libcontainer/specconv AllowedDevices, less /dev/net/tun, which runc
# 1.2 dropped): any node may be made, only these opened.
DEFAULT_RULES = (
    DeviceRule("c", None, None, "m"),
    DeviceRule("b", None, None, "m"),
    DeviceRule("c", 1, 3, "rwm"),     # /dev/null
    DeviceRule("c", 1, 5, "rwm"),     # /dev/zero
    DeviceRule("c", 1, 7, "rwm"),     # /dev/full
    DeviceRule("c", 1, 8, "rwm"),     # /dev/random
    DeviceRule("c", 1, 9, "rwm"),     # /dev/urandom
    DeviceRule("c", 5, 0, "rwm"),     # /dev/tty
    DeviceRule("c", 5, 1, "rwm"),     # /dev/console
    DeviceRule("c", 5, 2, "rwm"),     # /dev/ptmx
    DeviceRule("c", 136, None, "rwm"),   # /dev/pts/*
)


def write_v1_rules(cgroup_path: str, rules: tuple[DeviceRule, ...] | list[DeviceRule]) -> None:
    """Replace the v1 devices cgroup's list with `rules` (deny everything, then allow each)."""
    for control, value in [("devices.deny", "a"), *(("devices.allow", str(rule)) for rule in rules)]:
        try:
            with open(os.path.join(cgroup_path, control), "w") as f:
                f.write(value)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write '{value}' to {control} of {cgroup_path}: {exc.strerror}") from None


# ---------------------------------------------------------------- cgroup v2: the BPF program

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_LDX_W, _MOV64_REG, _MOV64_IMM, _AND64_IMM, _RSH64_IMM, _JNE_IMM, _EXIT = 0x61, 0xBF, 0xB7, 0x57, 0x77, 0x55, 0x95
_ACCESS = {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}


def device_program(rules: tuple[DeviceRule, ...] | list[DeviceRule]) -> bytes:
    """A BPF_PROG_TYPE_CGROUP_DEVICE program that allows what `rules` allow and nothing else.

    r1 is the context {u32 access_type (access << 16 | type), u32 major, u32 minor}. Each rule is a
    block that jumps to the next block on any mismatch and otherwise returns 1; the end returns 0.
    """
    head = [
        _insn(_LDX_W, dst=2, src=1, off=0),     # r2 = access_type
        _insn(_MOV64_REG, dst=3, src=2),
        _insn(_AND64_IMM, dst=3, imm=0xFFFF),   # r3 = type
        _insn(_MOV64_REG, dst=4, src=2),
        _insn(_RSH64_IMM, dst=4, imm=16),       # r4 = access
        _insn(_LDX_W, dst=5, src=1, off=4),     # r5 = major
        _insn(_LDX_W, dst=6, src=1, off=8),     # r6 = minor
    ]
    program = b"".join(head)
    for rule in rules:
        checks: list[tuple[int, int, int]] = []     # (code, register, value) of each "on mismatch, next rule"
        if rule.kind != "a":
            checks.append((_JNE_IMM, 3, BPF_DEVCG_DEV_CHAR if rule.kind == "c" else BPF_DEVCG_DEV_BLOCK))
        denied = 0
        for letter, bit in _ACCESS.items():
            if letter not in rule.access:
                denied |= bit
        if rule.major is not None:
            checks.append((_JNE_IMM, 5, rule.major))
        if rule.minor is not None:
            checks.append((_JNE_IMM, 6, rule.minor))
        block: list[tuple[int, int, int, int, int]] = []   # code, dst, src, off placeholder (-1: to next), imm
        for code, register, value in checks:
            block.append((code, register, 0, -1, value))
        if denied:
            # The access asked for must be within the rule's: (access & denied) == 0.
            block.append((_MOV64_REG, 7, 4, 0, 0))
            block.append((_AND64_IMM, 7, 0, 0, denied))
            block.append((_JNE_IMM, 7, 0, -1, 0))
        block.append((_MOV64_IMM, 0, 0, 0, 1))
        block.append((_EXIT, 0, 0, 0, 0))
        for index, (code, dst, src, off, imm) in enumerate(block):
            if off == -1:
                off = len(block) - index - 1
            program += _insn(code, dst=dst, src=src, off=off, imm=imm)
    program += _insn(_MOV64_IMM, dst=0, imm=0) + _insn(_EXIT)
    return program


def _bpf(command: int, attr: bytes, what: str) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(38, f"bpf: unknown system call number on {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(command), buffer, ctypes.c_uint(_ATTR_SIZE))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(result)


def load_device_program(rules: tuple[DeviceRule, ...] | list[DeviceRule]) -> int:
    """The program for `rules`, loaded: its fd (close it once attached; the cgroup keeps the program).

    Loaded without the verifier's log; if the kernel refuses it, loaded again with the log, whose last
    line (the verifier's reason) goes into the error.
    """
    program = device_program(rules)
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")

    def load(log_level: int, log: ctypes.Array) -> int:
        attr = struct.pack("<IIQQIIQ", BPF_PROG_TYPE_CGROUP_DEVICE, len(program) // 8, ctypes.addressof(insns),
                           ctypes.addressof(license_), log_level, len(log), ctypes.addressof(log))
        return _bpf(BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD) of the device program")

    try:
        return load(0, ctypes.create_string_buffer(1))
    except OSError as exc:
        log = ctypes.create_string_buffer(1 << 20)
        try:
            return load(1, log)
        except OSError:
            reason = (log.value.decode(errors="replace").strip().splitlines() or [""])[-1]
            raise OSError(exc.errno, f"{exc.strerror} (verifier: {reason})") from None


def attach_device_program(cgroup_path: str, program_fd: int) -> None:
    """Attach a loaded device program to the cgroup v2 directory (alongside any attached above it)."""
    cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = struct.pack("<IIII", cgroup_fd, program_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        _bpf(BPF_PROG_ATTACH, attr, f"bpf(BPF_PROG_ATTACH) to {cgroup_path}")
    finally:
        os.close(cgroup_fd)


def attached_device_programs(cgroup_path: str) -> int:
    """How many device programs are attached to the cgroup v2 directory itself."""
    cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ids = (ctypes.c_uint32 * 64)()
        # query: target_fd, attach_type, query_flags, attach_flags, prog_ids (u64), prog_cnt
        attr = bytearray(struct.pack("<IIIIQI", cgroup_fd, BPF_CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), 64))
        buffer = ctypes.create_string_buffer(bytes(attr), _ATTR_SIZE)
        number = _SYS_BPF[platform.machine()]
        if _libc.syscall(ctypes.c_long(number), ctypes.c_int(BPF_PROG_QUERY), buffer, ctypes.c_uint(_ATTR_SIZE)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf(BPF_PROG_QUERY) of {cgroup_path}: {os.strerror(err)}")
        return struct.unpack_from("<I", buffer.raw, 24)[0]
    finally:
        os.close(cgroup_fd)


def restrict_v2(cgroup_path: str, rules: tuple[DeviceRule, ...] | list[DeviceRule]) -> None:
    """Load the program of `rules` and attach it to the cgroup v2 directory."""
    fd = load_device_program(rules)
    try:
        attach_device_program(cgroup_path, fd)
    finally:
        os.close(fd)
