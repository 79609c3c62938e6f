"""Manifests written by a hostile or careless hand (issue 11): none may stall or crash the listing,
each is one bounded error naming its file and field, and every other manifest goes on.

The inputs are the reproductions of the bad-input campaign: numbers past a float's range, a YAML
alias bomb, a generated list of half a million arguments, names with a trailing newline, values
the kernel can never be given. The JSON Schema must refuse what the validator refuses, where JSON
Schema can say it.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from reconciler.models import MAX_EXEC_STRING, Manifest
from reconciler.schema import manifest_schema
from reconciler.source import MAX_DOCUMENT_VALUES, MAX_ERROR_CHARS, MAX_ERRORS_PER_DOCUMENT, ManifestSource
from tests.test_source import doc, write

HEAD = "apiVersion: reconciler/v1\nkind: Container\nmetadata: {name: NAME}\nspec:\n  command: {value: 'true'}\n"
HUGE = "1" + "0" * 309   # past a float's range: float() of it is an OverflowError


def manifest(name: str, spec_lines: str = "") -> str:
    return HEAD.replace("NAME", name) + spec_lines


def alias_bomb(levels: int = 7) -> str:
    """The 555-byte "billion laughs" of the report: 9**levels strings, behind `mem`."""
    text = "x0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels + 1):
        text += f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return text + manifest("bomb", f"  resources: {{mem: *l{levels}}}\n")


HOSTILE: dict[str, str] = {
    "mem-huge.yaml": manifest("mem-huge", f"  resources: {{mem: {HUGE}}}\n"),
    "disk-huge.yaml": manifest("disk-huge", f"  resources: {{disk: {HUGE}}}\n"),
    "grace-huge.yaml": manifest("grace-huge", f"  kill_grace_period: {HUGE}\n"),
    "cpus-huge.yaml": manifest("cpus-huge", f"  resources: {{cpus: {HUGE}}}\n"),
    "cpus-1e308.yaml": manifest("cpus-1e308", "  resources: {cpus: 1e308}\n"),
    "mem-nines.yaml": manifest("mem-nines", f"  resources: {{mem: '{'9' * 300}Gi'}}\n"),
    "rlimit-huge.yaml": manifest("rlimit-huge", "  container:\n    rlimit_info:\n      rlimits: "
                                 f"[{{type: RLMT_NOFILE, soft: {HUGE}, hard: 10}}]\n"),
    "shm-huge.yaml": manifest("shm-huge", "  container:\n    linux_info: {ipc_mode: PRIVATE, shm_size: "
                              f"{HUGE}}}\n"),
    "bomb.yaml": alias_bomb(),
    "big-command.yaml": manifest("big-command").replace("value: 'true'", f"value: '{'x' * 300_000}'"),
    "newline-name.yaml": HEAD.replace("{name: NAME}", '{name: "web\\n"}'),
    "block-scalar-name.yaml": HEAD.replace("metadata: {name: NAME}", "metadata:\n  name: |\n    web\n"),
    "newline-hostname.yaml": manifest("newline-hostname", "  container: {hostname: \"web\\n\"}\n"),
}


def arguments_list(count: int) -> str:
    """The report's generated manifest: `count` one-character arguments, about 2 bytes each."""
    return manifest("many-args").replace("command: {value: 'true'}",
                                         "command:\n    shell: false\n    value: /bin/true\n    arguments: [" +
                                         ",".join(["a"] * count) + "]")


def test_every_hostile_manifest_is_one_bounded_error_and_a_good_one_beside_is_desired(tmp_path: Path) -> None:
    for name, text in HOSTILE.items():
        (tmp_path / name).write_text(text)
    write(tmp_path, "zz-good.yaml", doc("good"))
    started = time.monotonic()
    listing = ManifestSource(str(tmp_path), strict_modes=False).list()
    assert time.monotonic() - started < 5
    assert list(listing.desired) == ["good"]
    problems = [*listing.invalid.values(), *listing.invalid_files]
    assert sorted(Path(p.manifest).name for p in problems) == sorted(HOSTILE)
    for problem in problems:
        assert len(problem.errors) == 1, problem.message
        assert len(problem.message) < 600, problem.message
        assert "\n" not in problem.message


