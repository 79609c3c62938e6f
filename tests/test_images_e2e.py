"""Container images end to end (issue 5, "Proof"): the real agent, real containers, images built from
Debian's busybox-static by tests/imagebuild.py in every archive format the store reads.

Each group runs one agent (`reconciler run`) in its own cgroup root, work dir, registry and store
(under /var/tmp: creating files under /tmp is slow here), and everything it started is killed and
removed afterwards. What a container really ran is read from inside it: a command that prints
`/proc/$$/cmdline` shows the exact argv the kernel was given, argv[0] included.

Groups: the command-resolution table of Mesos's docker-runtime.md, every cell; the image runtime
(env precedence, WorkingDir, every archive format and a digest pin, overlay writes kept out of the
store and counted by disk/du, one stored layer shared by all); untrusted and missing archives; the
rootfs's safety (symbolic links cannot lead a volume to the host, the overlay's own directories are
hidden, a pid namespace); agent restart and destroy; the agent refusing a bad flag set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from reconciler.images.store import ImageStore
from reconciler.isolators.docker_runtime import NO_EXECUTABLE
from tests.conftest import IS_ROOT, AgentEnv, alive, wait_dead
from tests.imagebuild import File, Symlink, build, busybox_layer, layer, malicious_layer

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs /bin/busybox (Debian's busybox-static)"),
    pytest.mark.skipif(IS_ROOT and "overlay" not in Path("/proc/filesystems").read_text(),
                       reason="needs overlayfs"),
]

ISOLATION = "filesystem/linux,docker/runtime,namespaces/pid,namespaces/ipc"
PATH_ENV = "PATH=/bin"
# Prints the argv of the shell running it, exactly as execve received it (NUL-separated). The
# trailing builtin keeps busybox's ash from exec'ing cat in its own place.
SHOW = "cat /proc/$$/cmdline; echo"
SHOW_SCRIPT = f"#!/bin/sh\n{SHOW}\n".encode()
TERMINAL = ("Succeeded", "Failed", "Invalid")
MB = 1024 * 1024


# ---------------------------------------------------------------- environment

@dataclass
class ImageEnv:
    """An agent setting with images: AgentEnv plus its registry (--docker_registry) and store."""
    agent: AgentEnv
    registry: Path
    store: Path

    def start(self, **overrides: Any) -> Any:
        return self.agent.start(image_providers="docker", docker_registry=self.registry,
                                docker_store_dir=self.store, **overrides)

    def write(self, name: str, image: str, command: dict[str, Any], *, volumes: list[dict] | None = None,
              linux_info: dict[str, Any] | None = None, cached: bool | None = None, **spec: Any) -> None:
        container: dict[str, Any] = {"type": "MESOS",
                                     "mesos": {"image": {"type": "DOCKER", "docker": {"name": image}}}}
        if cached is not None:
            container["mesos"]["image"]["cached"] = cached
        if volumes:
            container["volumes"] = volumes
        if linux_info:
            container["linux_info"] = linux_info
        doc = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name},
               "spec": {"restart_policy": "Never", "kill_grace_period": "1secs", "command": command,
                        "container": container, **spec}}
        path = self.agent.manifests / f"{name}.yaml"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc))
        os.rename(tmp, path)

    def wait(self, name: str, phases: tuple[str, ...] = TERMINAL, timeout: float = 20.0) -> dict[str, Any]:
        return self.agent.wait_status(name, lambda s: s["phase"] in phases, timeout=timeout)

    def stdout(self, status: dict[str, Any]) -> str:
        return (self.agent.sandbox(status) / "stdout").read_text()

    def wait_output(self, status: dict[str, Any], needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            out = self.stdout(status)
            if needle in out or time.monotonic() > deadline:
                return out
            time.sleep(0.02)


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]


@contextlib.contextmanager
def image_env(label: str) -> Iterator[ImageEnv]:
    root = Path(tempfile.mkdtemp(prefix=f"reconciler-images-{label}-", dir="/var/tmp"))
    root.chmod(0o755)
    agent = AgentEnv(tmp=root, cgroups_root=f"reconciler-test-{uuid.uuid4().hex[:12]}", manifests=root / "manifests",
                     work_dir=root / "work", launcher="linux", isolation=ISOLATION)
    agent.manifests.mkdir()
    env = ImageEnv(agent, root / "registry", root / "store")
    env.registry.mkdir()
    try:
        yield env
    finally:
        agent.cleanup()     # agents, the containers they checkpointed, the cgroup root
        left = mounts_under(root)
        if not left:
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"mounts left under {root}: {left}"


def argv_of(output: str) -> list[str]:
    """The argv SHOW printed: NUL-terminated arguments, then a newline."""
    assert output.endswith("\0\n"), repr(output)
    return output[:-2].split("\0")


def key_values(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: type and mode, size, mtime, inode, device number, link target."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            snap[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_rdev, target)
    return snap


def show_layer() -> Any:
    return layer(File("/bin/show", SHOW_SCRIPT, 0o755))


@pytest.fixture(scope="module")
def base_layers() -> list[Any]:
    """busybox (hard links, as the busybox image) and a layer with /bin/show: shared by most images."""
    return [busybox_layer(), show_layer()]


# ---------------------------------------------------------------- 1. the command-resolution table

ENTRYPOINT = ["/bin/sh", "-c", SHOW, "ep0"]
CMD_ALONE = ["/bin/sh", "-c", SHOW, "cmd0", "cmd1"]
CMD_AFTER_ENTRYPOINT = ["cmd1", "cmd2"]
COLUMNS: dict[str, dict[str, Any]] = {           # the image's Entrypoint / Cmd
    "e0c0": {},
    "e0c1": {"Cmd": CMD_ALONE},
    "e1c0": {"Entrypoint": ENTRYPOINT},
    "e1c1": {"Entrypoint": ENTRYPOINT, "Cmd": CMD_AFTER_ENTRYPOINT},
}
# Arguments that make sense both after Cmd[0] (/bin/sh) and after the Entrypoint.
ARGUMENTS = ["-c", SHOW, "arg0", "arg1"]
ROWS: dict[str, dict[str, Any]] = {              # the manifest's command
    "sh0-v0-a0": {"shell": False},
    "sh0-v0-a1": {"shell": False, "arguments": ARGUMENTS},
    "sh0-v1-a0": {"shell": False, "value": "/bin/show"},
    # arguments is the whole argv: "ash" (a busybox applet name, so busybox still runs its shell) is argv[0].
    "sh0-v1-a1": {"shell": False, "value": "/bin/sh", "arguments": ["ash", "-c", SHOW, "v0"]},
    "sh1-v0-a0": {"shell": True},
    "sh1-v0-a1": {"shell": True, "arguments": ["arg0"]},
    "sh1-v1-a0": {"value": SHOW},                # shell defaults to true, as in Mesos
    "sh1-v1-a1": {"shell": True, "value": SHOW, "arguments": ["ignored0", "ignored1"]},
}
INVALID = "invalid"   # refused by the manifest's validation before any image is looked at


def expected_cell(row: str, column: str) -> list[str] | str:
    """Mesos's table (docs/isolators/docker-runtime.md): the argv, or the error."""
    config = COLUMNS[column]
    entrypoint, cmd = config.get("Entrypoint", []), config.get("Cmd", [])
    if row.startswith("sh1-v0"):
        return INVALID
    if row.startswith("sh1-v1"):
        return ["sh", "-c", SHOW]
    if row == "sh0-v1-a0":
        return ["/bin/sh", "/bin/show"]          # the kernel runs the script as `<interpreter> <path>`
    if row == "sh0-v1-a1":
        return ["ash", "-c", SHOW, "v0"]
    if not entrypoint and not cmd:
        return NO_EXECUTABLE
    if row == "sh0-v0-a0":
        return entrypoint + cmd if entrypoint else cmd
    return entrypoint + ARGUMENTS if entrypoint else cmd[:1] + ARGUMENTS


