"""The manifest source: lists the manifest directory and turns it into the desired state.

It knows files and YAML, nothing about processes. A listing is always a full listing: the watcher
only decides *when* to list, and the listing is the truth. That is what makes ConfigMap `..data`
swaps, editors' temporary files and half-written files safe — whatever sequence of events
happened, the next listing sees the directory as it is now.

The only state kept between listings is a parse cache keyed by each file's identity
(device, inode, size, mtime, mode, owner), so re-listing a large unchanged directory costs one stat
per file.

The agent runs what the manifests say as root, so (as sshd's StrictModes, `--manifests_strict_modes`,
on by default) it reads manifests only from a directory, and files, that no one but root and the
agent's user can write: see _Trust. And the directory may hold a link to any file of the host, so
no error message quotes a file's content: it names the file, the document, the field path, the
line and column, and what is wrong, never the value that was found there (see _redact).
"""

from __future__ import annotations

import datetime as dt
import difflib
import errno
import json
import os
import pwd
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from reconciler.fsutil import FileTooLargeError, NotRegularFileError, read_config_file
from reconciler.linux.mountinfo import read_mountinfo
from reconciler.models import (
    ContainerInfo,
    ContainerSpec,
    Manifest,
    is_dns1123_label,
    spec_hash,
    spec_hash_without_resources,
)
from reconciler.yamlbounds import first_past_limits

# What one file may hold, as a Kubernetes ConfigMap (1 MiB); a manifest is a few hundred bytes.
MAX_MANIFEST_BYTES = 1024 * 1024
# Values (scalars, lists, mappings) of one document, YAML aliases expanded: past this a file is a
# "billion laughs" or a generated list no container runs, and validating it would cost the agent
# hundreds of megabytes. A manifest has about a hundred.
MAX_DOCUMENT_VALUES = 100_000
MAX_DOCUMENT_DEPTH = 64   # libyaml's composer recurses in C: 60,000 nested '[' overflow its stack
# An error message names a field and says what is wrong in a line, whatever the file holds.
MAX_ERROR_CHARS = 300
MAX_ERRORS_PER_DOCUMENT = 20
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# Editors', package managers' and downloaders' leftovers. Most would fail the suffix allow-list
# anyway; naming them keeps that true if the allow-list ever grows.
_IGNORED_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".bak", ".orig", ".rej", ".rpmnew", ".rpmsave")
_DPKG_LEFTOVER = re.compile(r"\.dpkg-[^./]*$")  # x.yaml.dpkg-new, x.yaml.dpkg-old, x.yaml.dpkg-dist
_VIM_PROBE = "4913"  # vim creates and deletes this to test whether it may write the directory


def is_manifest_name(entry_name: str) -> bool:
    """Whether a directory entry with this name is read as a manifest (the watcher may use this
    to ignore events for editors' temporary files)."""
    if entry_name.startswith("."):
        # Also covers Kubernetes ConfigMap volumes' `..data` and `..2026_…` directories.
        return False
    if entry_name.endswith(_IGNORED_SUFFIXES) or _DPKG_LEFTOVER.search(entry_name):
        return False
    if entry_name == _VIM_PROBE or (entry_name.startswith("#") and entry_name.endswith("#")):
        return False
    return entry_name.endswith(MANIFEST_SUFFIXES)


# --------------------------------------------------------------------------------------------
# What a listing produces
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DesiredContainer:
    name: str
    manifest: str  # os.path.join(manifests_dir, entry_name): the path as listed, symlinks not resolved
    document: int  # 0-based index of the document in the file
    labels: dict[str, str]
    spec: ContainerSpec
    spec_hash: str
    resources_free_hash: str


@dataclass(frozen=True)
class InvalidDocument:
    manifest: str
    document: int
    name: str | None
    message: str  # "<file>: document <n>: <field path>: <error>[; <field path>: <error>…]"
    # The same errors one per entry ("<field path>: <error>"), for printing one per line.
    errors: tuple[str, ...] = ()


@dataclass
class Listing:
    ok: bool  # False: the directory is missing, unreadable or not a directory; NOT an empty desired state
    error: str | None
    desired: dict[str, DesiredContainer]
    invalid: dict[str, InvalidDocument]  # names whose first declaration is an invalid document
    duplicates: list[InvalidDocument]  # declarations of a name already declared lexically earlier
    invalid_files: list[InvalidDocument]  # nothing readable as a name: syntax errors, non-mappings, I/O errors
    files: list[str]  # manifest files considered (after the ignore rules)
    ignored: list[str]  # entries skipped by the ignore rules, and subdirectories
    # Valid declarations whose node_selector does not match this node: declared, but not desired here.
    not_selected: dict[str, DesiredContainer] = field(default_factory=dict)