@pytest.mark.parametrize("name, field, words", [
    ("mem-huge.yaml", "spec.resources.mem", "too large: at most 8796093022208 MB (8 EiB)"),
    ("disk-huge.yaml", "spec.resources.disk", "too large: at most 8796093022208 MB (8 EiB)"),
    ("grace-huge.yaml", "spec.kill_grace_period", "too large: at most 365days"),
    ("cpus-huge.yaml", "spec.resources.cpus", "too large: at most 1000000"),
    ("cpus-1e308.yaml", "spec.resources.cpus", "too large: at most 1000000"),
    ("mem-nines.yaml", "spec.resources.mem", "too large"),
    ("rlimit-huge.yaml", "spec.container.rlimit_info.rlimits[0].soft", "too large"),
    ("shm-huge.yaml", "spec.container.linux_info.shm_size", "too large"),
    ("big-command.yaml", "spec.command", f"value is 300000 bytes; the kernel takes at most {MAX_EXEC_STRING}"),
    ("newline-name.yaml", "metadata.name", "is not a DNS-1123 label"),
    ("block-scalar-name.yaml", "metadata.name", "is not a DNS-1123 label"),
    ("newline-hostname.yaml", "spec.container.hostname", "is not a valid hostname"),
    ("bomb.yaml", "", f"more than {MAX_DOCUMENT_VALUES} values in one document (YAML aliases expanded)"),
])
def test_each_hostile_manifest_says_which_field_and_why(tmp_path: Path, name: str, field: str, words: str) -> None:
    path = tmp_path / name
    path.write_text(HOSTILE[name])
    listing = ManifestSource(str(tmp_path), strict_modes=False).list()
    [problem] = [*listing.invalid.values(), *listing.invalid_files]
    assert problem.message.startswith(f"{path}: document 0: {field + ': ' if field else ''}"), problem.message
    assert words in problem.message
    assert listing.desired == {}


def listed_with_cost(directory: Path) -> tuple[Any, float, int]:
    """The directory's listing, the seconds it took and the peak of Python memory it allocated."""
    tracemalloc.start()
    try:
        started = time.monotonic()
        listing = ManifestSource(str(directory), strict_modes=False).list()
        return listing, time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_alias_bomb_costs_neither_time_nor_memory(tmp_path: Path) -> None:
    """The report: 6 s, 1.25 GB and a 312 MB message. Now refused from libyaml's events."""
    (tmp_path / "bomb.yaml").write_text(alias_bomb(levels=9))
    listing, elapsed, peak = listed_with_cost(tmp_path)
    assert elapsed < 1 and peak < 5 * 1024 * 1024, (elapsed, peak)
    [problem] = listing.invalid_files
    assert "YAML aliases expanded" in problem.message


