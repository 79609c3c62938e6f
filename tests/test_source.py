"""The manifest source: which files count, how they are parsed, and what a listing says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import source as source_module
from reconciler.models import ContainerInfo, Manifest, spec_hash
from reconciler.source import (
    MAX_MANIFEST_BYTES,
    InvalidDocument,
    Listing,
    ManifestSource,
    is_manifest_name,
    validate_paths,
)
from tests.test_fsutil import root_only_file

REPO = Path(__file__).resolve().parent.parent


def doc(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("command", {"value": f"echo {name}"})
    return {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name}, "spec": spec}


def write(directory: Path, entry: str, *documents: Any) -> str:
    """Write documents as a multi-document YAML file (or raw text); returns the listed path."""
    path = directory / entry
    if len(documents) == 1 and isinstance(documents[0], str):
        path.write_text(documents[0])
    else:
        path.write_text(yaml.safe_dump_all(list(documents), sort_keys=False))
    return str(path)


def _permissions_are_enforced() -> bool:
    """False for root with CAP_DAC_OVERRIDE, which reads anything whatever its mode. (Run as root
    without it, e.g. `setpriv --bounding-set -dac_override,-dac_read_search`, to cover these tests.)"""
    with tempfile.TemporaryDirectory() as scratch:
        probe = os.path.join(scratch, "probe")
        with open(probe, "w"):
            pass
        os.chmod(probe, 0)
        try:
            with open(probe):
                return False
        except PermissionError:
            return True


PERMISSIONS_ENFORCED = _permissions_are_enforced()


def listing_of(directory: Path, **kwargs: Any) -> Listing:
    return ManifestSource(str(directory), **kwargs).list()


# ---------------------------------------------------------------------------------------------
# The directory itself
# ---------------------------------------------------------------------------------------------

def test_a_missing_directory_is_not_an_empty_desired_state(tmp_path: Path) -> None:
    missing = tmp_path / "manifests"
    listing = listing_of(missing)
    assert listing.ok is False
    assert listing.error == f"manifest directory {missing} does not exist"
    assert listing.desired == {} and listing.files == []


def test_a_file_in_place_of_the_directory_is_not_ok(tmp_path: Path) -> None:
    (tmp_path / "manifests").write_text("")
    listing = listing_of(tmp_path / "manifests")
    assert (listing.ok, listing.error) == (False, f"manifest directory {tmp_path / 'manifests'} is not a directory")


@pytest.mark.skipif(not PERMISSIONS_ENFORCED, reason="this process reads directories whatever their mode (CAP_DAC_OVERRIDE)")
def test_an_unreadable_directory_is_not_ok(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir(mode=0)
    listing = listing_of(tmp_path / "m")
    assert (listing.ok, listing.error) == (False, f"manifest directory {tmp_path / 'm'} is not readable: Permission denied")


def test_an_empty_directory_is_authoritative(tmp_path: Path) -> None:
    listing = listing_of(tmp_path)
    assert listing.ok is True and listing.error is None
    assert listing.desired == {} and listing.invalid == {} and listing.invalid_files == [] and listing.files == []


def test_a_directory_given_through_a_symlink_is_listed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    write(real, "web.yaml", doc("web"))
    (tmp_path / "link").symlink_to(real)
    assert list(listing_of(tmp_path / "link").desired) == ["web"]


# ---------------------------------------------------------------------------------------------
# A valid manifest
# ---------------------------------------------------------------------------------------------

def test_a_valid_manifest_becomes_a_desired_container(tmp_path: Path) -> None:
    d = doc("web", resources={"cpus": 0.5, "mem": "128Mi"})
    d["metadata"]["labels"] = {"team": "infra"}
    path = write(tmp_path, "web.yaml", d)
    listing = listing_of(tmp_path)
    web = listing.desired["web"]
    assert web.manifest == os.path.join(str(tmp_path), "web.yaml") == path
    assert web.document == 0
    assert web.labels == {"team": "infra"}
    assert web.spec == Manifest.model_validate(d).spec
    assert web.spec.resources.mem == 128.0
    assert web.spec_hash == spec_hash(web.spec)
    assert web.resources_free_hash.startswith("sha256:") and web.resources_free_hash != web.spec_hash
    assert listing.files == [path]


def test_yml_and_json_files_are_manifests_too(tmp_path: Path) -> None:
    write(tmp_path, "a.yml", doc("a"))
    (tmp_path / "b.json").write_text(json.dumps(doc("b")))
    assert list(listing_of(tmp_path).desired) == ["a", "b"]


def test_several_documents_per_file_with_empty_ones_skipped(tmp_path: Path) -> None:
    text = "---\n" + yaml.safe_dump(doc("one")) + "---\n---\n# just a comment\n---\n" + yaml.safe_dump(doc("two"))
    path = write(tmp_path, "all.yaml", text)
    listing = listing_of(tmp_path)
    assert [(c.name, c.manifest, c.document) for c in listing.desired.values()] == [("one", path, 0), ("two", path, 3)]
    assert listing.invalid_files == []


# ---------------------------------------------------------------------------------------------
# Which entries count
# ---------------------------------------------------------------------------------------------

IGNORED_NAMES = [
    ".web.yaml", ".web.yaml.swp", "web.yaml~", "web.yaml.swp", "web.yaml.swx", "web.yaml.tmp", "web.yaml.part",
    "web.yaml.dpkg-new", "web.yaml.dpkg-old", "web.yaml.dpkg-dist", "web.yaml.bak", "web.yaml.orig", "web.yaml.rej",
    "web.yaml.rpmnew", "web.yaml.rpmsave", "#web.yaml#", "4913", "README.md", "web.txt", "web",
]


@pytest.mark.parametrize("entry", IGNORED_NAMES)
def test_editor_and_package_manager_leftovers_are_ignored(tmp_path: Path, entry: str) -> None:
    path = write(tmp_path, entry, doc("ghost"))
    listing = listing_of(tmp_path)
    assert listing.ok and listing.desired == {} and listing.invalid_files == []
    assert listing.ignored == [path] and listing.files == []
    assert not is_manifest_name(entry)


@pytest.mark.parametrize("entry", ["web.yaml", "web.yml", "web.json", "10-web.yaml", "web.dpkg.yaml"])
def test_manifest_names(entry: str) -> None:
    assert is_manifest_name(entry)


def test_hidden_manifests_are_ignored_even_with_a_manifest_suffix(tmp_path: Path) -> None:
    write(tmp_path, ".web.yaml", doc("hidden"))
    write(tmp_path, "web.yaml", doc("web"))
    assert list(listing_of(tmp_path).desired) == ["web"]


def test_subdirectories_are_ignored_not_recursed(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "inner.yaml", doc("inner"))
    (tmp_path / "dir.yaml").mkdir()
    listing = listing_of(tmp_path)
    assert listing.desired == {} and listing.invalid_files == [] and listing.files == []
    assert listing.ignored == [str(tmp_path / "dir.yaml"), str(tmp_path / "sub")]


# ---------------------------------------------------------------------------------------------
# Symbolic links
# ---------------------------------------------------------------------------------------------

def test_symlinks_are_followed_and_listed_under_their_own_name(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere, "real.yaml", doc("web"))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").symlink_to(elsewhere / "real.yaml")
    assert listing_of(manifests).desired["web"].manifest == str(manifests / "web.yaml")


def test_a_dangling_symlink_is_an_invalid_file(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").symlink_to(tmp_path / "gone.yaml")
    listing = listing_of(tmp_path)
    path = str(tmp_path / "web.yaml")
    assert listing.ok and listing.desired == {}
    assert listing.invalid_files == [InvalidDocument(
        manifest=path, document=0, name=None, message=f"{path}: dangling symbolic link to {tmp_path / 'gone.yaml'}",
        errors=(f"dangling symbolic link to {tmp_path / 'gone.yaml'}",),
    )]


def test_a_configmap_data_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes' AtomicWriter: files live in a timestamped dir, `..data` points at it, and each
    visible name is a symlink through `..data`; an update swaps `..data` with one rename."""
    old = tmp_path / "..2026_01_01_00_00_00.000000001"
    old.mkdir()
    write(old, "web.yaml", doc("web", resources={"cpus": 0.5}))
    (tmp_path / "..data").symlink_to(old.name)
    (tmp_path / "web.yaml").symlink_to("..data/web.yaml")

    source = ManifestSource(str(tmp_path))
    first = source.list()
    assert first.desired["web"].spec.resources.cpus == 0.5
    assert first.files == [str(tmp_path / "web.yaml")]
    assert str(tmp_path / "..data") in first.ignored and str(old) in first.ignored  # dot-entries

    new = tmp_path / "..2026_01_02_00_00_00.000000002"
    new.mkdir()
    write(new, "web.yaml", doc("web", resources={"cpus": 2}))
    (tmp_path / "..data_tmp").symlink_to(new.name)
    os.rename(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap
    for leftover in old.iterdir():
        leftover.unlink()
    old.rmdir()

    second = source.list()
    assert second.desired["web"].spec.resources.cpus == 2.0
    assert second.desired["web"].spec_hash != first.desired["web"].spec_hash
    assert second.desired["web"].resources_free_hash == first.desired["web"].resources_free_hash


# ---------------------------------------------------------------------------------------------
# Invalid manifests
# ---------------------------------------------------------------------------------------------

def test_an_invalid_document_with_a_readable_name_is_invalid_under_that_name(tmp_path: Path) -> None:
    path = write(tmp_path, "web.yaml", doc("web", resurces={"cpus": 1}))
    listing = listing_of(tmp_path)
    assert listing.desired == {}
    assert listing.invalid == {"web": InvalidDocument(
        manifest=path, document=0, name="web",
        message=f"{path}: document 0: spec.resurces: unknown field (did you mean 'resources'?) (line 6, column 3)",
        errors=("spec.resurces: unknown field (did you mean 'resources'?) (line 6, column 3)",),
    )}


def test_all_errors_of_a_document_are_joined_in_one_message(tmp_path: Path) -> None:
    path = write(tmp_path, "web.yaml", doc(
        "web",
        resources={"mem": "12Mb"},
        container={"volumes": [{"container_path": "/data", "host_path": "../up"}, {"container_path": "data"}]},
    ))
    invalid = listing_of(tmp_path).invalid["web"]
    # The values are never quoted (the file may be a link to a secret); the line and column say where.
    assert invalid.message == (
        f"{path}: document 0: "
        "spec.resources.mem: invalid quantity '…': unit '…' is not one of Ki, Mi, Gi, Ti (line 7, column 10); "
        "spec.container.volumes[0].host_path: relative host_path '…' must not contain a '..' component "
        "(it is a path in the sandbox) (line 11, column 18); "
        "spec.container.volumes[1].container_path: container_path '…' must be an absolute path (line 12, column 23)"
    )
    assert len(invalid.errors) == 3


def test_the_document_index_is_in_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, "all.yaml", doc("one"), doc("two", restart_policy="Sometimes"))
    listing = listing_of(tmp_path)
    assert list(listing.desired) == ["one"]
    assert listing.invalid["two"].document == 1
    assert listing.invalid["two"].message == (
        f"{path}: document 1: spec.restart_policy: Input should be 'Always', 'OnFailure' or 'Never', got a string "
        "(line 14, column 19)")


