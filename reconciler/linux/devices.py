"""Device access rules for a cgroup: the v1 devices controller, or on cgroup v2 a BPF device program.

A rule is runc's: a type (`c` char, `b` block, `a` all), a major and a minor number (None: `*`) and
the access it allows (`r`, `w`, `m` for mknod). Anything no rule allows is refused with EPERM at
open or mknod, whatever the process's capabilities: it is what keeps a root container from making a
node of the host's disk and reading it.

cgroup v1: "a" written to devices.deny empties the cgroup's list (and makes it an allowlist), then
each rule is written to devices.allow.

cgroup v2 has no devices controller. The kernel runs every BPF_PROG_TYPE_CGROUP_DEVICE program
attached to the process's cgroup and to each of its ancestors (BPF_F_ALLOW_MULTI), and the access
goes through only if all of them return 1. The program is assembled here from the rules, one block
of instructions per rule, in the shape of runc's libcontainer devicefilter (which uses cilium/ebpf);
it needs no controller, so it works on any cgroup2 directory, and it goes away with the cgroup.
This module knows nothing of containers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from reconciler.linux import syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_ACCESS_LETTERS = "rwm"


@dataclass(frozen=True)
class DeviceRule:
    """One line of a devices list, as runc and the v1 controller write it: `c 1:3 rwm`, `b *:* m`."""

    kind: str            # "c", "b" or "a"
    major: int | None    # None: any
    minor: int | None
    access: str          # letters of "rwm"

    def __post_init__(self) -> None:
        if self.kind not in ("a", "b", "c"):
            raise ValueError(f"device rule {self}: the type must be 'a', 'b' or 'c'")
        if not self.access or set(self.access) - set(_ACCESS_LETTERS):
            raise ValueError(f"device rule {self}: the access must be letters of 'rwm'")
        for number in (self.major, self.minor):
            # The program compares them as 32-bit immediates, which the kernel sign-extends.
            if number is not None and not 0 <= number < 2**31:
                raise ValueError(f"device rule {self}: device numbers go from 0 to 2^31-1")

    def __str__(self) -> str:
        def number(n: int | None) -> str:
            return "*" if n is None else str(n)
        return f"{self.kind} {number(self.major)}:{number(self.minor)} {self.access}"


# runc v1.5.1's default allowlist (libcontainer/specconv AllowedDevices), in its order: any node may
# be made, only these opened. /dev/console (c 5:1) is not in it: runc dropped the host's console in
# 1.0 (a container's console is a pty, 136:*); Docker adds it back in its own spec, and so with
# filesystem/shared a container would reach the host's console. /dev/net/tun is in it (runc 1.2
# dropped it, 1.3 put it back): opening it gives nothing without CAP_NET_ADMIN.
DEFAULT_RULES: tuple[DeviceRule, ...] = (
    DeviceRule("c", None, None, "m"),
    DeviceRule("b", None, None, "m"),
    DeviceRule("c", 1, 3, "rwm"),        # /dev/null
    DeviceRule("c", 1, 8, "rwm"),        # /dev/random
    DeviceRule("c", 1, 7, "rwm"),        # /dev/full
    DeviceRule("c", 5, 0, "rwm"),        # /dev/tty
    DeviceRule("c", 1, 5, "rwm"),        # /dev/zero
    DeviceRule("c", 1, 9, "rwm"),        # /dev/urandom
    DeviceRule("c", 136, None, "rwm"),   # /dev/pts/*
    DeviceRule("c", 5, 2, "rwm"),        # /dev/ptmx
    DeviceRule("c", 10, 200, "rwm"),     # /dev/net/tun
)

# What devices.list shows for a cgroup that allows everything.
V1_UNRESTRICTED = "a *:* rwm"


# ---------------------------------------------------------------- cgroup v1: the devices controller

def write_v1_rules(cgroup_path: str, rules: Sequence[DeviceRule]) -> None:
    """Make the v1 devices cgroup at `cgroup_path` allow exactly `rules`.

    Its list is emptied first, so for a moment nothing is allowed: do it before anything runs there.
    """
    for control, value in [("devices.deny", "a"), *(("devices.allow", str(rule)) for rule in rules)]:
        path = os.path.join(cgroup_path, control)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())   # one write(2) per rule: the kernel parses each write alone
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"writing '{value}' to {control} of cgroup {cgroup_path}: {exc.strerror}",
                          path) from None


def read_v1_rules(cgroup_path: str) -> list[str]:
    """The v1 devices cgroup's list, a rule a line (`a *:* rwm` when it allows everything)."""
    with open(os.path.join(cgroup_path, "devices.list")) as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------- cgroup v2: the BPF program


