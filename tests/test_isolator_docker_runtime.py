"""docker/runtime: the image's Entrypoint, Cmd, Env and WorkingDir, combined with the manifest's command
by Mesos's table (docs/isolators/docker-runtime.md, every cell), and the agent's refusals when
--image_providers=docker lacks what it needs (Mesos's messages).

The table and precedence are unit tests of the isolator; the containerizer tests run real commands
(posix launcher, no rootfs yet: filesystem/linux brings that) to show the containerizer execs the
resolved command, in the image's working directory (created when missing), with the image's Env.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from reconciler import config as config_module
from reconciler.checkpoint import Checkpoints
from reconciler.config import AgentConfig, ConfigError
from reconciler.containerizer import Containerizer
from reconciler.isolators import isolator_class
from reconciler.isolators.base import ContainerConfig, PermanentError, ProvisionedImage
from reconciler.isolators.docker_runtime import (
    HOST_DEFAULT_PATH,
    NO_EXECUTABLE,
    SHELL_WITHOUT_VALUE,
    DockerRuntimeIsolator,
    LaunchCommand,
    image_environment,
    resolve_command,
)
from reconciler.launcher.base import LaunchHelper
from reconciler.launcher.posix import PosixLauncher
from reconciler.models import CommandInfo, ContainerSpec, Manifest
from reconciler.source import validation_messages

ENTRYPOINT = ["/entry", "e1"]
CMD = ["/cmd", "c1"]
ARGV = ["a0", "a1"]
VALUE = "/value"


def command(sh: int, value: int, argv: int) -> CommandInfo:
    """A CommandInfo for one row of the table; model_construct, because the manifest's own validation
    refuses a shell command without a value before it could reach the isolator."""
    return CommandInfo.model_construct(shell=bool(sh), value=VALUE if value else None,
                                       arguments=list(ARGV) if argv else [], environment=None, user=None)


def image_config(entrypoint: int, cmd: int) -> dict[str, Any]:
    return {"Entrypoint": list(ENTRYPOINT) if entrypoint else None, "Cmd": list(CMD) if cmd else None}


# (sh, value, argv) -> the four columns (Entrypoint, Cmd) = (0,0), (0,1), (1,0), (1,1), as in Mesos's docs.
SHELL = LaunchCommand("/bin/sh", ["sh", "-c", VALUE])
TABLE: dict[tuple[int, int, int], list[LaunchCommand | str]] = {
    (0, 0, 0): [NO_EXECUTABLE, LaunchCommand("/cmd", ["/cmd", "c1"]), LaunchCommand("/entry", ["/entry", "e1"]),
                LaunchCommand("/entry", ["/entry", "e1", "/cmd", "c1"])],
    (0, 0, 1): [NO_EXECUTABLE, LaunchCommand("/cmd", ["/cmd", "a0", "a1"]),
                LaunchCommand("/entry", ["/entry", "e1", "a0", "a1"]), LaunchCommand("/entry", ["/entry", "e1", "a0", "a1"])],
    (0, 1, 0): [LaunchCommand(VALUE, [VALUE])] * 4,
    (0, 1, 1): [LaunchCommand(VALUE, ["a0", "a1"])] * 4,       # arguments is the whole argv
    (1, 0, 0): [SHELL_WITHOUT_VALUE] * 4,
    (1, 0, 1): [SHELL_WITHOUT_VALUE] * 4,
    (1, 1, 0): [SHELL] * 4,
    (1, 1, 1): [SHELL] * 4,
}
COLUMNS = [(0, 0), (0, 1), (1, 0), (1, 1)]
CELLS = [(row, column, TABLE[row][i]) for row in TABLE for i, column in enumerate(COLUMNS)]


def cell_id(cell: tuple[Any, ...]) -> str:
    (sh, value, argv), (entrypoint, cmd), _ = cell
    return f"sh={sh},value={value},argv={argv}|Entrypoint={entrypoint},Cmd={cmd}"


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_every_cell_of_the_mesos_table(cell: tuple[Any, ...]) -> None:
    (sh, value, argv), (entrypoint, cmd), expected = cell
    info = command(sh, value, argv)
    config = image_config(entrypoint, cmd)
    if isinstance(expected, str):
        with pytest.raises(PermanentError) as error:
            resolve_command(info, config["Entrypoint"] or [], config["Cmd"] or [])
        assert str(error.value) == expected
    else:
        assert resolve_command(info, config["Entrypoint"] or [], config["Cmd"] or []) == expected


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_the_isolator_changes_the_command_only_in_the_image_rows(cell: tuple[Any, ...]) -> None:
    # Mesos returns a command only where the image supplies the program (sh=0, value=0); elsewhere
    # the manifest's command runs as written. An Error cell fails the launch with Mesos's message.
    (sh, value, argv), (entrypoint, cmd), expected = cell
    config = launch_config(command(sh, value, argv), image_config(entrypoint, cmd))
    isolator = DockerRuntimeIsolator(agent_config())
    if isinstance(expected, str):
        with pytest.raises(PermanentError, match=f"^{expected}$"):
            isolator.prepare("c1", config)
        return
    info = isolator.prepare("c1", config)
    assert info is not None
    if not sh and not value:
        assert info.command == expected.argv and info.command[0] == expected.executable
    else:
        assert info.command is None


def test_the_messages_are_mesos_own() -> None:
    assert NO_EXECUTABLE == "Failed to determine the launch command: No executable is found"
    assert SHELL_WITHOUT_VALUE == "Failed to determine the launch command: Shell specified but no command value provided"


def test_empty_entrypoint_and_cmd_count_as_not_specified() -> None:
    with pytest.raises(PermanentError, match="No executable is found"):
        resolve_command(command(0, 0, 1), [], [])
    info = DockerRuntimeIsolator(agent_config()).prepare(
        "c1", launch_config(command(0, 0, 0), {"Entrypoint": [], "Cmd": ["/bin/true"]}))
    assert info is not None and info.command == ["/bin/true"]


def test_a_lone_string_entrypoint_is_one_word_as_in_docker() -> None:
    info = DockerRuntimeIsolator(agent_config()).prepare(
        "c1", launch_config(command(0, 0, 0), {"Entrypoint": "/bin/app", "Cmd": ["--flag"]}))
    assert info is not None and info.command == ["/bin/app", "--flag"]


# --- the manifest edge ---------------------------------------------------------------------------

def manifest(command: dict[str, Any], image: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"command": command}
    if image:
        spec["container"] = {"mesos": {"image": {"type": "DOCKER", "docker": {"name": image}}}}
    return {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "x"}, "spec": spec}


def test_a_manifest_with_an_image_may_leave_the_program_to_the_image() -> None:
    spec = Manifest.model_validate(manifest({"shell": False, "arguments": ["hello"]}, "busybox:latest")).spec
    assert (spec.command.shell, spec.command.value, spec.command.arguments) == (False, None, ["hello"])
    assert Manifest.model_validate(manifest({"shell": False}, "busybox:latest")).spec.command.value is None
    # Without an image there is nothing to run: refused at the edge, naming the field.
    with pytest.raises(ValidationError) as error:
        Manifest.model_validate(manifest({"shell": False, "arguments": ["hello"]}, None))
    assert validation_messages(error.value, Manifest) == [
        "spec.command: command.value (the executable) is not specified; it is required when shell is false"]
    # shell defaults to true: a shell command needs its value, image or not.
    with pytest.raises(ValidationError) as error:
        Manifest.model_validate(manifest({"arguments": ["hello"]}, "busybox:latest"))
    assert validation_messages(error.value, Manifest) == ["spec.command: Shell command is not specified: set command.value"]


# --- environment, working directory, user ----------------------------------------------------------

def agent_config() -> AgentConfig:
    return AgentConfig(launcher="posix", isolation=["posix/cpu"], work_dir="/var/tmp/unused-docker-runtime")


def launch_config(info: CommandInfo, config: dict[str, Any], sandbox: str = "/var/tmp/unused-sandbox",
                  spec: ContainerSpec | None = None) -> ContainerConfig:
    spec = spec or ContainerSpec.model_construct(command=info, container=None)
    return ContainerConfig(container_id="c1", name="x", manifest="x.yaml", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox=sandbox,
                           image=ProvisionedImage(reference="test/image:latest", id="sha256:00", config=config))


def test_without_an_image_the_isolator_does_nothing() -> None:
    config = launch_config(command(1, 1, 0), {})
    config.image = None
    assert DockerRuntimeIsolator(agent_config()).prepare("c1", config) is None


def test_the_registry_names_this_isolator() -> None:
    assert isolator_class("docker/runtime") is DockerRuntimeIsolator


def test_image_env_later_entries_win_and_malformed_ones_are_skipped() -> None:
    env = image_environment(["A=1", "B=x=y", "NOEQUALS", "=anonymous", "A=2", "EMPTY=", "BAD=\0"])
    assert env == {"A": "2", "B": "x=y", "EMPTY": "", "PATH": HOST_DEFAULT_PATH}


def test_image_path_is_kept_and_a_missing_one_is_the_host_default() -> None:
    assert image_environment(["PATH=/opt/app/bin:/bin"])["PATH"] == "/opt/app/bin:/bin"
    assert image_environment([])["PATH"] == HOST_DEFAULT_PATH


@pytest.mark.parametrize("working_dir, expected", [
    ("/srv/app", "/srv/app"), ("srv/app", "/srv/app"), ("/srv/../app/", "/app"), ("", None), (None, None),
])
def test_working_dir_is_an_absolute_path_inside_the_rootfs(working_dir: str | None, expected: str | None) -> None:
    info = DockerRuntimeIsolator(agent_config()).prepare(
        "c1", launch_config(command(1, 1, 0), {"WorkingDir": working_dir}))
    assert info is not None and info.working_directory == expected


def test_the_image_user_applies_as_in_docker() -> None:
    info = DockerRuntimeIsolator(agent_config()).prepare("c9", launch_config(command(1, 1, 0), {"User": "nobody:users"}))
    assert info is not None and info.user == {"in_image": "nobody:users"}   # looked up in the image by its init


def test_the_manifest_user_wins_over_the_image_user() -> None:
    spec = ContainerSpec.model_validate({"command": {"value": "true", "user": "daemon"}})
    info = DockerRuntimeIsolator(agent_config()).prepare(
        "c9", launch_config(spec.command, {"User": "nobody"}, spec=spec))
    assert info is not None and info.user is None


def test_the_image_user_is_not_applied_as_in_mesos_with_the_flag(caplog: pytest.LogCaptureFixture) -> None:
    config = agent_config().model_copy(update={"docker_ignore_image_user": True})
    with caplog.at_level(logging.WARNING, logger="reconciler.isolators.docker_runtime"):
        info = DockerRuntimeIsolator(config).prepare("c9", launch_config(command(1, 1, 0), {"User": "nobody"}))
    assert info is not None and info.user is None
    assert "Container user 'nobody' is not supported yet for container c9" in caplog.text


@pytest.mark.parametrize("config, field", [
    ({"Entrypoint": 5}, "config.Entrypoint"), ({"Cmd": [1, 2]}, "config.Cmd.0"), ({"Env": {"A": "1"}}, "config.Env"),
    ({"WorkingDir": ["/"]}, "config.WorkingDir"),
])
def test_a_malformed_image_config_fails_the_launch_naming_image_and_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(PermanentError, match=rf"^Image 'test/image:latest' has an invalid config: {field}: "):
        DockerRuntimeIsolator(agent_config()).prepare("c1", launch_config(command(1, 1, 0), config))


def test_the_isolator_environment_sits_between_the_sandbox_and_the_manifest() -> None:
    # The containerizer's precedence (Mesos _launch): agent < MESOS_SANDBOX < isolators < command.environment.
    spec = ContainerSpec.model_validate({"command": {"value": "true", "environment": {"variables": [
        {"name": "WHO", "value": "manifest"}]}}})
    config = launch_config(spec.command, {"Env": ["WHO=image", "ONLY_IMAGE=1", "MESOS_SANDBOX=/image"]}, spec=spec)
    info = DockerRuntimeIsolator(agent_config()).prepare("c1", config)
    assert info is not None
    containerizer = Containerizer(launcher=None, isolators=[], checkpoints=Checkpoints("/nonexistent", "/nonexistent"))  # type: ignore[arg-type]
    env = containerizer._init_spec(config, info, {"PATH": "/agent/bin", "WHO": "agent", "LANG": "C"})["env"]
    assert env["WHO"] == "manifest" and env["ONLY_IMAGE"] == "1" and env["LANG"] == "C"
    assert env["PATH"] == HOST_DEFAULT_PATH        # the agent's PATH names host directories
    assert env["MESOS_SANDBOX"] == "/image"        # as in Mesos: isolators' variables come after it


# --- through the containerizer: real commands ------------------------------------------------------

class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.helper = LaunchHelper()
        self.checkpoints = Checkpoints(str(root / "containers"), str(root / "sandboxes"))
        self.containerizer = Containerizer(PosixLauncher(self.helper), [DockerRuntimeIsolator(agent_config())],
                                           self.checkpoints)

    async def run(self, spec: dict[str, Any], image: dict[str, Any],
                  environment: dict[str, str] | None = None) -> tuple[Any, str, str]:
        cid = uuid.uuid4().hex
        config = ContainerConfig(
            container_id=cid, name="x", manifest="x.yaml", spec=ContainerSpec.model_validate(spec), spec_hash="h",
            resources_free_hash="h", sandbox=self.checkpoints.sandbox(cid),
            image=ProvisionedImage(reference="test/image:latest", id="sha256:00", config=image))
        await self.containerizer.launch(config, environment or {"PATH": "/agent/bin"})
        termination = await asyncio.wait_for(self.containerizer.wait(cid), 20)
        sandbox = Path(config.sandbox)
        return termination, (sandbox / "stdout").read_text(), (sandbox / "stderr").read_text()


@pytest.fixture
def harness() -> Any:
    root = Path("/var/tmp") / f"reconciler-docker-runtime-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    harness = Harness(root)
    try:
        yield harness
    finally:
        from tests.conftest import kill_checkpointed_containers
        kill_checkpointed_containers(root)
        harness.helper.close()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


IMAGE_SHELL = {"command": {"shell": False, "arguments": ['echo "$WHO $ONLY_IMAGE $PATH"; pwd']},
               "container": {"mesos": {"image": {"type": "DOCKER", "docker": {"name": "test/image:latest"}}}}}


def test_the_image_entrypoint_runs_with_the_manifest_arguments_env_and_working_dir(harness: Harness) -> None:
    workdir = harness.root / "image-workdir" / "deep"          # absent: created before the command starts
    spec = {**IMAGE_SHELL, "command": {**IMAGE_SHELL["command"], "environment": {
        "variables": [{"name": "WHO", "value": "manifest"}]}}}
    image = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo from-cmd"], "WorkingDir": str(workdir),
             "Env": ["WHO=image", "ONLY_IMAGE=yes", "PATH=/usr/bin:/bin"]}
    termination, stdout, stderr = asyncio.run(harness.run(spec, image))
    assert termination.succeeded, (termination, stderr)
    assert stdout.splitlines() == ["manifest yes /usr/bin:/bin", str(workdir)]
    assert workdir.is_dir()


def test_the_image_cmd_follows_the_entrypoint_when_the_manifest_gives_no_arguments(harness: Harness) -> None:
    spec = {**IMAGE_SHELL, "command": {"shell": False}}
    image = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo from-cmd; echo $PATH"]}
    termination, stdout, stderr = asyncio.run(harness.run(spec, image))
    assert termination.succeeded, (termination, stderr)
    assert stdout.splitlines() == ["from-cmd", HOST_DEFAULT_PATH]


def test_a_shell_command_ignores_entrypoint_and_cmd_but_gets_env_and_working_dir(harness: Harness) -> None:
    workdir = harness.root / "wd"
    spec = {**IMAGE_SHELL, "command": {"value": "echo $WHO; pwd"}}
    image = {"Entrypoint": ["/bin/false"], "Cmd": ["ignored"], "Env": ["WHO=image"], "WorkingDir": str(workdir)}
    termination, stdout, stderr = asyncio.run(harness.run(spec, image))
    assert termination.succeeded, (termination, stderr)
    assert stdout.splitlines() == ["image", str(workdir)]


def test_an_error_cell_fails_the_launch_with_mesos_message_and_leaves_nothing(harness: Harness) -> None:
    spec = {**IMAGE_SHELL, "command": {"shell": False, "arguments": ["x"]}}
    with pytest.raises(PermanentError, match=f"^{NO_EXECUTABLE}$"):
        asyncio.run(harness.run(spec, {"Env": ["A=1"]}))
    assert harness.containerizer.containers == {} and harness.checkpoints.ids() == []


def test_an_image_working_dir_that_cannot_be_made_fails_with_mesos_message(harness: Harness) -> None:
    blocker = harness.root / "a-file"
    blocker.write_text("not a directory")
    spec = {**IMAGE_SHELL, "command": {"value": "true"}}
    termination, _, stderr = asyncio.run(harness.run(spec, {"WorkingDir": str(blocker / "sub")}))
    assert not termination.succeeded
    assert f"Failed to chdir into current working directory '{blocker / 'sub'}': Not a directory" in termination.message
    assert termination.message in stderr


# --- agent flags -----------------------------------------------------------------------------------

def load(argv: list[str]) -> AgentConfig:
    import argparse
    parser = argparse.ArgumentParser()
    config_module.add_flags(parser)
    return config_module.load(parser.parse_args(argv), {})


FS_LINUX = "The 'filesystem/linux' isolator must be enabled for container image support"
LINUX_LAUNCHER = "The 'linux' launcher must be used for container image support"
RUNTIME = ("Docker runtime isolator has to be specified if 'DOCKER' is included in 'image_providers'. "
           "Please add 'docker/runtime' to '--isolation' flags")


@pytest.mark.parametrize("flags, message", [
    (["--launcher=linux", "--isolation=docker/runtime,cgroups/cpu"], FS_LINUX),
    (["--launcher=posix", "--isolation=posix/cpu"], FS_LINUX),                       # Mesos checks this first
    (["--launcher=posix", "--isolation=filesystem/linux,docker/runtime"], LINUX_LAUNCHER),
    (["--launcher=linux", "--isolation=filesystem/linux,cgroups/cpu"], RUNTIME),
])
@pytest.mark.root
def test_image_providers_docker_refuses_to_start_without_what_it_needs(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(["--image_providers=docker", *flags])
    assert str(error.value) == message


@pytest.mark.root
def test_image_providers_docker_with_its_isolators_is_accepted(tmp_path: Path) -> None:
    config = load(["--image_providers=DOCKER", "--launcher=linux", f"--work_dir={tmp_path}",
                   "--isolation=filesystem/linux,docker/runtime,cgroups/cpu"])
    assert config.image_providers == ["docker"]
    assert config.docker_store_path == str(tmp_path / "store" / "docker")


def test_unknown_and_unsupported_image_types_are_refused_with_mesos_words() -> None:
    with pytest.raises(ConfigError, match=r"^flag --image_providers \(from command line\): Unknown image type 'oci'$"):
        load(["--image_providers=oci"])
    with pytest.raises(ConfigError, match=r"^flag --image_providers \(from command line\): Unsupported image type 'appc'$"):
        load(["--image_providers=docker,appc"])


def test_docker_store_dir_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load(["--docker_store_dir=store", "--launcher=posix", "--isolation=posix/cpu"]).docker_store_path == \
        str(tmp_path / "store")
    assert load(["--launcher=posix", "--isolation=posix/cpu", "--work_dir=/var/lib/x"]).docker_store_path == \
        "/var/lib/x/store/docker"


def test_the_agent_refuses_to_start_in_one_line_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "once", f"--manifests={tmp_path}", f"--work_dir={tmp_path / 'w'}",
         "--launcher=posix", "--isolation=posix/cpu", "--image_providers=docker"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"reconciler: {FS_LINUX}"]
