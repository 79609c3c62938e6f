"""Flags: Mesos names and value syntax, precedence, and one clear line per bad value."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

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
    with pytest.raises(ConfigError, match=rf"^flag --resync_interval \(from config file {file}\): must be longer than zero"):
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
        "reconciler: flag --default_container_info: volumes[0].container_path: container_path 'rel' must be "
        "an absolute path; bogus: unknown field; expected one of: type, hostname, mesos, volumes, linux_info, rlimit_info"]


def test_capability_flags_take_a_list_mesos_json_or_nothing() -> None:
    assert load(["--effective_capabilities=NET_BIND_SERVICE,chown"]).effective_capabilities == ["NET_BIND_SERVICE", "CHOWN"]
    assert load(['--bounding_capabilities={"capabilities": ["NET_ADMIN"]}']).bounding_capabilities == ["NET_ADMIN"]
    assert load(["--effective_capabilities="]).effective_capabilities == []      # drop them all
    assert load([]).effective_capabilities is None                              # not managed
    with pytest.raises(ConfigError, match=r"unknown capability 'CAP_CHOWN' \(use CHOWN\)"):
        load(["--bounding_capabilities=CAP_CHOWN"])
