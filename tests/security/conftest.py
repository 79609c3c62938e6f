"""The attacks of issue 10, planted in real containers (Debian's busybox-static plus a static attack kit),
run by the real agent with the documented image flags and nothing else:

    --isolation filesystem/linux,docker/runtime,namespaces/pid,namespaces/ipc,cgroups/cpu,cgroups/mem
    --image_providers docker

in three settings (the `scenario` fixture's params): the defaults (root in the container), the
manifest granting only CAP_SYS_PTRACE (`linux_info.capability_info`), and `command.user: nobody`.

Each setting runs one agent, a victim container (a secret in its environment and in its sandbox) and
an attacker container that runs every attack in turn and prints what it got, section by section.
The host holds canaries where the old escapes reached: a 0600 file outside the work dir, a file in
the checkpoint directory's parent, a loop device ("the host's disk") whose first bytes are a secret,
a read-only volume's file, a variable in the agent's own environment. The tests read the attacker's
output, the host's files and the agent's status; none of them may show a canary or a change.
Nothing is written by an attack that succeeds, where that could be avoided: the kit only opens
files for writing (tests/security/attack_kit.c), and the sysctl written back is its own value.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import IS_ROOT
from tests.imagebuild import File, build, busybox_layer, layer
from tests.test_images_e2e import PATH_ENV, ImageEnv, image_env

KIT_SOURCE = Path(__file__).with_name("attack_kit.c")
SETTINGS = {
    "root": ({"shell": True}, None),
    "sys-ptrace": ({"shell": True}, {"capability_info": {"capabilities": ["SYS_PTRACE"]}}),
    "user": ({"shell": True, "user": "nobody"}, None),
}
DOCKER_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
                       "NET_BIND_SERVICE", "NET_RAW", "SYS_CHROOT", "MKNOD", "AUDIT_WRITE", "SETFCAP")

# An unprivileged host user (uid and gid 43210, no groups, no capability left at all) running argv[1:].
# Not setpriv: it keeps root's capabilities until its exec, which is when the path is walked.
AS_HOST_USER = ("import os, sys; os.setgroups([]); os.setresgid(43210, 43210, 43210); "
                "os.setresuid(43210, 43210, 43210); os.execv(sys.argv[1], sys.argv[1:])")

ATTACK = r'''
section() { echo "== $1"; }
section id; id -u
section status; grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status
section fd; ls -l /proc/1/fd 2>&1
for fd in 0 1 2 3 4 5 6 7 8 9; do
  cat /proc/1/fd/$fd/../../../../../../../../..$HOST_SECRET 2>&1
  cat /proc/1/fd/$fd/../secret /proc/1/fd/$fd/../../secret 2>&1
  cat /proc/1/fd/$fd/../../sandboxes/$VICTIM_ID/secret /proc/1/fd/$fd/../../../sandboxes/$VICTIM_ID/secret 2>&1
done
cat /proc/1/root$HOST_SECRET /proc/1/cwd/../../../../../../..$HOST_SECRET 2>&1
section environ; cat /proc/1/environ 2>&1 | tr '\0' '\n'; echo
for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null | tr '\0' '\n'; done
section exe; readlink /proc/1/exe 2>&1; kit open-write /proc/1/exe
section map_files; kit map-files 1
section setns; kit setns /proc/1/ns/mnt $HOST_SECRET
section mem; kit mem-grep 1 $AGENT_CANARY_HEX $VICTIM_CANARY_HEX
section keyring; kit keyring
section handle; kit handle /bin/busybox
section bpf; kit bpf
section userns; kit unshare-user
section disk; mknod /tmp/disk b $DISK_MAJOR $DISK_MINOR 2>&1; head -c 64 /tmp/disk 2>&1; echo
section sysctl; mount -o remount,bind,rw /proc/sys 2>&1 && echo remounted-sys
(cat /proc/sys/vm/overcommit_ratio > /proc/sys/vm/overcommit_ratio) 2>&1 && echo sysctl-written
section cgroupfs; mkdir -p /tmp/cg; mount -t cgroup -o memory cgroup /tmp/cg 2>&1 && echo mounted-cgroup
section rovol; mount -o remount,bind,rw /ro 2>&1 && echo remounted-rw; (echo pwned > /ro/data) 2>&1 && echo wrote-ro
section cover; umount /mnt/mesos/sandbox/.rootfs 2>&1 && echo unmounted-cover; ls -A /mnt/mesos/sandbox/.rootfs 2>&1
section suid-image; /suid/kit ids 2>&1
section suid-sandbox; cp /bin/kit $MESOS_SANDBOX/kit && chmod 4755 $MESOS_SANDBOX/kit && echo planted
section logs; ln -s $HOST_SECRET $MESOS_SANDBOX/stderr.7; ln -s $HOST_SECRET $MESOS_SANDBOX/stdout.3; mkfifo $MESOS_SANDBOX/stderr.2
section end
'''


@dataclass
class Scenario:
    setting: str
    env: ImageEnv
    canaries: dict[str, str]
    sections: dict[str, list[str]]
    attacker: dict[str, Any]
    victim: dict[str, Any]
    stdout: str
    stderr: str
    logs_output: str
    host_suid_output: str
    hashes_before: dict[str, str]
    hashes_after: dict[str, str]
    ro_data_after: bytes
    disk_after: bytes

    def text(self) -> str:
        return self.stdout + self.stderr


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


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def host_binaries() -> dict[str, str]:
    """The host's interpreter and libpython: what the old init mapped writable into containers."""
    paths = {os.path.realpath(sys.executable)}
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    library = sysconfig.get_config_var("INSTSONAME") or ""
    if library and os.path.exists(os.path.join(libdir, library)):
        paths.add(os.path.realpath(os.path.join(libdir, library)))
    return {path: file_hash(path) for path in paths}


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack kit (apt-get install gcc libc6-dev)")
    out = tmp_path_factory.mktemp("kit") / "kit"
    built = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(KIT_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build the static attack kit: {built.stderr.strip()[-300:]}")
    return out.read_bytes()


def loop_device(backing: Path) -> str:
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device for the host-disk canary: {made.stderr.strip()}")
    return made.stdout.strip()


@pytest.fixture(scope="session", params=list(SETTINGS))
def scenario(request: pytest.FixtureRequest, kit: bytes) -> Iterator[Scenario]:
    if not IS_ROOT:
        pytest.skip("needs root (containers)")
    setting = request.param
    command, linux_info = SETTINGS[setting]
    canaries = {name: f"reconciler-canary-{name}-{secrets.token_hex(8)}" for name in
                ("host", "checkpoints", "disk", "agent", "victim-env", "victim-sandbox")}
    with image_env(f"security-{setting}") as env:
        root = env.agent.tmp
        host_dir = root / "host-secret"
        host_dir.mkdir(mode=0o700)
        host_secret = host_dir / "secret"
        host_secret.write_text(canaries["host"])
        host_secret.chmod(0o600)
        (env.agent.work_dir / "containers").mkdir(parents=True, mode=0o700)
        (env.agent.work_dir / "containers" / "secret").write_text(canaries["checkpoints"])
        ro = root / "ro-vol"
        ro.mkdir()
        (ro / "data").write_bytes(b"original\n")
        backing = root / "disk.img"
        backing.write_bytes(canaries["disk"].encode() + bytes(1 << 20))
        device = loop_device(backing)
        rdev = os.stat(device).st_rdev
        build(str(env.registry), "attack:1", [busybox_layer(), layer(
            File("/bin/kit", kit, 0o755), File("/suid/kit", kit, 0o4755), File("/ro/.keep", b""))],
            {"Env": [PATH_ENV]})
        hashes_before = host_binaries()
        os.environ["RECONCILER_TEST_CANARY"] = canaries["agent"]
        try:
            env.write("victim", "attack:1", {"value": f"echo {canaries['victim-sandbox']} > $MESOS_SANDBOX/secret; "
                                                      "exec sleep 600",
                                             "environment": {"variables": [
                                                 {"name": "VICTIM_SECRET", "value": canaries["victim-env"]}]}},
                      restart_policy="Always")
            agent = env.start()
        finally:
            del os.environ["RECONCILER_TEST_CANARY"]
        try:
            victim = env.wait("victim", phases=("Running",))
            variables = {"HOST_SECRET": str(host_secret), "VICTIM_ID": victim["container_id"],
                         # In hex: the canaries themselves must appear nowhere in what the attacker holds.
                         "AGENT_CANARY_HEX": canaries["agent"].encode().hex(),
                         "VICTIM_CANARY_HEX": canaries["victim-env"].encode().hex(),
                         "DISK_MAJOR": str(os.major(rdev)), "DISK_MINOR": str(os.minor(rdev))}
            attacker_command = {**command, "value": ATTACK,
                                "environment": {"variables": [{"name": k, "value": v} for k, v in variables.items()]}}
            write_attacker(env, attacker_command, linux_info, ro)
            attacker = env.wait("attacker", timeout=60)
            sandbox = env.agent.sandbox(attacker)
            stdout = (sandbox / "stdout").read_text(errors="replace")
            stderr = (sandbox / "stderr").read_text(errors="replace")
            logs_output = run_logs(env, "--stderr") + run_logs(env)
            suid = subprocess.run([sys.executable, "-c", AS_HOST_USER, str(sandbox / "kit"), "ids"],
                                  capture_output=True, text=True, timeout=10)
            yield Scenario(
                setting=setting, env=env, canaries=canaries, sections=parse_sections(stdout), attacker=attacker,
                victim=env.agent.status("victim") or victim, stdout=stdout, stderr=stderr,
                logs_output=logs_output,
                host_suid_output=suid.stdout + suid.stderr, hashes_before=hashes_before,
                hashes_after=host_binaries(), ro_data_after=(ro / "data").read_bytes(),
                disk_after=backing.read_bytes()[:64])
        finally:
            env.agent.stop(agent)
            subprocess.run(["losetup", "-d", device], capture_output=True)


def run_logs(env: ImageEnv, *flags: str) -> str:
    """`reconciler logs attacker`, as root, the way an operator reads a container's output."""
    try:
        done = subprocess.run([sys.executable, "-m", "reconciler", "logs", "attacker", *flags,
                               "--work_dir", str(env.agent.work_dir)], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        return f"TIMED OUT (a planted FIFO?): {exc.stdout!r} {exc.stderr!r}"
    return done.stdout + done.stderr


def write_attacker(env: ImageEnv, command: dict[str, Any], linux_info: dict[str, Any] | None, ro: Path) -> None:
    env.write("attacker", "attack:1", command, linux_info=linux_info,
              volumes=[{"container_path": "/ro", "host_path": str(ro), "mode": "RO"}])