def test_an_alias_bomb_under_the_value_limit_is_still_a_short_message(tmp_path: Path) -> None:
    """9**4 strings fit the limit; the error about them must not quote them all."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels=3))
    [problem] = ManifestSource(str(tmp_path), strict_modes=False).list().invalid.values()
    assert problem.message.startswith(f"{path}: document 0: spec.resources.mem: expected megabytes"), problem.message
    assert all(len(error) < 400 for error in problem.errors) and len(problem.message) < 2000


@pytest.mark.parametrize("spec_lines", [
    "  resources: {mem: &a [*a]}\n",
    "  node_selector: &a {x: *a}\n",
    "  command: &a {value: 'true', arguments: [*a]}\n",
    "  container: {volumes: &a [*a, {container_path: *a}]}\n",
])
def test_a_value_that_contains_itself_is_an_error_not_a_hang(tmp_path: Path, spec_lines: str) -> None:
    """A 30-byte manifest hung the listing for ever: the walk for strings to redact followed `&a [*a]`."""
    text = manifest("loop", spec_lines)
    if "command:" in spec_lines:
        text = text.replace("  command: {value: 'true'}\n", "")
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    started = time.monotonic()
    listing = ManifestSource(str(tmp_path), strict_modes=False).list()
    assert time.monotonic() - started < 1
    [problem] = [*listing.invalid.values(), *listing.invalid_files]
    assert problem.message.startswith(f"{path}: document 0: spec."), problem.message
    assert len(problem.message) < 1000


def test_a_generated_list_of_half_a_million_arguments_is_refused_early(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(arguments_list(500_000))
    assert path.stat().st_size <= 1024 * 1024
    listing, elapsed, peak = listed_with_cost(tmp_path)
    [problem] = listing.invalid_files
    assert f"more than {MAX_DOCUMENT_VALUES} values" in problem.message
    assert elapsed < 2 and peak < 20 * 1024 * 1024, (elapsed, peak)


def test_lists_and_the_command_line_have_limits_with_clear_errors(tmp_path: Path) -> None:
    write(tmp_path, "args.yaml", arguments_list(70_000))
    # Past ARG_MAX in a file under its size limit: one 100 KB argument, repeated through an alias.
    write(tmp_path, "long-line.yaml", manifest("long-line").replace(
        "command: {value: 'true'}", "command:\n    shell: false\n    value: /bin/true\n    arguments: [&x "
        + "x" * 100_000 + ", " + ", ".join(["*x"] * 11) + "]"))
    write(tmp_path, "nul.yaml", doc("nul", command={"value": "echo a\0b"}))
    write(tmp_path, "env.yaml", doc("env", command={"value": "true", "environment": {"variables": [
        {"name": "BIG", "value": "y" * 200_000}]}}))
    listing = ManifestSource(str(tmp_path), strict_modes=False).list()
    messages = {name: problem.errors[0] for name, problem in listing.invalid.items()}
    assert "spec.command.arguments: List should have at most 65536 items" in messages["many-args"]
    assert "the command line and environment are" in messages["long-line"] and "at most 1048576" in messages["long-line"]
    assert "value contains a NUL character" in messages["nul"]
    assert "environment.variables[0] is 200004 bytes" in messages["env"]


def test_a_file_over_the_size_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(manifest("big") + "# " + "x" * (10 * 1024 * 1024) + "\n")
    [problem] = ManifestSource(str(tmp_path), strict_modes=False).list().invalid_files
    assert "over the 1 MiB limit for a manifest" in problem.message


def test_many_errors_in_one_document_are_counted_not_listed(tmp_path: Path) -> None:
    write(tmp_path, "caps.yaml", doc("caps", command={"value": "true"}, container={"linux_info": {
        "capability_info": {"capabilities": [f"NOPE{i}" for i in range(500)]}}}))
    [problem] = ManifestSource(str(tmp_path), strict_modes=False).list().invalid.values()
    assert len(problem.errors) == MAX_ERRORS_PER_DOCUMENT + 1
    assert problem.errors[-1] == f"and {500 - MAX_ERRORS_PER_DOCUMENT} more errors"
    assert all(len(error) <= MAX_ERROR_CHARS + 40 for error in problem.errors)


def test_validate_prints_one_bounded_line_per_hostile_file_and_no_traceback(tmp_path: Path) -> None:
    for name, text in HOSTILE.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "many.yaml").write_text(arguments_list(500_000))
    result = subprocess.run([sys.executable, "-m", "reconciler", "validate", "--manifests_strict_modes=false",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stdout) + len(result.stderr) < 20_000


# --------------------------------------------------------------------------------------------
# The JSON Schema refuses what the validator refuses
# --------------------------------------------------------------------------------------------

def _with(path: str, value: Any) -> dict[str, Any]:
    document = doc("web", command={"value": "true"})
    target = document
    keys = path.split(".")
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value
    return document


REJECTED_BY_BOTH = {
    "uppercase name": _with("metadata.name", "Web"),
    "name over 63 characters": _with("metadata.name", "a" * 64),
    "name with a newline": _with("metadata.name", "web\n"),
    "relative container_path": _with("spec.container", {"volumes": [{"container_path": "data"}]}),
    "container_path with ..": _with("spec.container", {"volumes": [{"container_path": "/a/../etc"}]}),
    "container_path /": _with("spec.container", {"volumes": [{"container_path": "/"}]}),
    "relative host_path with ..": _with("spec.container", {"volumes": [{"container_path": "/d", "host_path": "../x"}]}),
    "nested relative host_path with ..": _with("spec.container", {"volumes": [{"container_path": "/d",
                                                                                 "host_path": "a/../../x"}]}),
    "empty host_path": _with("spec.container", {"volumes": [{"container_path": "/d", "host_path": ""}]}),
    "empty environment name": _with("spec.command", {"value": "true", "environment": {"variables": [
        {"name": "", "value": "x"}]}}),
    "environment name with =": _with("spec.command", {"value": "true", "environment": {"variables": [
        {"name": "A=B", "value": "x"}]}}),
    "shell true without a value": _with("spec.command", {"shell": True}),
    "shell by default without a value": _with("spec.command", {"arguments": ["x"]}),
    "shell with a blank value": _with("spec.command", {"value": "   "}),
    "image reference busybox:": _with("spec.container", {"mesos": {"image": {"type": "DOCKER",
                                                                            "docker": {"name": "busybox:"}}}}),
    "image reference with uppercase": _with("spec.container", {"mesos": {"image": {"type": "DOCKER",
                                                                                  "docker": {"name": "Busybox"}}}}),
    "hostname with a newline": _with("spec.container", {"hostname": "web\n"}),
    "hostname label starting with -": _with("spec.container", {"hostname": "-web.example"}),
    "mem past 8 EiB": _with("spec.resources", {"mem": 2 ** 44}),
    "cpus past the bound": _with("spec.resources", {"cpus": 2_000_000}),
    "kill_grace_period past a year": _with("spec.kill_grace_period", 400 * 86400),
    "rlimit past rlim_t": _with("spec.container", {"rlimit_info": {"rlimits": [
        {"type": "RLMT_NOFILE", "soft": 2 ** 64, "hard": 2 ** 64}]}}),
    "too many arguments": _with("spec.command", {"value": "true", "arguments": ["a"] * 65_537}),
}

# What JSON Schema cannot say: comparing two values, or sizes summed over a list.
REJECTED_BY_THE_VALIDATOR_ONLY = {
    "rlimit soft above hard": _with("spec.container", {"rlimit_info": {"rlimits": [
        {"type": "RLMT_NOFILE", "soft": 10, "hard": 5}]}}),
    "command line past ARG_MAX": _with("spec.command", {"shell": False, "value": "/bin/true",
                                                         "arguments": ["x" * 100_000] * 12}),
}


@pytest.mark.parametrize("case", sorted(REJECTED_BY_BOTH))
def test_the_schema_refuses_what_the_validator_refuses(case: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    document = REJECTED_BY_BOTH[case]
    with pytest.raises(Exception) as refused:   # pydantic's ValidationError
        Manifest.model_validate(document)
    assert type(refused.value).__name__ == "ValidationError"
    errors = list(jsonschema.Draft202012Validator(manifest_schema()).iter_errors(document))
    assert errors, f"the schema accepts a manifest the validator refuses ({case})"


@pytest.mark.parametrize("case", sorted(REJECTED_BY_THE_VALIDATOR_ONLY))
def test_what_the_schema_cannot_say_the_validator_still_refuses(case: str) -> None:
    with pytest.raises(Exception) as refused:
        Manifest.model_validate(REJECTED_BY_THE_VALIDATOR_ONLY[case])
    assert type(refused.value).__name__ == "ValidationError"


def test_the_schema_still_accepts_good_manifests() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(manifest_schema())
    good = [
        doc("web"),
        _with("spec.command", {"shell": False, "value": "/bin/sleep", "arguments": ["sleep", "1"]}),
        _with("spec.container", {"hostname": "web.example.com", "volumes": [
            {"container_path": "/data", "host_path": "data/x..y"}, {"container_path": "/abs", "host_path": "/srv/..a"}],
            "mesos": {"image": {"type": "DOCKER", "docker": {"name": "localhost:5000/team/app:v1.2"}}}}),
        _with("spec.resources", {"mem": "1Gi", "cpus": 0.5, "disk": 2048}),
    ]
    for document in good:
        Manifest.model_validate(document)
        assert list(validator.iter_errors(document)) == [], document


# --------------------------------------------------------------------------------------------
# The agent with all of them in its directory
# --------------------------------------------------------------------------------------------

def hostile_directory(directory: Path) -> None:
    """Every hostile input of the report in one manifest directory."""
    for name, text in HOSTILE.items():
        (directory / name).write_text(text)
    (directory / "many-args.yaml").write_text(arguments_list(500_000))
    (directory / "ten-mb.yaml").write_text(manifest("ten-mb") + "# " + "x" * (10 * 1024 * 1024) + "\n")
    (directory / "loop.yaml").write_text(manifest("loop", "  resources: {mem: &a [*a]}\n"))
    (directory / "deep.json").write_text("[" * 100_000)
    (directory / "bomb-json.json").write_text('{"a": [' + ",".join(['"lol"'] * 200_000) + "]}")


@pytest.mark.root
def test_the_agent_stays_small_and_quick_beside_every_hostile_manifest(agent_env) -> None:
    """Issue 11's bounded-memory check: RSS under 200 MB with every hostile input listed, across
    relistings, and a good manifest dropped beside them Running within 1 s."""
    psutil = pytest.importorskip("psutil")
    env = agent_env
    hostile_directory(env.manifests)
    agent = env.start(resync_interval="1secs")
    deadline = time.monotonic() + 30
    while (env.agent_status() or {}).get("pid") != agent.pid:
        assert agent.poll() is None, agent.communicate()[0]
        assert time.monotonic() < deadline, "the agent never published _agent.json"
        time.sleep(0.05)
    process = psutil.Process(agent.pid)
    peak = 0
    for _ in range(30):   # 3 s: three resyncs, each a full listing
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.1)
    agent_doc = env.agent_status()
    invalid = {Path(entry["file"]).name for entry in agent_doc["invalid_files"]} | \
        {Path(entry["file"]).name for entry in agent_doc["invalid_documents"]}
    assert invalid == set(HOSTILE) | {"many-args.yaml", "ten-mb.yaml", "loop.yaml", "deep.json", "bomb-json.json"}
    assert len((env.status_dir / "_agent.json").read_bytes()) < 64 * 1024
    env.write_manifest("good", "exec sleep 300", kill_grace_period="1secs")
    dropped = time.monotonic()
    env.wait_status("good", lambda s: s["phase"] == "Running", timeout=5)
    took = time.monotonic() - dropped
    peak = max(peak, process.memory_info().rss)
    assert peak < 200 * 1024 * 1024, f"agent RSS {peak / 2**20:.0f} MiB"
    assert took < 1.0, f"the good manifest took {took:.2f} s to run"
    assert agent.poll() is None


def test_a_manifest_nested_sixty_thousand_deep_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """libyaml's composer recurses in C: 60,000 nested `[` overflowed its stack (SIGSEGV, found by the
    flag fuzzing of --config). The depth is now refused from libyaml's events first."""
    (tmp_path / "deep.yaml").write_text("[" * 60_000)
    result = subprocess.run([sys.executable, "-m", "reconciler", "validate", "--manifests_strict_modes=false",
                             str(tmp_path / "deep.yaml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert "nested more than 64 deep" in result.stdout + result.stderr
