"""Seccomp profiles (reconciler/linux/seccomp.py) compiled by libseccomp and loaded for real
(reconciler/launcher/seccomp_filter.py), and the linux/seccomp isolator's choices and refusals.

Each filter is loaded in a forked child of the test, which then tries calls through ctypes and
reports their errno through a pipe: the kernel's answer under the filter, not a reading of the BPF.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import ContainerConfig, IsolatorSetupError, PermanentError
from reconciler.isolators.capabilities import DEFAULT_CAPABILITIES
from reconciler.isolators.seccomp import LinuxSeccompIsolator
from reconciler.launcher import seccomp_filter
from reconciler.linux import seccomp
from reconciler.models import ContainerSpec

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers below are x86_64's")

# x86_64 syscall numbers: the calls are made raw, so libc cannot route around the filter.
NR = {"keyctl": 250, "add_key": 248, "request_key": 249, "mount": 165, "umount2": 166, "pivot_root": 155,
      "unshare": 272, "setns": 308, "clone": 56, "clone3": 435, "open_by_handle_at": 304, "init_module": 175,
      "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "bpf": 321,
      "perf_event_open": 298, "ptrace": 101, "process_vm_readv": 310, "userfaultfd": 323, "io_uring_setup": 425,
      "fsopen": 430, "open_tree": 428, "getpid": 39, "personality": 135}
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
FS_NAME = ctypes.create_string_buffer(b"no-such-filesystem")
DOCKER_CAPS = frozenset(DEFAULT_CAPABILITIES)


def under_filter(program: bytes, probe: Callable[[Any], dict[str, Any]], no_new_privs: bool = True) -> dict[str, Any]:
    """Run `probe(libc)` in a forked child that loaded `program`; its result, as JSON through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
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
    os.waitpid(pid, 0)
    assert chunks, "the child died before it reported"
    return json.loads(b"".join(chunks))


def errno_of(libc: Any, number: int, *args: int) -> str:
    """'ok' or the errno name of a raw syscall. Arguments are harmless: a call the filter lets through
    fails on them (EFAULT, EINVAL, EBADF...) rather than doing anything."""
    result = libc.syscall(number, *[ctypes.c_long(a) for a in args])
    if result >= 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


# Each denied call with arguments that would be harmless if it went through.
DENIED = {
    "keyctl": (NR["keyctl"], 0, -3, 0),               # KEYCTL_GET_KEYRING_ID of the user keyring
    "add_key": (NR["add_key"], 0, 0, 0, 0, 0),
    "request_key": (NR["request_key"], 0, 0, 0, 0),
    "mount": (NR["mount"], 0, 0, 0, 0, 0),
    "umount2": (NR["umount2"], 0, 0),
    "pivot_root": (NR["pivot_root"], 0, 0),
    "setns": (NR["setns"], -1, 0),
    "clone-newuser": (NR["clone"], CLONE_NEWUSER | SIGCHLD, 1, 0, 0, 0),   # a stack of 1: the child dies at once
    "open_by_handle_at": (NR["open_by_handle_at"], -1, 0, 0),
    "init_module": (NR["init_module"], 0, 0, 0),
    "finit_module": (NR["finit_module"], -1, 0, 0),
    "delete_module": (NR["delete_module"], 0, 0),
    "kexec_load": (NR["kexec_load"], 0, 0, 0, 0),
    "kexec_file_load": (NR["kexec_file_load"], -1, -1, 0, 0, 0),
    "bpf": (NR["bpf"], -1, 0, 0),
    "perf_event_open": (NR["perf_event_open"], 0, 0, -1, -1, 0),
    "ptrace": (NR["ptrace"], 0, 0, 0, 0),            # PTRACE_TRACEME
    "process_vm_readv": (NR["process_vm_readv"], 1, 0, 0, 0, 0, 0),
    "userfaultfd": (NR["userfaultfd"], 1),            # UFFD_USER_MODE_ONLY
    "io_uring_setup": (NR["io_uring_setup"], 0, 0),
    "fsopen": (NR["fsopen"], ctypes.addressof(FS_NAME), 0),
    "open_tree": (NR["open_tree"], -1, 0, 0),
    # Last: where it goes through, the child is in a user namespace of its own, and calls after it would be
    # refused by the kernel for that reason.
    "unshare": (NR["unshare"], CLONE_NEWUSER),
}


def probe_denied(libc: Any) -> dict[str, Any]:
    # What ordinary programs do keeps working: a thread (clone without namespace flags), fork, exec. First:
    # once PTRACE_TRACEME went through, an exec would stop this child for a tracer that never comes.
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    results: dict[str, Any] = {"thread": "ok", "exec": subprocess.run(["/usr/bin/env", "true"]).returncode,
                               "getpid": errno_of(libc, NR["getpid"])}
    results.update({name: errno_of(libc, *call) for name, call in DENIED.items()})
    results["clone3"] = errno_of(libc, NR["clone3"], 0, 0)
    return results


