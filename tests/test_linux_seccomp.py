"""Seccomp profiles (reconciler/linux/seccomp.py) compiled by libseccomp and loaded for real
(reconciler/launcher/seccomp_filter.py).

Each filter is loaded in a forked child of the test, which then makes raw calls through ctypes (so
libc cannot route around the filter) and reports their errno through a pipe: the kernel's answer
under the filter, not a reading of the BPF. Every call below is made with arguments that would be
harmless if it went through (it then fails on them: EFAULT, EBADF, EINVAL...), and each is also made
with no filter at all, to show that it is the filter that refused it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from reconciler.isolators.capabilities import DEFAULT_CAPABILITIES
from reconciler.launcher import seccomp_filter
from reconciler.linux import seccomp

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="32-bit calls below are x86's (int 0x80)")

BUSYBOX = "/usr/bin/busybox"
DOCKER_CAPS = frozenset(DEFAULT_CAPABILITIES)
CLONE_FS, CLONE_PARENT, CLONE_NEWUSER, SIGCHLD = 0x200, 0x8000, 0x10000000, 17
FS_NAME = ctypes.create_string_buffer(b"no-such-filesystem")


def nr(name: str) -> int:
    import pyseccomp
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, name)
    assert number >= 0, name
    return number


def under_filter(program: bytes | None, probe: Callable[[Any], dict[str, Any]],
                 no_new_privs: bool = True) -> dict[str, Any]:
    """Run `probe(libc)` in a forked child that loaded `program` (None: no filter); its result, as JSON
    through a pipe, or {"killed_by": signal} when the child died of a signal before reporting."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            if program is not None:
                seccomp_filter.install(program, no_new_privs=no_new_privs)
            result = probe(ctypes.CDLL(None, use_errno=True))
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"killed_by": os.WTERMSIG(status)}
    assert chunks, "the child exited before it reported"
    return json.loads(b"".join(chunks))


def errno_of(libc: Any, number: int, *args: int) -> str:
    """'ok' or the errno name of a raw syscall."""
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
    if result >= 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


# The calls of issue 10's list, each with arguments that make it fail harmlessly if it goes through.
DENIED = {
    "keyctl": ("keyctl", 0, -4, 0),                    # KEYCTL_GET_KEYRING_ID of the user keyring, no create
    "add_key": ("add_key", 0, 0, 0, 0, 0),
    "request_key": ("request_key", 0, 0, 0, 0),
    "mount": ("mount", 0, 0, 0, 0, 0),
    "umount2": ("umount2", 0, 0),
    "pivot_root": ("pivot_root", 0, 0),
    "fsopen": ("fsopen", ctypes.addressof(FS_NAME), 0),
    "fsconfig": ("fsconfig", -1, 0, 0, 0, 0),
    "fsmount": ("fsmount", -1, 0, 0),
    "fspick": ("fspick", -1, 0, 0),
    "move_mount": ("move_mount", -1, 0, -1, 0, 0),
    "open_tree": ("open_tree", -1, 0, 0),
    "mount_setattr": ("mount_setattr", -1, 0, 0, 0, 0),
    "unshare": ("unshare", CLONE_NEWUSER | CLONE_PARENT),   # CLONE_PARENT: EINVAL for unshare
    "setns": ("setns", -1, 0),
    "clone-newuser": ("clone", CLONE_NEWUSER | CLONE_FS | SIGCHLD, 0, 0, 0, 0),   # together: EINVAL
    "open_by_handle_at": ("open_by_handle_at", -1, 0, 0),
    "init_module": ("init_module", 0, 0, 0),
    "finit_module": ("finit_module", -1, 0, 0),
    "delete_module": ("delete_module", 0, 0),
    "kexec_load": ("kexec_load", 0, 1000, 0, 0x00FF0000),   # too many segments, an unknown architecture
    "kexec_file_load": ("kexec_file_load", -1, -1, 0, 0, 0x7FFF0000),
    "reboot": ("reboot", 0, 0, 0, 0),                       # no magic: EINVAL
    "bpf": ("bpf", -1, 0, 0),
    "perf_event_open": ("perf_event_open", 0, 0, -1, -1, 0),
    "ptrace": ("ptrace", 3, 0, 0, 0),                       # PTRACE_PEEKUSER of pid 0: ESRCH
    "process_vm_readv": ("process_vm_readv", 0, 0, 0, 0, 0, 1),   # unknown flags: EINVAL
    "process_vm_writev": ("process_vm_writev", 0, 0, 0, 0, 0, 1),
    "pidfd_getfd": ("pidfd_getfd", -1, 0, 0),
    "kcmp": ("kcmp", 0, 0, -1, 0, 0),
    "userfaultfd": ("userfaultfd", 1 << 30),                # unknown flags: EINVAL
    "io_uring_setup": ("io_uring_setup", 0, 0),
    "io_uring_enter": ("io_uring_enter", -1, 0, 0, 0, 0, 0),
    "io_uring_register": ("io_uring_register", -1, 0, 0, 0),
}
ALWAYS_DENIED = ("keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "userfaultfd",
                 "io_uring_setup", "io_uring_enter", "io_uring_register")


