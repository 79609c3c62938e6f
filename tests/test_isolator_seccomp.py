"""The linux/seccomp isolator (reconciler/isolators/seccomp.py): which profile a container gets, what its
status shows, and the flag and manifest errors that stop the agent or fail a launch; then the same
end to end, with the agent running real containers whose command makes a denied call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import AgentConfig
from reconciler.isolators import create
from reconciler.isolators.base import ContainerConfig, ContainerState, IsolatorSetupError, PermanentError
from reconciler.isolators.seccomp import LinuxSeccompIsolator
from reconciler.models import ContainerSpec

ALLOW_ALL = {"defaultAction": "SCMP_ACT_ALLOW"}


def config_with(linux_info: dict[str, Any] | None, container_id: str = "c1") -> ContainerConfig:
    spec = ContainerSpec.model_validate({"command": {"value": "true"},
                                         **({"container": {"linux_info": linux_info}} if linux_info else {})})
    return ContainerConfig(container_id=container_id, name="x", manifest="x.yaml", spec=spec, spec_hash="h",
                           resources_free_hash="h", sandbox="/var/tmp/unused")


def agent(**flags: Any) -> AgentConfig:
    return AgentConfig(launcher="posix", isolation=["posix/cpu"], **flags)


def write_profile(directory: Path, name: str, doc: Any) -> Path:
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_the_isolator_picks_the_profile_and_shows_it(tmp_path: Path) -> None:
    write_profile(tmp_path, "strict.json", ALLOW_ALL)
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path)))
    cases = {
        "plain": (None, "default", None),
        "unconfined": ({"seccomp": {"unconfined": True}}, "unconfined", None),
        "named": ({"seccomp": {"profile_name": "strict.json"}}, "strict.json", str(tmp_path / "strict.json")),
        "privileged": ({"privileged": True}, "unconfined", None),
        "privileged-and-named": ({"privileged": True, "seccomp": {"profile_name": "strict.json"}}, "unconfined", None),
    }
    for container_id, (linux_info, name, path) in cases.items():
        info = isolator.prepare(container_id, config_with(linux_info, container_id))
        assert isolator.status(container_id) == {"security": {"seccomp": name}}, container_id
        if name == "unconfined":
            assert info is None, container_id
        else:
            assert info is not None and info.seccomp == {"name": name, "path": path}, container_id
    for container_id in cases:
        isolator.cleanup(container_id)
        isolator.cleanup(container_id)          # twice: harmless
        assert isolator.status(container_id) == {}


def test_the_flags_choose_every_container_s_default(tmp_path: Path) -> None:
    write_profile(tmp_path, "site.json", ALLOW_ALL)
    write_profile(tmp_path, "other.json", ALLOW_ALL)
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path), seccomp_profile_name="site.json"))
    info = isolator.prepare("c1", config_with(None))
    assert info is not None and info.seccomp == {"name": "site.json", "path": str(tmp_path / "site.json")}
    assert isolator.status("c1") == {"security": {"seccomp": "site.json"}}
    # A manifest's own profile wins over the flag's; so does its opt-out.
    named = isolator.prepare("c2", config_with({"seccomp": {"profile_name": "other.json"}}, "c2"))
    assert named is not None and named.seccomp["name"] == "other.json"
    assert isolator.prepare("c3", config_with({"seccomp": {"unconfined": True}}, "c3")) is None

    unconfined = LinuxSeccompIsolator(agent(seccomp_profile_name="unconfined"))
    assert unconfined.prepare("c1", config_with(None)) is None
    assert unconfined.status("c1") == {"security": {"seccomp": "unconfined"}}


@pytest.mark.parametrize("flags, message", [
    ({"seccomp_profile_name": "site.json"},
     "flag --seccomp_profile_name: profile 'site.json' needs --seccomp_config_dir"),
    ({"seccomp_config_dir": "/nonexistent-dir"}, "flag --seccomp_config_dir: /nonexistent-dir is not a directory"),
    ({"seccomp_config_dir": "DIR", "seccomp_profile_name": "missing.json"},
     "flag --seccomp_profile_name: profile 'missing.json' is not a file of --seccomp_config_dir DIR"),
    ({"seccomp_config_dir": "DIR", "seccomp_profile_name": "broken.json"},
     "flag --seccomp_profile_name: seccomp profile DIR/broken.json: defaultAction: Field required "
     "(or run with --seccomp_profile_name=unconfined)"),
    ({"seccomp_config_dir": "DIR", "seccomp_profile_name": "bad-op.json"},
     "flag --seccomp_profile_name: seccomp profile DIR/bad-op.json: syscalls.0.args.0.op: Input should be"),
])
def test_bad_flags_stop_the_agent_in_one_line(tmp_path: Path, flags: dict[str, Any], message: str) -> None:
    write_profile(tmp_path, "broken.json", {"syscalls": []})
    write_profile(tmp_path, "bad-op.json", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]})
    flags = {k: (str(tmp_path) if v == "DIR" else v) for k, v in flags.items()}
    with pytest.raises(IsolatorSetupError) as caught:
        LinuxSeccompIsolator(agent(**flags))
    assert message.replace("DIR", str(tmp_path)) in str(caught.value) and "\n" not in str(caught.value)


def test_without_libseccomp_the_agent_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyseccomp", None)      # as if the binding or library were absent
    with pytest.raises(IsolatorSetupError) as caught:
        LinuxSeccompIsolator(agent())
    message = str(caught.value)
    assert message.startswith("flag --isolation: linux/seccomp: libseccomp is not available")
    assert "install libseccomp2" in message and "--seccomp_profile_name=unconfined" in message
    # Unconfined by flag: libseccomp is not needed to start.
    assert LinuxSeccompIsolator(agent(seccomp_profile_name="unconfined")).default is None


def test_a_manifest_profile_that_is_missing_or_broken_fails_its_launch(tmp_path: Path) -> None:
    write_profile(tmp_path, "broken.json", "{")
    write_profile(tmp_path, "kill-everything.json", {"defaultAction": "SCMP_ACT_KILL", "flags": ["LOG"]})
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path)))
    for name, reason in (("missing.json", "cannot read it: No such file or directory"),
                         ("broken.json", "not valid JSON (line 1, column 2)"),
                         ("kill-everything.json", "flags: not supported (seccomp(2) filter flags and seccomp "
                                                  "agents are not implemented)")):
        with pytest.raises(PermanentError) as caught:
            isolator.prepare("c1", config_with({"seccomp": {"profile_name": name}}))
        assert str(caught.value) == (f"Failed to load seccomp profile '{name}' (linux_info.seccomp.profile_name): "
                                     f"seccomp profile {tmp_path / name}: {reason}")
        assert isolator.status("c1") == {}
    with pytest.raises(PermanentError, match="'x.json' .* the agent runs without --seccomp_config_dir"):
        LinuxSeccompIsolator(agent()).prepare("c1", config_with({"seccomp": {"profile_name": "x.json"}}))


def test_the_flag_s_profile_broken_after_start_fails_the_launch_naming_it(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "site.json", ALLOW_ALL)
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path), seccomp_profile_name="site.json"))
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"]}]}))
    with pytest.raises(PermanentError) as caught:
        isolator.prepare("c1", config_with(None))
    assert "'site.json' (--seccomp_profile_name)" in str(caught.value)
    assert "syscalls.0.action: Field required" in str(caught.value)


def test_recovery_shows_each_container_s_profile(tmp_path: Path) -> None:
    isolator = LinuxSeccompIsolator(agent(seccomp_config_dir=str(tmp_path)))
    states = [ContainerState(config=config_with(None, "plain"), pid=None),
              ContainerState(config=config_with({"seccomp": {"unconfined": True}}, "free"), pid=None)]
    isolator.recover(states, set())
    assert isolator.status("plain") == {"security": {"seccomp": "default"}}
    assert isolator.status("free") == {"security": {"seccomp": "unconfined"}}


def test_the_linux_launcher_always_has_it(tmp_path: Path) -> None:
    """Part of the default security profile: on with the linux launcher whatever --isolation names."""
    config = AgentConfig(launcher="linux", isolation=["posix/cpu"], work_dir=str(tmp_path))
    names = [isolator.name for isolator in create(config)]
    assert "linux/seccomp" in names


# ------------------------------------------------------------------ end to end, with the agent

# The command prints the errno names of keyctl(KEYCTL_GET_KEYRING_ID, user keyring) and of getppid ("ok"
# when it succeeded): host root's keyring is what the default profile keeps out of reach. It then waits,
# so that its status (which shows the profile while the container lives) can be read.
PROBE = ("import ctypes, errno, os\n"
         "libc = ctypes.CDLL(None, use_errno=True)\n"
         "def call(*args):\n"
         "    return \"ok\" if libc.syscall(*args) >= 0 else errno.errorcode[ctypes.get_errno()]\n"
         "print(call(250, 0, -4, 0), call(110), flush=True)\n"
         "os.execv(\"/bin/sleep\", [\"sleep\", \"300\"])\n")


@pytest.mark.root
def test_the_agent_runs_each_container_under_its_profile(linux_env: Any, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    write_profile(profiles, "no-getppid.json", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 30}]})       # EROFS
    write_profile(profiles, "broken.json", {"defaultAction": "SCMP_ACT_ALLOW", "syscals": []})
    command = f"exec {sys.executable} -c '{PROBE}'"
    cases = {
        "plain": (None, "EPERM ok", "default"),
        "free": ({"seccomp": {"unconfined": True}}, "ok ok", "unconfined"),
        "named": ({"seccomp": {"profile_name": "no-getppid.json"}}, "ok EROFS", "no-getppid.json"),
    }
    for name, (linux_info, _, _) in cases.items():
        spec: dict[str, Any] = {"kill_grace_period": "1secs"}
        if linux_info:
            spec["container"] = {"type": "MESOS", "linux_info": linux_info}
        linux_env.write_manifest(name, command, **spec)
    linux_env.write_manifest("broken", "true", restart_policy="Never",
                             container={"type": "MESOS", "linux_info": {"seccomp": {"profile_name": "broken.json"}}})
    agent = linux_env.start(seccomp_config_dir=str(profiles))
    try:
        for name, (_, answers, profile) in cases.items():
            status = linux_env.wait_status(name, lambda s: s.get("phase") == "Running", timeout=60)
            assert status["security"]["seccomp"] == profile, (name, status)
            stdout = linux_env.sandbox(status) / "stdout"
            deadline = time.monotonic() + 30
            while len(stdout.read_text().split()) < 2 and time.monotonic() < deadline:   # both answers
                time.sleep(0.02)
            assert stdout.read_text().strip() == answers, name
        broken = linux_env.wait_status("broken", lambda s: s.get("phase") == "Failed", timeout=60)
        assert "Failed to load seccomp profile 'broken.json'" in broken["message"], broken
        assert "syscals: Extra inputs are not permitted" in broken["message"], broken
    finally:
        linux_env.stop(agent)


@pytest.mark.root
def test_a_bad_profile_flag_stops_the_agent_with_one_line(linux_env: Any, tmp_path: Path) -> None:
    write_profile(tmp_path, "broken.json", {"defaultAction": "SCMP_ACT_SOMETIMES"})
    result = subprocess.run([sys.executable, "-m", "reconciler", "once",
                             *linux_env.flags(seccomp_config_dir=tmp_path, seccomp_profile_name="broken.json")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"reconciler: flag --seccomp_profile_name: seccomp profile {tmp_path}/broken.json: "
                               "defaultAction: Input should be"), lines
