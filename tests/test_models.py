"""The manifest and status models: what an operator may write, and what the errors say."""

from __future__ import annotations

import copy
import json
import re
import resource
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from reconciler.models import (
    CAPABILITY_NUMBERS,
    RLIMIT_NUMBERS,
    AgentStatus,
    ContainerInfo,
    ContainerSpec,
    ContainerStatus,
    Manifest,
    ResourceStatistics,
    SourceStatus,
    spec_hash,
    spec_hash_without_resources,
)
from reconciler.source import validation_messages


def manifest(**spec: Any) -> dict[str, Any]:
    spec.setdefault("command", {"value": "sleep 1000"})
    return {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web"}, "spec": spec}


def errors(doc: dict[str, Any], root: type[BaseModel] = Manifest) -> list[str]:
    """The operator-facing messages for an invalid document; fails if it is valid."""
    with pytest.raises(ValidationError) as info:
        root.model_validate(doc)
    return validation_messages(info.value, root)


def container(**info: Any) -> dict[str, Any]:
    return manifest(container=info)


# ---------------------------------------------------------------------------------------------
# Manifest basics
# ---------------------------------------------------------------------------------------------

def test_minimal_manifest_gets_mesos_defaults() -> None:
    m = Manifest.model_validate(manifest())
    assert m.metadata.labels == {}
    assert m.spec.restart_policy == "Always"
    assert m.spec.kill_grace_period == 10.0
    assert m.spec.node_selector == {}
    assert m.spec.resources.cpus is None and m.spec.resources.mem is None and m.spec.resources.disk is None
    assert m.spec.command.shell is True
    assert m.spec.command.arguments == []
    assert m.spec.container is None


SPEC_EXAMPLE = """
apiVersion: reconciler/v1
kind: Container
metadata:
  name: web
  labels: {team: infra}
spec:
  node_selector: {rack: r1}
  restart_policy: Always
  kill_grace_period: 10secs
  resources: {cpus: 0.5, mem: 128, disk: 1024}
  command:
    shell: true
    value: "exec python3 -m http.server 8080"
    arguments: []
    environment: {variables: [{name: MODE, value: prod}]}
    user: nobody
  container:
    type: MESOS
    hostname: web
    mesos:
      image: {type: DOCKER, docker: {name: "busybox:latest"}}
    volumes:
      - {container_path: /tmp, host_path: tmp, mode: RW}
      - {container_path: /etc/ssl, host_path: /etc/ssl, mode: RO}
    linux_info:
      share_pid_namespace: false
      capability_info: {capabilities: [NET_BIND_SERVICE]}
    rlimit_info:
      rlimits: [{type: RLMT_NOFILE, soft: 1024, hard: 4096}]
"""


def test_the_spec_example_manifest_is_valid() -> None:
    m = Manifest.model_validate(yaml.load(SPEC_EXAMPLE, Loader=yaml.CSafeLoader))
    assert m.spec.container is not None
    assert m.spec.container.mesos is not None and m.spec.container.mesos.image is not None
    assert m.spec.container.mesos.image.docker.name == "busybox:latest"
    assert [v.mode for v in m.spec.container.volumes] == ["RW", "RO"]
    assert m.spec.command.environment is not None
    assert m.spec.command.environment.variables[0].type == "VALUE"
    assert m.spec.command.user == "nobody"


def test_manifest_round_trips_through_its_json_dump() -> None:
    m = Manifest.model_validate(yaml.load(SPEC_EXAMPLE, Loader=yaml.CSafeLoader))
    assert Manifest.model_validate(m.model_dump(mode="json")) == m


def test_unknown_field_is_an_error_naming_its_path_with_a_suggestion() -> None:
    assert errors(manifest(resurces={"cpus": 1})) == ["spec.resurces: unknown field (did you mean 'resources'?)"]


def test_unknown_field_without_a_close_match_lists_the_known_fields() -> None:
    assert errors(container(volumes=[{"container_path": "/x", "zzz": 1}])) == [
        "spec.container.volumes[0].zzz: unknown field; expected one of: container_path, host_path, mode"
    ]


def test_unknown_top_level_field() -> None:
    doc = manifest()
    doc["status"] = {}
    assert errors(doc) == ["status: unknown field; expected one of: apiVersion, kind, metadata, spec"]


def test_missing_required_fields_are_named() -> None:
    assert errors({"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "web"}, "spec": {}}) == [
        "spec.command: field required"
    ]


def test_api_version_and_kind_are_checked() -> None:
    doc = manifest()
    doc["apiVersion"], doc["kind"] = "v1", "Pod"
    assert errors(doc) == [
        "apiVersion: Input should be 'reconciler/v1', got 'v1'",
        "kind: Input should be 'Container', got 'Pod'",
    ]


def test_manifest_models_are_immutable() -> None:
    # The source's parse cache shares these objects between listings.
    m = Manifest.model_validate(manifest())
    with pytest.raises(ValidationError):
        m.spec.restart_policy = "Never"


# ---------------------------------------------------------------------------------------------
# Names and labels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["web", "a", "0", "web-2", "2-web", "a" * 63])
def test_dns1123_labels_are_valid_names(name: str) -> None:
    doc = manifest()
    doc["metadata"]["name"] = name
    assert Manifest.model_validate(doc).metadata.name == name


@pytest.mark.parametrize("name", ["Web", "-web", "web-", "we_b", "a.b", "", "../etc", "web "])
def test_names_that_are_not_dns1123_labels_are_rejected(name: str) -> None:
    doc = manifest()
    doc["metadata"]["name"] = name
    assert errors(doc) == [
        f"metadata.name: name {name!r} is not a DNS-1123 label: use lowercase letters, digits and '-', "
        "starting and ending with a letter or digit (e.g. 'web', 'batch-job-2')"
    ]


def test_a_name_longer_than_63_characters_is_rejected() -> None:
    doc = manifest()
    doc["metadata"]["name"] = "a" * 64
    assert errors(doc) == [f"metadata.name: name {'a' * 64!r} is longer than 63 characters"]


def test_a_long_value_is_quoted_cut_short_with_its_length() -> None:
    doc = manifest()
    doc["metadata"]["name"] = "a" * 10_000
    assert errors(doc) == [f"metadata.name: name '{'a' * 80}'... (10000 characters) is longer than 63 characters"]


def test_label_values_must_be_strings() -> None:
    doc = manifest()
    doc["metadata"]["labels"] = {"app.kubernetes.io/version": 2}
    assert errors(doc) == ['metadata.labels["app.kubernetes.io/version"]: expected a string, got 2']


def test_restart_policy_is_one_of_three() -> None:
    for policy in ("Always", "OnFailure", "Never"):
        assert Manifest.model_validate(manifest(restart_policy=policy)).spec.restart_policy == policy
    assert errors(manifest(restart_policy="always")) == [
        "spec.restart_policy: Input should be 'Always', 'OnFailure' or 'Never', got 'always'"
    ]


# ---------------------------------------------------------------------------------------------
# Durations and quantities
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, seconds, written", [
    ("10secs", 10.0, "10secs"),
    ("500ms", 0.5, "500ms"),
    ("1mins", 60.0, "1mins"),
    ("2hrs", 7200.0, "2hrs"),
    ("15s", 15.0, "15secs"),
    (3, 3.0, "3secs"),
    (0.25, 0.25, "250ms"),
    (0, 0.0, "0secs"),
])
def test_kill_grace_period_accepts_mesos_durations_and_writes_them_back(given: Any, seconds: float, written: str) -> None:
    spec = Manifest.model_validate(manifest(kill_grace_period=given)).spec
    assert spec.kill_grace_period == seconds
    assert spec.model_dump(mode="json")["kill_grace_period"] == written
    # What is written back reads back as the same value.
    assert Manifest.model_validate(manifest(kill_grace_period=written)).spec.kill_grace_period == seconds