def test_a_document_without_a_name_is_an_invalid_file(tmp_path: Path) -> None:
    d = doc("x")
    del d["metadata"]["name"]
    path = write(tmp_path, "web.yaml", d)
    listing = listing_of(tmp_path)
    assert listing.invalid == {} and listing.desired == {}
    assert [(e.manifest, e.document, e.name, e.message) for e in listing.invalid_files] == [
        (path, 0, None, f"{path}: document 0: metadata.name: field required (line 3, column 11)")]


def test_a_name_that_is_not_a_dns_label_cannot_name_a_status_file(tmp_path: Path) -> None:
    path = write(tmp_path, "web.yaml", doc("../../etc/passwd"))
    listing = listing_of(tmp_path)
    assert listing.invalid == {}
    assert listing.invalid_files[0].name is None
    assert listing.invalid_files[0].message.startswith(f"{path}: document 0: metadata.name: name '…' is not")


@pytest.mark.parametrize("text, found", [("- a\n- b\n", "a list"), ("just words\n", "a string"), ("42\n", "an integer")])
def test_a_document_that_is_not_a_mapping_is_an_invalid_file(tmp_path: Path, text: str, found: str) -> None:
    path = write(tmp_path, "web.yaml", text)
    assert [e.message for e in listing_of(tmp_path).invalid_files] == [
        f"{path}: document 0: expected a mapping with apiVersion, kind, metadata and spec, got {found} (line 1, column 1)"]