# <linux/bpf.h>: commands, the program and attach types, flags and the device program's context.
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_GET_FD_BY_ID, BPF_PROG_QUERY = 5, 8, 9, 13, 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2
BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4
_ACCESS_BITS = {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}
_KIND = {"c": BPF_DEVCG_DEV_CHAR, "b": BPF_DEVCG_DEV_BLOCK}
_ATTR_SIZE = 128          # union bpf_attr, zero-padded: the kernel refuses non-zero bytes it does not know
_PROGRAM_NAME = b"reconciler_dev"   # what bpftool shows (at most 15 characters)

# The eBPF opcodes the program uses (<linux/bpf_common.h>, <linux/bpf.h>): 32-bit ALU operations, a load
# of a 32-bit word, a jump on "not equal" to an immediate, exit.
_LDX_MEM_W = 0x61        # dst = *(u32 *)(src + off)
_ALU_MOV_REG = 0xBC      # dst = src
_ALU_MOV_IMM = 0xB4      # dst = imm
_ALU_AND_IMM = 0x54      # dst &= imm
_ALU_RSH_IMM = 0x74      # dst >>= imm
_JMP_JNE_IMM = 0x55      # if dst != imm: pc += off
_JMP_EXIT = 0x95         # return r0
_R0, _R1, _TYPE, _ACCESS, _MAJOR, _MINOR = 0, 1, 2, 3, 4, 5
_TO_NEXT_RULE = None     # a jump's offset before the block's length is known


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One 8-byte instruction: opcode, dst and src registers in one byte, a signed offset and immediate."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def device_program(rules: Sequence[DeviceRule]) -> bytes:
    """A BPF_PROG_TYPE_CGROUP_DEVICE program that allows what `rules` allow and refuses the rest.

    Its context (r1) is struct bpf_cgroup_dev_ctx {u32 access_type (access << 16 | type), u32 major,
    u32 minor}. The head unpacks it into r2-r5; each rule is then a block whose tests jump to the next
    block on a mismatch and which otherwise returns 1; past the last block the program returns 0.
    """
    program = [
        _insn(_LDX_MEM_W, _TYPE, _R1, 0),
        _insn(_ALU_AND_IMM, _TYPE, imm=0xFFFF),
        _insn(_LDX_MEM_W, _ACCESS, _R1, 0),
        _insn(_ALU_RSH_IMM, _ACCESS, imm=16),
        _insn(_LDX_MEM_W, _MAJOR, _R1, 4),
        _insn(_LDX_MEM_W, _MINOR, _R1, 8),
    ]
    for rule in rules:
        block: list[tuple[int, int, int, int | None, int]] = []     # code, dst, src, offset, immediate
        if rule.kind != "a":
            block.append((_JMP_JNE_IMM, _TYPE, 0, _TO_NEXT_RULE, _KIND[rule.kind]))
        refused = sum(bit for letter, bit in _ACCESS_BITS.items() if letter not in rule.access)
        if refused:
            # r1 (the context is no longer needed) = what is asked and the rule does not give.
            block += [(_ALU_MOV_REG, _R1, _ACCESS, 0, 0), (_ALU_AND_IMM, _R1, 0, 0, refused),
                      (_JMP_JNE_IMM, _R1, 0, _TO_NEXT_RULE, 0)]
        if rule.major is not None:
            block.append((_JMP_JNE_IMM, _MAJOR, 0, _TO_NEXT_RULE, rule.major))
        if rule.minor is not None:
            block.append((_JMP_JNE_IMM, _MINOR, 0, _TO_NEXT_RULE, rule.minor))
        block += [(_ALU_MOV_IMM, _R0, 0, 0, 1), (_JMP_EXIT, 0, 0, 0, 0)]
        for index, (code, dst, src, off, imm) in enumerate(block):
            # A jump's offset counts from the instruction after it; the next block starts at len(block).
            program.append(_insn(code, dst, src, len(block) - index - 1 if off is _TO_NEXT_RULE else off, imm))
    program += [_insn(_ALU_MOV_IMM, _R0, imm=0), _insn(_JMP_EXIT)]
    return b"".join(program)


def _bpf(command: int, attr: bytes, call: str) -> tuple[int, bytes]:
    """bpf(command, attr): its result and the attr as the kernel left it. OSError names `call`."""
    number = syscalls.syscall_number("bpf")
    if number is None:
        raise OSError(errno.ENOSYS, f"{call}: no bpf(2) system call number known for {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(command), buffer, ctypes.c_uint(_ATTR_SIZE))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")
    return int(result), buffer.raw


