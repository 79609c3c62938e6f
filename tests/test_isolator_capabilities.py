"""linux/capabilities: what a command may do is what the flags and the manifest grant, with Mesos's rules and
messages (LinuxCapabilitiesIsolatorTest, LinuxCapabilitiesIsolatorFlagsTest).

Real kernel, as root, through the agent. The command's capability sets are read from the host's
/proc/<pid>/status of the command itself; the behaviour behind them is checked with what a user would
try (binding a privileged port, reading a file that only DAC_OVERRIDE could open).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators.base import ContainerConfig, IsolatorSetupError, PermanentError
from reconciler.isolators.capabilities import DEFAULT_CAPABILITIES, LinuxCapabilitiesIsolator, mesos_set
from reconciler.models import CAPABILITY_NUMBERS, ContainerSpec
from tests.conftest import IS_ROOT
from tests.test_isolator_filesystem_shared import wait_for_text

ISOLATION = "linux/capabilities,namespaces/pid,cgroups/cpu,cgroups/mem"
PORT = 81
BIND = f"python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', {PORT})); print('bound')\""


def mask(*names: str) -> int:
    return sum(1 << CAPABILITY_NUMBERS[n] for n in names)


def agent_mask() -> int:
    return proc_caps(os.getpid())["CapPrm"]


def proc_caps(pid: int) -> dict[str, int]:
    caps = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, value = line.split(":")
            caps[key] = int(value, 16)
    return caps


def command_pid(init_pid: int, comm: str, timeout: float = 10) -> int:
    """The host pid of the init's child once it runs `comm` (the exec'd command)."""
    deadline = time.monotonic() + timeout
    while True:
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                    return int(child)
            except FileNotFoundError:
                pass
        assert time.monotonic() < deadline, f"no child of {init_pid} runs {comm}"
        time.sleep(0.02)


@pytest.fixture
def env(outside_tmp_env: Any) -> Any:
    outside_tmp_env.isolation = ISOLATION
    return outside_tmp_env


def write_manifest(env: Any, name: str, value: str, user: str | None = None, **spec: Any) -> None:
    """env.write_manifest, with command.user."""
    path = env.write_manifest(name, value, **spec)
    if user is not None:
        doc = json.loads(path.read_text())
        doc["spec"]["command"]["user"] = user
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc))
        os.rename(tmp, path)


def launch(env: Any, name: str, value: str, *flags: str, user: str | None = None, **spec: Any) -> dict[str, Any]:
    write_manifest(env, name, value, user, **spec)
    result = env.once(*flags)
    assert result.returncode == 0, result.stdout + result.stderr
    status = env.status(name)
    assert status is not None and status["phase"] == "Running", status
    return status


def run_to_end(env: Any, name: str, value: str, *flags: str, user: str | None = None, **spec: Any) -> dict[str, Any]:
    write_manifest(env, name, value, user, restart_policy="Never", **spec)
    agent = env.start(*flags)
    try:
        return env.wait_status(name, lambda s: s["phase"] in ("Succeeded", "Failed"), timeout=30)
    finally:
        env.stop(agent)


def linux_info(**info: Any) -> dict[str, Any]:
    return {"linux_info": {k: {"capabilities": v} for k, v in info.items()}}


@pytest.fixture
def port_81_free() -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", PORT))
        except OSError as exc:
            pytest.skip(f"127.0.0.1:{PORT} is taken on this host ({exc}); the bind tests need it free")


# --- what the command holds --------------------------------------------------------------------------

@pytest.mark.root
def test_root_command_holds_exactly_the_granted_capabilities(env: Any) -> None:
    status = launch(env, "web", "exec sleep 300", container=linux_info(effective_capabilities=["NET_BIND_SERVICE"]))
    caps = proc_caps(command_pid(status["pid"], "sleep"))
    granted = mask("NET_BIND_SERVICE")
    assert caps["CapEff"] == caps["CapPrm"] == granted
    assert caps["CapBnd"] == granted          # no bounding set given: the effective set bounds it (Mesos)
    assert not caps["CapEff"] & mask("CHOWN", "DAC_OVERRIDE", "SYS_ADMIN", "KILL")
    # The init (pid1) keeps only what it needs to pass signals on to the command.
    init = proc_caps(status["pid"])
    assert init["CapEff"] == init["CapPrm"] == init["CapBnd"] == mask("KILL")


@pytest.mark.root
def test_root_without_dac_override_cannot_read_a_file_it_does_not_own(env: Any) -> None:
    secret = env.work_dir.parent / "secret"
    secret.write_text("s3cret\n")
    os.chown(secret, 65534, 65534)
    secret.chmod(0o600)
    # Mesos's deprecated capability_info is the effective set too.
    status = run_to_end(env, "reader", f"cat {secret} && echo read; echo done",
                        container={"linux_info": {"capability_info": {"capabilities": ["CHOWN"]}}})
    assert status["phase"] == "Succeeded", status
    out = wait_for_text(env.sandbox(status) / "stdout")
    assert "read" not in out
    assert "Permission denied" in (env.sandbox(status) / "stderr").read_text()


@pytest.mark.root
def test_non_root_user_keeps_a_granted_capability_as_ambient(env: Any, port_81_free: None) -> None:
    status = run_to_end(env, "bind", f"{BIND}; echo done", container=linux_info(
        effective_capabilities=["NET_BIND_SERVICE"]), user="nobody")
    assert status["phase"] == "Succeeded", status
    assert wait_for_text(env.sandbox(status) / "stdout").splitlines()[0] == "bound"


@pytest.mark.root
def test_non_root_user_without_the_capability_cannot_bind_a_privileged_port(env: Any, port_81_free: None) -> None:
    status = run_to_end(env, "nobind", BIND, user="nobody",
                        container=linux_info(effective_capabilities=["CHOWN"], bounding_capabilities=["CHOWN", "NET_RAW"]))
    assert status["phase"] == "Failed", status
    assert status["exit_code"] == 1
    assert "PermissionError: [Errno 13] Permission denied" in (env.sandbox(status) / "stderr").read_text()


@pytest.mark.root
def test_non_root_capability_sets_as_the_kernel_reports_them(env: Any) -> None:
    status = launch(env, "sets", "exec sleep 300", user="nobody",
                    container=linux_info(effective_capabilities=["NET_BIND_SERVICE", "NET_RAW"],
                                         bounding_capabilities=["NET_BIND_SERVICE", "NET_RAW", "CHOWN"]))
    pid = command_pid(status["pid"], "sleep")
    caps = proc_caps(pid)
    granted = mask("NET_BIND_SERVICE", "NET_RAW")
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == caps["CapAmb"] == granted
    assert caps["CapBnd"] == mask("NET_BIND_SERVICE", "NET_RAW", "CHOWN")
    assert os.stat(f"/proc/{pid}").st_uid == 65534


@pytest.mark.root
def test_bounding_only_keeps_the_users_defaults_within_the_bounding_set(env: Any) -> None:
    # No effective set anywhere (Mesos): root keeps its defaults, which the bounding set now limits.
    status = launch(env, "bnd", "exec sleep 300", "--bounding_capabilities=CHOWN,KILL,NET_BIND_SERVICE")
    caps = proc_caps(command_pid(status["pid"], "sleep"))
    assert caps["CapBnd"] == mask("CHOWN", "KILL", "NET_BIND_SERVICE")
    assert caps["CapEff"] == mask("CHOWN", "KILL", "NET_BIND_SERVICE")
    assert caps["CapAmb"] == 0


@pytest.mark.root
def test_effective_flag_applies_when_the_manifest_asks_for_nothing(env: Any) -> None:
    status = launch(env, "flag", "exec sleep 300", "--effective_capabilities=KILL",
                    "--bounding_capabilities=KILL,CHOWN")
    caps = proc_caps(command_pid(status["pid"], "sleep"))
    assert caps["CapEff"] == mask("KILL")
    assert caps["CapBnd"] == mask("KILL", "CHOWN")


@pytest.mark.root
def test_empty_effective_set_drops_everything(env: Any) -> None:
    status = launch(env, "none", "exec sleep 300", container=linux_info(effective_capabilities=[]))
    caps = proc_caps(command_pid(status["pid"], "sleep"))
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == 0


# --- refusals ---------------------------------------------------------------------------------------

@pytest.mark.root
def test_effective_beyond_the_bounding_flag_is_refused_with_mesos_message(env: Any) -> None:
    env.write_manifest("greedy", "sleep 300", container=linux_info(effective_capabilities=["NET_RAW", "NET_ADMIN"]))
    result = env.once("--effective_capabilities=CHOWN", "--bounding_capabilities=CHOWN")
    assert result.returncode == 1
    status = env.status("greedy")
    assert status["phase"] == "Failed" and status["reason"] == "LaunchFailed", status
    assert status["message"] == "Requested capabilities '{ NET_ADMIN, NET_RAW }', but only '{ CHOWN }' are allowed"
    assert status["pid"] is None


@pytest.mark.root
def test_bounding_beyond_the_bounding_flag_is_refused_with_mesos_message(env: Any) -> None:
    env.write_manifest("wide", "sleep 300", container=linux_info(bounding_capabilities=["CHOWN", "SYS_ADMIN"]))
    result = env.once("--bounding_capabilities=CHOWN,KILL")
    assert result.returncode == 1
    assert env.status("wide")["message"] == \
        "Bounding capabilities '{ CHOWN, SYS_ADMIN }', but only '{ CHOWN, KILL }' are allowed"


@pytest.mark.root
def test_a_capability_the_agent_lacks_is_refused_before_launch(env: Any) -> None:
    if agent_mask() & mask("SYS_RESOURCE"):
        pytest.skip("the agent holds CAP_SYS_RESOURCE on this host")
    env.write_manifest("res", "sleep 300", container=linux_info(effective_capabilities=["SYS_RESOURCE"]))
    assert env.once().returncode == 1
    assert env.status("res")["message"] == (
        "Requested capabilities '{ SYS_RESOURCE }', but the agent itself does not hold '{ SYS_RESOURCE }', "
        "so it cannot grant them")


@pytest.mark.root
def test_agent_refuses_to_start_when_the_effective_flag_exceeds_the_bounding_flag(env: Any) -> None:
    result = env.once("--effective_capabilities=NET_RAW,NET_ADMIN", "--bounding_capabilities=NET_RAW")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Allowed capabilities are not a subset of the bounding capabilities" in lines[0]
    assert "--effective_capabilities" in lines[0]


# --- the decision rules alone (Mesos's matrix) ------------------------------------------------------

def _config(linux: dict[str, Any] | None) -> ContainerConfig:
    spec = ContainerSpec.model_validate(
        {"command": {"value": "true"}, **({"container": {"linux_info": linux}} if linux is not None else {})})
    return ContainerConfig(container_id="c", name="n", manifest="m", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox="/nonexistent")


def _caps(*names: str) -> dict[str, list[str]]:
    return {"capabilities": list(names)}


NET = ("NET_RAW", "NET_ADMIN", "DAC_READ_SEARCH")


@pytest.mark.skipif(not IS_ROOT, reason="the isolator requires root, as Mesos's")
@pytest.mark.parametrize("flags, linux, expected", [
    # Mesos ROOT_Ping parameters: framework effective only -> allowed, bounding = effective.
    ({}, {"effective_capabilities": _caps(*NET)}, (set(NET), set(NET))),
    ({}, {"effective_capabilities": _caps()}, (set(), set())),
    # (framework effective NET with framework bounding {CHOWN}: refused by the manifest's validation already.)
    ({"effective_capabilities": ["CHOWN", "DAC_READ_SEARCH"], "bounding_capabilities": ["CHOWN", "DAC_READ_SEARCH"]},
     None, ({"CHOWN", "DAC_READ_SEARCH"}, {"CHOWN", "DAC_READ_SEARCH"})),
    ({"bounding_capabilities": list(NET)}, None, (None, set(NET))),
    ({"effective_capabilities": ["CHOWN"], "bounding_capabilities": ["CHOWN"]},
     {"effective_capabilities": _caps("NET_RAW", "NET_ADMIN")},
     "Requested capabilities '{ NET_ADMIN, NET_RAW }', but only '{ CHOWN }' are allowed"),
    ({}, {"effective_capabilities": _caps("DAC_READ_SEARCH"), "bounding_capabilities": _caps(*NET)},
     ({"DAC_READ_SEARCH"}, set(NET))),
    # The effective flag alone bounds nothing: a container's own effective set becomes its bounding set.
    ({"effective_capabilities": ["CHOWN"]}, {"effective_capabilities": _caps("NET_RAW")}, ({"NET_RAW"}, {"NET_RAW"})),
    ({"effective_capabilities": ["CHOWN"]}, None, ({"CHOWN"}, {"CHOWN"})),
    ({"bounding_capabilities": ["CHOWN"]}, {"bounding_capabilities": _caps("CHOWN", "KILL")},
     "Bounding capabilities '{ CHOWN, KILL }', but only '{ CHOWN }' are allowed"),
    # Nothing asked: Docker's default set bounds it (root holds it, any other user nothing).
    ({}, None, (None, set(DEFAULT_CAPABILITIES))),
    ({}, {"share_pid_namespace": False}, (None, set(DEFAULT_CAPABILITIES))),
])
def test_mesos_decision_rules(flags: dict[str, Any], linux: dict[str, Any] | None, expected: Any) -> None:
    isolator = LinuxCapabilitiesIsolator(AgentConfig(**flags))
    if isinstance(expected, str):
        with pytest.raises(PermanentError) as caught:
            isolator.prepare("c", _config(linux))
        assert str(caught.value) == expected
        return
    assert isolator.container_sets(_config(linux)) == expected
    info = isolator.prepare("c", _config(linux))
    assert info is not None and info.capabilities is not None
    effective, bounding = expected
    assert info.capabilities["bounding"] == sorted(CAPABILITY_NUMBERS[c] for c in bounding)
    assert info.capabilities["effective"] == (None if effective is None else
                                              sorted(CAPABILITY_NUMBERS[c] for c in effective))


@pytest.mark.skipif(not IS_ROOT, reason="the isolator requires root, as Mesos's")
@pytest.mark.parametrize("effective, bounding, ok", [
    (["NET_RAW", "NET_ADMIN"], ["NET_RAW"], False),
    (["NET_RAW"], ["NET_RAW"], True),
    (["NET_RAW"], ["NET_RAW", "NET_ADMIN"], True),
    (None, None, True),
    (["NET_RAW"], None, True),
    (None, ["NET_RAW"], True),
])
def test_mesos_flag_rules(effective: list[str] | None, bounding: list[str] | None, ok: bool) -> None:
    config = AgentConfig(effective_capabilities=effective, bounding_capabilities=bounding)
    if ok:
        LinuxCapabilitiesIsolator(config)
    else:
        with pytest.raises(IsolatorSetupError, match="Allowed capabilities are not a subset of the bounding"):
            LinuxCapabilitiesIsolator(config)


def test_effective_beyond_the_manifests_own_bounding_set_is_a_validation_error() -> None:
    with pytest.raises(ValueError, match="effective capabilities NET_RAW are not in bounding_capabilities"):
        _config({"effective_capabilities": _caps("NET_RAW"), "bounding_capabilities": _caps("CHOWN")})


def test_sets_are_written_as_mesos_writes_them() -> None:
    assert mesos_set({"NET_RAW", "CHOWN", "NET_ADMIN"}) == "{ CHOWN, NET_ADMIN, NET_RAW }"
    assert mesos_set([]) == "{  }"

