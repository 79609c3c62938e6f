"""docker/runtime (Mesos isolators/docker/runtime.cpp): an image's Entrypoint, Cmd, Env and WorkingDir apply.

Only containers with an image (`container.mesos.image`, provisioned into `ContainerConfig.image`
before isolators prepare) are concerned; without one the isolator does nothing.

Command. The manifest's CommandInfo and the image's Entrypoint/Cmd are combined by the table of
Mesos's docs/isolators/docker-runtime.md ("0" not specified, "1" specified):

    |                 | Entrypoint=0 Cmd=0 | Entrypoint=0 Cmd=1 | Entrypoint=1 Cmd=0 | Entrypoint=1 Cmd=1 |
    | sh=0 value=0 argv=0 | Error          | Cmd[0] Cmd[1..]    | Entrypt[0] Entrypt[1..] | Entrypt.. Cmd.. |
    | sh=0 value=0 argv=1 | Error          | Cmd[0] argv        | Entrypt.. argv     | Entrypt.. argv     |
    | sh=0 value=1 argv=* | value argv     | value argv         | value argv         | value argv         |
    | sh=1 value=0 argv=* | Error          | Error              | Error              | Error              |
    | sh=1 value=1 argv=* | /bin/sh -c value | /bin/sh -c value | /bin/sh -c value   | /bin/sh -c value   |

`shell` defaults to true, so the image's Entrypoint/Cmd apply only with `shell: false` and no
`value`. With a value, `arguments` is the whole argv (arguments[0] included), as everywhere in the
manifest. The two Error cells say what Mesos says: "Failed to determine the launch command: No
executable is found" and "... Shell specified but no command value provided". (The manifest's own
validation already refuses a shell command without a value, so the latter only guards programmatic
callers.) In the rows Mesos leaves the command alone (a value, or a shell) the isolator returns no
command and the containerizer runs the manifest's as usual, inside the image's rootfs.

Environment. The image's Env ("NAME=value" entries; an entry without '=' is skipped, as Mesos
does) is returned as the isolator's environment, so Mesos's precedence holds (containerizer.cpp
`_launch`): agent's variables < MESOS_SANDBOX < isolators (the image) < the manifest's
`command.environment`. An image without PATH gets the host default path (Mesos's launch helper
sets os::host_default_path() when no PATH is given): the agent's own PATH names host directories
that mean nothing inside the image.

Working directory. A non-empty WorkingDir becomes the command's working directory, a path inside
the rootfs (a relative one is taken from /). Mesos's launch helper creates it when the image lacks
it, after entering the rootfs and before changing user (so it is owned by root, as with docker);
our container init does the same, so the directory is made inside the container's root and a
symlink in the image can never lead it out to the host. Without a WorkingDir the containerizer's
default applies (the sandbox).

User. As Docker does, the image's `User` (`user`, `uid`, `user:group`, `uid:gid`) is who the command
runs as when the manifest gives no `command.user`; the container's init looks it up in the image's
own /etc/passwd and /etc/group once it has entered the root filesystem (reconciler/launcher/image_user.py).
Mesos does not apply it: it logs a warning ("Container user '...' is not supported yet") and runs
as the container's user (`command.user`, else the agent's); `--docker_ignore_image_user` does that.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from reconciler.container import ContainerConfig
from reconciler.isolators.base import Isolator, LaunchInfo, PermanentError
from reconciler.linux import DEFAULT_PATH
from reconciler.models import CommandInfo

log = logging.getLogger(__name__)

# Mesos os::host_default_path().
HOST_DEFAULT_PATH = DEFAULT_PATH
SHELL, SHELL_ARGV0 = "/bin/sh", "sh"      # Mesos os::Shell::name, os::Shell::arg0

LAUNCH_COMMAND_ERROR = "Failed to determine the launch command: "
NO_EXECUTABLE = LAUNCH_COMMAND_ERROR + "No executable is found"
SHELL_WITHOUT_VALUE = LAUNCH_COMMAND_ERROR + "Shell specified but no command value provided"


class LaunchCommand(NamedTuple):
    """What is exec'd: the program (looked up in PATH when it has no slash) and its argv."""
    executable: str
    argv: list[str]


