"""The command line as a user meets it: validate, schema, status, once, flag errors and flag precedence.

Everything runs the real CLI in a subprocess (`python -m reconciler`, and the `reconciler` console
script where the equivalence is the point), against the isolated directories of `agent_env`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import read_status_file

pytestmark = pytest.mark.root

LINUX_ISOLATION = "namespaces/pid,namespaces/ipc,posix/cpu,posix/mem"


@pytest.fixture
def env(agent_env):
    agent_env.isolation = LINUX_ISOLATION
    return agent_env


def cli(*args: str, cwd: Path | None = None, environ: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=environ)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """A flag error: exit 2, nothing on stdout, exactly one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    return lines[0]


def manifest_doc(name: str, command: str = "exec sleep 300", **spec) -> dict:
    return {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name},
            "spec": {"kill_grace_period": "1secs", "command": {"value": command}, **spec}}


# validate --------------------------------------------------------------------------------------

def test_validate_valid_file_and_directory_exit_0(env):
    env.write_manifest("web", "exec sleep 300")
    env.write_manifest("db", "exec sleep 300", resources={"cpus": 0.5, "mem": "128Mi"})
    for target in (env.manifests / "web.yaml", env.manifests):
        result = cli("validate", str(target))
        assert result.returncode == 0, (target, result.stdout, result.stderr)
        assert result.stdout.strip() == ""


def test_validate_unknown_field_names_file_document_and_path(env):
    path = env.manifests / "multi.yaml"
    bad = manifest_doc("second")
    bad["spec"]["resurces"] = {"cpus": 1}
    path.write_text("---\n" + json.dumps(manifest_doc("first")) + "\n---\n" + json.dumps(bad) + "\n")
    result = cli("validate", str(path))
    assert result.returncode == 1, result
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    line = lines[0]
    assert line.startswith(f"{path}: document 1: spec.resurces: "), line
    assert "unknown field" in line
    assert "resources" in line, "the message should suggest the field that was meant"
    assert "Traceback" not in result.stderr


def test_validate_bad_quantity_and_bad_name(env):
    quantity = env.write_manifest("qty", "true", resources={"mem": "12Qi"})
    name_doc = manifest_doc("Web_1")
    named = env.manifests / "name.yaml"
    named.write_text(json.dumps(name_doc))
    result = cli("validate", str(quantity), str(named))
    assert result.returncode == 1
    out = result.stdout
    assert f"{quantity}: document 0: spec.resources.mem: " in out, out
    # The file's value is not quoted (a manifest may be a link to a file that is not the operator's).
    assert "12Qi" not in out and "invalid quantity '…'" in out and "(line 1, column" in out, out
    assert f"{named}: document 0: metadata.name: " in out, out


def test_validate_directory_reports_every_bad_file_and_ignores_editor_files(env):
    env.write_manifest("good", "true")
    (env.manifests / "bad.yaml").write_text(json.dumps(manifest_doc("bad", spec_extra=1)))
    broken = manifest_doc("typo")
    broken["spec"]["restart_policy"] = "Sometimes"
    (env.manifests / "typo.yaml").write_text(json.dumps(broken))
    (env.manifests / "garbage.yaml").write_text("spec: [unclosed\n  - : :\n")
    # An editor's swap file with garbage must not be reported: the agent would not read it either.
    (env.manifests / ".good.yaml.swp").write_text("\x00\x01 not yaml: [")
    result = cli("validate", str(env.manifests))
    assert result.returncode == 1
    out = result.stdout
    assert f"{env.manifests / 'bad.yaml'}: document 0: spec.spec_extra: " in out, out
    assert f"{env.manifests / 'typo.yaml'}: document 0: spec.restart_policy: " in out, out
    assert str(env.manifests / "garbage.yaml") in out, out
    assert ".swp" not in out and "good.yaml:" not in out, out


def test_validate_nonexistent_path_is_an_error_not_a_traceback(env):
    result = cli("validate", str(env.tmp / "nope.yaml"))
    assert result.returncode == 1
    assert str(env.tmp / "nope.yaml") in result.stdout
    assert "Traceback" not in result.stderr


