"""What the containerizer hands a container's init, and the parts of it that isolators contribute.

The seam between the agent and the init (reconciler/launcher/init.py): the containerizer folds every
isolator's LaunchInfo into one `InitSpec`, which crosses to the launch helper as JSON over its socket
and reaches the forked init as the dict json.loads made. So these are TypedDicts: at run time they
are those plain dicts, with nothing to convert on either side, and the type checker holds the
builder (containerizer, isolators) and the reader (the init) to the same keys.

Standard library only, and only `typing`, which the init imports anyway: it is imported by the
launch helper, whose every import each forked init pays for (see reconciler/launcher/helper.py).
No `from __future__ import annotations`: the annotations are evaluated, so that `__required_keys__`
says at run time what the type checker says (tests compare a built spec against it).
"""

from typing import NotRequired, TypedDict, final


class MountOptions(TypedDict, total=False):
    """How the init prepares a mount's target before mount(2); absent means neither."""
    mkdir: bool        # a directory, with its parents (mode `mkdir_mode`, 0755 when absent)
    mkdir_mode: int
    file: bool         # an empty file, with its parent directories (a bind mount of a file needs one)


@final
class Mount(MountOptions):
    """One mount(2) call in the container's mount namespace: a new filesystem, a bind (MS_BIND), a
    remount (source None, MS_REMOUNT), or a propagation change (source None, MS_PRIVATE).

    A `target` (or bind `source`) inside the container's root filesystem has its symbolic links
    resolved within that root by the init."""
    source: str | None
    target: str
    fstype: str | None
    flags: int
    data: str | None


@final
class Symlink(TypedDict):
    """A symbolic link to `symlink` made at `target`, unless something is there already (/dev/fd and kin)."""
    symlink: str
    target: str


# LaunchInfo.mounts: what the init does in order, before it enters the root filesystem.
MountStep = Mount | Symlink


class RLimitSetting(TypedDict):
    """One setrlimit(2) call (posix/rlimits)."""
    name: str        # RLMT_*, as the manifest names it: for messages only
    resource: int    # the kernel's RLIMIT_* number
    soft: int        # RLIM_INFINITY for unlimited
    hard: int


class CapabilitySets(TypedDict):
    """linux/capabilities' verdict: numbers for the init, names for a reader of the launch info."""
    effective_names: list[str] | None
    bounding_names: list[str]
    effective: list[int] | None   # None: the user's default (root its bounding set, any other user nothing)
    bounding: list[int]
    last_cap: int                 # /proc/sys/kernel/cap_last_cap: every number up to it not bounding is dropped


class UserInImage(TypedDict):
    """docker/runtime: the image's `User`, which the init looks up in the image's own /etc/passwd."""
    in_image: str


class SeccompProfile(TypedDict):
    """linux/seccomp: the profile the containerizer compiles for the container's capabilities."""
    name: str            # "default" or a file name in --seccomp_config_dir
    path: str | None     # that file; None for the built-in default


class CommandUser(TypedDict):
    """Who the command runs as: setgroups(groups), setgid(gid), setuid(uid) before exec."""
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: NotRequired[str]   # a user looked up in the image: its HOME unless the environment has one


class Stdio(TypedDict):
    """The command's stdout and stderr: host paths in the sandbox, appended to."""
    stdout: str
    stderr: str


class LaunchSteps(TypedDict, total=False):
    """What the init applies in the new namespaces while the agent isolates, in this order; each may be
    absent (the containerizer always sends them; the init's warm-up runs with none)."""
    network_namespace: str | None   # network/cni: an nsfs file to setns(2) into, before anything else
    hostname: str | None
    mounts: list[MountStep]
    rootfs: str | None              # filesystem/linux: pivot_root(2) into it after the mounts
    rlimits: list[RLimitSetting]


class InitSpec(Stdio, LaunchSteps):
    """Everything the container's init needs, built by Containerizer._init_spec."""
    container_id: str
    checkpoint_dir: str             # where the launch helper creates the container's `status` file
    executable: str                 # looked up in env's PATH when it has no slash
    argv: list[str]
    env: dict[str, str]
    cwd: str                        # inside the container (made if missing)
    capabilities: CapabilitySets | None   # None: the agent's own, unchanged (no linux/capabilities)
    last_cap: int
    user: CommandUser | None        # resolved on the host (command.user of a container without an image)
    user_in_image: str | None       # looked up in the image's /etc/passwd once the init is in its root
    chown_sandbox: bool             # the agent is root: the init gives the sandbox to the user
    sandbox_in_container: str
    seccomp_filter: str | None      # base64 of the compiled BPF program
