"""deploy/systemd/reconciler.service: systemd's own verifier accepts it, and it keeps the promises
the agent depends on (containers survive a stop of the unit; the agent manages its own cgroups)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler import config as agent_config

from tests.conftest import IS_ROOT, REPO

UNIT = REPO / "deploy" / "systemd" / "reconciler.service"
ENV_FILE = REPO / "deploy" / "systemd" / "reconciler.env"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of (key, value) in order: systemd allows a key more than once (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{UNIT.name}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{UNIT.name}: {raw!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_the_unit_keeps_containers_alive_across_a_stop_and_delegates_cgroups():
    service = parse_unit(UNIT.read_text())["Service"]
    assert one(service, "Type") == "simple"            # no sd_notify in the agent
    assert one(service, "KillMode") == "process"       # a stop signals the agent only
    assert one(service, "Delegate") == "yes"
    assert one(service, "Restart") == "always"
    assert one(service, "EnvironmentFile") == "-/etc/reconciler/reconciler.env"
    exec_start = one(service, "ExecStart").split()
    assert exec_start[:2] == ["/usr/local/bin/reconciler", "run"]
    assert parse_unit(UNIT.read_text())["Install"] == [("WantedBy", "multi-user.target")]


def test_the_units_settings_and_the_example_environment_file_are_valid_agent_flags():
    """The Environment= defaults and every example line of reconciler.env, through the agent's own
    flag code: a misspelt RECONCILER_ variable would be silently ignored by the agent."""
    environ = dict(v.split("=", 1) for k, v in parse_unit(UNIT.read_text())["Service"] if k == "Environment")
    for line in ENV_FILE.read_text().splitlines():
        line = line.removeprefix("#")
        if line.startswith("RECONCILER_") and "=" in line:
            key, value = line.split("=", 1)
            environ[key] = value
    known = {f"RECONCILER_{n.upper()}" for n in agent_config.FLAG_NAMES} | {"RECONCILER_EXTRA_FLAGS"}
    assert set(environ) <= known, set(environ) - known
    extra = environ.pop("RECONCILER_EXTRA_FLAGS").split()
    parser = argparse.ArgumentParser()
    agent_config.add_flags(parser)
    if not IS_ROOT:   # the default isolators need the linux launcher, which needs root
        environ["RECONCILER_ISOLATION"] = agent_config.USER_ISOLATION
    parsed = agent_config.load(parser.parse_args(extra), environ=environ)
    assert parsed.manifests == "/etc/reconciler/manifests" and parsed.work_dir == "/var/lib/reconciler"
    assert parsed.attributes == {"pool": "batch", "rack": "r12"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing (Debian package systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path):
    # verify checks that ExecStart's program exists: point it at the installed entry point.
    program = shutil.which("reconciler")
    assert program, "the reconciler entry point is not installed (pip install -e .)"
    unit = tmp_path / "reconciler.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/reconciler", program))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any line about our file is a failure.
    about_us = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not about_us, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing (Debian package systemd)")
def test_systemd_analyze_verify_catches_a_misspelt_key(tmp_path: Path):
    """The check above is not vacuous: the same verifier reports a broken copy."""
    program = shutil.which("reconciler")
    unit = tmp_path / "reconciler.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/reconciler", program or "/bin/true")
                    .replace("KillMode=process", "KillMode=proces"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "kill mode" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