# schema ----------------------------------------------------------------------------------------

def test_schema_prints_manifest_and_status_json_schema():
    manifest = cli("schema")
    assert manifest.returncode == 0, manifest.stderr
    schema = json.loads(manifest.stdout)
    assert schema.get("type") == "object"
    text = json.dumps(schema)
    for field in ("apiVersion", "metadata", "spec", "restart_policy", "kill_grace_period"):
        assert field in text, field

    status = cli("schema", "--status")
    assert status.returncode == 0, status.stderr
    status_schema = json.loads(status.stdout)
    text = json.dumps(status_schema)
    for field in ("phase", "container_id", "exit_code", "restarts", "conditions"):
        assert field in text, field
    assert status_schema != schema


# status ----------------------------------------------------------------------------------------

def test_status_table_and_json(env):
    env.write_manifest("web", "exec sleep 300")
    env.write_manifest("api", "exec sleep 300")
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    web, api = env.status("web"), env.status("api")

    table = cli("status", f"--status_dir={env.status_dir}")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "PHASE", "PID"], lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert set(rows) == {"web", "api"}, table.stdout
    assert rows["web"][1:3] == ["Running", str(web["pid"])]
    assert rows["api"][1:3] == ["Running", str(api["pid"])]

    # --work_dir finds <work_dir>/status too
    via_work_dir = cli("status", f"--work_dir={env.work_dir}")
    assert via_work_dir.returncode == 0
    assert sorted(line.split()[:3] for line in via_work_dir.stdout.splitlines()) == \
        sorted(line.split()[:3] for line in lines)

    raw = cli("status", f"--status_dir={env.status_dir}", "--json")
    assert raw.returncode == 0, raw.stderr
    doc = json.loads(raw.stdout)
    text = json.dumps(doc)
    containers = doc["containers"] if isinstance(doc, dict) else doc
    by_name = {c["name"]: c for c in containers}
    assert by_name["web"]["pid"] == web["pid"] and by_name["web"]["phase"] == "Running"
    assert by_name["api"]["container_id"] == api["container_id"]
    assert "_agent" not in by_name
    assert "AgentStatus" in text  # the agent's own document is part of the raw output


