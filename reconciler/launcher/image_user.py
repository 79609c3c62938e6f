"""A user named as Docker names it (`user`, `uid`, `user:group`, `uid:gid`), looked up in the container's own
/etc/passwd and /etc/group: an image's `User`, and `command.user` of a container with an image.

Docker's rules (runc's libcontainer/user): a name must be in /etc/passwd; a number need not be (its
group is then 0 unless given); a group given by name must be in /etc/group, by number need not be;
without a group, the primary group is the user's and every group of /etc/group listing the user is
added. Called by the container's init once it has entered the container's root, before the command
starts: the files are the image's, untrusted, so each is read only if it is a regular file, and at
most MAX_FILE bytes of it. Standard library only (it runs in the launch helper's fork).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reconciler.launch_spec import CommandUser

MAX_FILE = 1 << 20
MAX_ID = (1 << 31) - 1


def _entries(path: str) -> list[list[str]]:
    """The colon-separated lines of a passwd/group file; none when it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = os.read(fd, MAX_FILE)
    finally:
        os.close(fd)
    lines = data.decode("utf-8", "replace").splitlines()
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def _number(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise ValueError(f"'{text}' is out of range for a user or group id (at most {MAX_ID})")
    return value


def _id_field(entry: list[str], index: int) -> int | None:
    try:
        return _number(entry[index])
    except (IndexError, ValueError):
        return None


def resolve(spec: str, root: str = "/") -> CommandUser:
    """{"name", "uid", "gid", "groups", "home"} for `spec`; ValueError saying what was not found."""
    user, _, group = spec.partition(":")
    uid: int | None = 0
    gid: int | None = 0
    name, home = user or "root", "/"
    if user:
        number = _number(user)
        match = next((e for e in _entries(os.path.join(root, "etc/passwd"))
                      if len(e) >= 4 and (e[0] == user or (number is not None and _id_field(e, 2) == number))), None)
        if match is not None:
            name, uid, gid = match[0], _id_field(match, 2), _id_field(match, 3)
            home = match[5] if len(match) > 5 and match[5] else "/"
            if uid is None or gid is None:
                raise ValueError(f"unable to find user {user}: its passwd entry has no valid uid or gid")
        elif number is not None:
            uid = number
        else:
            raise ValueError(f"unable to find user {user}: no matching entries in passwd file")
    groups_file = _entries(os.path.join(root, "etc/group"))
    if group:
        number = _number(group)
        match = next((e for e in groups_file
                      if len(e) >= 3 and (e[0] == group or (number is not None and _id_field(e, 2) == number))), None)
        if match is not None:
            gid = _id_field(match, 2)
        elif number is not None:
            gid = number
        else:
            raise ValueError(f"unable to find group {group}: no matching entries in group file")
        if gid is None:
            raise ValueError(f"unable to find group {group}: its group entry has no valid gid")
        groups = [gid]
    else:
        groups = [gid] if gid is not None else []   # never None here: a passwd entry without one was refused
        for entry in groups_file:
            members = entry[3].split(",") if len(entry) > 3 else []
            extra = _id_field(entry, 2)
            if name in members and extra is not None and extra not in groups:
                groups.append(extra)
    assert uid is not None and gid is not None   # an entry without a valid one was refused above
    return {"name": name, "uid": uid, "gid": gid, "groups": groups, "home": home}
