"""Docker image references: `[REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:HEX]`, parsed as Mesos parses them
(src/docker/spec.cpp parseImageReference) and checked against Docker's reference grammar, so a malformed
name fails here with a message instead of as a missing archive.

`str(reference)` is Mesos's stringify: `[registry/]repository` then `@digest` or else `:tag`. The local
registry's archive for a reference is `<docker_registry>/<str(reference)>.tar` (`busybox:latest` →
`busybox:latest.tar`); a bare name is `:latest` as in Docker, with Mesos's `busybox.tar` as a fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconciler.images.errors import InvalidReference

DEFAULT_TAG = "latest"
DOCKER_HUB = "docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL})(?:\.{_LABEL})*(?::[0-9]{{1,5}})?\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ImageReference:
    repository: str
    registry: str | None = None
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}" if self.registry else self.repository
        if self.digest:
            return f"{name}@{self.digest}"
        if self.tag:
            return f"{name}:{self.tag}"
        return name

    @property
    def name(self) -> str:
        """`[registry/]repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    @property
    def effective_tag(self) -> str:
        return self.tag or DEFAULT_TAG

    def normalized_name(self) -> str:
        """The name as Docker normalizes it for comparison: docker.io and library/ dropped."""
        return normalize_name(self.name)


def normalize_name(name: str) -> str:
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/"):]
    return name


def parse_reference(text: str) -> ImageReference:
    """Parse a reference, raising InvalidReference that quotes it and says what is wrong."""
    def bad(why: str) -> InvalidReference:
        return InvalidReference(f"Invalid docker image reference '{text}': {why}")

    if not isinstance(text, str) or not text:
        raise bad("it is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise bad("it contains whitespace")
    s = text
    digest = None
    if "@" in s:
        parts = s.split("@")
        if len(parts) != 2:
            raise bad("Multiple '@' symbols found")
        s, digest = parts
        if not _DIGEST.match(digest):
            raise bad(f"digest '{digest}' is not 'sha256:' followed by 64 lowercase hex digits")
    tag = None
    if ":" in s:
        head, _, last = s.rpartition(":")
        if "/" not in last:  # otherwise the ':' belongs to a registry port and there is no tag
            tag, s = last, head
            if not _TAG.match(tag):
                raise bad(f"tag '{tag}' must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    if not s:
        raise bad("the repository name is empty")
    registry = None
    first, sep, rest = s.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, s = first, rest
        if not _HOST.match(registry):
            raise bad(f"registry '{registry}' is not a host name with an optional port")
    if not s:
        raise bad("the repository name is empty")
    for component in s.split("/"):
        if not component:
            raise bad("the repository name has an empty path component")
        if not _COMPONENT.match(component):
            if component.lower() != component and _COMPONENT.match(component.lower()):
                raise bad(f"repository name component '{component}' must be lowercase")
            raise bad(f"repository name component '{component}' must be lowercase letters and digits, "
                      "separated by '.', '_', '__' or '-'")
    if len(s) + (len(registry) + 1 if registry else 0) > 255:
        raise bad("the name is longer than 255 characters")
    return ImageReference(repository=s, registry=registry, tag=tag, digest=digest)