# One document's outcome. An InvalidDocument with name None is a file-level problem.
_Outcome = DesiredContainer | InvalidDocument
_StatKey = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class _CachedFile:
    key: _StatKey
    outcomes: tuple[_Outcome, ...]


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------

class ManifestSource:
    """Lists one manifest directory. Safe to call list() from several threads: the cache is
    replaced whole at the end of each listing, so the worst case is a parse done twice."""

    def __init__(
        self,
        directory: str,
        *,
        node_attributes: dict[str, str] | None = None,
        default_container_info: ContainerInfo | None = None,
        strict_modes: bool = True,
    ) -> None:
        self.directory = directory
        self.node_attributes: dict[str, str] = dict(node_attributes or {})
        self.default_container_info = default_container_info
        self.strict_modes = strict_modes   # --manifests_strict_modes
        self._cache: dict[str, _CachedFile] = {}

    def list(self) -> Listing:
        trust = _Trust() if self.strict_modes else None
        try:
            if trust is not None:
                refused = trust.directory_problem(self.directory)
                if refused is not None:
                    # As an unreadable directory: not an empty desired state, nothing is destroyed.
                    return _failed_listing(f"manifest directory {self.directory} refused: {refused}")
            entries = sorted((entry.name, entry.is_symlink()) for entry in os.scandir(self.directory))
        except OSError as exc:
            return _failed_listing(_directory_error(self.directory, exc))

        files: list[tuple[str, tuple[_Outcome, ...]]] = []
        ignored: list[str] = []
        cache: dict[str, _CachedFile] = {}
        for entry_name, is_link in entries:
            path = os.path.join(self.directory, entry_name)
            if not is_manifest_name(entry_name):
                ignored.append(path)
                continue
            if is_link and trust is not None:
                # Where the link leads must be as trusted as the directory (a ConfigMap's `..data`).
                refused = _refusal(trust.path_problem, path)
                if refused is not None:
                    files.append((path, (_file_error(path, f"refused: {refused}"),)))
                    continue
            try:
                st = os.stat(path)  # follows symlinks, as ConfigMap volumes require
            except FileNotFoundError:
                dangling = _dangling_link(path)
                if dangling is not None:
                    files.append((path, (_file_error(path, dangling),)))
                # else: removed since the directory was read; the listing is right without it.
                continue
            except OSError as exc:
                files.append((path, (_file_error(path, f"cannot stat: {exc.strerror}"),)))
                continue
            if stat.S_ISDIR(st.st_mode):
                ignored.append(path)  # no recursion: one directory is one desired state
                continue

            cached = self._cache.get(entry_name)
            if cached is not None and cached.key == _stat_key(st):
                outcomes = cached.outcomes
                cache[entry_name] = cached
            else:
                key, outcomes = _read_and_parse(path, self.default_container_info, trust)
                if key is not None:  # I/O errors and refusals are not cached
                    cache[entry_name] = _CachedFile(key, outcomes)
            files.append((path, outcomes))

        self._cache = cache
        listing = _resolve(files, self.node_attributes)
        listing.ignored = ignored
        return listing


def validate_paths(paths: list[str], *, strict_modes: bool = True) -> list[InvalidDocument]:
    """Every error in the given files and directories, in the order given (for `reconciler validate`).

    Directories get the same include/ignore rules as the agent's listing; a file named explicitly
    is validated whatever its name. Names must be unique across everything given, as they would
    be if it were all one manifest directory. Node selectors are not evaluated: a manifest is
    checked wherever it might run. strict_modes refuses what the agent would refuse (for the user
    running validate: root and that user may write them).
    """
    files: list[tuple[str, tuple[_Outcome, ...]]] = []
    seen_inodes: set[tuple[int, int]] = set()
    trust = _Trust() if strict_modes else None

    def add_file(path: str) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            files.append((path, (_file_error(path, _dangling_link(path) or "does not exist"),)))
            return
        except OSError as exc:
            files.append((path, (_file_error(path, f"cannot stat: {exc.strerror}"),)))
            return
        if (st.st_dev, st.st_ino) in seen_inodes:
            return  # `validate dir dir/web.yaml` must not report web as its own duplicate
        seen_inodes.add((st.st_dev, st.st_ino))
        if trust is not None:
            refused = _refusal(trust.path_problem, path)
            if refused is not None:
                files.append((path, (_file_error(path, f"refused: {refused}"),)))
                return
        files.append((path, _read_and_parse(path, None, trust)[1]))

    for path in paths:
        if os.path.isdir(path):
            if trust is not None:
                refused = _refusal(trust.directory_problem, path)
                if refused is not None:
                    files.append((path, (_file_error(path, f"manifest directory refused: {refused}"),)))
                    continue
            try:
                entry_names = sorted(entry.name for entry in os.scandir(path))
            except OSError as exc:
                files.append((path, (_file_error(path, _directory_error(path, exc)),)))
                continue
            for entry_name in entry_names:
                entry_path = os.path.join(path, entry_name)
                if is_manifest_name(entry_name) and not os.path.isdir(entry_path):
                    add_file(entry_path)
        else:
            add_file(path)  # named explicitly: validated whatever its name

    listing = _resolve(files, node_attributes=None)
    order = {path: index for index, (path, _) in enumerate(files)}
    errors = [*listing.invalid_files, *listing.invalid.values(), *listing.duplicates]
    return sorted(errors, key=lambda error: (order[error.manifest], error.document))


