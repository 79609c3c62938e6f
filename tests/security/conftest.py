"""The attacks of issue 10, planted in real containers (Debian's busybox-static plus a static attack kit,
tests/security/attack_kit.c), run by the real agent with the documented image flags and nothing else:

    --isolation filesystem/linux,docker/runtime,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem
    --image_providers docker

in three settings (the `scenario` fixture's params): the defaults (root in the container);
`linux/capabilities` added and the manifest granting only CAP_SYS_PTRACE
(`linux_info.capability_info`); `command.user: nobody`.

Each setting runs one agent and three containers:
- a victim (the default profile) with a secret in its environment, its sandbox and its checkpoint dir;
- an attacker that waits until the test planted a canary in its own checkpoint dir, then runs every
  attack of ATTACK in turn, printing what it got section by section ("== name"), then stays running
  so that the host can check its cgroup;
- racers: the kit as the command itself, attaching to PID 1 before the init's last exec, if it can.
The host holds canaries where the old escapes reached: a 0600 file in a 0700 directory outside the
work dir, files in the work dir, the checkpoints directory and both containers' checkpoint dirs, the
victim's sandbox, a loop device ("a disk") whose first bytes are a secret, a variable in the agent's
own environment. After the run the host is checked: canary files, the host's python3 and libpython,
the read-only volume, the attacker's memory limit, the kernel keyrings; and an unprivileged host user
tries what the container left in its sandbox (a setuid-root kit, a device node).

No attack may damage the host if a defence fails: the kit only opens files for writing, removes a
key it managed to add, reads devices without printing their bytes (the real disk: 512 bytes read,
nothing written), the sysctl written back is its own value, and the memory limit raised is the
attacker's own (its cgroup is the test's). An environment is never printed, only the canary lines
grepped out of it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from reconciler.linux import cgroups
from tests.conftest import IS_ROOT
from tests.imagebuild import File, build, busybox_layer, layer
from tests.test_images_e2e import PATH_ENV, ImageEnv, image_env

KIT_SOURCE = Path(__file__).with_name("attack_kit.c")
DEFAULT_ISOLATION = "filesystem/linux,docker/runtime,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem"
# setting → (what it adds to the attacker's command, its linux_info, what it adds to --isolation)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, str]] = {
    "root": ({}, None, ""),
    "sys-ptrace": ({}, {"capability_info": {"capabilities": ["SYS_PTRACE"]}}, ",linux/capabilities"),
    "user": ({"user": "nobody"}, None, ""),
}
DOCKER_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
                       "NET_BIND_SERVICE", "NET_RAW", "SYS_CHROOT", "MKNOD", "AUDIT_WRITE", "SETFCAP")
# runc's default masked paths: what the container must read as empty where the host has them.
RUNC_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
               "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
MEM_MB = 64
RACERS = 4
HOST_UID = 43210

# An unprivileged host user (uid and gid 43210, no groups, no capability left at all) running argv[1:].
# Not setpriv: it keeps root's capabilities until its exec, which is when the path is walked.
AS_HOST_USER = (f"import os, sys; os.setgroups([]); os.setresgid({HOST_UID}, {HOST_UID}, {HOST_UID}); "
                f"os.setresuid({HOST_UID}, {HOST_UID}, {HOST_UID}); os.execv(sys.argv[1], sys.argv[1:])")

CANARY_LINES = "grep -E '^(RECONCILER_TEST_CANARY|VICTIM_SECRET)='"

ATTACK = r'''
section() { echo "== $1"; }
canaries() { tr '\0' '\n' | ''' + CANARY_LINES + r'''; }
i=0; while [ ! -e "$MESOS_SANDBOX/go" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
section id; id -u
section env; env | canaries
section status; grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status
section fd; ls -l /proc/1/fd 2>&1; for fd in /proc/1/fd/*; do [ -d $fd ] && echo "directory: $fd"; done
section traversal
for fd in 0 1 2 3 4 5 6 7 8 9; do
  for up in "" ../ ../../ ../../../ ../../../../ ../../../../../ ../../../../../../ ../../../../../../../; do
    p=/proc/1/fd/$fd/$up
    cat ${p}secret ${p}sandboxes/$VICTIM_ID/secret ${p}containers/$VICTIM_ID/secret 2>/dev/null
  done
  p=/proc/1/fd/$fd/../../../../../../../../../../..
  cat $p$HOST_SECRET 2>/dev/null; cat $p/proc/$AGENT_PID/environ 2>/dev/null | canaries
done
section root; cat /proc/1/root$HOST_SECRET /proc/1/cwd/../../../../../../../../..$HOST_SECRET 2>&1
section environ; (wc -c < /proc/1/environ) 2>&1; cat /proc/1/environ 2>/dev/null | canaries
for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null | canaries; done
section exe; readlink /proc/1/exe 2>&1; kit open-write /proc/1/exe
section map_files; kit map-files 1
section ns; kit nsenter mnt $HOST_SECRET; for t in uts ipc net cgroup; do kit nsenter $t; done
section mem; kit mem-grep 1 $AGENT_CANARY_HEX $VICTIM_CANARY_HEX
section keyring; kit keyring
section shocker; kit shocker /mnt/mesos/sandbox ${HOST_SECRET#/}
section bpf; kit bpf
section perf; kit perf
section userns; kit unshare-user
section disk
for d in /dev /tmp; do
  mknod $d/canary-disk b $CANARY_MAJOR $CANARY_MINOR 2>&1 && head -c 64 $d/canary-disk 2>&1; echo
  mknod $d/host-disk b $DISK_MAJOR $DISK_MINOR 2>&1 && kit read-dev $d/host-disk
done
mknod $MESOS_SANDBOX/disk b $CANARY_MAJOR $CANARY_MINOR 2>&1 && chmod 666 $MESOS_SANDBOX/disk && echo planted-node
section sysctl; mount -o remount,bind,rw /proc/sys 2>&1 && echo remounted-sys
(cat /proc/sys/vm/overcommit_ratio > /proc/sys/vm/overcommit_ratio) 2>&1 && echo sysctl-written
section knobs; kit open-write /proc/sys/kernel/core_pattern /proc/sysrq-trigger /sys/kernel/uevent_helper \
  /proc/sys/kernel/modprobe /sys/kernel/mm/transparent_hugepage/enabled
section masked; for p in $MASKED; do echo "$p $( (cat $p 2>/dev/null || ls -A $p 2>/dev/null) | wc -c)"; done
section cgroupfs; cg=$(grep ':memory:' /proc/self/cgroup | cut -d: -f3); mkdir -p /tmp/cg
if mount -t cgroup -o memory cgroup /tmp/cg 2>&1; then echo mounted-cgroup
  (echo 2147483648 > /tmp/cg$cg/memory.limit_in_bytes) 2>&1 && echo raised-limit; fi
(echo 2147483648 > /sys/fs/cgroup/memory$cg/memory.limit_in_bytes) 2>/dev/null && echo raised-limit-sysfs
section rovol; mount -o remount,bind,rw /ro 2>&1 && echo remounted-rw; (echo pwned > /ro/data) 2>&1 && echo wrote-ro
section cover; umount /mnt/mesos/sandbox/.rootfs 2>&1 && echo unmounted-cover; ls -A /mnt/mesos/sandbox/.rootfs 2>&1
section suid-image; /suid/kit ids 2>&1
section suid-sandbox; cp /bin/kit $MESOS_SANDBOX/kit && chmod 4755 $MESOS_SANDBOX/kit && echo planted
section logs; ln -s $HOST_SECRET $MESOS_SANDBOX/stderr.7; ln -s $HOST_SECRET $MESOS_SANDBOX/stdout.3
mkfifo $MESOS_SANDBOX/stderr.2
section end
exec sleep 600
'''


@dataclass
class Scenario:
    setting: str
    env: ImageEnv
    canaries: dict[str, str]
    sections: dict[str, list[str]]
    attacker: dict[str, Any]
    victim: dict[str, Any]
    racers: list[str]                  # each racer's stdout
    stdout: str
    stderr: str
    host_namespaces: dict[str, str]    # the test's own (the host's) /proc/self/ns/* links
    files_before: dict[str, str]       # sha256 of every canary file, host binary and the read-only volume
    files_after: dict[str, str]
    memory_limit: int                  # the attacker's, read from the host while it ran
    host_keys: str                     # /proc/keys after the run
    logs_output: str                   # `reconciler logs attacker [--stderr]`, as root
    host_user: dict[str, str] = field(default_factory=dict)   # what an unprivileged host user got

    def text(self) -> str:
        return self.stdout + self.stderr + "".join(self.racers)


def parse_sections(output: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = "_"
    for line in output.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            sections[current] = []
        else:
            sections.setdefault(current, []).append(line)
    return sections


def file_hashes(paths: list[Path | str]) -> dict[str, str]:
    hashes = {}
    for path in paths:
        with open(path, "rb") as f:
            hashes[str(path)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def host_binaries() -> list[str]:
    """The host's interpreter and libpython: what the old init mapped writable into containers."""
    paths = {os.path.realpath(sys.executable)}
    library = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    if os.path.isfile(library):
        paths.add(os.path.realpath(library))
    return sorted(paths)