def probe_calls(libc: Any) -> dict[str, Any]:
    # What ordinary programs do keeps working: a thread (clone without namespace flags), fork, exec.
    box: list[int] = []
    thread = threading.Thread(target=lambda: box.append(threading.get_native_id()))
    thread.start()
    thread.join()
    child = os.fork()
    if child == 0:
        os._exit(7)
    forked = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    exec_out = subprocess.run([BUSYBOX, "echo", "exec"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"thread": len(box), "fork": forked, "exec": exec_out,
                               "getpid": errno_of(libc, nr("getpid"))}
    results.update({name: errno_of(libc, nr(call[0]), *call[1:]) for name, call in DENIED.items()})
    results["clone3"] = errno_of(libc, nr("clone3"), 0, 0)
    return results


@pytest.fixture(scope="module")
def unfiltered() -> dict[str, Any]:
    """What the kernel answers each call with no filter (this test runs as root with every capability)."""
    return under_filter(None, probe_calls)


def test_the_default_profile_denies_the_escape_calls_and_keeps_ordinary_ones(unfiltered: dict[str, Any]) -> None:
    results = under_filter(seccomp.compile_for(None, DOCKER_CAPS), probe_calls)
    assert {name: results[name] for name in DENIED} == {name: "EPERM" for name in DENIED}
    assert results["clone3"] == "ENOSYS"         # so that libc falls back to clone, which the filter can read
    # The kernel alone answers otherwise (here, without modules or kexec, ENOSYS for those).
    assert [name for name in DENIED if unfiltered[name] == "EPERM"] == [] and unfiltered["clone3"] != "ENOSYS"
    assert (results["thread"], results["fork"], results["exec"], results["getpid"]) == (1, 7, "exec", "ok")


@pytest.mark.parametrize("granted, lifted", [
    ({"SYS_ADMIN", "SYS_PTRACE"},
     ("mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
      "mount_setattr", "unshare", "setns", "clone-newuser", "clone3", "bpf", "perf_event_open", "ptrace",
      "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp")),
    ({"SYS_MODULE", "SYS_BOOT", "DAC_READ_SEARCH", "BPF", "PERFMON"},
     ("init_module", "finit_module", "delete_module", "reboot", "open_by_handle_at", "bpf", "perf_event_open")),
])
def test_granted_capabilities_lift_their_conditional_denials(unfiltered: dict[str, Any], granted: set[str],
                                                             lifted: tuple[str, ...]) -> None:
    results = under_filter(seccomp.compile_for(None, DOCKER_CAPS | granted), probe_calls)
    assert {name: results[name] for name in lifted} == {name: unfiltered[name] for name in lifted}
    # Everything else stays refused, the keyrings, kexec, userfaultfd and io_uring whatever is granted.
    kept = [name for name in DENIED if name not in lifted]
    assert set(ALWAYS_DENIED) <= set(kept)
    assert {name: results[name] for name in kept} == {name: "EPERM" for name in kept}


def test_busybox_python_http_server_and_threads_run_under_the_default_profile(tmp_path: Path) -> None:
    program = seccomp.compile_for(None, DOCKER_CAPS)

    def confined(argv: list[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=lambda: seccomp_filter.install(program, no_new_privs=True),
                                cwd=tmp_path, **kwargs)

    (tmp_path / "index.txt").write_text("served\n")
    script = ("echo one two three | busybox wc -w; busybox ls /proc/self/ >/dev/null && echo ls; "
              "busybox sleep 0 & wait $! && echo waited; busybox sh -c 'echo nested'; "
              "busybox mkdir d && busybox touch d/f && busybox find d -type f; "
              "busybox ps >/dev/null && echo ps; busybox id -u")
    shell = confined([BUSYBOX, "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env={"PATH": "/usr/bin:/bin"})
    out, err = shell.communicate(timeout=30)
    assert (shell.returncode, out.split(), err) == (0, ["3", "ls", "waited", "nested", "d/f", "ps", "0"], "")

    threads = confined([sys.executable, "-c", "import concurrent.futures as f, os\n"
                        "with f.ThreadPoolExecutor(8) as pool: print(sum(pool.map(lambda i: i, range(100))))\n"
                        "pid = os.fork()\n"
                        "if pid == 0: os._exit(3)\n"
                        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"],
                       stdout=subprocess.PIPE, text=True)
    assert threads.communicate(timeout=30)[0].split() == ["4950", "3"]

    server = confined([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()           # "Serving HTTP on 127.0.0.1 port N (...)"
        match = re.search(r"port (\d+)", line)
        assert match, line
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/index.txt", timeout=10) as reply:
            assert (reply.status, reply.read()) == (200, b"served\n")
    finally:
        server.kill()
        server.wait(timeout=10)


# i386 through int 0x80 from this 64-bit process: the kernel sees AUDIT_ARCH_I386, as for a 32-bit program.
def int80(number: int, ebx: int = 0, ecx: int = 0) -> Callable[[Any], dict[str, Any]]:
    # mov eax, number; mov ebx, ebx; mov ecx, ecx; xor edx, edx; int 0x80; ret
    code = (b"\xb8" + number.to_bytes(4, "little") + b"\xbb" + (ebx & 0xffffffff).to_bytes(4, "little") +
            b"\xb9" + (ecx & 0xffffffff).to_bytes(4, "little") + b"\x31\xd2\xcd\x80\xc3")

    def probe(libc: Any) -> dict[str, Any]:
        libc.mmap.restype = ctypes.c_void_p
        page = libc.mmap(None, 4096, 7, 0x22, -1, 0)       # RWX, private anonymous
        ctypes.memmove(page, code, len(code))
        return {"result": ctypes.CFUNCTYPE(ctypes.c_int)(page)()}
    return probe


I386_KEYCTL, I386_GETPPID = 288, 64
X32_BIT = 0x40000000


def test_32_bit_and_x32_calls_of_a_denied_syscall_are_denied_too() -> None:
    program = seccomp.compile_for(None, DOCKER_CAPS)
    keyring = int80(I386_KEYCTL, 0, -4)
    assert under_filter(None, keyring)["result"] >= 0
    assert under_filter(program, keyring)["result"] == -errno.EPERM
    # x32's keyctl (the x86_64 number with bit 30): the filter answers before the kernel would.
    assert under_filter(program, lambda libc: {"x32": errno_of(libc, X32_BIT | nr("keyctl"), 0, -4, 0)}) == \
        {"x32": "EPERM"}


def test_a_profile_without_compat_architectures_kills_their_calls(tmp_path: Path) -> None:
    path = docker_profile(tmp_path, [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO"}])   # no archMap
    program = seccomp.compile_for(path, DOCKER_CAPS)
    assert under_filter(program, int80(I386_GETPPID)) == {"killed_by": signal.SIGSYS}
    assert under_filter(program, lambda libc: {"x32": errno_of(libc, X32_BIT | nr("getpid"))}) == \
        {"killed_by": signal.SIGSYS}
    assert under_filter(program, lambda libc: {"native": errno_of(libc, nr("getppid"))}) == {"native": "EPERM"}


def test_a_32_bit_program_is_refused_the_denied_call(tmp_path: Path) -> None:
    """A real i386 executable (static, no libc) calling keyctl; it exits with the errno it got."""
    source = tmp_path / "keyctl32.c"
    source.write_text("void _start(void) {\n"
                      "    int ret, status;\n"
                      "    __asm__ volatile (\"int $0x80\" : \"=a\"(ret)\n"
                      "                      : \"a\"(288), \"b\"(0), \"c\"(-4), \"d\"(0));\n"
                      "    status = ret < 0 ? -ret : 0;\n"
                      "    __asm__ volatile (\"int $0x80\" : : \"a\"(1), \"b\"(status));\n"
                      "    for (;;) {}\n"
                      "}\n")
    binary = tmp_path / "keyctl32"
    built = subprocess.run(["gcc", "-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pic", "-no-pie", "-O1",
                            "-o", str(binary), str(source)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"gcc cannot build an i386 program here: {built.stderr.strip()[:200]}")
    program = seccomp.compile_for(None, DOCKER_CAPS)
    assert subprocess.run([str(binary)]).returncode == 0
    confined = subprocess.run([str(binary)], preexec_fn=lambda: seccomp_filter.install(program, no_new_privs=True))
    assert confined.returncode == errno.EPERM


def docker_profile(tmp_path: Path, rules: list[dict[str, Any]], default: str = "SCMP_ACT_ALLOW", name: str = "p.json",
                   **extra: Any) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"defaultAction": default, "syscalls": rules, **extra}))
    return str(path)


def test_docker_args_conditions_errno_ret_and_conditions_are_honoured(tmp_path: Path) -> None:
    path = docker_profile(tmp_path, [
        # personality(0xffffffff) only queries: allowed; any other persona refused with EACCES.
        {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
         "args": [{"index": 0, "value": 0xffffffff, "op": "SCMP_CMP_NE"}]},
        # Conditions on one argument are alternatives (runc): either value is refused.
        {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EDOM,
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}, {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOTSUP,
         "includes": {"caps": ["CAP_SYS_ADMIN"]}},     # not held: the rule does not apply
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"name": "getuid", "action": "SCMP_ACT_ERRNO"},                     # no errnoRet: EPERM, not the default's
        {"names": ["getgid"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["arm64"]}},
        {"names": ["getegid"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["amd64"]}},
        {"names": ["geteuid"], "action": "SCMP_ACT_ERRNO", "includes": {"minKernel": "99.0"}},
        {"names": ["getsid"], "action": "SCMP_ACT_ERRNO", "excludes": {"minKernel": "2.6"}},
        {"names": ["getpgrp"], "action": "SCMP_ACT_ERRNO", "includes": {"minKernel": "3.0"}},
        {"names": ["no_such_call_anywhere"], "action": "SCMP_ACT_ERRNO"},   # skipped, as Docker does
    ])
    calls = {"query": ("personality", 0xffffffff), "change": ("personality", 0x0040000),
             "prio-process": ("getpriority", 0, 0), "prio-group": ("getpriority", 1, 0),
             "prio-user": ("getpriority", 2, 0), "getppid": ("getppid",), "getuid": ("getuid",),
             "getgid": ("getgid",), "getegid": ("getegid",), "geteuid": ("geteuid",), "getsid": ("getsid", 0),
             "getpgrp": ("getpgrp",)}
    results = under_filter(seccomp.compile_for(path, {"CHOWN"}), lambda libc: {
        name: errno_of(libc, nr(call[0]), *call[1:]) for name, call in calls.items()})
    assert results == {"query": "ok", "change": "EACCES", "prio-process": "EDOM", "prio-group": "EDOM",
                       "prio-user": "ok", "getppid": "EROFS", "getuid": "EPERM", "getgid": "ok",
                       "getegid": "EPERM", "geteuid": "ok", "getsid": "ok", "getpgrp": "EPERM"}


# What a Python child needs between loading an allow-list filter and reporting through its pipe.
PYTHON_CALLS = ["read", "write", "close", "mmap", "munmap", "mprotect", "brk", "madvise", "futex", "rt_sigaction",
                "rt_sigprocmask", "rt_sigreturn", "getpid", "exit", "exit_group"]


def test_an_allow_list_refuses_what_it_does_not_list_and_calls_newer_than_it_get_enosys(tmp_path: Path) -> None:
    """runc's patchbpf: above the highest call the profile names (exit_group, 231; i386: 252), ENOSYS."""
    path = docker_profile(tmp_path, [{"names": PYTHON_CALLS, "action": "SCMP_ACT_ALLOW"}], default="SCMP_ACT_ERRNO",
                          archMap=[{"architecture": "SCMP_ARCH_X86_64",
                                    "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}])
    program = seccomp.compile_for(path, DOCKER_CAPS)
    results = under_filter(program, lambda libc: {
        "getpid": errno_of(libc, nr("getpid")), "getppid": errno_of(libc, nr("getppid")),
        "clone3": errno_of(libc, nr("clone3"), 0, 0), "pidfd_open": errno_of(libc, nr("pidfd_open"), 0, 0),
        "x32-getppid": errno_of(libc, X32_BIT | nr("getppid")),
        "x32-pidfd_open": errno_of(libc, X32_BIT | nr("pidfd_open"), 0, 0),
        "x32-1000": errno_of(libc, X32_BIT | 1000)})
    # x32's highest named call is its own rt_sigreturn (513): its pidfd_open (434) is below it.
    assert results == {"getpid": "ok", "getppid": "EPERM", "clone3": "ENOSYS", "pidfd_open": "ENOSYS",
                       "x32-getppid": "EPERM", "x32-pidfd_open": "EPERM", "x32-1000": "ENOSYS"}
    assert under_filter(program, int80(I386_GETPPID))["result"] == -errno.EPERM
    assert under_filter(program, int80(434))["result"] == -errno.ENOSYS          # i386 pidfd_open
    # A default of ENOSYS already: every unlisted call gets it; a rule's ERRNO without errnoRet is EPERM (runc).
    path = docker_profile(tmp_path, [{"names": PYTHON_CALLS, "action": "SCMP_ACT_ALLOW"},
                                     {"names": ["getuid"], "action": "SCMP_ACT_ERRNO"}],
                          default="SCMP_ACT_ERRNO", defaultErrnoRet=errno.ENOSYS, name="enosys.json")
    assert under_filter(seccomp.compile_for(path, DOCKER_CAPS), lambda libc: {
        "getppid": errno_of(libc, nr("getppid")), "getuid": errno_of(libc, nr("getuid"))}) == \
        {"getppid": "ENOSYS", "getuid": "EPERM"}


@pytest.mark.parametrize("doc, message", [
    ({"defaultAction": "SCMP_ACT_MAYBE"}, "defaultAction: Input should be"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "syscalls.0.args.0.index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ALMOST"}]}]},
     "syscalls.0.args.0.op"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscals": []}, "syscals: Extra inputs are not permitted"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "read", "names": ["write"],
                                                       "action": "SCMP_ACT_ERRNO"}]},
     "syscalls.0: set either 'name' or 'names'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                                                       "errnoRet": 1}]},
     "syscalls.0: errnoRet is only for SCMP_ACT_ERRNO"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "includes": {"minKernel": "new"}}]},
     "syscalls.0.includes.minKernel: 'new' is not a kernel version"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
      "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}, "(document): set either 'architectures' or 'archMap'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"architecture": "SCMP_ARCH_VAX"}]},
     "archMap.0.architecture: Input should be"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}, "flags: not supported"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}, "listenerPath: not supported"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]},
     "syscalls.0.action: Input should be"),
    ("not json", "not valid JSON (line 1, column 1)"),
])
def test_a_broken_profile_is_refused_naming_file_and_field(tmp_path: Path, doc: Any, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(seccomp.SeccompError) as caught:
        seccomp.load_profile(str(path))
    assert str(caught.value).startswith(f"seccomp profile {path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_fifo_or_directory_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()
    for name in ("fifo.json", "dir.json"):
        with pytest.raises(seccomp.SeccompError, match=f"seccomp profile {tmp_path / name}: not a regular file"):
            seccomp.load_profile(str(tmp_path / name))


def test_go_style_nulls_are_empty_lists(tmp_path: Path) -> None:
    """Docker's own default.json writes "subArchitectures": null; Go encoders write null for empty lists."""
    path = docker_profile(tmp_path, [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "args": None}],
                          archMap=[{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": None}], flags=None)
    profile = seccomp.load_profile(path)
    assert profile.archMap[0].subArchitectures == [] and profile.syscalls[0].args == []


def test_compiled_programs_are_cached_by_file_and_capabilities(tmp_path: Path) -> None:
    path = docker_profile(tmp_path, [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO",
                                      "excludes": {"caps": ["CAP_SYS_ADMIN"]}}])
    first = seccomp.compile_for(path, DOCKER_CAPS)
    assert seccomp.compile_for(path, DOCKER_CAPS) is first
    profile = seccomp.load_profile(path)
    assert seccomp.compile_profile(profile, DOCKER_CAPS) is first          # same file, same mtime
    assert seccomp.compile_profile(profile, {"CAP_SYS_ADMIN"}) is seccomp.compile_profile(profile, {"SYS_ADMIN"})
    assert seccomp.compile_profile(profile, {"SYS_ADMIN"}) != first
    Path(path).write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getppid", "getpid"], "action": "SCMP_ACT_ERRNO"}]}))
    os.utime(path, ns=(1, 1))
    changed = seccomp.compile_for(path, DOCKER_CAPS)
    assert changed != first
    assert under_filter(changed, lambda libc: {"getpid": errno_of(libc, nr("getpid"))}) == {"getpid": "EPERM"}


def test_the_default_profile_is_ours_and_loads() -> None:
    assert seccomp.default_profile_path() == seccomp.DEFAULT_PROFILE
    profile = seccomp.load_profile(seccomp.default_profile_path())
    assert profile.defaultAction == "SCMP_ACT_ALLOW"
    assert all(rule.action == "SCMP_ACT_ERRNO" and rule.errnoRet in (errno.EPERM, errno.ENOSYS)
               for rule in profile.syscalls)


def test_install_refuses_a_malformed_program_and_names_the_failing_call() -> None:
    with pytest.raises(ValueError, match="1 to 4096 instructions of 8 bytes, not 12 bytes"):
        seccomp_filter.install(b"\0" * 12, no_new_privs=True)
    program = seccomp.compile_for(None, DOCKER_CAPS)

    def without_privileges(no_new_privs: bool) -> Callable[[Any], dict[str, Any]]:
        def probe(libc: Any) -> dict[str, Any]:
            os.setuid(65534)         # nobody: no CAP_SYS_ADMIN left
            try:
                seccomp_filter.install(program, no_new_privs=no_new_privs)
            except OSError as exc:
                return {"errno": errno.errorcode[exc.errno], "message": str(exc)}
            return {"keyctl": errno_of(libc, nr("keyctl"), 0, -4, 0)}
        return probe
    # The kernel loads a filter only for a thread with no_new_privs or CAP_SYS_ADMIN.
    refused = under_filter(None, without_privileges(no_new_privs=False))
    assert refused["errno"] == "EACCES" and "prctl(PR_SET_SECCOMP)" in refused["message"]
    assert under_filter(None, without_privileges(no_new_privs=True)) == {"keyctl": "EPERM"}
    # Root (CAP_SYS_ADMIN) may load one without no_new_privs; the filter is in force all the same.
    assert under_filter(program, lambda libc: {"keyctl": errno_of(libc, nr("keyctl"), 0, -4, 0),
                                               "nnp": int(Path("/proc/self/status").read_text().split(
                                                   "NoNewPrivs:")[1].split()[0])}, no_new_privs=False) == \
        {"keyctl": "EPERM", "nnp": 0}