# --------------------------------------------------------------------------------------------
# From parsed files to a listing: names, duplicates, node selection
# --------------------------------------------------------------------------------------------

def _resolve(files: list[tuple[str, tuple[_Outcome, ...]]], node_attributes: dict[str, str] | None) -> Listing:
    """Apply "the first declaration of a name wins" across files in the order given.

    A name first declared by an invalid document stays owned by that document even when a later
    file declares it validly: otherwise fixing or breaking one file would silently switch a
    running container to another file's spec.
    """
    listing = Listing(ok=True, error=None, desired={}, invalid={}, duplicates=[], invalid_files=[],
                      files=[path for path, _ in files], ignored=[])
    declared_in: dict[str, tuple[str, int]] = {}
    attributes = node_attributes or {}
    for _, outcomes in files:
        for outcome in outcomes:
            if outcome.name is None:
                assert isinstance(outcome, InvalidDocument)
                listing.invalid_files.append(outcome)
                continue
            first = declared_in.get(outcome.name)
            if first is not None:
                listing.duplicates.append(_duplicate(outcome, *first))
                continue
            declared_in[outcome.name] = (outcome.manifest, outcome.document)
            if isinstance(outcome, InvalidDocument):
                listing.invalid[outcome.name] = outcome
            elif _selects(outcome.spec.node_selector, attributes):
                listing.desired[outcome.name] = outcome
            else:
                listing.not_selected[outcome.name] = outcome
    return listing


def _selects(node_selector: dict[str, str], attributes: dict[str, str]) -> bool:
    return all(attributes.get(key) == value for key, value in node_selector.items())


def _duplicate(outcome: _Outcome, first_file: str, first_document: int) -> InvalidDocument:
    error = f"metadata.name: duplicate name, declared in {first_file} (document {first_document})"
    return InvalidDocument(
        manifest=outcome.manifest, document=outcome.document, name=outcome.name,
        message=f"{outcome.manifest}: document {outcome.document}: {error}", errors=(error,),
    )


def _failed_listing(error: str) -> Listing:
    return Listing(ok=False, error=error, desired={}, invalid={}, duplicates=[], invalid_files=[],
                   files=[], ignored=[])