CELLS = [(row, column) for row in ROWS for column in COLUMNS]


@pytest.fixture(scope="module")
def table(base_layers: list[Any]) -> Iterator[dict[str, tuple[dict[str, Any], str | None]]]:
    """One agent runs every cell: name → (its final status, its stdout)."""
    with image_env("table") as env:
        for column, config in COLUMNS.items():
            build(str(env.registry), f"table:{column}", base_layers, {**config, "Env": [PATH_ENV]})
        for row, command in ROWS.items():
            for column in COLUMNS:
                env.write(f"t-{row}-{column}", f"table:{column}", command)
        agent = env.start()
        results = {}
        try:
            for row, column in CELLS:
                status = env.wait(f"t-{row}-{column}")
                out = env.stdout(status) if status["container_id"] else None
                results[f"{row}-{column}"] = (status, out)
        finally:
            log = env.agent.stop(agent)
        results["_log"] = ({}, log)
        yield results


@pytest.mark.parametrize("row, column", CELLS, ids=[f"{r}-{c}" for r, c in CELLS])
def test_command_resolution_table_cell(table: dict, row: str, column: str) -> None:
    status, out = table[f"{row}-{column}"]
    expected = expected_cell(row, column)
    if expected == INVALID:
        # Mesos: "Shell specified but no command value provided". The manifest's validation says it first.
        assert status["phase"] == "Invalid", status
        assert "Shell command is not specified" in status["message"], status
    elif isinstance(expected, str):
        assert (status["phase"], status["reason"], status["message"]) == ("Failed", "LaunchFailed", expected), status
        assert status["image_id"].startswith("sha256:"), status      # the image was provisioned before it failed
    else:
        assert status["phase"] == "Succeeded", (status, table["_log"][1])
        assert argv_of(out) == expected