def test_the_default_profile_denies_the_escape_calls_and_keeps_ordinary_ones(tmp_path: Path) -> None:
    results = under_filter(seccomp.compile_for(None, DOCKER_CAPS), probe_denied)
    denied = {name: results[name] for name in DENIED}
    assert denied == {name: "EPERM" for name in DENIED}
    # It is the filter that refused: with none, the kernel answers each of them otherwise.
    unfiltered = under_filter(seccomp.compile_for(docker_profile(tmp_path, []), DOCKER_CAPS), probe_denied)
    assert [name for name in DENIED if unfiltered[name] == "EPERM"] == []
    assert results["clone3"] == "ENOSYS"         # so that libc falls back to clone, which the filter can read
    assert (results["thread"], results["exec"], results["getpid"]) == ("ok", 0, "ok")


def test_granted_capabilities_lift_their_conditional_denials(tmp_path: Path) -> None:
    caps = DOCKER_CAPS | {"SYS_ADMIN", "SYS_PTRACE"}
    results = under_filter(seccomp.compile_for(None, caps), probe_denied)
    # What the kernel answers with no filter at all (this test runs as root with every capability).
    unfiltered = under_filter(seccomp.compile_for(docker_profile(tmp_path, []), caps), probe_denied)
    lifted = ("mount", "umount2", "pivot_root", "unshare", "setns", "clone-newuser", "clone3", "fsopen", "open_tree",
              "bpf", "perf_event_open", "ptrace", "process_vm_readv", "userfaultfd")
    assert {name: results[name] for name in lifted} == {name: unfiltered[name] for name in lifted}
    # Always refused: the keyrings and io_uring; module and kexec calls without their own capabilities.
    for name in ("keyctl", "add_key", "request_key", "io_uring_setup", "init_module", "kexec_load"):
        assert results[name] == "EPERM" != unfiltered[name] or name == "kexec_load", (name, results, unfiltered)


def test_a_32_bit_call_of_a_denied_syscall_is_denied_too() -> None:
    """int 0x80 with i386's number of keyctl (288): the compat architecture is in the filter as well."""
    code = bytes.fromhex("b820010000" "bbfdffffff" "31c9" "cd80" "c3")   # mov eax,288; mov ebx,-3; xor ecx,ecx; int 0x80; ret
    def probe(libc: Any) -> dict[str, Any]:
        libc.mmap.restype = ctypes.c_void_p
        page = libc.mmap(None, 4096, 7, 0x22, -1, 0)       # RWX, private anonymous
        ctypes.memmove(page, code, len(code))
        result = ctypes.CFUNCTYPE(ctypes.c_int)(page)()
        return {"result": result}
    assert under_filter(seccomp.compile_for(None, DOCKER_CAPS), probe)["result"] == -errno.EPERM


def docker_profile(tmp_path: Path, rules: list[dict[str, Any]], default: str = "SCMP_ACT_ALLOW", **extra: Any) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"defaultAction": default, "syscalls": rules, **extra}))
    return str(path)


def test_docker_args_conditions_and_errno_ret_are_honoured(tmp_path: Path) -> None:
    # personality(0xffffffff) only queries: allow it; any other persona is refused with EACCES.
    path = docker_profile(tmp_path, [
        {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
         "args": [{"index": 0, "value": 0xffffffff, "op": "SCMP_CMP_NE"}]},
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOTSUP,
         "includes": {"caps": ["CAP_SYS_ADMIN"]}},     # not held: the rule does not apply
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["no_such_call_anywhere"], "action": "SCMP_ACT_ERRNO"},   # skipped, as Docker does
    ])
    results = under_filter(seccomp.compile_for(path, DOCKER_CAPS), lambda libc: {
        "query": errno_of(libc, NR["personality"], 0xffffffff),
        "change": errno_of(libc, NR["personality"], 0x0040000),
        "getppid": errno_of(libc, 110)})
    assert results == {"query": "ok", "change": "EACCES", "getppid": "EROFS"}


def test_an_allow_list_profile_refuses_what_it_does_not_list(tmp_path: Path) -> None:
    allowed = ["read", "write", "exit", "exit_group", "rt_sigreturn", "getpid", "brk", "mmap", "munmap", "close",
               "futex", "rt_sigprocmask", "rt_sigaction", "madvise"]
    path = docker_profile(tmp_path, [{"names": allowed, "action": "SCMP_ACT_ALLOW"}], default="SCMP_ACT_ERRNO",
                          defaultErrnoRet=errno.ENOSYS)
    results = under_filter(seccomp.compile_for(path, DOCKER_CAPS), lambda libc: {
        "getpid": errno_of(libc, NR["getpid"]), "getppid": errno_of(libc, 110)})
    assert results == {"getpid": "ok", "getppid": "ENOSYS"}


