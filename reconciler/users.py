"""`command.user`: who the command runs as, resolved on the agent's host as Mesos does (os::su).

The name is looked up in the host's user database (passwd/group through NSS) when the container is
launched, so a user added or changed later is picked up by the next launch. The command gets the
user's uid, primary gid and every group the database lists the user in (initgroups(3)); nothing of
the agent's own groups is kept.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from reconciler.isolators.base import PermanentError
from reconciler.launch_spec import CommandUser


class UnknownUserError(PermanentError):
    """No such user on this host: the launch cannot succeed until the manifest (or the host) changes."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def launch_spec(self) -> CommandUser:
        """What the container's init applies (setgroups, setgid, setuid) before it execs the command."""
        return {"name": self.name, "uid": self.uid, "gid": self.gid, "groups": list(self.groups)}


def resolve(name: str) -> User:
    """The user named `name`, with primary group and supplementary groups; UnknownUserError if none."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UnknownUserError(f"Failed to get user information for '{name}': no such user on this host") from None
    # An error here (a directory service that does not answer) is temporary: the launch is retried.
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    # getgrouplist puts the primary group first; keep that order, without repeats.
    return User(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid,
                groups=tuple(dict.fromkeys([entry.pw_gid, *groups])), home=entry.pw_dir)


def give_sandbox(sandbox: str, user: User) -> None:
    """Make `user` the owner of the (fresh, empty) sandbox, as Mesos chowns the executor's directory.

    The command, its stdout and stderr and whatever it writes there are then the user's. An agent
    that is not root cannot give a directory away: that is permanent until the manifest or the
    agent's user changes.
    """
    try:
        os.chown(sandbox, user.uid, user.gid)
    except PermissionError as exc:
        raise PermanentError(f"Failed to chown sandbox '{sandbox}' to user '{user.name}': {exc.strerror}"
                             " (running as another user needs an agent running as root)") from None