# ---------------------------------------------------------------- 2-5. the image runtime

FORMATS = {   # manifest name → (format, archive reference, manifest reference: the digest kind or None)
    "fmt-manifest": ("manifest", "fmt-manifest:1", None),
    "fmt-legacy": ("legacy", "fmt-legacy:1", None),
    "fmt-oci-dir": ("oci", "fmt-oci-dir:1", None),
    "fmt-oci-tar": ("oci-tar", "fmt-oci-tar:1", None),
    "pin-config": ("manifest", "pinned:1", "id"),                 # name@<image id (config digest)>
    "pin-oci": ("oci-tar", "ocipinned:2", "manifest_digest"),     # name@<OCI manifest digest>
}


@dataclass
class Runtime:
    env: ImageEnv
    statuses: dict[str, dict[str, Any]]
    outputs: dict[str, str]
    built: dict[str, Any]
    before: dict[str, tuple]          # the store's layers after the pre-pull, before the agent ran
    after: dict[str, tuple]
    writer_status: dict[str, Any]     # the running writer, once disk/du counted its writes


@pytest.fixture(scope="module")
def runtime(base_layers: list[Any]) -> Iterator[Runtime]:
    with image_env("runtime") as env:
        reg = str(env.registry)
        built: dict[str, Any] = {}
        built["env"] = build(reg, "app:env", base_layers, {
            "Env": [PATH_ENV, "A=from-image", "B=from-image", "NOEQUALS"], "WorkingDir": "/work/dir"})
        built["wd"] = build(reg, "app:wd", [*base_layers, layer(File("/app/marker", b"marked\n"))],
                            {"Env": [PATH_ENV], "WorkingDir": "app"})
        for name, (fmt, ref, _) in FORMATS.items():
            built[name] = build(reg, ref, base_layers, {"Cmd": ["/bin/sh", "-c", f"echo ok-{name}"], "Env": [PATH_ENV]},
                                fmt=fmt, compress="gzip" if fmt.startswith("oci") else None)
        built["writer"] = build(reg, "writer:1", base_layers, {"Env": [PATH_ENV]})
        built["sharer"] = build(reg, "sharer:1", [base_layers[0], layer(File("/etc/sharer", b"1\n"))],
                                {"Env": [PATH_ENV], "Cmd": ["/bin/sleep", "1000"]})

        # The store holds the writer's layers before the agent starts: their trees are compared after.
        ImageStore(reg, str(env.store)).pull("writer:1")
        before = tree_snapshot(env.store / "layers")

        env.write("env", "app:env", {"value": 'echo "cwd=$(pwd)"; echo "A=$A"; echo "B=$B"; echo "C=$C"; '
                                              'echo "SANDBOX=$MESOS_SANDBOX"; echo "PATH=$PATH"; '
                                              'echo "NOEQUALS=$NOEQUALS"',
                                     "environment": {"variables": [{"name": "B", "value": "from-manifest"},
                                                                   {"name": "C", "value": "from-manifest"}]}})
        env.write("wd", "app:wd", {"value": 'echo "cwd=$(pwd)"; echo "marker=$(cat marker)"'})
        for name, (fmt, ref, pin) in FORMATS.items():
            reference = ref if pin is None else f"{ref.split(':')[0]}@{getattr(built[name], pin)}"
            env.write(name, reference, {"shell": False})
        env.write("writer", "writer:1", {"value": "echo data > /bin/x && rm /bin/echo && "
                                                  "dd if=/dev/zero of=/big bs=65536 count=48 2>/dev/null && "
                                                  "test ! -e /bin/echo && echo written && exec sleep 1000"},
                  restart_policy="Always")
        env.write("sharer", "sharer:1", {"shell": False}, restart_policy="Always")

        agent = env.start(isolation=ISOLATION + ",disk/du", container_disk_watch_interval="100ms")
        try:
            statuses = {name: env.wait(name) for name in ["env", "wd", *FORMATS]}
            statuses["sharer"] = env.wait("sharer", ("Running",))
            writer = env.wait("writer", ("Running",))
            env.wait_output(writer, "written")
            writer = env.agent.wait_status("writer", lambda s: (s.get("disk") or {}).get("used_bytes", 0) >= 3 * MB,
                                           timeout=15)
            statuses["writer"] = writer
        finally:
            env.agent.stop(agent)
        outputs = {name: env.stdout(status) for name, status in statuses.items()}
        yield Runtime(env, statuses, outputs, built, before, tree_snapshot(env.store / "layers"), writer)


