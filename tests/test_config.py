"""Flags: Mesos names and value syntax, precedence, and one clear line per bad value."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
import pytest
import yaml

from reconciler import cli
from reconciler import config as config_module
from reconciler.config import AgentConfig, ConfigError


def load(argv: list[str], environ: dict[str, str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser()
    config_module.add_flags(parser)
    return config_module.load(parser.parse_args(argv), environ or {})


def test_mesos_durations_and_defaults() -> None:
    cfg = load(["--resync_interval=500ms", "--container_disk_watch_interval=1mins"])
    assert cfg.resync_interval == 0.5 and cfg.container_disk_watch_interval == 60
    assert load([]).resync_interval == 10 and load([]).container_disk_watch_interval == 15


@pytest.mark.parametrize("given, expected", [("0x10", 0x10), ("16", 16), ("0xFFFF", 0xFFFF)])
def test_net_cls_primary_handle_is_decimal_or_hex(given: str, expected: int) -> None:
    assert load([f"--cgroups_net_cls_primary_handle={given}"]).cgroups_net_cls_primary_handle == expected


def test_net_cls_secondary_range_and_its_errors() -> None:
    assert load(["--cgroups_net_cls_secondary_handles=0x10,0x20"]).cgroups_net_cls_secondary_handles == (16, 32)
    with pytest.raises(ConfigError, match=r"^flag --cgroups_net_cls_secondary_handles \(from command line\): the range is empty"):
        load(["--cgroups_net_cls_secondary_handles=0x20,0x10"])
    with pytest.raises(ConfigError, match="out of range"):
        load(["--cgroups_net_cls_primary_handle=0x10000"])


def test_xfs_project_range_attributes_and_booleans() -> None:
    cfg = load(["--xfs_project_range=[10-20]", "--attributes=rack:r1;zone:a", "--enforce_container_disk_quota"])
    assert cfg.xfs_project_range == (10, 20)
    assert cfg.attributes == {"rack": "r1", "zone": "a"}
    assert cfg.enforce_container_disk_quota is True
    assert load(["--enforce_container_disk_quota=false"]).enforce_container_disk_quota is False
    with pytest.raises(ConfigError, match="--attributes .*'rack' is not of the form key:value"):
        load(["--attributes=rack"])


def test_precedence_command_line_over_environment_over_file(tmp_path) -> None:
    file = tmp_path / "agent.yaml"
    file.write_text("resync_interval: 1mins\ncgroups_root: from-file\nattributes: 'rack:file'\n")
    environ = {"RECONCILER_RESYNC_INTERVAL": "30secs", "RECONCILER_CGROUPS_ROOT": "from-env"}
    cfg = load([f"--config={file}", "--resync_interval=5secs"], environ)
    assert cfg.resync_interval == 5 and cfg.cgroups_root == "from-env" and cfg.attributes == {"rack": "file"}


def test_an_error_says_where_the_bad_value_came_from(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^flag --resync_interval \(from environment RECONCILER_RESYNC_INTERVAL\): invalid duration 'soon'"):
        load([], {"RECONCILER_RESYNC_INTERVAL": "soon"})
    file = tmp_path / "agent.yaml"
    file.write_text("resync-interval: 0secs\n")
    with pytest.raises(ConfigError, match=rf"^flag --resync_interval \(from config file {file}\): '0secs' is too short"):
        load([f"--config={file}"])


def test_posix_launcher_refuses_linux_isolators() -> None:
    with pytest.raises(ConfigError, match="isolator 'namespaces/pid' needs --launcher=linux"):
        load(["--launcher=posix", "--isolation=posix/cpu,namespaces/pid"])
    with pytest.raises(ConfigError, match="Duplicate entries found in --isolation flag 'posix/cpu,posix/cpu'"):
        load(["--launcher=posix", "--isolation=posix/cpu,posix/cpu"])


def test_paths_are_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load(["--work_dir=w", "--launcher=posix", "--isolation=posix/cpu"])
    assert cfg.work_dir == str(tmp_path / "w") and cfg.status_path == str(tmp_path / "w" / "status")


def test_a_default_container_info_that_is_not_a_container_info_is_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "once", f"--manifests={tmp_path}", f"--work_dir={tmp_path / 'w'}",
         "--launcher=posix", "--isolation=posix/cpu",
         '--default_container_info={"volumes": [{"container_path": "rel"}], "bogus": 1}'],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "reconciler: flag --default_container_info (from command line): volumes[0].container_path: container_path "
        "'rel' must be an absolute path; bogus: unknown field; expected one of: type, hostname, mesos, volumes, "
        "network_infos, linux_info, rlimit_info"]


def test_capability_flags_take_a_list_mesos_json_or_nothing() -> None:
    assert load(["--effective_capabilities=NET_BIND_SERVICE,chown"]).effective_capabilities == ["NET_BIND_SERVICE", "CHOWN"]
    assert load(['--bounding_capabilities={"capabilities": ["NET_ADMIN"]}']).bounding_capabilities == ["NET_ADMIN"]
    assert load(["--effective_capabilities="]).effective_capabilities == []      # drop them all
    assert load([]).effective_capabilities is None                              # not managed
    with pytest.raises(ConfigError, match=r"unknown capability 'CAP_CHOWN' \(use CHOWN\)"):
        load(["--bounding_capabilities=CAP_CHOWN"])


# Issue 11, "Flags": every bad value is one line naming the flag, exit 2 ----------------------------

POSIX = {"launcher": "posix", "isolation": "posix/cpu"}   # flags every run below needs, unless under test


def once(tmp_path: Path, *flags: str | bytes, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`reconciler once` in a subprocess: what an operator sees, bytes of argv included."""
    argv: list[str | bytes] = [sys.executable, "-m", "reconciler", "once", f"--manifests={tmp_path}",
                               f"--work_dir={tmp_path / 'work'}", *(f"--{k}={v}" for k, v in POSIX.items()), *flags]
    return subprocess.run(argv, capture_output=True, timeout=60, cwd=tmp_path, env=environ)