def _directory_error(directory: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"manifest directory {directory} does not exist"
    if isinstance(exc, NotADirectoryError):
        return f"manifest directory {directory} is not a directory"
    if isinstance(exc, PermissionError):
        return f"manifest directory {directory} is not readable: {exc.strerror}"
    return f"cannot list manifest directory {directory}: {exc.strerror}"


# --------------------------------------------------------------------------------------------
# StrictModes: who may write what the agent runs
# --------------------------------------------------------------------------------------------

_STRICT_MODES_HINT = ("make it owned by root or the agent's user and writable by no one else "
                      "(chown root; chmod go-w), or set --manifests_strict_modes=false")
_MAX_LINKS = 40   # as the kernel's MAXSYMLINKS


def _refusal(check: Callable[[str], str | None], path: str) -> str | None:
    """Why `check` refuses `path`; None for a path gone meanwhile (the caller's own stat says so)."""
    try:
        return check(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot resolve: {exc.strerror}"


class _Trust:
    """sshd's StrictModes, for the manifest directory and its files, for one listing.

    Trusted writers are root and the agent's own user. A path is trusted when every directory its
    resolution looks a name up in (its ancestors, and those of each symbolic link's target: a
    ConfigMap's `..data` and `..<timestamp>` directories) is owned by a trusted writer and writable
    by no one else, and a manifest file is trusted when the file opened (fstat on its fd) is too.

    Two exceptions, each keeping "no one else can change what is read" true:
    - A world-writable directory with the sticky bit, such as /tmp, above the manifest directory:
      others may add names to it, but not rename or remove a name they do not own, so the child the
      path goes through is as safe as its owner, who must be trusted. The manifest directory itself
      gets no such exception: anyone could add a manifest, or a link to any file, to it.
    - What is on a read-only mount that no writable mount in the agent's mount namespace shows
      (Kubernetes mounts a ConfigMap volume, 0777, read-only; the chart mounts git-sync's checkout
      read-only): no user of this machine's namespace can change it, whatever its mode and owner.
      Its writers are the ones the deployer gave a writable mount elsewhere (the kubelet, git-sync).
    """

    def __init__(self) -> None:
        self.uids = {0, os.geteuid()}
        self._stats: dict[str, os.stat_result] = {}
        self._mounts: list[_Mount] | None = None
        self._read_only: dict[str, bool] = {}

    def directory_problem(self, directory: str) -> str | None:
        """Why the manifest directory is refused, or None. Raises OSError when it cannot be resolved."""
        real, problem = self._resolve(directory)
        if problem is not None:
            return problem
        st = self._stat(real)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
        return self._writers_problem(real, st, sticky_child=None)

    def path_problem(self, path: str) -> str | None:
        """Why a manifest (a link or a file named to `validate`) is refused: a directory on its way."""
        return self._resolve(path)[1]

    def file_problem(self, fd: int, st: os.stat_result) -> str | None:
        """Why the opened manifest file is refused, or None."""
        if st.st_uid in self.uids and not st.st_mode & 0o022:
            return None
        if os.fstatvfs(fd).f_flag & os.ST_RDONLY and not self._writable_mount_shows(os.readlink(f"/proc/self/fd/{fd}")):
            return None
        return f"the file {_owner_and_mode(st)} is {_who_writes(st, self.uids)}; {_STRICT_MODES_HINT}"

    def _resolve(self, path: str) -> tuple[str, str | None]:
        """(the real path, why a directory on the way is refused or None), as realpath walks it."""
        pending = os.path.abspath(path).split("/")[::-1]
        current, links = "/", 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                current = os.path.dirname(current)
                continue
            child = os.path.join(current, part)
            child_st = self._stat(child)
            problem = self._writers_problem(current, self._stat(current), sticky_child=child_st)
            if problem is not None:
                return child, problem
            if stat.S_ISLNK(child_st.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(child)
                if target.startswith("/"):
                    current = "/"
                pending.extend(target.split("/")[::-1])
                continue
            current = child
        return current, None

    def _writers_problem(self, directory: str, st: os.stat_result, sticky_child: os.stat_result | None) -> str | None:
        """Why others could change what `directory` holds, or None."""
        owner_ok = st.st_uid in self.uids
        if owner_ok and not st.st_mode & 0o022:
            return None
        if owner_ok and sticky_child is not None and st.st_mode & stat.S_ISVTX and sticky_child.st_uid in self.uids:
            return None
        if self._on_read_only_view(directory):
            return None
        return f"{directory} {_owner_and_mode(st)} is {_who_writes(st, self.uids)}; {_STRICT_MODES_HINT}"

    def _stat(self, path: str) -> os.stat_result:
        st = self._stats.get(path)
        if st is None:
            st = self._stats[path] = os.lstat(path)
        return st

    def _on_read_only_view(self, directory: str) -> bool:
        verdict = self._read_only.get(directory)
        if verdict is None:
            verdict = self._read_only[directory] = (
                bool(os.statvfs(directory).f_flag & os.ST_RDONLY) and not self._writable_mount_shows(directory))
        return verdict

    def _writable_mount_shows(self, path: str) -> bool:
        """Whether a read-write mount in this namespace shows the filesystem object at `path` (resolved).

        The mount `path` is on tells which directory of its filesystem it is; any writable mount of
        the same filesystem whose root is that directory or above it makes it writable here.
        """
        if self._mounts is None:
            self._mounts = _mounts()
        on = None
        for mount in self._mounts:   # in mount order: the last one over a path is what it shows
            if path == mount.point or path.startswith(mount.point.rstrip("/") + "/"):
                if on is None or len(mount.point) >= len(on.point):
                    on = mount
        if on is None:
            return True   # no mount table to judge by: not read-only for this purpose
        inside = os.path.normpath(on.root + "/" + path[len(on.point):])
        for mount in self._mounts:
            if mount.device == on.device and mount.writable and (
                    inside == mount.root or inside.startswith(mount.root.rstrip("/") + "/")):
                return True
        return False


@dataclass(frozen=True)
class _Mount:
    device: str      # major:minor
    root: str        # the directory of the filesystem mounted here
    point: str
    writable: bool   # neither the mount nor its superblock read-only


def _mounts() -> list[_Mount]:
    try:
        entries = read_mountinfo()
    except OSError:
        return []
    return [_Mount(device=e.device, root=e.root, point=e.mount_point, writable=e.writable) for e in entries]


def _owner_and_mode(st: os.stat_result) -> str:
    try:
        owner = f"{pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
    except KeyError:
        owner = f"uid {st.st_uid}"
    return f"(owner {owner}, mode {stat.S_IMODE(st.st_mode):04o})"


def _who_writes(st: os.stat_result, uids: set[int]) -> str:
    if st.st_uid not in uids:
        return "owned by a user other than root and the agent's user"
    return "writable by " + ("group and others" if st.st_mode & 0o022 == 0o022 else
                             "others" if st.st_mode & 0o002 else "its group")


# --------------------------------------------------------------------------------------------
# One file: read, split into documents, validate each
# --------------------------------------------------------------------------------------------

def _stat_key(st: os.stat_result) -> _StatKey:
    # Mode and owner too: a chmod or chown changes neither size nor mtime, and may change the verdict.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid)


def _read_and_parse(
    path: str, default_container_info: ContainerInfo | None, trust: _Trust | None = None,
) -> tuple[_StatKey | None, tuple[_Outcome, ...]]:
    """(cache key, outcomes); the key is None when reading failed, so the failure is not cached."""
    try:
        key, data = _read_manifest_file(path, trust)
    except _UnreadableFile as exc:
        return None, (_file_error(path, str(exc)),)
    return key, _parse_file(path, data, default_container_info)


class _UnreadableFile(Exception):
    pass


_SIZE_LIMIT = f"{MAX_MANIFEST_BYTES // (1024 * 1024)} MiB"


def _read_manifest_file(path: str, trust: _Trust | None = None) -> tuple[_StatKey, bytes]:
    def trusted(fd: int, st: os.stat_result) -> None:
        # On the opened fd: whatever the name pointed to when it was checked, this is what is read.
        refused = trust.file_problem(fd, st) if trust is not None else None
        if refused is not None:
            raise _UnreadableFile(f"refused: {refused}")

    try:
        st, data = read_config_file(path, limit=MAX_MANIFEST_BYTES, check=trusted)
    except NotRegularFileError:
        raise _UnreadableFile("not a regular file") from None
    except FileTooLargeError as exc:
        size = "over" if exc.size is None else f"{exc.size} bytes, over"   # None: it grew while read
        raise _UnreadableFile(f"file is {size} the {_SIZE_LIMIT} limit for a manifest") from None
    except OSError as exc:
        raise _UnreadableFile(f"cannot read: {exc.strerror}") from None
    return _stat_key(st), data


def _parse_file(path: str, data: bytes, default_container_info: ContainerInfo | None) -> tuple[_Outcome, ...]:
    try:
        documents = _load_documents(data, json_file=path.endswith(".json"))
    except _SyntaxError as exc:
        error = str(exc)
        return (InvalidDocument(manifest=path, document=exc.document, name=None,
                                message=f"{path}: document {exc.document}: {error}", errors=(error,)),)
    outcomes: list[_Outcome] = []
    positions = _Positions(data)
    for index, document in enumerate(documents):
        if document is None:
            continue  # an empty document, e.g. a leading or trailing `---`
        outcomes.append(_validate_document(path, index, document, default_container_info, positions))
    return tuple(outcomes)


def _validate_document(
    path: str, index: int, document: Any, default_container_info: ContainerInfo | None, positions: _Positions,
) -> _Outcome:
    if not isinstance(document, dict):
        error = (f"expected a mapping with apiVersion, kind, metadata and spec, got {_describe_type(document)}"
                 f"{positions.of(index, ())}")
        return InvalidDocument(path, index, None, f"{path}: document {index}: {error}", (error,))
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as exc:
        details = exc.errors(include_url=False)
        errors = [_bounded(_format_error(error, Manifest, quote_input=False))
                  + positions.of(index, error["loc"], error["type"])
                  for error in details[:MAX_ERRORS_PER_DOCUMENT]]
        if len(details) > MAX_ERRORS_PER_DOCUMENT:
            errors.append(f"and {len(details) - MAX_ERRORS_PER_DOCUMENT} more errors")
        return InvalidDocument(path, index, _readable_name(document), f"{path}: document {index}: {'; '.join(errors)}",
                               tuple(errors))

    spec = manifest.spec
    if spec.container is None and default_container_info is not None:
        # As Mesos's --default_container_info: applied before hashing, so changing the flag
        # replaces the containers it applies to.
        spec = spec.model_copy(update={"container": default_container_info})
    return DesiredContainer(
        name=manifest.metadata.name, manifest=path, document=index, labels=dict(manifest.metadata.labels),
        spec=spec, spec_hash=spec_hash(spec), resources_free_hash=spec_hash_without_resources(spec),
    )


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS - 1] + "…"


def _readable_name(document: dict[Any, Any]) -> str | None:
    # Only a valid name counts: it becomes a status file name, and "../x" must not.
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and is_dns1123_label(name) else None


def _dangling_link(path: str) -> str | None:
    """The error for a symlink whose target is missing; None when `path` itself is gone."""
    try:
        return f"dangling symbolic link to {os.readlink(path)}"
    except OSError:
        return None


def _file_error(path: str, error: str) -> InvalidDocument:
    return InvalidDocument(manifest=path, document=0, name=None, message=f"{path}: {error}", errors=(error,))


# --------------------------------------------------------------------------------------------
# YAML and JSON loading
# --------------------------------------------------------------------------------------------

class _SyntaxError(Exception):
    def __init__(self, message: str, document: int = 0) -> None:
        super().__init__(message)
        self.document = document   # index of the document the parser stopped in


class _ManifestLoader(yaml.CSafeLoader):
    """The C safe loader, but a repeated mapping key is an error instead of last-one-wins:
    two `resources:` keys in one spec is a mistake the operator must see."""


def _construct_mapping_without_duplicates(loader: _ManifestLoader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<` merges may legitimately be overridden by explicit keys
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}"
                if isinstance(key, str) else "found duplicate key", key_node.start_mark)
        seen.add(key)
    return (yield from yaml.constructor.SafeConstructor.construct_yaml_map(loader, node))


_ManifestLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping_without_duplicates)


class _DuplicateJsonKey(ValueError):
    pass


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateJsonKey(f"duplicate key {_quoted_if_schema_word(key)}")
        result[key] = value
    return result


def _quoted_if_schema_word(text: str) -> str:
    """'resources' for a word of the schema; '…' for anything else, which may be a file's secret."""
    return repr(text) if text in _schema_vocabulary() else "'…'"


def _without_quoted_content(problem: str) -> str:
    """A PyYAML composer or constructor message with the tags, anchors and values it quotes taken out."""
    return _QUOTED.sub(lambda m: _quoted_if_schema_word(m.group(0)[1:-1]), problem)


def _load_documents(data: bytes, *, json_file: bool) -> list[Any]:
    """The file's documents; _SyntaxError says where and why it cannot be read, never what is there.

    libyaml's scanner and parser messages are fixed phrases; PyYAML's composer and constructor
    quote tags, anchors and values, and its constructors for explicit tags (`!!int x`,
    `!!timestamp x`) fail with plain Python exceptions that quote the value: none of that is kept.
    """
    if json_file:
        try:
            document = json.loads(data, object_pairs_hook=_reject_duplicate_json_keys)
            if _count_values(document) > MAX_DOCUMENT_VALUES:
                raise _SyntaxError(_too_many_values())
            return [document]
        except json.JSONDecodeError as exc:
            raise _SyntaxError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        except UnicodeDecodeError as exc:
            raise _SyntaxError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        except _DuplicateJsonKey as exc:
            raise _SyntaxError(f"invalid JSON: {exc}") from None
        except RecursionError:
            raise _SyntaxError("nested too deeply to be a manifest") from None
        except ValueError:
            raise _SyntaxError("invalid JSON: a number out of range") from None
    documents: list[Any] = []
    try:
        _check_expansion(data)
        # All of them before any is used: load_all is lazy, and a syntax error in a later document
        # makes the whole file suspect (it may be half-written), so no document of it is used.
        for document in yaml.load_all(data, Loader=_ManifestLoader):
            documents.append(document)
        return documents
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = ": ".join(part for part in (exc.context, exc.problem) if part)
        if isinstance(exc, (yaml.composer.ComposerError, yaml.constructor.ConstructorError)):
            what = _without_quoted_content(what)
        raise _SyntaxError(f"invalid YAML{where}: {what}", document=len(documents)) from None
    except yaml.reader.ReaderError as exc:
        raise _SyntaxError(f"not UTF-8 text: {exc.reason} at byte {exc.position}") from None
    except RecursionError:
        raise _SyntaxError("nested too deeply to be a manifest", document=len(documents)) from None
    except _SyntaxError:
        raise
    except Exception:  # noqa: BLE001 - a constructor's own failure, whatever its type, quotes the value
        raise _SyntaxError("invalid YAML: a value with an explicit tag (such as !!int or !!timestamp) is not "
                           "of that type", document=len(documents)) from None


def _too_many_values() -> str:
    return (f"more than {MAX_DOCUMENT_VALUES} values in one document (YAML aliases expanded), or nested more "
            f"than {MAX_DOCUMENT_DEPTH} deep: a manifest has about a hundred values, a few levels deep")


def _check_expansion(data: bytes) -> None:
    """Refuse a document of more than MAX_DOCUMENT_VALUES values (YAML aliases expanded) or nested
    more than MAX_DOCUMENT_DEPTH deep, before it is built (see reconciler.yamlbounds). A syntax error
    is left to the loader, which says which document it is in."""
    try:
        past = first_past_limits(data, MAX_DOCUMENT_VALUES, MAX_DOCUMENT_DEPTH)
    except (yaml.YAMLError, ValueError, RecursionError):
        return
    if past is not None:
        raise _SyntaxError(f"{_too_many_values()}, past line {past.line}", document=past.document)


def _count_values(value: Any) -> int:
    count = 0
    stack = [value]
    while stack and count <= MAX_DOCUMENT_VALUES:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


# --------------------------------------------------------------------------------------------
# Validation errors in an operator's words
# --------------------------------------------------------------------------------------------

_TYPE_MESSAGES = {
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}


def validation_messages(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One "<field path>: <what is wrong>" per error, e.g. "spec.container.volumes[0].host_path: …".

    `root` is the model that was validated; it is where unknown-field suggestions are looked up
    (the CLI can pass ContainerInfo for --default_container_info). For values the operator typed (a
    flag): the message quotes the value found. A manifest file's errors never do (_parse_file).
    """
    return [_format_error(error, root) for error in exc.errors(include_url=False)]


def _format_error(error: ErrorDetails, root: type[BaseModel], *, quote_input: bool = True) -> str:
    path = field_path(error["loc"])
    kind = error["type"]
    found = _describe_value(error.get("input")) if quote_input else _describe_type(error.get("input"))
    if kind == "extra_forbidden":
        message, misspelt = _unknown_field_message(error["loc"], root)
        if not quote_input and len(error["loc"]) == 1 and not misspelt:
            # A top-level key that is no misspelling: a file that is not a manifest at all (a link to
            # `KEY: value` credentials), whose key may itself be the secret. Its line says where.
            return f"unknown top-level field; {message.removeprefix('unknown field; ')}"
    elif kind == "missing":
        message = "field required"
    elif kind in ("value_error", "assertion_error"):
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind in _TYPE_MESSAGES:
        message = f"{_TYPE_MESSAGES[kind]}, got {found}"
    else:
        message = f"{error['msg']}, got {found}"
    if not quote_input:
        message = _redact(message, error.get("input"))
    return f"{path}: {message}" if path else message


def field_path(loc: Iterable[int | str]) -> str:
    """('spec', 'container', 'volumes', 0, 'host_path') -> 'spec.container.volumes[0].host_path'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            path += f".{part}" if path else part
        else:
            path += f"[{json.dumps(part)}]"  # a label key such as app.kubernetes.io/name
    return path


def _unknown_field_message(loc: tuple[int | str, ...], root: type[BaseModel]) -> tuple[str, bool]:
    """(the message, whether it suggests a field the key is a misspelling of)."""
    model = _model_at(loc[:-1], root)
    if model is None or not isinstance(loc[-1], str):
        return "unknown field", False
    known = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    if close:
        return f"unknown field (did you mean {close[0]!r}?)", True
    return f"unknown field; expected one of: {', '.join(known)}", False


def _model_at(loc: tuple[int | str, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the item has the list's model
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional[...], list[...], Annotated[...]
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe_type(value: Any) -> str:
    """What a value is, never what it says: error messages about a file must not quote it."""
    if value is None:
        return "null"
    for kind, words in ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (dict, "a mapping"), (list, "a list"), (bytes, "binary data"), (dt.datetime, "a timestamp"),
                        (dt.date, "a date"), (set, "a set")):
        if isinstance(value, kind):
            return words
    return "a value of another type"


# Quoted words in a message ('…' or "…"): where validators put the value they refuse.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_REDACTED = "…"
_vocabulary: frozenset[str] | None = None


def _redact(message: str, value: Any) -> str:
    """`message` without any string taken from `value` (the validated input from the file).

    The models' validators say "unknown capability 'X'", "name 'X' is not …", "volumes[0] (/x) is
    nested …": each such X, quoted or not, becomes "…" unless it is a word of the manifest's schema
    (a field name, an enum value such as 'RLMT_NOFILE': public, and the hint the operator needs).
    The line and column the message ends with say where the value is.
    """
    strings = _strings_in(value)
    if not strings:
        return message
    vocabulary = _schema_vocabulary()

    def quoted(match: re.Match[str]) -> str:
        inner = match.group(0)[1:-1]
        if inner in vocabulary or not _taken_from(inner, strings):
            return match.group(0)
        return match.group(0)[0] + _REDACTED + match.group(0)[0]

    message = _QUOTED.sub(quoted, message)
    for text in sorted(strings, key=len, reverse=True):
        if (len(text) >= 3 or (len(text) == 2 and not text.isalpha())) and text not in vocabulary:
            message = re.sub(rf"(?<!\w){re.escape(text)}(?!\w)", _REDACTED, message)
    return message


def _taken_from(inner: str, strings: set[str]) -> bool:
    """Whether a quoted part of a message was built from the input: equal to a string of it, or
    sharing four characters in a row with one (a validator's suggestion made of the value)."""
    if inner in strings:
        return True
    if len(inner) < 3:
        # A unit cut out of a value ('Mb' of "12Mb") is the file's; '-', '..', '/' are the validators' words.
        return any(c.isalnum() for c in inner) and any(inner in text for text in strings)
    grams = {inner[i:i + 4] for i in range(max(1, len(inner) - 3))}
    return any(gram in text for text in strings for gram in grams)


def _strings_in(value: Any, limit: int = 2000) -> set[str]:
    """Up to `limit` strings of a value. YAML aliases make lists and mappings that contain
    themselves (`&a [*a]`): each is visited once, and the walk is bounded whatever the shape."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [value]
    visits = 0
    while stack and len(found) < limit and visits < MAX_DOCUMENT_VALUES:
        item = stack.pop()
        visits += 1
        if isinstance(item, (dict, list, tuple, set)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, str):
            if item:
                found.add(item)
                found.add(repr(item)[1:-1])   # as a validator quotes it: 'web\n'
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return found


def _schema_vocabulary() -> frozenset[str]:
    """Every field name, enum value and constant of the manifest's JSON Schema."""
    global _vocabulary
    if _vocabulary is None:
        words: set[str] = set()
        stack: list[Any] = [Manifest.model_json_schema(mode="validation")]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                words.update(key for key in item.get("properties", {}) if isinstance(key, str))
                words.update(v for v in item.get("enum", []) if isinstance(v, str))
                if isinstance(item.get("const"), str):
                    words.add(item["const"])
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        _vocabulary = frozenset(words)
    return _vocabulary


class _Positions:
    """Where a validation error is in the file: "(line L, column C)", found again in the YAML nodes.

    Composed only when a document is invalid (the valid path never pays for it). JSON files are
    YAML too, so their errors get a line as well; a file the composer cannot read gets none.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._documents: list[Any] | None = None

    def of(self, document: int, loc: Iterable[int | str], kind: str = "") -> str:
        node = self._document(document)
        if node is None:
            return ""
        target = node
        parts = list(loc)
        for i, part in enumerate(parts):
            if isinstance(node, yaml.MappingNode):
                pair = next((pair for pair in reversed(node.value)
                             if isinstance(pair[0], yaml.ScalarNode) and pair[0].value == str(part)), None)
                if pair is None:
                    continue   # not a key of the file: pydantic's name for a union member
                node = pair[1]
                # An unknown field is its key; anything else is its value.
                target = pair[0] if kind == "extra_forbidden" and i == len(parts) - 1 else node
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = target = node.value[part]
        mark = target.start_mark
        return f" (line {mark.line + 1}, column {mark.column + 1})"

    def _document(self, index: int) -> Any:
        if self._documents is None:
            try:
                self._documents = list(yaml.compose_all(self._data, Loader=yaml.CSafeLoader))
            except (yaml.YAMLError, RecursionError, ValueError):
                self._documents = []
        return self._documents[index] if 0 <= index < len(self._documents) else None


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