def test_image_env_is_overridden_by_the_manifest_and_the_sandbox_is_mnt_mesos_sandbox(runtime: Runtime) -> None:
    status = runtime.statuses["env"]
    assert status["phase"] == "Succeeded", status
    values = key_values(runtime.outputs["env"])
    assert values["A"] == "from-image"             # image Env applies
    assert values["B"] == "from-manifest"          # the manifest's environment wins over the image's
    assert values["C"] == "from-manifest"
    assert values["SANDBOX"] == "/mnt/mesos/sandbox"
    assert values["PATH"] == "/bin"
    assert values["NOEQUALS"] == ""                # an entry without '=' is skipped, as Mesos does


def test_a_missing_working_dir_is_created_in_the_container_not_in_the_store(runtime: Runtime) -> None:
    status = runtime.statuses["env"]
    assert key_values(runtime.outputs["env"])["cwd"] == "/work/dir"
    upper = runtime.env.agent.sandbox(status) / ".rootfs" / "upper"
    assert (upper / "work" / "dir").is_dir()
    assert not any(path.endswith("/rootfs/work") for path in runtime.after)


def test_an_existing_relative_working_dir_is_used(runtime: Runtime) -> None:
    assert runtime.statuses["wd"]["phase"] == "Succeeded", runtime.statuses["wd"]
    assert key_values(runtime.outputs["wd"]) == {"cwd": "/app", "marker": "marked"}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_archive_format_and_a_digest_pin_run_and_show_the_image_id(runtime: Runtime, name: str) -> None:
    status = runtime.statuses[name]
    fmt, ref, pin = FORMATS[name]
    assert status["phase"] == "Succeeded", status
    assert runtime.outputs[name] == f"ok-{name}\n"
    assert status["image_id"] == runtime.built[name].id
    expected_ref = ref if pin is None else f"{ref.split(':')[0]}@{getattr(runtime.built[name], pin)}"
    assert status["image"] == expected_ref


def test_overlay_writes_stay_in_the_sandbox_and_disk_du_counts_them(runtime: Runtime) -> None:
    status = runtime.writer_status
    upper = runtime.env.agent.sandbox(status) / ".rootfs" / "upper"
    assert (upper / "bin" / "x").read_text() == "data\n"
    assert (upper / "big").stat().st_size == 48 * 65536
    whiteout = os.lstat(upper / "bin" / "echo")          # the deletion, as overlayfs records it
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    # The writes are counted; the image's layers (a 2 MB busybox among them) are not.
    assert 3 * MB <= status["disk"]["used_bytes"] < 4 * MB, status["disk"]
    # The store's layers are exactly as they were before any container ran.
    assert {k: v for k, v in runtime.after.items() if k in runtime.before} == runtime.before
    bb = runtime.built["writer"].layer_ids[0]
    layer_root = runtime.env.store / "layers" / bb / "rootfs"
    assert (layer_root / "bin" / "echo").is_file() and not (layer_root / "bin" / "x").exists()
    assert not (layer_root / "big").exists()