def plant(path: Path, content: str) -> Path:
    path.write_text(content)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack kit (apt-get install gcc libc6-dev)")
    out = tmp_path_factory.mktemp("kit") / "kit"
    built = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(KIT_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build the static attack kit (needs gcc and libc6-dev): {built.stderr.strip()[-300:]}")
    return out.read_bytes()


@pytest.fixture(scope="session", params=list(SETTINGS))
def scenario(request: pytest.FixtureRequest, kit: bytes) -> Iterator[Scenario]:
    if not IS_ROOT:
        pytest.skip("needs root (containers)")
    if shutil.which("losetup") is None:
        pytest.skip("needs losetup (util-linux) for the disk canary")
    setting = request.param
    command, linux_info, more_isolation = SETTINGS[setting]
    canaries = {name: f"reconciler-canary-{name}-{secrets.token_hex(8)}" for name in
                ("host", "work-dir", "checkpoints", "attacker-checkpoint", "victim-checkpoint", "disk", "agent",
                 "victim-env", "victim-sandbox")}
    with image_env(f"security-{setting}") as env:
        root, work = env.agent.tmp, env.agent.work_dir
        host_dir = root / "host-secret"
        host_dir.mkdir(mode=0o700)
        host_secret = plant(host_dir / "secret", canaries["host"])
        (work / "containers").mkdir(parents=True, mode=0o700)
        planted = [host_secret, plant(work / "secret", canaries["work-dir"]),
                   plant(work / "containers" / "secret", canaries["checkpoints"])]
        ro = root / "ro-vol"
        ro.mkdir()
        (ro / "data").write_bytes(b"original\n")
        backing = root / "disk.img"
        backing.write_bytes(canaries["disk"].encode() + bytes(1 << 20))
        made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"no loop device for the disk canary: {made.stderr.strip()}")
        loop = made.stdout.strip()
        try:
            yield run_scenario(env, setting, command, linux_info, DEFAULT_ISOLATION + more_isolation, kit,
                               canaries, host_secret, planted, ro, backing, loop)
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def run_scenario(env: ImageEnv, setting: str, command: dict[str, Any], linux_info: dict[str, Any] | None,
                 isolation: str, kit: bytes, canaries: dict[str, str], host_secret: Path, planted: list[Path],
                 ro: Path, backing: Path, loop: str) -> Scenario:
    build(str(env.registry), "attack:1", [busybox_layer(), layer(
        File("/bin/kit", kit, 0o755), File("/suid/kit", kit, 0o4755), File("/ro/.keep", b""))],
        {"Env": [PATH_ENV]})
    resources = {"cpus": 1, "mem": MEM_MB}
    env.write("victim", "attack:1", {"value": f"echo {canaries['victim-sandbox']} > $MESOS_SANDBOX/secret; "
                                              "exec sleep 600",
                                     "environment": {"variables": [
                                         {"name": "VICTIM_SECRET", "value": canaries["victim-env"]}]}},
              restart_policy="Always", resources=resources)
    os.environ["RECONCILER_TEST_CANARY"] = canaries["agent"]
    try:
        agent = env.start(isolation=isolation)
    finally:
        del os.environ["RECONCILER_TEST_CANARY"]
    try:
        victim = env.wait("victim", phases=("Running",))
        sandbox_secret = env.agent.sandbox(victim) / "secret"
        assert wait_for(lambda: read(sandbox_secret) == canaries["victim-sandbox"] + "\n"), "the victim wrote no secret"
        containers = env.agent.work_dir / "containers"
        planted += [sandbox_secret, plant(containers / victim["container_id"] / "secret", canaries["victim-checkpoint"])]
        # In hex: the canaries themselves must be in no process of the container.
        needles = [canaries["agent"].encode().hex(), canaries["victim-env"].encode().hex()]
        canary_rdev, disk_dev = os.stat(loop).st_rdev, os.stat("/var/tmp").st_dev
        variables = {"HOST_SECRET": str(host_secret), "VICTIM_ID": victim["container_id"],
                     "AGENT_PID": str(agent.pid), "AGENT_CANARY_HEX": needles[0], "VICTIM_CANARY_HEX": needles[1],
                     "CANARY_MAJOR": str(os.major(canary_rdev)), "CANARY_MINOR": str(os.minor(canary_rdev)),
                     "DISK_MAJOR": str(os.major(disk_dev)), "DISK_MINOR": str(os.minor(disk_dev)),
                     "MASKED": " ".join(p for p in RUNC_MASKED if os.path.exists(p))}
        files_before = file_hashes([*planted, *host_binaries(), ro / "data", backing])
        for i in range(RACERS):
            env.write(f"racer-{i}", "attack:1", {**command, "shell": False, "value": "/bin/kit",
                                                 "arguments": ["kit", "race-pid1", *needles]},
                      linux_info=linux_info, resources=resources)
        env.write("attacker", "attack:1", {**command, "value": ATTACK, "environment": {"variables": [
            {"name": k, "value": v} for k, v in variables.items()]}},
            linux_info=linux_info, resources=resources,
            volumes=[{"container_path": "/ro", "host_path": str(ro), "mode": "RO"}])
        attacker = env.wait("attacker", phases=("Running",))
        sandbox = env.agent.sandbox(attacker)
        planted.append(plant(containers / attacker["container_id"] / "secret", canaries["attacker-checkpoint"]))
        files_before.update(file_hashes(planted[-1:]))
        (sandbox / "go").touch()
        if not wait_for(lambda: "== end" in read(sandbox / "stdout"), timeout=60):
            raise AssertionError(f"the attack did not finish within 60s: {read(sandbox / 'stdout')[-3000:]}")
        memory_limit = memory_limit_of(env.agent.cgroups_root, attacker["container_id"])
        racers = [env.stdout(env.wait(f"racer-{i}")) for i in range(RACERS)]
        stdout = read(sandbox / "stdout")
        return Scenario(
            setting=setting, env=env, canaries=canaries, sections=parse_sections(stdout),
            attacker=env.agent.status("attacker") or attacker, victim=env.agent.status("victim") or victim,
            racers=racers, stdout=stdout, stderr=read(sandbox / "stderr"),
            host_namespaces={t: os.readlink(f"/proc/self/ns/{t}") for t in ("mnt", "uts", "ipc", "net", "cgroup")},
            files_before=files_before, files_after=file_hashes(list(files_before)), memory_limit=memory_limit,
            host_keys=Path("/proc/keys").read_text(), logs_output=run_logs(env, "--stderr") + run_logs(env),
            host_user=host_user_attempts(sandbox))
    finally:
        env.agent.stop(agent)