def _string_list(value: Any) -> Any:
    # Docker's strslice: a lone string is a one-element list; null is "not specified".
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class ImageRuntimeConfig(BaseModel):
    """The runtime part of an image's config (the "config" object of a Docker or OCI image config).

    The image is untrusted input: a field of the wrong type is refused with the field's name.
    """
    model_config = ConfigDict(extra="ignore")

    Entrypoint: list[str] = []
    Cmd: list[str] = []
    Env: list[str] = []
    WorkingDir: str = ""
    User: str = ""

    @field_validator("Entrypoint", "Cmd", "Env", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _string_list(value)

    @field_validator("WorkingDir", "User", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value


def parse_image_config(config: dict[str, Any], image: str) -> ImageRuntimeConfig:
    """Validate an image's runtime config; PermanentError names the image and the field."""
    try:
        return ImageRuntimeConfig.model_validate(config or {})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in err["loc"])
        raise PermanentError(f"Image '{image}' has an invalid config: config.{field}: {err['msg']}") from None


def resolve_command(command: CommandInfo, entrypoint: list[str], cmd: list[str]) -> LaunchCommand:
    """The program and argv to exec for a container with an image, by Mesos's table (see the module doc).

    Raises PermanentError with Mesos's message for the Error cells.
    """
    value = command.value or None    # an empty value is no value
    if command.shell:
        if value is None:
            raise PermanentError(SHELL_WITHOUT_VALUE)
        return LaunchCommand(SHELL, [SHELL_ARGV0, "-c", value])
    if value is not None:
        return LaunchCommand(value, list(command.arguments) or [value])
    arguments = list(command.arguments)
    if entrypoint:
        # The manifest's arguments replace Cmd; without any, Cmd follows the Entrypoint.
        argv = list(entrypoint) + (arguments or list(cmd))
    elif cmd:
        # The manifest's arguments replace Cmd[1..]; Cmd[0] stays the program.
        argv = [cmd[0]] + (arguments or list(cmd[1:]))
    else:
        raise PermanentError(NO_EXECUTABLE)
    return LaunchCommand(argv[0], argv)


def image_environment(env: list[str], container_id: str = "") -> dict[str, str]:
    """The image's "NAME=value" entries as variables; later duplicates win, PATH defaults to the host's."""
    environment: dict[str, str] = {}
    for entry in env:
        name, sep, value = entry.partition("=")
        if not sep or not name or "\0" in entry:
            # Mesos skips an entry without '='; an empty name or a NUL cannot be passed to execve.
            log.info("Skipping invalid environment variable %r in the image of container %s", entry, container_id)
            continue
        environment[name] = value
    environment.setdefault("PATH", HOST_DEFAULT_PATH)
    return environment


def image_working_directory(working_dir: str) -> str | None:
    """The image's WorkingDir as an absolute path inside the rootfs; None when it has none."""
    if not working_dir:
        return None
    return posixpath.normpath(posixpath.join("/", working_dir))


class DockerRuntimeIsolator(Isolator):
    """Stateless: everything comes from the container's config, so recovery and cleanup have nothing to do."""

    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        image = config.image
        if image is None:
            return None
        runtime = parse_image_config(image.config, image.reference)
        command = config.spec.command
        launch = resolve_command(command, runtime.Entrypoint, runtime.Cmd)
        info = LaunchInfo(environment=image_environment(runtime.Env, container_id),
                          working_directory=image_working_directory(runtime.WorkingDir))
        if runtime.User and not command.user:
            if self.config.docker_ignore_image_user:
                log.warning("Container user '%s' is not supported yet for container %s", runtime.User, container_id)
            else:
                info.user = {"in_image": runtime.User}
        if not command.shell and not command.value:
            # Only the image's Entrypoint/Cmd rows change the command (as Mesos, which returns no
            # command otherwise); there the program is argv[0].
            info.command = launch.argv
        return info
