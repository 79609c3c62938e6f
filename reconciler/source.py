"""The manifest source: lists the manifest directory and turns it into the desired state.

It knows files and YAML, nothing about processes. A listing is always a full listing: the watcher
only decides *when* to list, and the listing is the truth. That is what makes ConfigMap `..data`
swaps, editors' temporary files and half-written files safe — whatever sequence of events
happened, the next listing sees the directory as it is now.

The only state kept between listings is a parse cache keyed by each file's identity
(device, inode, size, mtime), so re-listing a large unchanged directory costs one stat per file.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from reconciler.models import (
    ContainerInfo,
    ContainerSpec,
    Manifest,
    is_dns1123_label,
    spec_hash,
    spec_hash_without_resources,
)

MAX_MANIFEST_BYTES = 10 * 1024 * 1024
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
_StatKey = tuple[int, int, int, int]


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
    ) -> None:
        self.directory = directory
        self.node_attributes: dict[str, str] = dict(node_attributes or {})
        self.default_container_info = default_container_info
        self._cache: dict[str, _CachedFile] = {}

    def list(self) -> Listing:
        try:
            entry_names = sorted(entry.name for entry in os.scandir(self.directory))
        except OSError as exc:
            return _failed_listing(_directory_error(self.directory, exc))

        files: list[tuple[str, tuple[_Outcome, ...]]] = []
        ignored: list[str] = []
        cache: dict[str, _CachedFile] = {}
        for entry_name in entry_names:
            path = os.path.join(self.directory, entry_name)
            if not is_manifest_name(entry_name):
                ignored.append(path)
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
                key, outcomes = _read_and_parse(path, self.default_container_info)
                if key is not None:  # I/O errors are not cached: a chmod does not change the key
                    cache[entry_name] = _CachedFile(key, outcomes)
            files.append((path, outcomes))

        self._cache = cache
        listing = _resolve(files, self.node_attributes)
        listing.ignored = ignored
        return listing


def validate_paths(paths: list[str]) -> list[InvalidDocument]:
    """Every error in the given files and directories, in the order given (for `reconciler validate`).

    Directories get the same include/ignore rules as the agent's listing; a file named explicitly
    is validated whatever its name. Names must be unique across everything given, as they would
    be if it were all one manifest directory. Node selectors are not evaluated: a manifest is
    checked wherever it might run.
    """
    files: list[tuple[str, tuple[_Outcome, ...]]] = []
    seen_inodes: set[tuple[int, int]] = set()

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
        files.append((path, _read_and_parse(path, None)[1]))

    for path in paths:
        if os.path.isdir(path):
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
# One file: read, split into documents, validate each
# --------------------------------------------------------------------------------------------

def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_and_parse(
    path: str, default_container_info: ContainerInfo | None,
) -> tuple[_StatKey | None, tuple[_Outcome, ...]]:
    """(cache key, outcomes); the key is None when reading failed, so the failure is not cached."""
    try:
        key, data = _read_manifest_file(path)
    except _UnreadableFile as exc:
        return None, (_file_error(path, str(exc)),)
    return key, _parse_file(path, data, default_container_info)


class _UnreadableFile(Exception):
    pass


def _read_manifest_file(path: str) -> tuple[_StatKey, bytes]:
    try:
        # O_NONBLOCK: a FIFO named x.yaml must not hang the listing in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _UnreadableFile(f"cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _UnreadableFile("not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise _UnreadableFile(f"file is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB limit for a manifest")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:  # it grew between fstat and read
            raise _UnreadableFile(f"file is over the {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB limit for a manifest")
        return _stat_key(st), data
    except OSError as exc:
        raise _UnreadableFile(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _parse_file(path: str, data: bytes, default_container_info: ContainerInfo | None) -> tuple[_Outcome, ...]:
    try:
        documents = _load_documents(data, json_file=path.endswith(".json"))
    except _SyntaxError as exc:
        error = str(exc)
        return (InvalidDocument(manifest=path, document=exc.document, name=None,
                                message=f"{path}: document {exc.document}: {error}", errors=(error,)),)
    outcomes: list[_Outcome] = []
    for index, document in enumerate(documents):
        if document is None:
            continue  # an empty document, e.g. a leading or trailing `---`
        outcomes.append(_validate_document(path, index, document, default_container_info))
    return tuple(outcomes)


def _validate_document(
    path: str, index: int, document: Any, default_container_info: ContainerInfo | None,
) -> _Outcome:
    if not isinstance(document, dict):
        error = f"expected a mapping with apiVersion, kind, metadata and spec, got {_describe_value(document)}"
        return InvalidDocument(path, index, None, f"{path}: document {index}: {error}", (error,))
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as exc:
        errors = tuple(validation_messages(exc, Manifest))
        return InvalidDocument(path, index, _readable_name(document), f"{path}: document {index}: {'; '.join(errors)}", errors)

    spec = manifest.spec
    if spec.container is None and default_container_info is not None:
        # As Mesos's --default_container_info: applied before hashing, so changing the flag
        # replaces the containers it applies to.
        spec = spec.model_copy(update={"container": default_container_info})
    return DesiredContainer(
        name=manifest.metadata.name, manifest=path, document=index, labels=dict(manifest.metadata.labels),
        spec=spec, spec_hash=spec_hash(spec), resources_free_hash=spec_hash_without_resources(spec),
    )


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
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return (yield from yaml.constructor.SafeConstructor.construct_yaml_map(loader, node))


_ManifestLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping_without_duplicates)


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _load_documents(data: bytes, *, json_file: bool) -> list[Any]:
    documents: list[Any] = []
    try:
        if json_file:
            return [json.loads(data, object_pairs_hook=_reject_duplicate_json_keys)]
        # All of them before any is used: load_all is lazy, and a syntax error in a later document
        # makes the whole file suspect (it may be half-written), so no document of it is used.
        for document in yaml.load_all(data, Loader=_ManifestLoader):
            documents.append(document)
        return documents
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = ": ".join(part for part in (exc.context, exc.problem) if part)
        raise _SyntaxError(f"invalid YAML{where}: {what}", document=len(documents)) from None
    except yaml.reader.ReaderError as exc:
        raise _SyntaxError(f"not UTF-8 text: {exc.reason} at byte {exc.position}") from None
    except yaml.YAMLError as exc:
        raise _SyntaxError("invalid YAML: " + " ".join(str(exc).split())) from None
    except json.JSONDecodeError as exc:
        raise _SyntaxError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise _SyntaxError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # the JSON duplicate-key hook
        raise _SyntaxError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise _SyntaxError("nested too deeply to be a manifest") from None


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
    (the CLI can pass ContainerInfo for --default_container_info).
    """
    return [_format_error(error, root) for error in exc.errors(include_url=False)]


def _format_error(error: ErrorDetails, root: type[BaseModel]) -> str:
    path = field_path(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        message = _unknown_field_message(error["loc"], root)
    elif kind == "missing":
        message = "field required"
    elif kind in ("value_error", "assertion_error"):
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind in _TYPE_MESSAGES:
        message = f"{_TYPE_MESSAGES[kind]}, got {_describe_value(error['input'])}"
    else:
        message = f"{error['msg']}, got {_describe_value(error['input'])}"
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


def _unknown_field_message(loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    model = _model_at(loc[:-1], root)
    if model is None or not isinstance(loc[-1], str):
        return "unknown field"
    known = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    if close:
        return f"unknown field (did you mean {close[0]!r}?)"
    return f"unknown field; expected one of: {', '.join(known)}"


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


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
