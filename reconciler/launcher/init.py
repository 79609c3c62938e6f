"""The container's init: what runs first inside a container, as Mesos's `mesos-containerizer launch`.

It is forked (never exec'd) by the launch helper, so a container costs no new Python interpreter.
It applies the launch info (mounts, root filesystem, hostname, rlimits) while the agent isolates,
waits for the agent's go-ahead (sent after every isolator's `isolate`), starts the command (as its
user, with its capabilities, no_new_privs and seccomp filter), and then execs `pid1` (pid1.c): the
container's PID 1 from then on, when it has a pid namespace. pid1 reaps every zombie, forwards
termination signals to the command, and writes the command's wait status into the container's
checkpoint (`status`), so an exit code survives restarts of the agent.

Why exec rather than stay (as runc's `runc init` execs the container's process): a fork of the
launch helper maps the host's interpreter and libraries, keeps the helper's heap (earlier launches'
specs) and its environment, and holds root's capabilities. A container able to reach its PID 1
(through /proc/1 or ptrace, given CAP_SYS_PTRACE) would reach all of that. pid1 is a static program
exec'd from a sealed memfd, with an empty environment, only CAP_KILL, no_new_privs, a seccomp filter
of its own, not dumpable, holding nothing but /dev/null and the container's own `status` file.

This module imports only the standard library: it runs in the launch helper, which is kept small
so that each forked init costs little memory until it execs.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import os
import resource
import signal
import sys
import time
from typing import TYPE_CHECKING, NamedTuple

from reconciler.launcher import image_user, seccomp_filter

if TYPE_CHECKING:
    # Types only (annotations are not evaluated here): the init reads the plain dicts json.loads made.
    from reconciler.launch_spec import CapabilitySets, CommandUser, InitSpec, LaunchSteps, RLimitSetting, Stdio

# Signals an operator or the agent may send to a container; init passes them on to the command.
FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT,
)
RESET_SIGNALS = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ)
STATUS_FILE = "status"
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
# Capabilities, set in the command's process before exec (see _limit_capabilities).
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
SECBIT_NOROOT = 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_KILL = 5
CLONE_NEWNET = 0x40000000
PID1_STATUS_FD = 3    # where pid1 finds the status file (then the command's release and its errors)
MNT_DETACH = 2
# pivot_root has no glibc wrapper (the same table as reconciler.linux.syscalls, which the init can't import).
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}

# Not reconciler.linux.syscalls: it imports dataclasses and platform, and a heavier launch helper was
# measured to cost each init ~200 KiB more unique memory. These two calls are all the init needs.
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount", target)


def warm_up() -> None:
    """Run, once in the launch helper, the library paths every init takes (ctypes calls, JSON).

    ctypes builds its call machinery and CPython specialises bytecode on first use; done here, before
    any fork, it is shared by every init instead of being copied into each one.
    """
    _libc.prctl(PR_SET_NAME, b"reconciler-helper", 0, 0, 0)
    for _ in range(10):   # CPython 3.11 specialises a function's bytecode after 8 calls
        try:
            _mount(None, "", None, 0, None)   # fails (ENOENT): only the call path matters
        except OSError:
            pass
        json.dumps(termination_doc(0, None))
        for fd in open_stdio({"stdout": os.devnull, "stderr": os.devnull}):
            os.close(fd)
        apply_launch_info({})
        # What a container with its own root filesystem runs for each of its ~20 mounts.
        resolve_in_root("/", "/proc/self/../self/fd")
        os.makedirs("/proc", mode=0o755, exist_ok=True)


def write_status(status_fd: int, doc: dict) -> None:
    """Write the container's `status` (created empty by the launch helper; held open, so no mount can hide it).

    Written once, by whichever process ends the container's life (this init or pid1), and read by the
    agent only once that process is gone. No fsync: the record only matters while this boot lasts
    (see reconciler.checkpoint).
    """
    os.pwrite(status_fd, json.dumps(doc).encode(), 0)


def termination_doc(wait_status: int | None, error: str | None = None) -> dict:
    doc: dict = {"wait_status": wait_status, "exit_code": None, "exit_signal": None,
                 "finished_at": time.time(), "error": error}
    if wait_status is not None:
        if os.WIFEXITED(wait_status):
            doc["exit_code"] = os.WEXITSTATUS(wait_status)
        elif os.WIFSIGNALED(wait_status):
            doc["exit_signal"] = os.WTERMSIG(wait_status)
    return doc


def run(spec: InitSpec, go_fd: int, status_fd: int, pid1_fd: int) -> int:
    """The container's init until it becomes pid1. Returns an exit code for os._exit only when it fails."""
    # The only dispositions Python and the launch helper changed; every executed line of Python
    # here copies pages of the helper, so the init does no more than it must.
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    blocked = {signal.SIGCHLD, *FORWARDED_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    _libc.prctl(PR_SET_NAME, b"reconciler-init", 0, 0, 0)

    # The launch info (mounts, root filesystem, hostname, rlimits) is applied while the agent still
    # isolates (cgroups, checkpoints): nothing of the command runs before the go-ahead, and the two
    # overlap on separate CPUs. A failure is reported once the go-ahead came, as any other.
    stdio = None
    setup_error = None
    user = spec.get("user")
    try:
        network_namespace = spec.get("network_namespace")
        if network_namespace:
            join_network_namespace(network_namespace)
        # Opened here, by their host paths: a root filesystem entered below would hide them.
        stdio = open_stdio(spec)
        apply_launch_info(spec)
        in_image = spec.get("user_in_image")
        if in_image is not None:
            # Docker's rule (and Mesos's for command.user): a user is looked up in the container's own
            # /etc/passwd and /etc/group, now that it is the root.
            user = image_user.resolve(in_image)
            spec["env"].setdefault("HOME", user.pop("home"))
        if user is not None and spec.get("chown_sandbox"):
            # Only now the container's user may change the sandbox: the mounts and files root made in
            # it (the overlay's directories, stdout, stderr) can no longer be swapped for links.
            os.chown(spec["sandbox_in_container"], user["uid"], user["gid"], follow_symlinks=False)
    except Exception as exc:  # noqa: BLE001
        setup_error = exc

    # The agent sends one byte after isolate(); EOF means it gave up on this launch (or died first).
    if os.read(go_fd, 1) != b"\x01":
        # Said in the status, so an agent recovering this container knows none of its command ran
        # and launches it again, whatever its restart policy.
        write_status(status_fd, {"not_started": True, "finished_at": time.time()})
        return 0
    os.close(go_fd)

    if os.getpid() != 1:
        # Without a pid namespace, daemonised grandchildren are re-parented to us, not the host's init.
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    try:
        if setup_error is not None:
            raise setup_error
        command = start_command(spec, stdio, user)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint makes an orphan, not a crash
        message = f"Failed to launch container: {exc}"
        _log_to_stderr(spec, message, stdio)
        write_status(status_fd, termination_doc(None, message))
        return 1
    for fd in stdio or ():   # set: the setup did not fail
        os.close(fd)
    try:
        become_pid1(command, status_fd, pid1_fd, spec["last_cap"])
    except Exception as exc:  # noqa: BLE001 - nothing may run unsupervised: end the command with the reason
        os.kill(command.pid, signal.SIGKILL)   # still held before its exec: none of its code ran
        write_status(status_fd, termination_doc(None, f"container init failed: cannot start pid1: {exc}"))
    return 1


def become_pid1(command: "Command", status_fd: int, pid1_fd: int, last_cap: int) -> None:
    """Exec pid1 (pid1.c) in this process, which stays the command's parent. Returns only by raising.

    The command is held before its exec until pid1 runs (pid1 closes `command.release`): no code of the
    container runs while this process, with root's capabilities and the launch helper's memory, is its
    PID 1. pid1 then reads the command's exec failure, if any, from `command.errors`. Signals that
    arrive meanwhile stay pending (they are blocked) and reach pid1.
    """
    os.chdir("/")
    # Only CAP_KILL (to pass signals on to a command of another user): its bounding set, inheritable and
    # ambient sets reduced to it, so that exec gives root nothing more.
    if os.geteuid() == 0:
        for cap in range(last_cap + 1):
            if cap != CAP_KILL:
                _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
        kill_only = 1 << CAP_KILL
        _capset(kill_only, kill_only, 0)
    # Its descriptors: 0-2 /dev/null (set by the launch helper), 3 the status file, 4 the command's
    # release, 5 its exec errors, and nothing else.
    wanted = [status_fd, command.release, command.errors]
    # Copies out of the way of 3-5 first (close-on-exec), then each to its place (inheritable).
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in wanted]
    pid1 = fcntl.fcntl(pid1_fd, fcntl.F_DUPFD_CLOEXEC, 10)
    for target, fd in enumerate(moved, start=PID1_STATUS_FD):
        os.dup2(fd, target)
    os.closerange(PID1_STATUS_FD + len(wanted), 10)
    os.execve(pid1, ["reconciler-init", str(command.pid)], {})


