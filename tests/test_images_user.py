"""Who an image container's command runs as (issue 10: "the image's User honoured as Docker does, with
Mesos's behaviour behind a flag"; "no_new_privs when a command.user is set").

The image's `User` applies when the manifest gives no `command.user`, looked up in the image's own
/etc/passwd and /etc/group (Docker's rules: reconciler/launcher/image_user.py); `command.user` of an
image container is looked up there too (as Mesos does after chroot). `--docker_ignore_image_user`
gives Mesos's behaviour: root, with a warning. A command that is not root runs with no_new_privs.

Unit tests of the lookup on a fake root, then one agent running every case in real containers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from reconciler.launcher.image_user import resolve
from tests.imagebuild import File, build, busybox_layer, layer
from tests.test_images_e2e import PATH_ENV, image_env

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\napp:x:1001:\nstaff:x:50:app,other\nwheel:x:10:other\nnogroup:x:65534:\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_bytes(PASSWD)
    (tmp_path / "etc" / "group").write_bytes(GROUP)
    return tmp_path


@pytest.mark.parametrize("spec, expected", [
    ("app", {"uid": 1000, "gid": 1001, "groups": [1001, 50], "home": "/home/app"}),
    ("1000", {"uid": 1000, "gid": 1001, "groups": [1001, 50], "home": "/home/app"}),
    ("app:staff", {"uid": 1000, "gid": 50, "groups": [50], "home": "/home/app"}),
    ("app:4242", {"uid": 1000, "gid": 4242, "groups": [4242], "home": "/home/app"}),
    ("4321", {"uid": 4321, "gid": 0, "groups": [0], "home": "/"}),              # a uid the image does not list
    ("4321:4322", {"uid": 4321, "gid": 4322, "groups": [4322], "home": "/"}),
    ("", {"uid": 0, "gid": 0, "groups": [0], "home": "/"}),
])
def test_docker_user_rules(root: Path, spec: str, expected: dict[str, Any]) -> None:
    found = resolve(spec, str(root))
    assert {k: found[k] for k in expected} == expected


@pytest.mark.parametrize("spec, message", [
    ("ghost", "unable to find user ghost: no matching entries in passwd file"),
    ("app:ghosts", "unable to find group ghosts: no matching entries in group file"),
    ("99999999999", "out of range"),
])
def test_unknown_names_are_refused(root: Path, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(spec, str(root))


def test_a_hostile_passwd_is_read_only_if_it_is_a_small_regular_file(root: Path) -> None:
    (root / "etc" / "passwd").unlink()
    os.mkfifo(root / "etc" / "passwd")          # would block a reader that does not check
    with pytest.raises(ValueError, match="no matching entries"):
        resolve("app", str(root))
    assert resolve("77", str(root))["uid"] == 77


# ---------------------------------------------------------------- in real containers

# Prints who runs, the no_new_privs bit and HOME, one per line.
WHO = "id -u; id -g; id -G; grep NoNewPrivs /proc/self/status; echo HOME=$HOME"


@pytest.fixture(scope="module")
def outcomes() -> Iterator[dict[str, tuple[dict[str, Any], str]]]:
    etc = layer(File("/etc/passwd", PASSWD), File("/etc/group", GROUP),
                File("/bin/who.sh", f"#!/bin/sh\n{WHO}\n".encode(), 0o755))
    with image_env("user") as env:
        build(str(env.registry), "userimg:1", [busybox_layer(), etc],
              {"Env": [PATH_ENV], "User": "app", "Entrypoint": ["/bin/sh", "/bin/who.sh"]})
        build(str(env.registry), "ghostimg:1", [busybox_layer(), etc],
              {"Env": [PATH_ENV], "User": "ghost", "Entrypoint": ["/bin/sh", "/bin/who.sh"]})
        cases = {
            "image-user": ("userimg:1", {"shell": False}),
            "manifest-user": ("userimg:1", {"shell": False, "user": "nobody"}),
            "unknown-image-user": ("ghostimg:1", {"shell": False}),
        }
        for name, (image, command) in cases.items():
            env.write(name, image, command)
        results: dict[str, tuple[dict[str, Any], str]] = {}
        agent = env.start()
        try:
            for name in cases:
                status = env.wait(name)
                results[name] = (status, env.stdout(status) if status.get("container_id") else "")
        finally:
            env.agent.stop(agent)
        # Mesos's behaviour, behind the flag: the image's User is ignored.
        for name in cases:
            (env.agent.manifests / f"{name}.yaml").unlink()
        env.write("mesos-user", "userimg:1", {"shell": False})
        agent = env.start(docker_ignore_image_user="true")
        try:
            status = env.wait("mesos-user")
            results["mesos-user"] = (status, env.stdout(status))
        finally:
            env.agent.stop(agent)
        yield results


def lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines()]


def test_the_image_user_runs_the_command_with_its_groups_and_home(outcomes: dict) -> None:
    status, out = outcomes["image-user"]
    assert status["phase"] == "Succeeded", status
    uid, gid, groups, nnp, home = lines(out)
    assert (uid, gid, sorted(groups.split()), nnp.split(), home) == \
        ("1000", "1001", ["1001", "50"], ["NoNewPrivs:", "1"], "HOME=/home/app")


def test_command_user_wins_and_is_looked_up_in_the_image(outcomes: dict) -> None:
    status, out = outcomes["manifest-user"]
    assert status["phase"] == "Succeeded", status
    uid, gid, groups, nnp, home = lines(out)
    assert (uid, gid, nnp.split(), home) == ("65534", "65534", ["NoNewPrivs:", "1"], "HOME=/nonexistent")


def test_an_image_user_missing_from_the_image_fails_the_launch_saying_so(outcomes: dict) -> None:
    status, _ = outcomes["unknown-image-user"]
    assert status["phase"] == "Failed", status
    assert "unable to find user ghost: no matching entries in passwd file" in status["message"], status


def test_mesos_behaviour_behind_the_flag_runs_as_root(outcomes: dict) -> None:
    status, out = outcomes["mesos-user"]
    assert status["phase"] == "Succeeded", status
    uid, gid, _, nnp, _ = lines(out)
    assert (uid, gid, nnp.split()) == ("0", "0", ["NoNewPrivs:", "0"])