def test_all_images_share_one_stored_layer_extracted_once(runtime: Runtime) -> None:
    layers_dir = runtime.env.store / "layers"
    wanted = {lid for b in runtime.built.values() for lid in b.layer_ids}
    assert set(os.listdir(layers_dir)) == wanted
    bb = runtime.built["writer"].layer_ids[0]
    assert all(b.layer_ids[0] == bb for b in runtime.built.values())
    # Extracted by the pre-pull, before the agent started: its record (extraction time) is unchanged, so
    # none of the images that use it extracted it again.
    assert runtime.after[f"{bb}/layer.json"] == runtime.before[f"{bb}/layer.json"]
    assert os.listdir(runtime.env.store / "staging") == []
    # Two containers running at the same time on the same lower directory.
    lower = str(layers_dir / bb / "rootfs")
    pids = [runtime.statuses["writer"]["pid"], runtime.statuses["sharer"]["pid"]]
    for pid in pids:
        assert alive(pid)
        root_mount = [line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                      if line.split()[4] == "/"]
        assert root_mount and "overlay" in root_mount[0] and lower in root_mount[0], root_mount


# ---------------------------------------------------------------- 6. untrusted and missing archives

SLIPS = ("dotdot", "absolute", "symlink-parent", "hardlink-dotdot")


def test_tar_slips_are_refused_and_a_missing_archive_is_retried_until_it_appears(base_layers: list[Any]) -> None:
    with image_env("archives") as env:
        reg = str(env.registry)
        outside = env.agent.tmp / "outside"
        outside.mkdir()
        (outside / "secret").write_text("secret\n")
        build(reg, "good:1", base_layers[:1], {"Env": [PATH_ENV], "Cmd": ["/bin/sleep", "1000"]})
        env.write("good", "good:1", {"shell": False}, restart_policy="Always")
        for kind in SLIPS:
            build(reg, f"slip-{kind}:1", [base_layers[0], malicious_layer(kind, str(outside))], {"Env": [PATH_ENV]})
            env.write(f"slip-{kind}", f"slip-{kind}:1", {"value": "true"})
        # A relative symbolic link climbing out of its layer is kept (Docker, Mesos): `..` stops at the root.
        build(reg, "climb:1", [base_layers[0], layer(Symlink("/x", "../../../../etc"))], {"Env": [PATH_ENV]})
        env.write("climb", "climb:1", {"value": "cat /x/group"})
        env.write("late", "late:1", {"value": "echo late-ran; exec sleep 1000"}, restart_policy="Always")

        agent = env.start()
        try:
            good = env.wait("good", ("Running",))
            late = env.wait("late", ("Failed",))
            assert late["reason"] == "ProvisioningFailed", late
            assert late["message"].startswith(
                f"Failed to launch container: Failed to find archive for image 'late:1' at '{reg}/late:1.tar'"), late
            assert "retrying at" in late["message"]
            for kind in SLIPS:
                slip = env.wait(f"slip-{kind}", ("Failed",))
                assert slip["reason"] == "ProvisioningFailed", slip
                assert "Refusing layer '" in slip["message"] and f"slip-{kind}:1.tar" in slip["message"], slip
                assert "member '" in slip["message"], slip
            # The image's /etc/group, not the host's: the link led nowhere outside the container's root.
            climb = env.wait("climb", ("Succeeded",))
            assert env.stdout(climb) == "root:x:0:\nnogroup:x:65534:\n", climb

            # The archive appears: the next retry (the first one after ~1 s, then doubling) runs it.
            appeared = time.monotonic()
            build(reg, "late:1", base_layers[:1], {"Env": [PATH_ENV]})
            late = env.wait("late", ("Running",), timeout=10)
            assert time.monotonic() - appeared < 8
            assert late["reason"] == "" and late["image_id"].startswith("sha256:")
            assert "late-ran" in env.wait_output(late, "late-ran")
            # The other containers were never touched.
            assert env.agent.status("good")["pid"] == good["pid"] and alive(good["pid"])
        finally:
            env.agent.stop(agent)
        # Nothing was written outside the store, nor left half-extracted in it.
        assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "secret\n"
        assert not Path("/pwned").exists() and not Path("/secret").exists()
        assert os.listdir(env.store / "staging") == []
        # The layers of the images that ran (climb:1 adds its link layer to the base good:1 has), no other.
        assert set(os.listdir(env.store / "layers")) == set(stored_layers_of(env, "good:1") + stored_layers_of(env, "climb:1"))