def join_network_namespace(path: str) -> None:
    """network/cni: the namespace it made and attached (its interfaces, routes and addresses are there)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot join the network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def apply_launch_info(spec: LaunchSteps) -> None:
    """What isolators asked for, applied inside the new namespaces before the command starts."""
    hostname = spec.get("hostname")
    if hostname:
        import socket
        socket.sethostname(hostname)
    rootfs = spec.get("rootfs")
    for m in spec.get("mounts", []):
        target = m["target"]
        if rootfs and target.startswith(rootfs + "/"):
            # Inside the image's root filesystem: its symbolic links must not lead a mount to the host.
            target = resolve_in_root(rootfs, target[len(rootfs):])
        if "symlink" in m:
            if not os.path.lexists(target):
                os.symlink(m["symlink"], target)
            continue
        if m.get("mkdir"):
            os.makedirs(target, mode=m.get("mkdir_mode", 0o755), exist_ok=True)
        elif m.get("file"):
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        source = m.get("source")
        if rootfs and source and source.startswith(rootfs + "/"):
            source = resolve_in_root(rootfs, source[len(rootfs):])    # a bind from inside it, likewise
        _mount(source, target, m.get("fstype"), m.get("flags", 0), m.get("data"))
    if rootfs:
        pivot_root(rootfs)
    for rl in spec.get("rlimits", []):
        try:
            resource.setrlimit(rl["resource"], (rl["soft"], rl["hard"]))
        except (OSError, ValueError) as exc:
            raise OSError(f"Failed to set {rl.get('name', rl['resource'])} limit: {_rlimit_reason(rl, exc)}") from None


def _rlimit_reason(rl: RLimitSetting, exc: Exception) -> str:
    # Python turns EPERM and EINVAL into ValueErrors with its own words; say what the kernel said, and why.
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if "raise maximum" not in str(exc):
        return os.strerror(22) + f" ({exc})"
    hard = resource.getrlimit(rl["resource"])[1]
    hint = ", and RLMT_NOFILE cannot exceed /proc/sys/fs/nr_open" if rl["resource"] == resource.RLIMIT_NOFILE else ""
    return f"{os.strerror(1)}: raising a hard limit above the agent's own ({hard}) needs CAP_SYS_RESOURCE{hint}"


def open_stdio(spec: Stdio) -> tuple[int, int, int]:
    """The command's stdin (/dev/null), stdout and stderr (appended to, in the sandbox)."""
    stdin = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    stdout = os.open(spec["stdout"], flags, 0o644)
    stderr = os.open(spec["stderr"], flags, 0o644)
    return stdin, stdout, stderr