def the_error_line(result: subprocess.CompletedProcess, flag: str) -> str:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, (result.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith((f"reconciler: flag --{flag} ", f"reconciler: flag --{flag}: ")), lines[0]
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


@pytest.mark.parametrize("flag, argument, words", [
    ("attributes", b"--attributes=rack:\xff", "'rack:\\xff' is not UTF-8 text"),
    ("default_container_info", "--default_container_info=" + "[" * 1000, "not a ContainerInfo: nested too deeply"),
    ("isolation", "--isolation=posix/cpu\nfoo", "contains the control character '\\n': a flag value is one line"),
    ("isolation", "--isolation=", "is empty: containers would run without isolation"),
    ("isolation", "--isolation=" + "x" * 3000, "Unknown or unsupported isolator 'xxxxxxxxxx"),
    ("xfs_project_range", "--xfs_project_range=[5000-10000", "'[5000-10000' must be a range like [5000-10000]"),
    ("xfs_project_range", "--xfs_project_range=[5000-4294967296]", "project ids are 32 bits (at most 4294967295)"),
    ("xfs_project_range", "--xfs_project_range=[0-10]", "project id 0 is not a project"),
    ("cgroups_net_cls_primary_handle", "--cgroups_net_cls_primary_handle=1_000", "'1_000' is not a decimal or hex"),
    ("cgroups_net_cls_primary_handle", "--cgroups_net_cls_primary_handle=٣", "'٣' is not a decimal or hexadecimal"),
    ("resync_interval", "--resync_interval=1ns", "'1ns' is too short: at least 100ms"),
    ("xfs_quota_headroom", "--xfs_quota_headroom=1Gi", "Mesos spells it 1GB"),
], ids=lambda value: value.decode(errors="replace")[:40] if isinstance(value, bytes) else str(value)[:40])
def test_the_reported_bad_values_exit_2_with_one_line_naming_the_flag(tmp_path: Path, flag: str, argument: str | bytes,
                                                                      words: str) -> None:
    line = the_error_line(once(tmp_path, argument), flag)
    assert line.startswith(f"reconciler: flag --{flag} (from command line): ") and words in line, line


FUZZ = {
    "empty": "", "newline": "\n", "non_utf8": "rack:\udcff", "huge": "1" + "0" * 309, "minus_one": "-1",
    "big_float": "1e308", "nan": "nan", "inf": "inf", "underscore": "1_000", "arabic_three": "٣",
    "long": "x" * 100_000,
}
# What is legitimately valid: a path or a file name (a directory named 'nan' is one), and empty where
# the flag's default is "unset" or "none". Every other value of FUZZ is refused, for every flag.
NAMES = {"manifests", "work_dir", "status_dir", "docker_registry", "docker_store_dir", "seccomp_config_dir",
         "cgroups_root", "seccomp_profile_name", "network_cni_config_dir", "network_cni_plugins_dir", "docker_config",
         "docker_registry_ca_file"}
EMPTY_IS_UNSET = {"status_dir", "docker_registry", "docker_store_dir", "seccomp_config_dir", "default_container_info",
                  "cgroups_net_cls_primary_handle", "image_providers", "attributes", "effective_capabilities",
                  "bounding_capabilities", "http_address", "seccomp_profile_name", "network_cni_config_dir",
                  "network_cni_plugins_dir", "default_container_dns", "egress_rate_limit_per_container",
                  "docker_config", "docker_registry_ca_file", "docker_insecure_registries"}


# Host names: "nan", "inf" and "1e308" are names a registry may have; "-1", "1_000" and "٣" are not.
HOST_NAMES = {"docker_insecure_registries"}


def accepted(flag: str, case: str) -> bool:
    if case == "empty":
        return flag in EMPTY_IS_UNSET
    if flag in HOST_NAMES:
        return case in ("big_float", "nan", "inf")
    return flag in NAMES and case in ("minus_one", "big_float", "nan", "inf", "underscore", "arabic_three")


@pytest.mark.parametrize("case", FUZZ)
@pytest.mark.parametrize("flag", config_module.FLAG_NAMES)
def test_any_value_of_any_flag_on_the_command_line_runs_or_exits_2_with_one_line(
        flag: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    value = FUZZ[case]
    if flag == "manifests" and accepted(flag, case):
        os.mkdir(value)     # a missing manifest directory is the agent's business, not a flag error
    else:
        os.mkdir("manifests")
    code = cli.main(["once", "--manifests=manifests", "--work_dir=work", *(f"--{k}={v}" for k, v in POSIX.items()),
                     f"--{flag}={value}"])
    err = capsys.readouterr().err
    if accepted(flag, case):
        assert code == 0 and "reconciler: flag" not in err, err[-2000:]
        return
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"reconciler: flag --{flag} (from command line): ") and len(lines[0]) < 600, lines[0]


@pytest.mark.parametrize("source", ["environment", "config file"])
@pytest.mark.parametrize("case", FUZZ)
@pytest.mark.parametrize("flag", config_module.FLAG_NAMES)
def test_any_value_of_any_flag_in_the_environment_or_a_config_file_is_accepted_or_one_line(
        flag: str, case: str, source: str, tmp_path: Path) -> None:
    argv = [f"--{k}={v}" for k, v in POSIX.items() if k != flag]
    environ: dict[str, str] = {}
    file = tmp_path / "agent.yaml"
    if source == "environment":
        environ[f"RECONCILER_{flag.upper()}"] = FUZZ[case]
        where = f"environment RECONCILER_{flag.upper()}"
    else:
        if case == "non_utf8":      # a YAML file cannot hold the byte \xff as text: the file itself is refused
            file.write_bytes(f"{flag}: ".encode() + b"rack:\xff\n")
        else:
            file.write_text(yaml.safe_dump({flag: FUZZ[case]}, allow_unicode=True, width=1 << 30))
        argv.append(f"--config={file}")
        where = f"config file {file}"
    if accepted(flag, case):
        json.dumps(load(argv, environ).public_flags())     # what _agent.json is written from
        return
    with pytest.raises(ConfigError) as refused:
        load(argv, environ)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 600, message
    if source == "config file" and case == "non_utf8":
        assert message.startswith(f"flag --config: {file} is not YAML text: invalid leading UTF-8 octet"), message
    else:
        assert message.startswith(f"flag --{flag} (from {where}): "), message


YAML_VALUES = {   # what a YAML file gives that no command line can: types, and numbers YAML reads itself
    "huge_int": "1" + "0" * 309, "minus_one": "-1", "big_float": "1.0e+308", "inf": ".inf", "nan": ".nan",
    "date": "2020-01-01", "binary": "!!binary aGk=", "null": "~", "true": "true", "list": "[a, b]",
    "mapping": "{a: b}", "nested": "[[[[1]]]]",
}
NEVER_A_FLAG_VALUE = {"huge_int", "minus_one", "big_float", "inf", "nan", "date", "binary"}


@pytest.mark.parametrize("case", YAML_VALUES)
@pytest.mark.parametrize("flag", config_module.FLAG_NAMES)
def test_any_yaml_value_of_any_flag_in_a_config_file_is_accepted_or_one_line(flag: str, case: str,
                                                                            tmp_path: Path) -> None:
    file = tmp_path / "agent.yaml"
    file.write_text(f"{flag}: {YAML_VALUES[case]}\n")
    argv = [f"--{k}={v}" for k, v in POSIX.items() if k != flag] + [f"--config={file}"]
    try:
        json.dumps(load(argv).public_flags())
    except ConfigError as refused:
        message = str(refused)
        assert message.startswith(f"flag --{flag} (from config file {file}): "), message
        assert "\n" not in message and len(message) < 600, message
    else:
        assert case not in NEVER_A_FLAG_VALUE, f"--{flag} took {YAML_VALUES[case]}"


def alias_bomb(levels: int = 9) -> str:
    """A 700-byte file that stands for 9**levels strings."""
    text = "x0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels + 1):
        text += f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return text + f"default_container_info: {{volumes: *l{levels}}}\n"


@pytest.mark.parametrize("content, words", [
    (alias_bomb(), "more than 10000 values (YAML aliases expanded), or nested more than 32 deep"),
    ("default_container_info: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 32 deep"),
    ("resync_interval: " + "1" * 5000 + "\n", "holds a value YAML cannot build: a number of more than 4300 digits"),
    ("resync_interval: !!timestamp soon\n", "holds a value YAML cannot build"),
    ("# flags\n" * 200_000, "is larger than 1 MiB"),
    ("resync_interval: [\n", "is not valid YAML at line 2, column 1: did not find expected node content"),
    ("attributes: *nowhere\n", "is not valid YAML at line 1, column 13: found undefined alias"),
    ("- resync_interval\n", "must be a mapping of flag names to values"),
    ("? [a, b]\n: 1\n", "found unhashable key"),
    ("1: 1\n", "unknown flag 1"),
], ids=["alias-bomb", "deep", "huge-int", "bad-timestamp", "2MiB", "syntax", "undefined-alias", "a-list",
        "key-a-list", "key-a-number"])
def test_a_config_file_no_flag_can_come_from_is_one_line(tmp_path: Path, content: str, words: str) -> None:
    # In a subprocess: the loader that 100000 brackets reach overflows the C stack, which kills the process.
    file = tmp_path / "agent.yaml"
    file.write_text(content)
    line = the_error_line(once(tmp_path, f"--config={file}"), "config")
    assert line.startswith(f"reconciler: flag --config: {file}") and words in line, line


# Issue 11: one Mesos grammar per kind of value ------------------------------------------------------

SIZE_FLAGS = ["container_logger_max_stdout_size", "container_logger_max_stderr_size", "docker_max_image_size",
              "xfs_quota_headroom"]


@pytest.mark.parametrize("flag", SIZE_FLAGS)
def test_every_size_flag_takes_mesos_bytes(flag: str) -> None:
    in_bytes = (lambda cfg: getattr(cfg, flag) * 1024 * 1024) if flag == "xfs_quota_headroom" else \
        (lambda cfg: getattr(cfg, flag))
    for given, size in (("1GB", 1 << 30), ("512KB", 512 << 10), ("20mb", 20 << 20), ("1TB", 1 << 40)):
        assert in_bytes(load([f"--{flag}={given}"])) == size
    for bad, words in (("1.5MB", "Mesos sizes are whole numbers"), ("1Gi", "Mesos spells it 1GB"),
                       ("10 MB", "a number with a unit, e.g. 10MB"), ("-1MB", "a number with a unit"),
                       ("9999999TB", "size too large")):
        with pytest.raises(ConfigError, match=rf"^flag --{flag} \(from command line\): (invalid size|size too large)") \
                as refused:
            load([f"--{flag}={bad}"])
        assert words in str(refused.value)


def test_xfs_quota_headroom_is_10MB_by_default_and_a_bare_number_stays_megabytes() -> None:
    assert load([]).xfs_quota_headroom == 10.0 == load(["--xfs_quota_headroom=10MB"]).xfs_quota_headroom
    assert load(["--xfs_quota_headroom=10"]).xfs_quota_headroom == 10.0           # as before: MB
    assert load(["--xfs_quota_headroom=512KB"]).xfs_quota_headroom == 0.5
    assert load(["--xfs_quota_headroom=0B"]).xfs_quota_headroom == 0.0
    assert load([], {"RECONCILER_XFS_QUOTA_HEADROOM": "1GB"}).xfs_quota_headroom == 1024.0


def test_a_bare_number_of_a_byte_flag_stays_bytes_and_a_log_size_is_at_least_a_page() -> None:
    assert load(["--docker_max_image_size=1048576"]).docker_max_image_size == 1 << 20
    assert load(["--container_logger_max_stdout_size=0"]).container_logger_max_stdout_size == 0
    with pytest.raises(ConfigError, match="'100' is less than one page"):
        load(["--container_logger_max_stderr_size=100"])


@pytest.mark.parametrize("flag, shortest, too_short", [
    ("resync_interval", "100ms", "99ms"), ("container_disk_watch_interval", "1ms", "999us"),
])
def test_duration_flags_have_a_floor_and_a_ceiling(flag: str, shortest: str, too_short: str) -> None:
    assert getattr(load([f"--{flag}={shortest}"]), flag) == pytest.approx(float(shortest[:-2]) / 1000)
    for bad, words in ((too_short, f"is too short: at least {shortest}"), ("1ns", "is too short"),
                       ("0secs", "is too short"), ("366days", "is too long: at most 365days"),
                       ("9" * 400 + "secs", "duration out of range")):
        with pytest.raises(ConfigError, match=rf"^flag --{flag} \(from command line\): ") as refused:
            load([f"--{flag}={bad}"])
        assert words in str(refused.value)


def test_an_empty_isolation_is_refused_from_every_source_and_leaving_it_out_is_the_default(tmp_path: Path) -> None:
    for argv, environ, where in ((["--isolation="], {}, "command line"),
                                 ([], {"RECONCILER_ISOLATION": " , "}, "environment RECONCILER_ISOLATION")):
        with pytest.raises(ConfigError, match=rf"^flag --isolation \(from {where}\): is empty: containers would run "
                                              "without isolation"):
            load(argv, environ)
    file = tmp_path / "agent.yaml"
    file.write_text("isolation: []\n")
    with pytest.raises(ConfigError, match=r"^flag --isolation \(from config file .*\): is empty"):
        load([f"--config={file}"])
    default = config_module.ROOT_ISOLATION if config_module.IS_ROOT else config_module.USER_ISOLATION
    assert load([]).isolation == default.split(",")
    # A program may still build a config without isolators, to test one isolator alone.
    assert AgentConfig(launcher="posix", isolation=[]).isolation == []


def test_xfs_project_range_is_mesos_range_of_32_bit_project_ids() -> None:
    assert load(["--xfs_project_range=[1-4294967295]"]).xfs_project_range == (1, 4294967295)
    assert load(["--xfs_project_range= [ 10 - 20 ] "]).xfs_project_range == (10, 20)
    for bad, words in (("[5000-10000", "must be a range like"), ("5000-10000]", "must be a range like"),
                       ("5000-10000", "must be a range like"), ("[٣-10]", "must be a range like"),
                       ("[1_0-20]", "must be a range like"), ("[20-10]", "is an empty range"),
                       ("[1-4294967296]", "project ids are 32 bits"), ("[0-10]", "is not a project"),
                       (f"[1-{'9' * 2000}]", "digits is out of range: project ids are 32 bits")):
        with pytest.raises(ConfigError, match=r"^flag --xfs_project_range \(from command line\): ") as refused:
            load([f"--xfs_project_range={bad}"])
        assert words in str(refused.value)


@pytest.mark.parametrize("bad", ["1_000", "٣", "0x1_0", "+1", "-1", "0x", "1e3", "0x10000", "65536", "0"])
def test_net_cls_primary_handle_is_ascii_decimal_or_hex_and_16_bits(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^flag --cgroups_net_cls_primary_handle \(from command line\): "):
        load([f"--cgroups_net_cls_primary_handle={bad}"])


def test_an_empty_boolean_is_refused_and_the_flag_alone_is_true() -> None:
    assert load(["--allow_privileged"]).allow_privileged is True
    with pytest.raises(ConfigError, match=r"^flag --allow_privileged \(from command line\): an empty value is neither"):
        load(["--allow_privileged="])
    with pytest.raises(ConfigError, match=r"^flag --allow_privileged \(from environment RECONCILER_ALLOW_PRIVILEGED\): "
                                          "an empty value is neither true nor false"):
        load([], {"RECONCILER_ALLOW_PRIVILEGED": ""})


@pytest.mark.parametrize("bad", ["٣", "1_000", "+5", "5.0", "1001"])
def test_container_logger_keep_is_an_ascii_whole_number(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^flag --container_logger_keep \(from command line\): "):
        load([f"--container_logger_keep={bad}"])


def test_http_address_port_is_ascii_digits() -> None:
    assert load(["--http_address=127.0.0.1:5051"]).http_address == "127.0.0.1:5051"
    with pytest.raises(ConfigError, match=r"^flag --http_address \(from command line\): '127.0.0.1:٣' is not host:port"):
        load(["--http_address=127.0.0.1:٣"])


def test_a_default_container_info_error_is_bounded_whatever_it_quotes() -> None:
    with pytest.raises(ConfigError) as refused:
        load([f'--default_container_info={{"bogus{"z" * 3000}": 1, "volumes": [{{"container_path": "rel"}}]}}'])
    message = str(refused.value)
    assert message.startswith("flag --default_container_info (from command line): ") and len(message) < 600, message


def test_json_escapes_cannot_smuggle_undecodable_text_into_agent_json() -> None:
    with pytest.raises(ConfigError, match=r"^flag --default_container_info \(from command line\): '\\xff' is not UTF-8"):
        load(['--default_container_info={"hostname": "\\udcff"}'])
    with pytest.raises(ConfigError, match=r"^flag --default_container_info \(from command line\): not a ContainerInfo: "
                                          "a number out of range"):
        load([f'--default_container_info={{"hostname": {"1" * 5000}}}'])