@pytest.mark.parametrize("doc, message", [
    ({"defaultAction": "SCMP_ACT_MAYBE"}, "defaultAction: Input should be"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "syscalls.0.args.0.index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscals": []}, "syscals: Extra inputs are not permitted"),
    ("not json", "not valid JSON"),
])
def test_a_broken_profile_is_refused_naming_file_and_field(tmp_path: Path, doc: Any, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(seccomp.SeccompError) as caught:
        seccomp.load_profile(str(path))
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_compiled_profile_is_cached_until_its_file_changes(tmp_path: Path) -> None:
    path = docker_profile(tmp_path, [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO"}])
    first = seccomp.compile_for(path, DOCKER_CAPS)
    assert seccomp.compile_for(path, DOCKER_CAPS) is first
    Path(path).write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getppid", "getpid"], "action": "SCMP_ACT_ERRNO"}]}))
    os.utime(path, ns=(1, 1))
    assert seccomp.compile_for(path, DOCKER_CAPS) != first


# ---------------------------------------------------------------- the isolator

def config_with(linux_info: dict[str, Any] | None) -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"},
                                         **({"container": {"linux_info": linux_info}} if linux_info else {})})
    return ContainerConfig(container_id="c1", name="x", manifest="x.yaml", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox="/var/tmp/unused")


def agent(**flags: Any) -> AgentConfig:
    return AgentConfig(launcher="posix", isolation=["posix/cpu"], **flags)


def test_the_isolator_picks_the_profile_and_shows_it(tmp_path: Path) -> None:
    (tmp_path / "strict.json").write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path)))
    cases = {
        None: ("default", None),
        '{"seccomp": {"unconfined": true}}': ("unconfined", None),
        '{"seccomp": {"profile_name": "strict.json"}}': ("strict.json", str(tmp_path / "strict.json")),
        '{"privileged": true}': ("unconfined", None),
    }
    for linux_info, (name, path) in cases.items():
        info = isolator.prepare("c1", config_with(json.loads(linux_info) if linux_info else None))
        assert isolator.status("c1") == {"security": {"seccomp": name}}
        if name == "unconfined":
            assert info is None
        else:
            assert info is not None and info.seccomp == {"name": name, "path": path}
    isolator.cleanup("c1")
    assert isolator.status("c1") == {}


def test_the_flags_choose_every_container_s_default(tmp_path: Path) -> None:
    (tmp_path / "site.json").write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path), seccomp_profile_name="site.json"))
    assert isolator.prepare("c1", config_with(None)).seccomp == {"name": "site.json", "path": str(tmp_path / "site.json")}
    assert LinuxSeccompIsolator(agent(seccomp_profile_name="unconfined")).prepare("c1", config_with(None)) is None


@pytest.mark.parametrize("flags, message", [
    ({"seccomp_profile_name": "site.json"}, "flag --seccomp_profile_name: profile 'site.json' needs --seccomp_config_dir"),
    ({"seccomp_config_dir": "/nonexistent-dir"}, "flag --seccomp_config_dir: /nonexistent-dir is not a directory"),
    ({"seccomp_config_dir": "DIR", "seccomp_profile_name": "missing.json"}, "flag --seccomp_profile_name: linux/seccomp: seccomp profile"),
    ({"seccomp_config_dir": "DIR", "seccomp_profile_name": "broken.json"}, "defaultAction"),
])
def test_bad_flags_stop_the_agent_in_one_line(tmp_path: Path, flags: dict[str, Any], message: str) -> None:
    (tmp_path / "broken.json").write_text(json.dumps({"syscalls": []}))
    flags = {k: (str(tmp_path) if v == "DIR" else v) for k, v in flags.items()}
    with pytest.raises(IsolatorSetupError) as caught:
        LinuxSeccompIsolator(agent(**flags))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_manifest_profile_that_is_missing_or_broken_fails_its_launch(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{")
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path)))
    with pytest.raises(PermanentError, match="Failed to load seccomp profile 'missing.json'"):
        isolator.prepare("c1", config_with({"seccomp": {"profile_name": "missing.json"}}))
    with pytest.raises(PermanentError, match="not valid JSON"):
        isolator.prepare("c1", config_with({"seccomp": {"profile_name": "broken.json"}}))
    with pytest.raises(PermanentError, match="the agent runs without --seccomp_config_dir"):
        LinuxSeccompIsolator(agent()).prepare("c1", config_with({"seccomp": {"profile_name": "x.json"}}))