@pytest.mark.parametrize("given, message", [
    ("10", "invalid duration '10': expected a number and a unit, e.g. 500ms, 15secs, 1mins, 2hrs"),
    ("10 parsecs", "invalid duration '10 parsecs': expected a number and a unit, e.g. 500ms, 15secs, 1mins, 2hrs"),
    (-1, "duration must not be negative: -1"),
    (True, "expected a duration such as 10secs or 500ms, or a number of seconds, got True"),
    ([10], "expected a duration such as 10secs or 500ms, or a number of seconds, got a list"),
    (float("inf"), "expected a finite number, got inf"),
])
def test_bad_durations_are_rejected(given: Any, message: str) -> None:
    assert errors(manifest(kill_grace_period=given)) == [f"spec.kill_grace_period: {message}"]


@pytest.mark.parametrize("given, mb", [
    (128, 128.0), (0.5, 0.5), ("128", 128.0), ("128Mi", 128.0), ("1Gi", 1024.0), ("2gi", 2048.0),
    ("512Ki", 0.5), ("1Ti", 1024.0 * 1024.0),
])
def test_mem_and_disk_are_megabytes_or_binary_quantities(given: Any, mb: float) -> None:
    resources = Manifest.model_validate(manifest(resources={"mem": given, "disk": given})).spec.resources
    assert resources.mem == mb and resources.disk == mb
    # Written back as plain MB numbers, the Mesos unit.
    assert resources.model_dump(mode="json", exclude_none=True) == {"mem": mb, "disk": mb}