def test_a_yaml_syntax_error_invalidates_the_whole_file(tmp_path: Path) -> None:
    # The first document is fine, but a file that ends in garbage may be half-written.
    text = yaml.safe_dump(doc("one")) + "---\napiVersion: reconciler/v1\nkind: [Container\n"
    path = write(tmp_path, "web.yaml", text)
    listing = listing_of(tmp_path)
    assert listing.desired == {} and listing.invalid == {}
    [error] = listing.invalid_files
    assert error.name is None
    assert re.fullmatch(rf"{re.escape(path)}: document 1: invalid YAML at line \d+, column \d+: .+", error.message), error.message


def test_a_repeated_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = ("apiVersion: reconciler/v1\nkind: Container\nmetadata: {name: web}\nspec:\n"
            "  resources: {cpus: 1}\n  command: {value: x}\n  resources: {cpus: 2}\n")
    path = write(tmp_path, "web.yaml", text)
    assert [e.message for e in listing_of(tmp_path).invalid_files] == [
        f"{path}: document 0: invalid YAML at line 7, column 3: while constructing a mapping: found duplicate key 'resources'"]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = ("apiVersion: reconciler/v1\nkind: Container\nmetadata: {name: web}\nspec:\n"
            "  resources: &small {cpus: 1, mem: 64}\n  command: {value: x}\n"
            "  node_selector: {<<: {rack: r1}, rack: r2}\n")
    write(tmp_path, "web.yaml", text)
    listing = listing_of(tmp_path, node_attributes={"rack": "r2"})
    assert listing.desired["web"].spec.node_selector == {"rack": "r2"}


def test_json_syntax_errors_are_json_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", '{"apiVersion": "reconciler/v1",\n "kind": }')
    assert [e.message for e in listing_of(tmp_path).invalid_files] == [
        f"{path}: document 0: invalid JSON at line 2, column 10: Expecting value"]


def test_json_repeated_keys_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", '{"kind": "Container", "kind": "Container"}')
    assert [e.message for e in listing_of(tmp_path).invalid_files] == [f"{path}: document 0: invalid JSON: duplicate key 'kind'"]


def test_a_json_file_is_one_document(tmp_path: Path) -> None:
    path = write(tmp_path, "web.json", json.dumps([doc("a"), doc("b")]))
    assert [e.message for e in listing_of(tmp_path).invalid_files] == [
        f"{path}: document 0: expected a mapping with apiVersion, kind, metadata and spec, got a list (line 1, column 1)"]