def stored_layers_of(env: ImageEnv, reference: str) -> list[str]:
    """The layer ids the store recorded for the image pulled as `reference`."""
    doc = json.loads((env.store / "refs").joinpath(
        next(n for n in os.listdir(env.store / "refs")
             if json.loads((env.store / "refs" / n).read_text())["reference"] == reference)).read_text())
    image = json.loads((env.store / "images" / (doc["image_id"].removeprefix("sha256:") + ".json")).read_text())
    return list(image["layer_ids"])


def stored_layer_of(env: ImageEnv, reference: str) -> str:
    """The one layer id the store recorded for a single-layer image pulled as `reference`."""
    (layer_id,) = stored_layers_of(env, reference)
    return layer_id


# ---------------------------------------------------------------- 7. the rootfs's safety

def etc_snapshot() -> tuple:
    st = os.stat("/etc")
    return sorted(os.listdir("/etc")), st.st_mtime_ns, st.st_ino


SAFETY_SCRIPT = " ".join([
    "echo rw-data > /mnt/vol/hello;",
    'echo "ro=$(cat /x/ro/data)";',
    "if echo no > /x/ro/nope 2>/dev/null; then echo ro-write=allowed; else echo ro-write=refused; fi;",
    'echo "rootfs-entries=$(ls -A /mnt/mesos/sandbox/.rootfs | wc -l)";',
    "if touch /mnt/mesos/sandbox/.rootfs/x 2>/dev/null; then echo rootfs-write=allowed;",
    "else echo rootfs-write=refused; fi;",
    'echo "pids=$(ls /proc | grep -E "^[0-9]+$" | tr "\\n" " ")";',
    'echo "self=$$";',
    'echo "comms=$(cat /proc/[0-9]*/comm | tr "\\n" " ")";',
    'echo "etc=$(ls /etc | tr "\\n" " ")";',
    'echo "hello=$(cat /etc/vol/hello)";',
    # Writing the value it already has: harmless on the host even if the kernel's knobs were writable.
    "if cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern 2>/dev/null;",
    "then echo sysctl-write=allowed; else echo sysctl-write=refused; fi",
])