def resolve_in_root(root: str, path: str) -> str:
    """`path` inside `root`, its symbolic links resolved as if `root` were / (an absolute link restarts
    at `root`, `..` stops there), as runc's securejoin; missing components are kept as they are."""
    pending = [p for p in path.split("/") if p]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        current = os.path.join(root, *resolved, part)
        if os.path.islink(current):
            links += 1
            if links > 40:
                raise OSError(40, f"Too many levels of symbolic links resolving '{path}' in the root filesystem")
            link = os.readlink(current)
            if link.startswith("/"):
                resolved = []
            pending = [p for p in link.split("/") if p] + pending
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def pivot_root(new_root: str) -> None:
    """Enter `new_root` (a mount point) as / and detach the old root, as Mesos's fs::chroot::enter."""
    os.chdir(new_root)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"pivot_root: unknown system call number on {os.uname().machine}")
    # pivot_root(".", "."): the old root ends up stacked on the new one, then is detached.
    _check(_libc.syscall(number, b".", b"."), "pivot_root", new_root)
    _check(_libc.umount2(b".", MNT_DETACH), "umount2", "/")
    os.chdir("/")


class Command(NamedTuple):
    """A forked command held before its exec: its pid, the pipe end whose closing lets it exec, and
    the pipe that carries its exec failure (nothing, then EOF, when the exec succeeds)."""
    pid: int
    release: int
    errors: int