def read(path: Path) -> str:
    """A sandbox's output file; empty until the container's init made it."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def memory_limit_of(cgroups_root: str, container_id: str) -> int:
    hierarchy = cgroups.hierarchy_for(cgroups.find_mounts(), "memory")
    assert hierarchy is not None, "no memory cgroup hierarchy"
    control = "memory.limit_in_bytes" if hierarchy.version == 1 else "memory.max"
    return int(hierarchy.read(f"{cgroups_root}/{container_id}", control))


def run_logs(env: ImageEnv, *flags: str) -> str:
    """`reconciler logs attacker`, as root, the way an operator reads a container's output."""
    try:
        done = subprocess.run([sys.executable, "-m", "reconciler", "logs", "attacker", *flags,
                               "--work_dir", str(env.agent.work_dir)], capture_output=True, text=True, timeout=20,
                              cwd=env.agent.tmp)
    except subprocess.TimeoutExpired as exc:
        return f"TIMED OUT (a planted FIFO?): {exc.stdout!r} {exc.stderr!r}"
    return done.stdout + done.stderr


def host_user_attempts(sandbox: Path) -> dict[str, str]:
    """What the container left in its sandbox, tried by an unprivileged user of the host."""
    def run(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return f"{done.stdout}{done.stderr}exit {done.returncode}"
    user = [sys.executable, "-c", AS_HOST_USER]
    return {
        "suid-kit": run([*user, str(sandbox / "kit"), "ids"]),
        # setpriv keeps root's capabilities until its exec, so the path is reached: the setuid bit must not count.
        "suid-kit-setpriv": run(["setpriv", f"--reuid={HOST_UID}", f"--regid={HOST_UID}", "--clear-groups",
                                 str(sandbox / "kit"), "ids"]),
        "device-node": run([*user, "/bin/busybox", "head", "-c", "64", str(sandbox / "disk")]),
    }


# ---------------------------------------------------------------- reading the attacker's output

def succeeded(lines: list[str]) -> list[str]:
    """The kit's attempts that worked ("<attempt>: ok")."""
    return [line for line in lines if line.endswith(": ok")]


def proc_status_field(scenario: Scenario, name: str) -> str:
    """A field of the attacker's /proc/self/status (CapEff, NoNewPrivs, Seccomp...)."""
    for line in scenario.sections["status"]:
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise AssertionError(f"{name} not in the attacker's /proc/self/status: {scenario.sections['status']}")