def test_text_that_is_not_utf8_is_an_invalid_file(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_bytes(b"apiVersion: \xff\xfe\xfa\n")
    [error] = listing_of(tmp_path).invalid_files
    assert error.message == f"{tmp_path / 'web.yaml'}: document 0: not UTF-8 text: invalid leading UTF-8 octet at byte 12"


def test_files_over_1_mib_are_invalid_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    write(tmp_path, "web.yaml", doc("web"))
    listing = listing_of(tmp_path)
    assert list(listing.desired) == ["web"]
    assert [e.message for e in listing.invalid_files] == [
        f"{big}: file is {MAX_MANIFEST_BYTES + 1} bytes, over the 1 MiB limit for a manifest"]


def test_a_fifo_does_not_hang_the_listing(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "web.yaml")
    result: list[Listing] = []
    thread = threading.Thread(target=lambda: result.append(listing_of(tmp_path)), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert result, "listing a directory with a FIFO hung"
    assert [e.message for e in result[0].invalid_files] == [f"{tmp_path / 'web.yaml'}: not a regular file"]


@pytest.mark.skipif(not PERMISSIONS_ENFORCED, reason="this process reads files whatever their mode (CAP_DAC_OVERRIDE)")
def test_an_unreadable_file_is_an_invalid_file_until_it_becomes_readable(tmp_path: Path) -> None:
    path = write(tmp_path, "web.yaml", doc("web"))
    os.chmod(path, 0)
    source = ManifestSource(str(tmp_path))
    assert [e.message for e in source.list().invalid_files] == [f"{path}: cannot read: Permission denied"]
    os.chmod(path, 0o644)  # changes no part of the cache key: the error must not have been cached
    assert list(source.list().desired) == ["web"]


# ---------------------------------------------------------------------------------------------
# Names across files
# ---------------------------------------------------------------------------------------------

def test_the_lexically_first_declaration_of_a_name_wins(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", doc("web", restart_policy="Never"))
    second = write(tmp_path, "b.yaml", doc("web"))
    listing = listing_of(tmp_path)
    assert listing.desired["web"].manifest == first
    assert listing.desired["web"].spec.restart_policy == "Never"
    assert listing.duplicates == [InvalidDocument(
        manifest=second, document=0, name="web",
        message=f"{second}: document 0: metadata.name: duplicate name, declared in {first} (document 0)",
        errors=(f"metadata.name: duplicate name, declared in {first} (document 0)",),
    )]


def test_duplicates_within_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, "all.yaml", doc("web"), doc("web", restart_policy="Never"))
    listing = listing_of(tmp_path)
    assert listing.desired["web"].document == 0
    assert [d.message for d in listing.duplicates] == [
        f"{path}: document 1: metadata.name: duplicate name, declared in {path} (document 0)"]


def test_an_invalid_first_declaration_keeps_the_name(tmp_path: Path) -> None:
    # Otherwise breaking a.yaml would silently switch the running container to b.yaml's spec.
    first = write(tmp_path, "a.yaml", doc("web", restart_policy="Sometimes"))
    second = write(tmp_path, "b.yaml", doc("web"))
    listing = listing_of(tmp_path)
    assert listing.desired == {}
    assert listing.invalid["web"].manifest == first
    assert [d.manifest for d in listing.duplicates] == [second]


def test_lexical_order_is_by_entry_name(tmp_path: Path) -> None:
    write(tmp_path, "10-web.yaml", doc("web", restart_policy="Never"))
    write(tmp_path, "9-web.yaml", doc("web", restart_policy="OnFailure"))
    assert listing_of(tmp_path).desired["web"].spec.restart_policy == "Never"  # "1" < "9"


def test_every_document_lands_in_exactly_one_place(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", doc("web"), doc("db", node_selector={"rack": "r9"}), doc("bad", restart_policy="x"))
    write(tmp_path, "b.yaml", doc("web"), "- not a manifest")
    write(tmp_path, "c.yaml", "kind: [")
    listing = listing_of(tmp_path, node_attributes={"rack": "r1"})
    places = ([(c.manifest, c.document) for c in listing.desired.values()]
              + [(c.manifest, c.document) for c in listing.not_selected.values()]
              + [(i.manifest, i.document) for i in listing.invalid.values()]
              + [(i.manifest, i.document) for i in [*listing.duplicates, *listing.invalid_files]])
    a, b, c = (str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml"))
    assert sorted(places) == [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1), (c, 0)]


# ---------------------------------------------------------------------------------------------
# Node selection and the default ContainerInfo
# ---------------------------------------------------------------------------------------------

def test_node_selector_decides_where_a_container_is_desired(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", doc("anywhere"))
    write(tmp_path, "b.yaml", doc("rack-one", node_selector={"rack": "r1"}))
    write(tmp_path, "c.yaml", doc("rack-one-ssd", node_selector={"rack": "r1", "disk": "ssd"}))
    write(tmp_path, "d.yaml", doc("rack-two", node_selector={"rack": "r2"}))

    here = listing_of(tmp_path, node_attributes={"rack": "r1", "zone": "z"})
    assert list(here.desired) == ["anywhere", "rack-one"]
    assert list(here.not_selected) == ["rack-one-ssd", "rack-two"]
    assert here.invalid == {} and here.invalid_files == [] and here.duplicates == []

    nowhere = listing_of(tmp_path)  # a node without attributes runs only unselective manifests
    assert list(nowhere.desired) == ["anywhere"]


def test_a_name_declared_for_another_node_is_still_taken(tmp_path: Path) -> None:
    # `reconciler validate` has no node; names must be unique whatever the node.
    write(tmp_path, "a.yaml", doc("web", node_selector={"rack": "r2"}))
    second = write(tmp_path, "b.yaml", doc("web", node_selector={"rack": "r1"}))
    listing = listing_of(tmp_path, node_attributes={"rack": "r1"})
    assert listing.desired == {}
    assert [d.manifest for d in listing.duplicates] == [second]


def test_default_container_info_fills_in_a_missing_container(tmp_path: Path) -> None:
    default = ContainerInfo.model_validate({"linux_info": {"share_pid_namespace": False}, "hostname": "node"})
    write(tmp_path, "a.yaml", doc("plain"))
    write(tmp_path, "b.yaml", doc("own", container={"hostname": "own"}))
    without = listing_of(tmp_path)
    listing = listing_of(tmp_path, default_container_info=default)
    assert listing.desired["plain"].spec.container == default
    assert listing.desired["own"].spec.container == ContainerInfo(hostname="own")
    # Hashed with the default: changing --default_container_info replaces what it applies to.
    assert listing.desired["plain"].spec_hash == spec_hash(listing.desired["plain"].spec)
    assert listing.desired["plain"].spec_hash != without.desired["plain"].spec_hash
    assert listing.desired["own"].spec_hash == without.desired["own"].spec_hash


# ---------------------------------------------------------------------------------------------
# The parse cache
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths parsed since the fixture was set up."""
    seen: list[str] = []
    real = source_module._parse_file

    def counting(path: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(source_module, "_parse_file", counting)
    return seen


def test_a_relisting_does_not_reread_unchanged_files(tmp_path: Path, parses: list[str]) -> None:
    for i in range(50):
        write(tmp_path, f"c{i:02}.yaml", doc(f"c{i:02}"))
    write(tmp_path, "broken.yaml", "kind: [")
    source = ManifestSource(str(tmp_path))
    first = source.list()
    assert len(parses) == 51

    parses.clear()
    second = source.list()
    assert parses == []
    assert second.desired == first.desired and second.invalid_files == first.invalid_files

    changed = write(tmp_path, "c07.yaml", doc("c07", restart_policy="Never"))
    os.utime(changed, ns=(1, 1))  # a different mtime whatever the clock's granularity
    (tmp_path / "c08.yaml").unlink()
    parses.clear()
    third = source.list()
    assert parses == [changed]
    assert third.desired["c07"].spec.restart_policy == "Never"
    assert "c08" not in third.desired


def test_a_same_size_rewrite_is_noticed(tmp_path: Path) -> None:
    path = write(tmp_path, "web.yaml", doc("web", restart_policy="Never"))
    source = ManifestSource(str(tmp_path))
    assert source.list().desired["web"].spec.restart_policy == "Never"
    text = Path(path).read_text().replace("Never", "Nevrr")  # same length
    Path(path).write_text(text)
    os.utime(path, ns=(2, 2))
    assert source.list().invalid["web"].errors[0].startswith("spec.restart_policy:")


def test_a_file_removed_and_restored_is_parsed_again(tmp_path: Path, parses: list[str]) -> None:
    path = write(tmp_path, "web.yaml", doc("web"))
    source = ManifestSource(str(tmp_path))
    source.list()
    os.rename(path, tmp_path / "web.yaml.bak")
    assert source.list().desired == {}
    os.rename(tmp_path / "web.yaml.bak", path)
    parses.clear()
    assert list(source.list().desired) == ["web"]
    assert parses == [path]  # the cache entry went with the file


# ---------------------------------------------------------------------------------------------
# validate_paths (reconciler validate)
# ---------------------------------------------------------------------------------------------

def test_validate_reports_every_error_in_order(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    a = write(d, "a.yaml", doc("web"), doc("bad", resurces={}))
    write(d, "notes.txt", "not a manifest, not read")
    b = write(d, "b.yaml", doc("web"))
    odd = write(tmp_path, "extra.manifest", doc("db", restart_policy="Sometimes"))
    missing = str(tmp_path / "missing.yaml")

    errors = validate_paths([str(d), odd, missing])
    assert [e.message for e in errors] == [
        f"{a}: document 1: spec.resurces: unknown field (did you mean 'resources'?) (line 14, column 3)",
        f"{b}: document 0: metadata.name: duplicate name, declared in {a} (document 0)",
        f"{odd}: document 0: spec.restart_policy: Input should be 'Always', 'OnFailure' or 'Never', got a string "
        "(line 6, column 19)",
        f"{missing}: does not exist",
    ]


def test_validate_finds_duplicates_across_arguments(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", doc("web"))
    b = write(tmp_path, "b.yaml", doc("web"))
    assert [e.message for e in validate_paths([b, a])] == [
        f"{a}: document 0: metadata.name: duplicate name, declared in {b} (document 0)"]


def test_validate_does_not_count_a_file_given_twice_as_a_duplicate(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", doc("web"))
    assert validate_paths([str(tmp_path), a, a]) == []


def test_validate_ignores_node_selectors(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", doc("web", node_selector={"rack": "nowhere"}))
    assert validate_paths([str(tmp_path)]) == []


# ---------------------------------------------------------------------------------------------
# StrictModes (--manifests_strict_modes): only root and the agent's user may write what it runs
# ---------------------------------------------------------------------------------------------

OTHER_UID = 65534   # nobody: "another user of this machine"
HINT = ("make it owned by root or the agent's user and writable by no one else (chown root; chmod go-w), "
        "or set --manifests_strict_modes=false")


def owner_of(uid: int) -> str:
    import pwd
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


ME = owner_of(os.geteuid())


def manifests_dir(tmp_path: Path, mode: int = 0o755) -> Path:
    m = tmp_path / "m"
    m.mkdir()
    write(m, "web.yaml", doc("web"))
    os.chmod(m, mode)
    return m


def test_a_directory_others_can_write_is_refused_as_an_unreadable_one(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path, 0o777)
    listing = listing_of(m)
    assert (listing.ok, listing.desired, listing.files) == (False, {}, [])   # nothing to destroy by
    assert listing.error == (f"manifest directory {m} refused: {m} (owner {ME}, mode 0777) is writable by group "
                             f"and others; {HINT}")
    os.chmod(m, 0o775)
    assert listing_of(m).error.endswith(f"{m} (owner {ME}, mode 0775) is writable by its group; {HINT}")
    os.chmod(m, 0o1777)   # the manifest directory itself gets no sticky-bit exception: anyone could add a file
    assert listing_of(m).ok is False
    assert list(listing_of(m, strict_modes=False).desired) == ["web"]


def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path)
    os.chown(m, OTHER_UID, -1)
    listing = listing_of(m)
    assert listing.ok is False
    assert listing.error == (f"manifest directory {m} refused: {m} (owner {owner_of(OTHER_UID)}, mode 0755) is owned "
                             f"by a user other than root and the agent's user; {HINT}")


def test_an_ancestor_others_can_write_is_refused_unless_sticky_above_our_own_child(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                       # anyone could rename m away and put their own in its place
    m = manifests_dir(shared)
    assert listing_of(m).error == (f"manifest directory {m} refused: {shared} (owner {ME}, mode 0777) is writable by "
                                   f"group and others; {HINT}")
    # As /tmp: with the sticky bit, others cannot rename or remove what they do not own.
    os.chmod(shared, 0o1777)
    assert list(listing_of(m).desired) == ["web"]
    # ... but what they own they can: a directory of theirs on the way is theirs to swap.
    theirs = shared / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, -1)
    m2 = manifests_dir(theirs)
    assert listing_of(m2).error.startswith(f"manifest directory {m2} refused: {shared} (owner {ME}, mode 1777)")
    # And a link on the way is judged where it leads: every directory its target is looked up in.
    (tmp_path / "via").symlink_to(m2)
    assert listing_of(tmp_path / "via").error.startswith(f"manifest directory {tmp_path / 'via'} refused: {shared}")


def test_a_file_others_can_write_is_an_invalid_file_that_protects_its_names(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path)
    loose = write(m, "loose.yaml", doc("loose"))
    os.chmod(loose, 0o666)
    theirs = write(m, "theirs.yaml", doc("theirs"))
    os.chown(theirs, OTHER_UID, -1)
    listing = listing_of(m)
    assert listing.ok and list(listing.desired) == ["web"] and listing.invalid == {}
    assert [(e.manifest, e.name, e.message) for e in listing.invalid_files] == [
        (loose, None, f"{loose}: refused: the file (owner {ME}, mode 0666) is writable by group and others; {HINT}"),
        (theirs, None, f"{theirs}: refused: the file (owner {owner_of(OTHER_UID)}, mode 0644) is owned by a user other "
                       f"than root and the agent's user; {HINT}"),
    ]
    assert sorted(listing_of(m, strict_modes=False).desired) == ["loose", "theirs", "web"]


def test_a_chmod_alone_is_noticed_on_the_next_listing(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path)
    source = ManifestSource(str(m))
    assert list(source.list().desired) == ["web"]
    os.chmod(m / "web.yaml", 0o646)                    # neither size nor mtime change: the parse cache must not hide it
    listing = source.list()
    assert listing.desired == {} and [e.manifest for e in listing.invalid_files] == [str(m / "web.yaml")]
    os.chmod(m / "web.yaml", 0o644)
    assert list(source.list().desired) == ["web"]


def test_a_link_is_judged_by_every_directory_on_its_way(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path)
    drop = tmp_path / "drop"                            # a directory another user can write
    drop.mkdir()
    os.chmod(drop, 0o777)
    write(drop, "db.yaml", doc("db"))                   # root's file, but in a directory anyone may swap it in
    (m / "db.yaml").symlink_to(drop / "db.yaml")
    # A ConfigMap volume: links through `..data` to a timestamped directory, all root's.
    stamped = m / "..2026_01_01_00_00_00.000000001"
    stamped.mkdir()
    write(stamped, "cm.yaml", doc("cm"))
    (m / "..data").symlink_to(stamped.name)
    (m / "cm.yaml").symlink_to("..data/cm.yaml")
    listing = listing_of(m)
    assert sorted(listing.desired) == ["cm", "web"]
    assert [e.message for e in listing.invalid_files] == [
        f"{m / 'db.yaml'}: refused: {drop} (owner {ME}, mode 0777) is writable by group and others; {HINT}"]


def test_validate_refuses_what_the_agent_refuses(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path, 0o777)
    loose = write(tmp_path, "loose.yaml", doc("loose"))
    os.chmod(loose, 0o666)
    errors = validate_paths([str(m), loose])
    assert [e.message for e in errors] == [
        f"{m}: manifest directory refused: {m} (owner {ME}, mode 0777) is writable by group and others; {HINT}",
        f"{loose}: refused: the file (owner {ME}, mode 0666) is writable by group and others; {HINT}"]
    assert validate_paths([str(m), loose], strict_modes=False) == []
    cli = [sys.executable, "-m", "reconciler", "validate", str(m), loose]
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stdout.count("refused") == 2, refused
    relaxed = subprocess.run([*cli, "--manifests_strict_modes=false"], capture_output=True, text=True, timeout=60)
    assert (relaxed.returncode, relaxed.stdout) == (0, ""), relaxed
    bad = subprocess.run([*cli, "--manifests_strict_modes=perhaps"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("reconciler validate: flag --manifests_strict_modes: ")


READ_ONLY_VIEWS = r"""
import json, os, subprocess, sys
from reconciler.source import ManifestSource
tmp = sys.argv[1]
doc = '{"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web"}, "spec": {"command": {"value": "true"}}}'
def populate(directory):
    os.makedirs(directory)
    with open(os.path.join(directory, "web.yaml"), "w") as f:
        f.write(doc)
    os.chmod(os.path.join(directory, "web.yaml"), 0o666)
    os.chown(os.path.join(directory, "web.yaml"), 65534, -1)
    os.chmod(directory, 0o777)
    os.chown(directory, 65534, -1)
out = {}
# A ConfigMap volume as the kubelet mounts it: 0777, read-only, no writable view of it here.
volume = os.path.join(tmp, "volume")
os.makedirs(volume)
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", volume], check=True)
populate(os.path.join(volume, "m"))
subprocess.run(["mount", "-o", "remount,ro", volume], check=True)
listing = ManifestSource(os.path.join(volume, "m")).list()
out["configmap"] = [listing.ok, sorted(listing.desired), listing.error]
# A read-only bind of a directory anyone can still write through another path: refused.
populate(os.path.join(tmp, "open"))
view = os.path.join(tmp, "view")
os.makedirs(view)
subprocess.run(["mount", "--bind", os.path.join(tmp, "open"), view], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", view], check=True)
listing = ManifestSource(view).list()
out["bind"] = [listing.ok, sorted(listing.desired), listing.error]
print(json.dumps(out))
"""


@pytest.mark.root
def test_a_read_only_view_nobody_here_can_write_is_trusted(tmp_path: Path) -> None:
    # In a mount namespace of its own: every mount goes with the process.
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", READ_ONLY_VIEWS,
                             str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["configmap"] == [True, ["web"], None]
    ok, desired, error = out["bind"]
    assert (ok, desired) == (False, [])
    assert error.startswith(f"manifest directory {tmp_path / 'view'} refused: {tmp_path / 'view'} (owner "), error


# ---------------------------------------------------------------------------------------------
# No message quotes a file: a link to a secret yields its name, line and column, never its bytes
# ---------------------------------------------------------------------------------------------

TOKEN = "S3cr3t-Token-4f9a2c71"
SECRET_SHAPES = {
    # /etc/shadow's shape: one plain scalar.
    "shadow.yaml": f"root:{TOKEN}:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n",
    # credentials as YAML: the secret in a value, and as a key.
    "creds.yaml": f"password: {TOKEN}\n{TOKEN}: x\n",
    # every field a validator quotes, each holding the secret.
    "every-field.yaml": json.dumps({
        "apiVersion": TOKEN, "kind": TOKEN, "metadata": {"name": TOKEN, "labels": {"a": [TOKEN]}},
        "spec": {"restart_policy": TOKEN, "kill_grace_period": TOKEN, "resources": {"mem": TOKEN, "cpus": TOKEN},
                 "command": {"value": "x", "user": TOKEN, "environment": {"variables": [{"name": f"{TOKEN}=", "type": TOKEN}]}},
                 "node_selector": {"k": [TOKEN]},
                 "container": {"type": TOKEN, "hostname": TOKEN, "volumes": [
                     {"container_path": TOKEN, "host_path": f"../{TOKEN}", "mode": TOKEN},
                     {"container_path": f"/{TOKEN}", "host_path": "a"}, {"container_path": f"/{TOKEN}/x", "host_path": "b"}],
                     "linux_info": {"capability_info": {"capabilities": [f"CAP_{TOKEN}", TOKEN]}},
                     "rlimit_info": {"rlimits": [{"type": f"RLIMIT_{TOKEN}"}, {"type": TOKEN}]}}}}),
    # a valid name, so an Invalid status file is written, with the secret in the values.
    "named.yaml": json.dumps({"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "leaky"},
                              "spec": {"restart_policy": TOKEN, "command": {"value": "x"},
                                       "container": {"hostname": f"{TOKEN}!", "type": TOKEN}}}),
    # what PyYAML's composer and constructors quote: tags, anchors, tagged values, duplicate keys.
    "tags.yaml": f"a: !{TOKEN} x\n",
    "alias.yaml": f"a: *{TOKEN}\n",
    "int.yaml": f"a: !!int {TOKEN}\n",
    "timestamp.yaml": f"a: !!timestamp {TOKEN}\n",
    "bool.yaml": f"a: !!bool {TOKEN}\n",
    "dupe.yaml": f"{TOKEN}: 1\n{TOKEN}: 2\n",
    "syntax.yaml": f"a: [{TOKEN}\nb: \"{TOKEN}\\q\"\n",
    "dupe.json": f'{{"{TOKEN}": 1, "{TOKEN}": 2}}',
    "syntax.json": f'{{"a": "{TOKEN}", }}',
    "list.json": json.dumps([TOKEN]),
    "binary.yaml": f"a: !!binary {TOKEN}\n",
    "not-utf8.yaml": f"a: {TOKEN}\xff",
}


def plant_secret_links(tmp_path: Path, m: Path) -> list[Path]:
    """Root-only files (0600) holding the token in every shape, each linked from the manifest directory."""
    secrets_dir = tmp_path / "host-secrets"
    secrets_dir.mkdir(mode=0o700)
    targets = []
    for name, text in SECRET_SHAPES.items():
        target = root_only_file(secrets_dir / name, text.encode("latin-1" if "\xff" in text else "utf-8"))
        (m / name).symlink_to(target)
        targets.append(target)
    return targets


def test_no_message_quotes_the_content_of_a_linked_secret(tmp_path: Path) -> None:
    m = manifests_dir(tmp_path, 0o777)                   # relaxed modes: anyone could have planted the links
    plant_secret_links(tmp_path, m)
    listing = listing_of(m, strict_modes=False)
    messages = [e.message for e in [*listing.invalid_files, *listing.invalid.values(), *listing.duplicates]]
    assert len(messages) == len(SECRET_SHAPES), messages
    for message in messages:
        assert TOKEN not in message and TOKEN.lower() not in message.lower(), message
        assert "4f9a2c71" not in message and "S3cr3t" not in message, message
    # What is kept: the file, the document, the field path, the line and column, the reason.
    named = listing.invalid["leaky"].message
    assert named.startswith(f"{m / 'named.yaml'}: document 0: spec.restart_policy: Input should be 'Always', "
                            "'OnFailure' or 'Never', got a string (line 1, column "), named
    assert "spec.container.type: only MESOS containers are supported, got '…'" in named, named
    creds = next(message for message in messages if "creds.yaml" in message)
    assert "unknown top-level field; expected one of: apiVersion, kind, metadata, spec (line 2, column 1)" in creds
    # validate, strict or not, prints none of it either.
    for strict in (True, False):
        printed = "\n".join(e.message for e in validate_paths([str(m)], strict_modes=strict))
        assert TOKEN not in printed and "4f9a2c71" not in printed
    shown = subprocess.run([sys.executable, "-m", "reconciler", "validate", "--manifests_strict_modes=false", str(m),
                            *[str(m / name) for name in SECRET_SHAPES]], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and "every-field.yaml" in shown.stdout
    assert "4f9a2c71" not in shown.stdout + shown.stderr


# ---------------------------------------------------------------------------------------------
# The example manifests shipped in manifests/
# ---------------------------------------------------------------------------------------------

def test_the_example_manifests_are_valid() -> None:
    assert validate_paths([str(REPO / "manifests")]) == []
    listing = ManifestSource(str(REPO / "manifests")).list()
    assert listing.ok and listing.invalid_files == [] and listing.invalid == {}
    assert sorted(listing.desired) == ["batch-job", "web"]

    web = listing.desired["web"].spec
    assert web.restart_policy == "Always" and web.container is None
    assert (web.resources.cpus, web.resources.mem) == (0.1, 64.0)
    assert web.command.value is not None and "http.server 8080" in web.command.value

    job = listing.desired["batch-job"].spec
    assert job.restart_policy == "OnFailure" and job.container is None


def test_the_commented_container_block_in_web_yaml_is_valid_when_uncommented(tmp_path: Path) -> None:
    lines = (REPO / "manifests" / "web.yaml").read_text().splitlines()
    start = lines.index("  # container:")
    uncommented = lines[:start] + [line.replace("# ", "", 1) for line in lines[start:]]
    write(tmp_path, "web.yaml", "\n".join(uncommented) + "\n")
    listing = listing_of(tmp_path)
    assert listing.invalid == {} and listing.invalid_files == []
    info = listing.desired["web"].spec.container
    assert info is not None
    assert [v.container_path for v in info.volumes] == ["/tmp", "/etc/ssl"]
    assert info.rlimit_info is not None and info.rlimit_info.rlimits[0].type == "RLMT_NOFILE"