def test_volumes_land_inside_the_rootfs_through_symlinks_and_the_overlay_is_hidden(base_layers: list[Any]) -> None:
    with image_env("safety") as env:
        host_ro = env.agent.tmp / "host-ro"
        host_ro.mkdir()
        (host_ro / "data").write_text("from-host\n")
        # /mnt -> /etc and /x -> /../../../../etc: absolute links (the store keeps them, they are normal in
        # images); followed on the host they would put the volumes, and the sandbox, in the host's /etc.
        build(str(env.registry), "evil:1", [base_layers[0], layer(Symlink("/mnt", "/etc"),
                                                                  Symlink("/x", "/../../../../etc"))],
              {"Env": [PATH_ENV]})
        etc_before = etc_snapshot()
        env.write("evil", "evil:1", {"value": SAFETY_SCRIPT}, volumes=[
            {"container_path": "/mnt/vol", "host_path": "vol", "mode": "RW"},
            {"container_path": "/x/ro", "host_path": str(host_ro), "mode": "RO"},
        ])
        agent = env.start()
        try:
            status = env.wait("evil")
        finally:
            env.agent.stop(agent)
        out = env.stdout(status)
        assert status["phase"] == "Succeeded", (status, out, (env.agent.sandbox(status) / "stderr").read_text())
        values = key_values(out)
        assert (env.agent.sandbox(status) / "vol" / "hello").read_text() == "rw-data\n"    # RW volume
        assert values["hello"] == "rw-data"          # /mnt/vol is the rootfs's /etc/vol, inside the container
        assert values["ro"] == "from-host"
        assert values["ro-write"] == "refused" and sorted(os.listdir(host_ro)) == ["data"]   # RO volume
        assert {"vol", "ro", "mesos"} <= set(values["etc"].split()), values["etc"]
        # The host's /etc is untouched: nothing was created or mounted there.
        assert etc_snapshot() == etc_before
        assert not any(os.path.lexists(f"/etc/{name}") for name in ("vol", "ro", "mesos") if name not in etc_before[0])
        # The overlay's upper and work directories are hidden from the container.
        assert values["rootfs-entries"] == "0" and values["rootfs-write"] == "refused"
        # /proc's kernel knobs are read-only for the container, root as it is.
        assert values["sysctl-write"] == "refused"
        assert (env.agent.sandbox(status) / ".rootfs" / "upper").is_dir()
        # namespaces/pid: the container sees its init (1), its command (2) and the command's children only
        # (the script's subshells and pipelines), never the host's processes, such as this test's.
        pids = [int(p) for p in values["pids"].split()]
        assert 1 in pids and max(pids) < 50, pids
        assert values["self"] == "2"
        comms = set(values["comms"].split())
        # ("exe": busybox's sh runs its applets through /proc/self/exe, so a child may be read mid-exec.)
        assert comms <= {"reconciler-init", "sh", "cat", "tr", "ls", "grep", "wc", "exe"} \
            and "reconciler-init" in comms, comms


# ---------------------------------------------------------------- 8. agent restart, destroy

def test_a_running_image_container_is_recovered_and_destroyed_without_leftovers(base_layers: list[Any]) -> None:
    with image_env("restart") as env:
        build(str(env.registry), "app:1", base_layers[:1], {"Env": [PATH_ENV], "Cmd": ["/bin/sleep", "1000"]})
        env.write("app", "app:1", {"shell": False}, restart_policy="Always")
        agent = env.start()
        try:
            first = env.wait("app", ("Running",))
        finally:
            env.agent.stop(agent)
        sandbox = env.agent.sandbox(first)
        assert alive(first["pid"])

        agent = env.start()
        try:
            # A new agent writes every status once: wait for its own.
            again = env.agent.wait_status("app", lambda s: s["phase"] == "Running"
                                          and s["updated_at"] != first["updated_at"])
            assert (again["container_id"], again["pid"], again["restarts"]) == (first["container_id"], first["pid"], 0)
            assert again["image_id"] == first["image_id"]
            # The rootfs lives in the container's mount namespace only: the host has no mount of it.
            assert not mounts_under(sandbox)
            assert any(" / / " in line and "overlay" in line
                       for line in Path(f"/proc/{again['pid']}/mountinfo").read_text().splitlines())

            (env.agent.manifests / "app.yaml").unlink()
            env.agent.wait_gone("app")
        finally:
            env.agent.stop(agent)
        wait_dead([first["pid"]])
        # Only the agent's own nosuid,nodev bind of the sandboxes directory stays (docs/security.md).
        sandboxes = str(env.agent.work_dir / "sandboxes")
        assert not mounts_under(sandbox) and [line.split()[4] for line in mounts_under(env.agent.work_dir)] \
            == [sandboxes]
        assert not sandbox.exists()


# ---------------------------------------------------------------- 9. the agent refuses a bad flag set

@pytest.mark.parametrize("isolation, needed", [("filesystem/linux,namespaces/pid", "docker/runtime"),
                                               ("docker/runtime", "filesystem/linux")])
def test_image_providers_without_the_isolators_it_needs_refuses_to_start(agent_env: AgentEnv, isolation: str,
                                                                         needed: str) -> None:
    result = agent_env.once(isolation=isolation, launcher="linux", image_providers="docker",
                            docker_registry=agent_env.tmp, timeout=30)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needed in lines[0], result.stderr
    assert not agent_env.work_dir.exists() or not any((agent_env.work_dir / "containers").glob("*"))