def load_device_program(rules: Sequence[DeviceRule], cgroup_path: str | None = None) -> int:
    """The program for `rules`, loaded: its fd (close it once attached: the cgroup holds the program).
    `cgroup_path`, the cgroup it is meant for, only goes into the error.

    Loaded without the verifier's log first (the log costs time); if the kernel refuses the program,
    loaded again with the log, whose last line (the verifier's reason) goes into the error.
    """
    program = device_program(rules)
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    call = "bpf(BPF_PROG_LOAD) of a device program" + (f" for cgroup {cgroup_path}" if cgroup_path else "")

    def load(log: ctypes.Array | None) -> int:
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags, prog_name
        attr = struct.pack("<IIQQIIQII16s", BPF_PROG_TYPE_CGROUP_DEVICE, len(program) // 8, ctypes.addressof(insns),
                           ctypes.addressof(license_), 1 if log is not None else 0, len(log) if log is not None else 0,
                           ctypes.addressof(log) if log is not None else 0, 0, 0, _PROGRAM_NAME)
        return _bpf(BPF_PROG_LOAD, attr, call)[0]

    try:
        return load(None)
    except OSError as exc:
        log = ctypes.create_string_buffer(1 << 16)
        try:
            return load(log)
        except OSError:
            lines = log.value.decode(errors="replace").strip().splitlines()
            if not lines:
                raise exc from None
            raise OSError(exc.errno, f"{exc.strerror} (verifier: {lines[-1]})") from None


def _open_cgroup(cgroup_path: str, call: str) -> int:
    try:
        return os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"{call}: cannot open the cgroup: {exc.strerror}", cgroup_path) from None


def attach_device_program(cgroup_path: str, program_fd: int) -> None:
    """Attach a loaded device program to the cgroup v2 directory, beside any attached there or above."""
    call = f"bpf(BPF_PROG_ATTACH, BPF_CGROUP_DEVICE) to cgroup {cgroup_path}"
    cgroup_fd = _open_cgroup(cgroup_path, call)
    try:
        # target_fd, attach_bpf_fd, attach_type, attach_flags
        _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", cgroup_fd, program_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI), call)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise OSError(exc.errno, f"{exc.strerror} (is it a cgroup v2 directory?)") from None
        raise
    finally:
        os.close(cgroup_fd)


def device_program_ids(cgroup_path: str) -> list[int]:
    """The ids of the device programs attached to the cgroup v2 directory itself (not above it)."""
    call = f"bpf(BPF_PROG_QUERY, BPF_CGROUP_DEVICE) of cgroup {cgroup_path}"
    cgroup_fd = _open_cgroup(cgroup_path, call)
    try:
        capacity = 64        # the kernel allows at most 64 programs per attach point
        ids = (ctypes.c_uint32 * capacity)()
        # target_fd, attach_type, query_flags, attach_flags, prog_ids, prog_cnt
        attr = struct.pack("<IIIIQI", cgroup_fd, BPF_CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), capacity)
        _, out = _bpf(BPF_PROG_QUERY, attr, call)
        count = struct.unpack_from("<I", out, 24)[0]
        return list(ids[:min(count, capacity)])
    finally:
        os.close(cgroup_fd)


def detach_device_programs(cgroup_path: str, keep: Iterable[int] = ()) -> None:
    """Detach from the cgroup v2 directory every device program attached there, but those in `keep`.

    A program gone meanwhile (detached by someone else, its cgroup removed) is fine.
    """
    kept = set(keep)
    call = f"bpf(BPF_PROG_DETACH, BPF_CGROUP_DEVICE) from cgroup {cgroup_path}"
    for program_id in device_program_ids(cgroup_path):
        if program_id in kept:
            continue
        try:
            program_fd, _ = _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", program_id),
                                 f"bpf(BPF_PROG_GET_FD_BY_ID) of program {program_id} on cgroup {cgroup_path}")
        except FileNotFoundError:
            continue
        try:
            cgroup_fd = _open_cgroup(cgroup_path, call)
            try:
                # target_fd, attach_bpf_fd, attach_type
                _bpf(BPF_PROG_DETACH, struct.pack("<III", cgroup_fd, program_fd, BPF_CGROUP_DEVICE), call)
            except FileNotFoundError:
                pass
            finally:
                os.close(cgroup_fd)
        finally:
            os.close(program_fd)


def _program_id(program_fd: int) -> int:
    """The kernel's id of a loaded program, from /proc/self/fdinfo."""
    with open(f"/proc/self/fdinfo/{program_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "prog_id":
                return int(value)
    raise OSError(errno.EINVAL, f"fd {program_fd} is not a BPF program (no prog_id in its fdinfo)")


def restrict_v2(cgroup_path: str, rules: Sequence[DeviceRule]) -> None:
    """Make the cgroup v2 directory allow exactly `rules`: their program attached, any older one detached.

    The new program is attached before the old ones go, as runc does, so that the cgroup is never left
    without one; doing it again is harmless (one program stays).
    """
    program_fd = load_device_program(rules, cgroup_path)
    try:
        attach_device_program(cgroup_path, program_fd)
        detach_device_programs(cgroup_path, keep=[_program_id(program_fd)])
    finally:
        os.close(program_fd)