@pytest.mark.parametrize("given, message", [
    ("128Mb", "invalid quantity '128Mb': unit 'Mb' is not one of Ki, Mi, Gi, Ti"),
    ("128M", "invalid quantity '128M': unit 'M' is not one of Ki, Mi, Gi, Ti"),
    ("lots", "invalid quantity 'lots': expected MB as a number, or a string like 128Mi or 1Gi"),
    (0, "Input should be greater than 0, got 0"),
    (-5, "quantity must not be negative: -5"),
    ({"mb": 1}, "expected megabytes as a number, or a string such as 128Mi or 1Gi, got a mapping"),
])
def test_bad_quantities_are_rejected(given: Any, message: str) -> None:
    assert errors(manifest(resources={"mem": given})) == [f"spec.resources.mem: {message}"]


def test_cpus_must_be_positive_and_finite() -> None:
    assert Manifest.model_validate(manifest(resources={"cpus": 1})).spec.resources.cpus == 1.0
    assert errors(manifest(resources={"cpus": 0})) == ["spec.resources.cpus: Input should be greater than 0, got 0"]
    assert errors(manifest(resources={"cpus": "lots"})) == ["spec.resources.cpus: expected a number, got 'lots'"]
    assert errors(manifest(resources={"cpus": float("nan")})) == [
        "spec.resources.cpus: expected a finite number, got nan"]


# ---------------------------------------------------------------------------------------------
# CommandInfo
# ---------------------------------------------------------------------------------------------

def test_shell_command_needs_a_value() -> None:
    assert errors(manifest(command={"shell": True})) == ["spec.command: Shell command is not specified: set command.value"]
    assert errors(manifest(command={"value": "  "})) == ["spec.command: Shell command is not specified: set command.value"]


