"""Image references parse as Mesos parses them (DockerSpecTest.ParseImageReference) and name archives as
Mesos names them; malformed ones fail with a message that quotes them."""

from __future__ import annotations

import pytest

from reconciler.images import ImageReference, InvalidReference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, expected, archive", [
    ("busybox", ImageReference("busybox"), "busybox"),
    ("busybox:latest", ImageReference("busybox", tag="latest"), "busybox:latest"),
    ("library/busybox:tag", ImageReference("library/busybox", tag="tag"), "library/busybox:tag"),
    ("registry.io:80/library/busybox@" + DIGEST,
     ImageReference("library/busybox", registry="registry.io:80", digest=DIGEST),
     "registry.io:80/library/busybox@" + DIGEST),
    ("localhost/foo", ImageReference("foo", registry="localhost"), "localhost/foo"),
    ("localhost:5000/foo", ImageReference("foo", registry="localhost:5000"), "localhost:5000/foo"),
    ("localhost:5000/team/app:1.2_rc-3", ImageReference("team/app", registry="localhost:5000", tag="1.2_rc-3"),
     "localhost:5000/team/app:1.2_rc-3"),
    ("busybox:1.36@" + DIGEST, ImageReference("busybox", tag="1.36", digest=DIGEST), "busybox@" + DIGEST),
    ("my.registry/a/b/c", ImageReference("a/b/c", registry="my.registry"), "my.registry/a/b/c"),
    ("team/app_x.y__z-w", ImageReference("team/app_x.y__z-w"), "team/app_x.y__z-w"),
])
def test_parses_like_mesos_and_stringifies_to_the_archive_name(text: str, expected: ImageReference, archive: str) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == archive  # the archive is <docker_registry>/<str(ref)>.tar


def test_default_tag_is_latest_and_names_normalize_like_docker() -> None:
    assert parse_reference("busybox").effective_tag == "latest"
    assert parse_reference("busybox:1").effective_tag == "1"
    assert parse_reference("docker.io/library/busybox").normalized_name() == "busybox"
    assert parse_reference("library/busybox").normalized_name() == "busybox"
    assert parse_reference("team/app").normalized_name() == "team/app"


@pytest.mark.parametrize("text, why", [
    ("", "it is empty"),
    ("busy box", "whitespace"),
    ("a@b@c", "Multiple '@' symbols found"),
    ("busybox@sha256:abc", "not 'sha256:' followed by 64 lowercase hex digits"),
    ("busybox@md5:" + "a" * 32, "not 'sha256:'"),
    ("Busybox", "component 'Busybox' must be lowercase"),
    ("busybox:bad$tag", "tag 'bad$tag'"),
    ("busybox:", "tag ''"),
    (":latest", "repository name is empty"),
    ("team//app", "empty path component"),
    ("team/-app", "component '-app'"),
    ("bad_host.:5000/app", "registry 'bad_host.:5000'"),
    ("a/" + "b" * 260, "longer than 255"),
])
def test_malformed_references_fail_with_a_clear_message(text: str, why: str) -> None:
    with pytest.raises(InvalidReference) as e:
        parse_reference(text)
    assert f"Invalid docker image reference '{text}'" in str(e.value)
    assert why in str(e.value)