def test_status_of_empty_directory_prints_header_only(env):
    result = cli("status", f"--status_dir={env.tmp / 'no-status-here'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["NAME", "PHASE", "PID"]
    assert len([line for line in result.stdout.splitlines() if line.strip()]) == 1


# bad flags: exit 2, one line naming the flag ------------------------------------------------------

@pytest.mark.parametrize("command", ["once", "run"])
def test_bad_duration_flag(env, command):
    result = cli(command, *env.flags(resync_interval="abc"), timeout=20)
    line = one_error_line(result)
    assert "--resync_interval" in line, line
    assert "abc" in line, line


@pytest.mark.parametrize("command", ["once", "run"])
def test_unknown_isolator(env, command):
    result = cli(command, *env.flags(isolation="posix/cpu,foo/bar"), timeout=20)
    line = one_error_line(result)
    assert "--isolation" in line, line
    assert "Unknown or unsupported isolator 'foo/bar'" in line, line
    assert not (env.work_dir / "containers").exists() or not any((env.work_dir / "containers").iterdir())


@pytest.mark.parametrize("value", ["0x10,0x5", "zz,0xffff", "0x0001", "0x1,0x10000"])
def test_bad_net_cls_secondary_handles(env, value):
    result = cli("once", *env.flags(cgroups_net_cls_secondary_handles=value), timeout=20)
    line = one_error_line(result)
    assert "--cgroups_net_cls_secondary_handles" in line, line


def test_nonexistent_config_file(env):
    missing = env.tmp / "missing-config.yaml"
    result = cli("once", f"--config={missing}", *env.flags(), timeout=20)
    line = one_error_line(result)
    assert "--config" in line and str(missing) in line, line


def test_config_file_with_unknown_key(env):
    config = env.tmp / "agent.yaml"
    config.write_text("resync_interval: 5secs\nresync_intervall: 5secs\n")
    result = cli("once", f"--config={config}", *env.flags(), timeout=20)
    line = one_error_line(result)
    assert "--config" in line and "resync_intervall" in line, line


def test_bad_value_in_config_file_names_flag_and_file(env):
    config = env.tmp / "agent.yaml"
    config.write_text("container_disk_watch_interval: soon\n")
    result = cli("once", f"--config={config}", *env.flags(), timeout=20)
    line = one_error_line(result)
    assert "--container_disk_watch_interval" in line and str(config) in line, line


def test_bad_value_in_environment_names_flag(env):
    environ = dict(os.environ, RECONCILER_RESYNC_INTERVAL="often")
    flags = [f for f in env.flags() if not f.startswith("--resync_interval=")]
    result = cli("once", *flags, environ=environ, timeout=20)
    line = one_error_line(result)
    assert "--resync_interval" in line and "RECONCILER_RESYNC_INTERVAL" in line, line


def test_unknown_command_line_flag_exits_2(env):
    result = cli("once", *env.flags(), "--no_such_flag=1", timeout=20)
    assert result.returncode == 2
    assert "--no_such_flag" in result.stderr
    assert "Traceback" not in result.stderr


# --help: every flag described, by section, as docs/flags.md says ---------------------------------------

def flags_page_rows() -> dict[str, tuple[str, str]]:
    """docs/flags.md: flag -> (its section, its row's 'default' and 'meaning' as --help prints them)."""
    rows: dict[str, tuple[str, str]] = {}
    section = ""
    for line in (Path(__file__).resolve().parents[1] / "docs" / "flags.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        m = re.fullmatch(r"\| `--(\w+)`(?: \[BOOL\])? \| `RECONCILER_\w+` \| (.*?) \| (.*) \|", line)
        if m:
            rows[m.group(1)] = (section, f"{m.group(3)} (default: {m.group(2)})".replace("`", ""))
    return rows


def help_entries(text: str) -> dict[str, dict[str, str]]:
    """`--help` output: section -> flag -> its entry (invocation and help), whitespace collapsed."""
    sections = re.split(r"^(\S[^\n]*):$", text, flags=re.MULTILINE)
    entries: dict[str, dict[str, str]] = {}
    for section, body in zip(sections[1::2], sections[2::2]):
        body = body.strip("\n").split("\n\n")[0]      # a blank line ends a section (the epilog follows)
        for entry in re.split(r"^  (?=-)", body, flags=re.MULTILINE):
            if entry.startswith("--"):
                entries.setdefault(section, {})[entry.split()[0]] = " ".join(entry.split())
    return entries


@pytest.mark.parametrize("command", ["run", "once"])
def test_help_describes_every_flag_in_its_section(command):
    from reconciler.config import FLAG_NAMES

    # Wide enough that argparse wraps no help text (it would break 'git-sync' at its hyphen).
    result = cli(command, "--help", environ=dict(os.environ, COLUMNS="2000"), timeout=30)
    assert result.returncode == 0, result.stderr
    rows = flags_page_rows()
    assert sorted(rows) == sorted(FLAG_NAMES), "docs/flags.md is stale: run python3 docs/generate_flags.py"
    shown = help_entries(result.stdout)
    for name in FLAG_NAMES:
        section, described = rows[name]
        entry = shown.get(section, {}).get(f"--{name}")
        assert entry is not None, f"`{command} --help` does not show --{name} under {section!r}"
        assert entry.endswith(" ".join(described.split())), (name, entry, described)
    assert "--config" in shown["options"] and "RECONCILER_<FLAG>" in result.stdout


# precedence: command line > RECONCILER_<FLAG> > --config file ---------------------------------------

def test_flag_precedence_cli_over_env_over_config_file(env):
    from_file, from_env, from_cli = env.tmp / "st-file", env.tmp / "st-env", env.tmp / "st-cli"
    config = env.tmp / "agent.yaml"
    config.write_text(f"status_dir: {from_file}\n")
    base = dict(os.environ)
    base.pop("RECONCILER_STATUS_DIR", None)

    def run(with_env: bool, with_cli: bool) -> None:
        environ = dict(base)
        if with_env:
            environ["RECONCILER_STATUS_DIR"] = str(from_env)
        extra = [f"--status_dir={from_cli}"] if with_cli else []
        result = cli("once", f"--config={config}", *env.flags(), *extra, environ=environ, cwd=env.tmp)
        assert result.returncode == 0, result.stdout + result.stderr

    run(with_env=False, with_cli=False)
    assert (from_file / "_agent.json").exists()
    assert not from_env.exists() and not from_cli.exists()

    run(with_env=True, with_cli=False)
    assert (from_env / "_agent.json").exists()
    assert not from_cli.exists()

    run(with_env=True, with_cli=True)
    assert (from_cli / "_agent.json").exists()
    agent = read_status_file(from_cli / "_agent.json")
    assert agent is not None
    assert agent["flags"]["status_dir"] == str(from_cli)


def test_config_file_values_are_used(env):
    config = env.tmp / "agent.yaml"
    config.write_text(textwrap.dedent(f"""\
        manifests: {env.manifests}
        work_dir: {env.work_dir}
        launcher: {env.launcher}
        isolation: {env.isolation}
        cgroups_root: {env.cgroups_root}
        resync_interval: 3secs
    """))
    env.write_manifest("web", "exec sleep 300")
    result = cli("once", f"--config={config}", cwd=env.tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert env.status("web")["phase"] == "Running"
    agent = env.agent_status()
    assert agent["flags"]["resync_interval"] == 3.0 or agent["flags"]["resync_interval"] in ("3secs", "3s")


# once exit status ----------------------------------------------------------------------------------

def test_once_exit_0_when_all_converge(env):
    env.write_manifest("web", "exec sleep 300")
    jobs = [f"job{i}" for i in range(8)]
    for job in jobs:
        env.write_manifest(job, "exit 0", restart_policy="Never")
    result = env.once()
    assert result.returncode == 0, result.stdout + result.stderr
    assert env.status("web")["phase"] == "Running"
    # Short jobs end while `once` is still running: what it leaves on disk must be a settled
    # phase, not a destroy it abandoned half-way ("Terminating" for a process long gone).
    phases = {job: env.status(job)["phase"] for job in jobs}
    assert set(phases.values()) <= {"Running", "Succeeded"}, phases


def test_once_exit_1_when_a_manifest_is_invalid(env):
    env.write_manifest("web", "exec sleep 300")
    env.write_manifest("bad", "exec sleep 300", bogus_field=True)
    result = env.once()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert env.status("web")["phase"] == "Running"  # the valid one still runs
    bad = env.status("bad")
    assert bad["phase"] == "Invalid"
    assert "spec.bogus_field" in bad["message"]


# python -m reconciler is the console script -------------------------------------------------------

def test_console_script_and_module_behave_the_same(env):
    script = shutil.which("reconciler")
    assert script, "the `reconciler` console script is not installed"
    for args in (["schema"], ["schema", "--status"]):
        a = subprocess.run([script, *args], capture_output=True, text=True, timeout=30)
        b = cli(*args)
        assert a.returncode == b.returncode == 0
        assert a.stdout == b.stdout
    env.write_manifest("bad", "true", bogus_field=1)
    a = subprocess.run([script, "validate", str(env.manifests)], capture_output=True, text=True, timeout=30)
    b = cli("validate", str(env.manifests))
    assert a.returncode == b.returncode == 1
    assert a.stdout == b.stdout
    a = subprocess.run([script, "once", *env.flags(isolation="foo/bar")], capture_output=True, text=True, timeout=30)
    assert a.returncode == 2 and "Unknown or unsupported isolator 'foo/bar'" in a.stderr
    a = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    b = cli("--version")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()