def start_command(spec: InitSpec, stdio: tuple[int, int, int] | None = None,
                  user: CommandUser | None = None) -> Command:
    """Fork the command; it sets itself up (user, capabilities, seccomp), then waits to be released."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    release_r, release_w = os.pipe2(os.O_CLOEXEC)
    stdin, stdout, stderr = stdio if stdio is not None else open_stdio(spec)
    pid = os.fork()
    if pid == 0:
        os.close(release_w)
        _exec_command(spec, user, stdin, stdout, stderr, err_w, release_r)
    os.close(err_w)
    os.close(release_r)
    if stdio is None:
        for fd in (stdin, stdout, stderr):
            os.close(fd)
    return Command(pid, release_w, err_r)


def _exec_command(spec: InitSpec, user: CommandUser | None, stdin: int, stdout: int, stderr: int, err_w: int,
                  release: int) -> None:
    """In the command's process: become the command's user with its capabilities, and exec. Never returns.

    A function of its own so the init, which only forks, never runs (and so never copies) this code.
    The order matters: the bounding set is dropped while CAP_SETPCAP is held; a seccomp filter needs
    either no_new_privs or CAP_SYS_ADMIN when it is loaded, so a root command loads it before its
    capabilities are reduced to the granted ones, and a command of another user (which always gets
    no_new_privs: a setuid program must not give it back what it never had) loads it last.
    """
    failing = ""
    try:
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        low = 3
        for keep in sorted((err_w, release)):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 65536)
        # As Mesos's launch helper: a working directory the image lacks is made (inside the container's
        # root, as root, before the user changes); only failing to enter it fails the launch.
        try:
            os.makedirs(spec["cwd"], mode=0o755, exist_ok=True)
        except OSError:
            pass
        failing = f"Failed to chdir into current working directory '{spec['cwd']}'"
        os.chdir(spec["cwd"])
        uid = user["uid"] if user else os.getuid()
        caps = spec.get("capabilities")
        if caps:
            failing = "Failed to set capabilities"
            _limit_capabilities(caps, uid)
        no_new_privs = uid != 0
        if no_new_privs:
            failing = "Failed to set no_new_privs"
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        encoded = spec.get("seccomp_filter")
        program = base64.b64decode(encoded) if encoded else None
        if program is not None and not no_new_privs:
            failing = "Failed to load the seccomp filter"
            seccomp_filter.install(program, no_new_privs=False)
        if user:
            failing = f"Failed to switch to user '{user.get('name', uid)}'"
            os.fchown(1, uid, user["gid"])   # the sandbox's stdout and stderr are the user's, as the sandbox
            os.fchown(2, uid, user["gid"])
            os.setgroups(user["groups"])
            os.setgid(user["gid"])
            os.setuid(uid)
        if caps and caps["effective"] is not None:
            failing = "Failed to set capabilities"
            _grant_capabilities(caps["effective"])
        if program is not None and no_new_privs:
            failing = "Failed to load the seccomp filter"
            seccomp_filter.install(program, no_new_privs=False)    # set above already
        # Held here until pid1 runs (it closes the other end): see become_pid1.
        failing = "Failed to wait for the container's init"
        os.read(release, 1)
        os.close(release)
        failing = ""
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        executable = spec["executable"]
        if "/" in executable:
            os.execve(executable, spec["argv"], spec["env"])
        else:
            os.execvpe(executable, spec["argv"], spec["env"])
    except BaseException as exc:  # noqa: BLE001 - report whatever stopped the exec, then die
        failing = failing or f"Failed to execute '{spec['executable']}'"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            message = f"{failing}: {reason}".encode()
            os.write(2, message + b"\n")     # the sandbox's stderr (pid1 puts it in the status)
            os.write(err_w, message)
        finally:
            os._exit(127)
    os._exit(127)   # not reached: exec either replaced this process or raised


def _limit_capabilities(caps: CapabilitySets, uid: int) -> None:
    """In the command's process, before it changes user: shrink the bounding set, keep what is granted.

    Only the command's process runs this (it is exec'd right after), so the init stays small.
    """
    keep = set(caps["bounding"])
    for cap in range(caps["last_cap"] + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    if caps["effective"] is None:
        # The user's default (Mesos): root gets its bounding set at exec, any other user nothing. The
        # inheritable and ambient sets the agent may have had would add to that at exec: cleared.
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
        effective, permitted, _ = _capget()
        _capset(effective, permitted, 0)
        return
    if uid == 0:
        # Without this, exec gives root every capability of its bounding set whatever was granted.
        _check(_libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
    else:
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")


def _capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability masks."""
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capget(header, data), "capget")
    return (data[0] | data[3] << 32, data[1] | data[4] << 32, data[2] | data[5] << 32)


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF,
                                 effective >> 32, permitted >> 32, inheritable >> 32)
    _check(_libc.capset(header, data), "capset")


def _grant_capabilities(effective: list[int]) -> None:
    """After setuid: exactly `effective` as effective, permitted, inheritable and ambient (kept across exec)."""
    mask = 0
    for cap in effective:
        mask |= 1 << cap
    _capset(mask, mask, mask)
    for cap in effective:
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"prctl(PR_CAP_AMBIENT_RAISE, {cap})")


def _log_to_stderr(spec: Stdio, message: str, stdio: tuple[int, int, int] | None = None) -> None:
    try:
        if stdio is not None:
            os.write(stdio[2], (message + "\n").encode())
            return
        with open(spec["stderr"], "a") as f:
            f.write(message + "\n")
    except OSError:
        pass


def child_main(spec: InitSpec, go_fd: int, status_fd: int, pid1_fd: int) -> None:
    """Entry in the freshly cloned child: never returns."""
    code = 1
    try:
        code = run(spec, go_fd, status_fd, pid1_fd)
    except BaseException as exc:  # noqa: BLE001
        try:
            write_status(status_fd, termination_doc(None, f"container init failed: {exc}"))
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)