def test_non_shell_command_needs_the_executable() -> None:
    assert errors(manifest(command={"shell": False, "arguments": ["sleep", "10"]})) == [
        "spec.command: command.value (the executable) is not specified; it is required when shell is false"
    ]
    cmd = Manifest.model_validate(manifest(command={"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "10"]})).spec.command
    assert (cmd.value, cmd.arguments) == ("/bin/sleep", ["sleep", "10"])


def test_environment_variables_are_mesos_value_variables() -> None:
    env = Manifest.model_validate(manifest(command={"value": "x", "environment": {"variables": [{"name": "A", "value": "1"}]}}))
    assert env.spec.command.environment is not None
    assert env.spec.command.environment.variables[0].model_dump() == {"name": "A", "type": "VALUE", "value": "1"}
    assert errors(manifest(command={"value": "x", "environment": {"variables": [{"name": "A", "type": "SECRET", "value": "s"}]}})) == [
        "spec.command.environment.variables[0].type: only VALUE environment variables are supported, got 'SECRET'"
    ]
    assert errors(manifest(command={"value": "x", "environment": {"variables": [{"name": "A=B", "value": "1"}]}})) == [
        "spec.command.environment.variables[0].name: invalid environment variable name 'A=B': must be non-empty, without '=' or NUL"
    ]
    assert errors(manifest(command={"value": "x", "environment": {"variables": [{"name": "A", "value": 1}]}})) == [
        "spec.command.environment.variables[0].value: expected a string, got 1"
    ]


# ---------------------------------------------------------------------------------------------
# ContainerInfo
# ---------------------------------------------------------------------------------------------

def test_only_mesos_containers_are_supported() -> None:
    assert Manifest.model_validate(container()).spec.container == ContainerInfo(type="MESOS")
    assert errors(container(type="DOCKER")) == ["spec.container.type: only MESOS containers are supported, got 'DOCKER'"]


@pytest.mark.parametrize("hostname", ["web", "web-1", "web.example.com", "A1"])
def test_valid_hostnames(hostname: str) -> None:
    info = Manifest.model_validate(container(hostname=hostname)).spec.container
    assert info is not None and info.hostname == hostname


@pytest.mark.parametrize("hostname", ["-web", "web-", "we_b", "web..com", "", "a" * 64, "web/1",
                                      ".".join(["a" * 22] * 3)])
def test_invalid_hostnames(hostname: str) -> None:
    assert errors(container(hostname=hostname)) == [
        f"spec.container.hostname: hostname {hostname!r} is not a valid hostname: dot-separated labels of letters, "
        "digits and '-', each at most 63 characters and not starting or ending with '-', at most 64 in all "
        "(the kernel's limit)"
    ]


@pytest.mark.parametrize("networks, message", [
    ([{"name": "a"}, {"name": "a"}], "Attempted to join CNI network 'a' multiple times"),
    ([{"name": "none"}, {"name": "a"}], "network 'none' (loopback only) cannot be joined with other networks"),
    ([{}, {"name": "a"}], "a network without a name is the host network: it cannot be joined with CNI networks"),
    ([{"name": "a", "port_mappings": [{"host_port": 80, "container_port": 8080}]},
      {"name": "b", "port_mappings": [{"host_port": 80, "container_port": 9090}]}], "host port 80/tcp is mapped twice"),
    ([{"port_mappings": [{"host_port": 80, "container_port": 8080}]}],
     "port_mappings need a CNI network: the host network and 'none' map no ports"),
])
def test_network_infos_that_cannot_be_joined_are_refused(networks: list, message: str) -> None:
    assert errors(container(network_infos=networks)) == [f"spec.container.network_infos: {message}"]


def test_network_infos_in_mesos_spelling() -> None:
    info = Manifest.model_validate(container(network_infos=[{
        "name": "bridge-net", "labels": {"labels": [{"key": "team", "value": "web"}]},
        "port_mappings": [{"host_port": 8080, "container_port": 80, "protocol": "tcp"},
                          {"host_port": 8080, "container_port": 80, "protocol": "udp"}]}])).spec.container
    assert info is not None and info.network_infos[0].name == "bridge-net"
    assert [m.protocol for m in info.network_infos[0].port_mappings] == ["tcp", "udp"]
    assert errors(container(network_infos=[{"name": "bad/name"}]))[0].startswith(
        "spec.container.network_infos[0].name: network name 'bad/name' is not a CNI network name")


def test_image_must_be_a_docker_image_with_a_name() -> None:
    ok = Manifest.model_validate(container(mesos={"image": {"type": "DOCKER", "docker": {"name": "busybox"}}}))
    assert ok.spec.container is not None and ok.spec.container.mesos is not None
    assert errors(container(mesos={"image": {"type": "APPC", "docker": {"name": "x"}}})) == [
        "spec.container.mesos.image.type: Input should be 'DOCKER', got 'APPC'"
    ]
    assert errors(container(mesos={"image": {"type": "DOCKER"}})) == ["spec.container.mesos.image.docker: field required"]


# Volumes

def test_volume_defaults_and_modes() -> None:
    info = Manifest.model_validate(container(volumes=[{"container_path": "/data", "host_path": "data"}])).spec.container
    assert info is not None and info.volumes[0].mode == "RW"
    assert errors(container(volumes=[{"container_path": "/data", "mode": "rw"}])) == [
        "spec.container.volumes[0].mode: Input should be 'RW' or 'RO', got 'rw'"
    ]


@pytest.mark.parametrize("path, message", [
    ("tmp", "container_path 'tmp' must be an absolute path"),
    ("./tmp", "container_path './tmp' must be an absolute path"),
    ("/a/../etc", "container_path '/a/../etc' must not contain a '..' component"),
    ("/..", "container_path '/..' must not contain a '..' component"),
    ("/", "container_path must not be '/': a volume cannot replace the root filesystem"),
])
def test_container_path_must_be_absolute_and_not_escape(path: str, message: str) -> None:
    assert errors(container(volumes=[{"container_path": path}])) == [f"spec.container.volumes[0].container_path: {message}"]


def test_dots_that_are_not_a_parent_component_are_fine() -> None:
    info = Manifest.model_validate(container(volumes=[{"container_path": "/a..b/.c", "host_path": "x..y"}])).spec.container
    assert info is not None and info.volumes[0].container_path == "/a..b/.c"


@pytest.mark.parametrize("host_path", ["../etc", "data/../../etc", ".."])
def test_relative_host_path_must_not_leave_the_sandbox(host_path: str) -> None:
    assert errors(container(volumes=[{"container_path": "/data", "host_path": host_path}])) == [
        f"spec.container.volumes[0].host_path: relative host_path {host_path!r} must not contain a '..' component "
        "(it is a path in the sandbox)"
    ]


def test_empty_host_path_is_rejected() -> None:
    assert errors(container(volumes=[{"container_path": "/data", "host_path": ""}])) == [
        "spec.container.volumes[0].host_path: host_path must not be empty; leave it out instead"
    ]


def test_nested_volumes_are_an_error_on_the_volume_list() -> None:
    assert errors(container(volumes=[{"container_path": "/data"}, {"container_path": "/data/cache/"}])) == [
        "spec.container.volumes: volumes[1] (/data/cache) is nested under volumes[0] (/data)"
    ]
    # Whatever the order they are listed in.
    assert errors(container(volumes=[{"container_path": "/data/cache"}, {"container_path": "/data"}])) == [
        "spec.container.volumes: volumes[0] (/data/cache) is nested under volumes[1] (/data)"
    ]


def test_two_volumes_at_one_path_are_an_error() -> None:
    assert errors(container(volumes=[{"container_path": "/data"}, {"container_path": "/data/"}])) == [
        "spec.container.volumes: volumes[1] and volumes[0] both mount at /data"
    ]


def test_sibling_volumes_sharing_a_prefix_are_not_nested() -> None:
    info = Manifest.model_validate(container(volumes=[{"container_path": "/data"}, {"container_path": "/data2"}])).spec.container
    assert info is not None and len(info.volumes) == 2


# Capabilities, IPC

def test_capability_numbers_are_the_kernels() -> None:
    assert len(CAPABILITY_NUMBERS) == 41
    assert CAPABILITY_NUMBERS["CHOWN"] == 0
    assert CAPABILITY_NUMBERS["NET_BIND_SERVICE"] == 10
    assert CAPABILITY_NUMBERS["NET_ADMIN"] == 12
    assert CAPABILITY_NUMBERS["SYS_ADMIN"] == 21
    assert CAPABILITY_NUMBERS["AUDIT_READ"] == 37
    assert CAPABILITY_NUMBERS["CHECKPOINT_RESTORE"] == 40


def test_all_mesos_capability_names_are_accepted() -> None:
    info = Manifest.model_validate(container(linux_info={"bounding_capabilities": {"capabilities": list(CAPABILITY_NUMBERS)}}))
    assert info.spec.container is not None and info.spec.container.linux_info is not None
    assert info.spec.container.linux_info.bounding_capabilities is not None
    assert info.spec.container.linux_info.bounding_capabilities.capabilities == list(CAPABILITY_NUMBERS)


def test_unknown_capabilities_are_named() -> None:
    assert errors(container(linux_info={"capability_info": {"capabilities": ["CAP_NET_RAW", "FLY"]}})) == [
        "spec.container.linux_info.capability_info.capabilities[0]: unknown capability 'CAP_NET_RAW': "
        "Mesos names have no CAP_ prefix, use 'NET_RAW'",
        "spec.container.linux_info.capability_info.capabilities[1]: unknown capability 'FLY': "
        "expected a Linux capability name such as NET_BIND_SERVICE",
    ]


def test_capability_info_and_effective_capabilities_are_exclusive() -> None:
    caps = {"capabilities": ["KILL"]}
    assert errors(container(linux_info={"capability_info": caps, "effective_capabilities": caps})) == [
        "spec.container.linux_info.effective_capabilities: set only one of capability_info (deprecated) and effective_capabilities"
    ]


def test_effective_capabilities_must_be_within_the_bounding_set() -> None:
    linux_info = {"effective_capabilities": {"capabilities": ["KILL", "NET_RAW", "CHOWN"]},
                  "bounding_capabilities": {"capabilities": ["KILL"]}}
    assert errors(container(linux_info=linux_info)) == [
        "spec.container.linux_info: effective capabilities CHOWN, NET_RAW are not in bounding_capabilities; "
        "a process cannot hold a capability outside its bounding set"
    ]
    linux_info["bounding_capabilities"] = {"capabilities": ["KILL", "NET_RAW", "CHOWN", "SETUID"]}
    Manifest.model_validate(container(linux_info=linux_info))


def test_shm_size_needs_a_private_ipc_namespace() -> None:
    info = Manifest.model_validate(container(linux_info={"ipc_mode": "PRIVATE", "shm_size": 64})).spec.container
    assert info is not None and info.linux_info is not None and info.linux_info.shm_size == 64
    for linux_info in ({"ipc_mode": "SHARE_PARENT", "shm_size": 64}, {"shm_size": 64}):
        assert errors(container(linux_info=linux_info)) == [
            "spec.container.linux_info.shm_size: shm_size is only allowed with ipc_mode PRIVATE"]
    assert errors(container(linux_info={"ipc_mode": "PRIVATE", "shm_size": 0})) == [
        "spec.container.linux_info.shm_size: Input should be greater than 0, got 0"]
    assert errors(container(linux_info={"ipc_mode": "HOST"})) == [
        "spec.container.linux_info.ipc_mode: Input should be 'PRIVATE' or 'SHARE_PARENT', got 'HOST'"]


# RLimits

def rlimits(*limits: dict[str, Any]) -> dict[str, Any]:
    return container(rlimit_info={"rlimits": list(limits)})


def test_rlimit_numbers_are_the_kernels() -> None:
    assert len(RLIMIT_NUMBERS) == 16
    assert RLIMIT_NUMBERS["RLMT_NOFILE"] == resource.RLIMIT_NOFILE
    assert RLIMIT_NUMBERS["RLMT_CORE"] == resource.RLIMIT_CORE
    assert RLIMIT_NUMBERS["RLMT_AS"] == resource.RLIMIT_AS
    assert RLIMIT_NUMBERS["RLMT_LOCKS"] == 10
    assert len(set(RLIMIT_NUMBERS.values())) == 16


def test_rlimits_with_both_or_neither_limit() -> None:
    info = Manifest.model_validate(rlimits(
        {"type": "RLMT_NOFILE", "soft": 1024, "hard": 4096},
        {"type": "RLMT_CORE"},  # neither: unlimited
        {"type": "RLMT_NPROC", "soft": 10, "hard": 10},
    )).spec.container
    assert info is not None and info.rlimit_info is not None
    assert [(r.type, r.soft, r.hard) for r in info.rlimit_info.rlimits] == [
        ("RLMT_NOFILE", 1024, 4096), ("RLMT_CORE", None, None), ("RLMT_NPROC", 10, 10)]


@pytest.mark.parametrize("limit, message", [
    ({"type": "RLMT_NOFILE", "soft": 1024}, "RLMT_NOFILE: set both soft and hard, or neither for unlimited"),
    ({"type": "RLMT_NOFILE", "hard": 1024}, "RLMT_NOFILE: set both soft and hard, or neither for unlimited"),
    ({"type": "RLMT_NOFILE", "soft": 4096, "hard": 1024}, "RLMT_NOFILE: soft limit 4096 is greater than hard limit 1024"),
])
def test_rlimit_rules_are_mesos_rules(limit: dict[str, Any], message: str) -> None:
    assert errors(rlimits(limit)) == [f"spec.container.rlimit_info.rlimits[0]: {message}"]


def test_rlimit_types_are_checked() -> None:
    assert errors(rlimits({"type": "RLIMIT_NOFILE"})) == [
        "spec.container.rlimit_info.rlimits[0].type: unknown rlimit type 'RLIMIT_NOFILE': Mesos spells it 'RLMT_NOFILE'"]
    assert errors(rlimits({"type": "RLMT_FOO"})).pop().startswith(
        "spec.container.rlimit_info.rlimits[0].type: unknown rlimit type 'RLMT_FOO': expected one of RLMT_AS, RLMT_CORE,")
    assert errors(rlimits({"type": "RLMT_NOFILE", "soft": -1, "hard": 1})) == [
        "spec.container.rlimit_info.rlimits[0].soft: Input should be greater than or equal to 0, got -1"]


def test_an_rlimit_type_may_appear_once() -> None:
    assert errors(rlimits({"type": "RLMT_NOFILE"}, {"type": "RLMT_NOFILE", "soft": 1, "hard": 1})) == [
        "spec.container.rlimit_info.rlimits: duplicate rlimit type RLMT_NOFILE"]


def test_several_errors_are_all_reported() -> None:
    doc = manifest(restart_policy="Sometimes", resources={"cpus": -1}, command={"shell": True})
    assert errors(doc) == [
        "spec.restart_policy: Input should be 'Always', 'OnFailure' or 'Never', got 'Sometimes'",
        "spec.resources.cpus: Input should be greater than 0, got -1",
        "spec.command: Shell command is not specified: set command.value",
    ]


def test_suggestions_follow_the_validated_root_model() -> None:
    assert errors({"volume": []}, ContainerInfo) == ["volume: unknown field (did you mean 'volumes'?)"]


# ---------------------------------------------------------------------------------------------
# spec_hash
# ---------------------------------------------------------------------------------------------

def spec_of(**spec: Any) -> ContainerSpec:
    return Manifest.model_validate(manifest(**spec)).spec


def test_spec_hash_is_sha256_of_canonical_json() -> None:
    h = spec_hash(spec_of())
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    # Pinned: a change here restarts every container on upgrade; change it only deliberately.
    assert h == "sha256:" + __import__("hashlib").sha256(b'{"command":{"value":"sleep 1000"}}').hexdigest()


def test_spec_hash_ignores_key_order() -> None:
    a = spec_of(restart_policy="Never", resources={"cpus": 1, "mem": 64}, node_selector={"a": "1", "b": "2"})
    b = spec_of(node_selector={"b": "2", "a": "1"}, resources={"mem": 64, "cpus": 1}, restart_policy="Never")
    assert spec_hash(a) == spec_hash(b)


def test_spelling_a_default_out_does_not_change_the_hash() -> None:
    plain = spec_of()
    explicit = spec_of(restart_policy="Always", kill_grace_period="10secs", node_selector={}, resources={},
                       command={"shell": True, "value": "sleep 1000", "arguments": []}, container=None)
    assert spec_hash(explicit) == spec_hash(plain)
    assert spec_hash_without_resources(explicit) == spec_hash_without_resources(plain)


def test_equal_values_in_other_units_hash_equal() -> None:
    assert spec_hash(spec_of(kill_grace_period="1mins")) == spec_hash(spec_of(kill_grace_period=60))
    assert spec_hash(spec_of(resources={"mem": "1Gi"})) == spec_hash(spec_of(resources={"mem": 1024}))


def test_resources_change_changes_spec_hash_but_not_the_resources_free_hash() -> None:
    small, large = spec_of(resources={"cpus": 0.5, "mem": 64}), spec_of(resources={"cpus": 1, "mem": 128})
    assert spec_hash(small) != spec_hash(large)
    assert spec_hash_without_resources(small) == spec_hash_without_resources(large)


def test_any_other_change_changes_both_hashes() -> None:
    base = spec_of()
    for changed in (spec_of(restart_policy="Never"), spec_of(command={"value": "sleep 1"}),
                    spec_of(container={"hostname": "web"}), spec_of(kill_grace_period="11secs")):
        assert spec_hash(changed) != spec_hash(base)
        assert spec_hash_without_resources(changed) != spec_hash_without_resources(base)


# ---------------------------------------------------------------------------------------------
# Status documents
# ---------------------------------------------------------------------------------------------

SPEC_STATUS_EXAMPLE = {
    "apiVersion": "reconciler/v1", "kind": "ContainerStatus",
    "name": "web", "container_id": "5b7e", "manifest": "manifests/web.yaml",
    "spec_hash": "sha256:00", "phase": "Running",
    "pid": 4242, "started_at": "2026-11-21T12:00:00.123Z", "restarts": 0,
    "exit_code": None, "exit_signal": None, "message": "",
    "conditions": [{"type": "Ready", "status": True, "reason": "", "message": "", "since": "2026-11-21T12:00:00.123Z"}],
    "isolators": ["filesystem/shared", "namespaces/pid", "cgroups/net_cls"],
    "net_cls": {"classid": "0x00100001", "classid_int": 1048577, "primary": "0x0010", "secondary": "0x0001"},
    "disk": {"used_bytes": 4096, "limit_bytes": 1073741824, "checked_at": "2026-11-21T12:00:00.123Z", "enforced": False},
    "statistics": {"timestamp": 0.0, "cpus_user_time_secs": 0.0, "cpus_system_time_secs": 0.0,
                   "cpus_limit": 0.5, "mem_rss_bytes": 0, "mem_limit_bytes": 134217728,
                   "processes": 1, "threads": 1},
    "updated_at": "2026-11-21T12:00:01.000Z",
}


def test_the_spec_status_example_is_a_valid_container_status() -> None:
    status = ContainerStatus.model_validate(SPEC_STATUS_EXAMPLE)
    dumped = status.model_dump(mode="json")
    expected = dict(SPEC_STATUS_EXAMPLE, reason="", image=None, image_id=None, security=None, network_infos=None, pull=None)
    assert dumped == expected


def test_unmeasured_statistics_are_absent_not_null() -> None:
    status = ContainerStatus(name="web", phase="Running", updated_at="t",
                             statistics=ResourceStatistics(timestamp=1.5, processes=2))
    dumped = json.loads(status.model_dump_json())
    assert dumped["statistics"] == {"timestamp": 1.5, "processes": 2}
    # Elsewhere null stays explicit, as in the SPEC's example.
    assert dumped["exit_code"] is None and "exit_code" in dumped


def test_status_documents_are_strict() -> None:
    with pytest.raises(ValidationError):
        ContainerStatus.model_validate(dict(SPEC_STATUS_EXAMPLE, surprise=1))
    with pytest.raises(ValidationError):
        ContainerStatus.model_validate(dict(SPEC_STATUS_EXAMPLE, phase="Destroyed"))  # files are removed instead


def test_agent_status_round_trips() -> None:
    agent = AgentStatus(
        version="0.1.0", pid=1, started_at="t", isolators=["posix/cpu"], launcher="posix",
        flags={"manifests": "./manifests"}, manifests_dir="./manifests",
        source=SourceStatus(ready=False, error="manifest directory ./manifests does not exist", watch_mode="poll"),
        counts={"Running": 2, "Invalid": 1}, updated_at="t",
    )
    doc = agent.model_dump(mode="json")
    assert doc["kind"] == "AgentStatus" and doc["apiVersion"] == "reconciler/v1"
    assert doc["source"]["error"] == "manifest directory ./manifests does not exist"
    assert AgentStatus.model_validate(copy.deepcopy(doc)) == agent
    with pytest.raises(ValidationError):
        AgentStatus.model_validate(dict(doc, counts={"Exploded": 1}))
