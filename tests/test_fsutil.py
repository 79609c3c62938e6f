"""Files the agent writes and reads (status files, `_agent.json`, checkpoints): never through a link.

Issue 10, item 8: the temp file was `._agent.json.<pid>.tmp`, opened without O_EXCL or O_NOFOLLOW,
so a user who could write the status directory planted a link there and the agent, as root,
overwrote the file it pointed to. Each test plants the attack and checks the linked-to file is
unchanged and the agent's own file is right.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from reconciler import fsutil
from reconciler.checkpoint import Checkpoints
from reconciler.status import AGENT_FILE, StatusWriter

SECRET = b"root:$6$stand-in-for-etc-shadow-7d1e:19700:0:99999:7:::\n"


def root_only_file(path: Path, data: bytes) -> Path:
    """A file only its owner (root, in these tests) may read, as /etc/shadow: 0600 from its creation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only host file, standing in for /etc/shadow."""
    return root_only_file(tmp_path / "secret", SECRET)


def plant_old_names(directory: Path, name: str, secret: Path) -> None:
    """Links at every name the old code would have written: the pid-based temp names of the next
    few hundred pids, and the target itself."""
    pid = os.getpid()
    for candidate in range(max(1, pid - 50), pid + 400):
        os.symlink(secret, directory / f".{name}.{candidate}.tmp")
    os.symlink(secret, directory / name)


def test_atomic_write_never_writes_through_a_planted_link(tmp_path: Path, secret: Path) -> None:
    directory = tmp_path / "status"
    directory.mkdir()
    plant_old_names(directory, "_agent.json", secret)
    fsutil.atomic_write(str(directory / "_agent.json"), b'{"ok": true}\n', durable=True, mode=0o644)

    assert secret.read_bytes() == SECRET and stat.S_IMODE(secret.stat().st_mode) == 0o600
    target = directory / "_agent.json"
    assert not target.is_symlink() and target.read_bytes() == b'{"ok": true}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o644          # exactly the mode asked, whatever the umask
    # The planted links are left as they were (never opened), and nothing of ours is left behind.
    ours = [p for p in directory.iterdir() if not p.is_symlink()]
    assert ours == [target]


def test_a_temp_file_is_private_until_complete_and_its_name_is_unpredictable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int]] = []
    real_rename = os.rename

    def spy(src, dst, *args, **kwargs):  # noqa: ANN001, ANN202 - os.rename's own signature
        st = os.stat(src, dir_fd=kwargs.get("src_dir_fd"), follow_symlinks=False)
        seen.append((src, stat.S_IMODE(st.st_mode)))
        return real_rename(src, dst, *args, **kwargs)

    real_write = os.write
    modes_while_writing: list[int] = []

    def write_spy(fd: int, data: bytes) -> int:
        modes_while_writing.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(fsutil.os, "rename", spy)
    monkeypatch.setattr(fsutil.os, "write", write_spy)
    for _ in range(2):
        fsutil.atomic_write(str(tmp_path / "web.json"), b"{}\n", durable=False, mode=0o644)
    monkeypatch.undo()

    assert modes_while_writing == [0o600, 0o600]     # others never read a half-written document
    (first, _), (second, _) = seen
    assert first != second and str(os.getpid()) not in first
    assert first.startswith(".web.json.") and len(first) > len(".web.json..tmp") + 30   # 128 random bits


def test_status_and_checkpoint_writers_replace_planted_links(tmp_path: Path, secret: Path) -> None:
    status_dir = tmp_path / "status"
    writer = StatusWriter(str(status_dir))
    writer.ensure_dir()
    plant_old_names(status_dir, AGENT_FILE, secret)
    plant_old_names(status_dir, "web.json", secret)
    writer.write_agent({"pid": os.getpid()}, time.time())
    writer.write("web", {"name": "web", "phase": "Running"}, time.time())

    checkpoints = Checkpoints(str(tmp_path / "containers"), str(tmp_path / "sandboxes"))
    checkpoints.ensure_dirs()
    os.makedirs(checkpoints.dir("c1"))
    plant_old_names(Path(checkpoints.dir("c1")), "termination.json", secret)
    plant_old_names(Path(checkpoints.dir("c1")), "pid.json", secret)
    checkpoints.write_termination("c1", {"exit_code": 0})
    checkpoints.write_pid("c1", 1, 2, "boot", True, 3.0)

    assert secret.read_bytes() == SECRET
    assert writer.read_agent()["pid"] == os.getpid()
    assert [doc["name"] for doc in writer.read_all()] == ["web"]
    assert checkpoints.read_termination("c1") == {"exit_code": 0}
    assert checkpoints.read_pid("c1")["boot_id"] == "boot"


def test_readers_refuse_links_fifos_and_oversized_files(tmp_path: Path, secret: Path) -> None:
    (tmp_path / "linked.json").symlink_to(secret)
    with pytest.raises(ValueError, match="linked.json is a symbolic link, not a regular file"):
        fsutil.read_json(str(tmp_path / "linked.json"))

    os.mkfifo(tmp_path / "fifo.json")
    outcome: list[object] = []
    reader = threading.Thread(target=lambda: outcome.append(_raises(fsutil.read_json, str(tmp_path / "fifo.json"))),
                              daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read_json blocked on a FIFO"
    assert isinstance(outcome[0], fsutil.UnsafeFileError) and "is a FIFO" in str(outcome[0])

    (tmp_path / "huge.json").write_bytes(b" " * 2048 + b"{}")
    with pytest.raises(ValueError, match="larger than 1024 bytes"):
        fsutil.read_json(str(tmp_path / "huge.json"), limit=1024)
    assert fsutil.read_json(str(tmp_path / "missing.json")) is None

    # A status directory with a linked status file: `reconciler status` shows nothing of the target.
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    json_secret = tmp_path / "secret.json"
    json_secret.write_text('{"name": "secret", "phase": "Running", "message": "root-only"}')
    os.chmod(json_secret, 0o600)
    (status_dir / "web.json").symlink_to(json_secret)
    (status_dir / AGENT_FILE).symlink_to(json_secret)
    writer = StatusWriter(str(status_dir))
    assert writer.read_all() == [] and writer.read_agent() is None


def test_configuration_an_operator_names_is_read_through_links_but_never_from_a_fifo_or_past_its_bound(
        tmp_path: Path) -> None:
    # A ConfigMap volume: each file is a link into ..data, itself a link to the current version.
    (tmp_path / "..2024_01_01").mkdir()
    (tmp_path / "..2024_01_01" / "web.yaml").write_bytes(b"kind: Container\n")
    (tmp_path / "..data").symlink_to("..2024_01_01")
    (tmp_path / "web.yaml").symlink_to("..data/web.yaml")
    st, data = fsutil.read_config_file(str(tmp_path / "web.yaml"), limit=1024)
    assert data == b"kind: Container\n" and st.st_size == len(data)

    os.mkfifo(tmp_path / "fifo.yaml")
    outcome: list[object] = []
    reader = threading.Thread(daemon=True, target=lambda: outcome.append(
        _raises(lambda: fsutil.read_config_file(str(tmp_path / "fifo.yaml"), limit=1024))))
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read_config_file blocked on a FIFO"
    assert isinstance(outcome[0], fsutil.NotRegularFileError) and "is a FIFO, not a regular file" in str(outcome[0])

    (tmp_path / "huge.yaml").write_bytes(b" " * 2048)
    with pytest.raises(fsutil.FileTooLargeError) as refused:
        fsutil.read_config_file(str(tmp_path / "huge.yaml"), limit=1024)
    assert (refused.value.size, refused.value.limit) == (2048, 1024)

    def refuse(fd: int, st: os.stat_result) -> None:
        raise PermissionError(f"not yours: mode {stat.S_IMODE(st.st_mode):o}")

    with pytest.raises(PermissionError, match="not yours"):    # refused before anything is read
        fsutil.read_config_file(str(tmp_path / "web.yaml"), limit=1024, check=refuse)
    with pytest.raises(FileNotFoundError):
        fsutil.read_config_file(str(tmp_path / "missing.yaml"), limit=1024)


def _raises(function, *args):  # noqa: ANN001, ANN202
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_remove_stale_temps_takes_only_old_temp_files_of_ours(tmp_path) -> None:
    import time as _time
    from reconciler.fsutil import atomic_write, remove_stale_temps
    old = _time.time() - 3600
    ours = tmp_path / f".web.json.{'a' * 32}.tmp"
    young = tmp_path / f".api.json.{'b' * 32}.tmp"
    other = tmp_path / ".web.json.notours.tmp"
    directory = tmp_path / f".dir.json.{'c' * 32}.tmp"
    for path in (ours, young, other):
        path.write_text("{")
    directory.mkdir()
    for path in (ours, other, directory):
        os.utime(path, (old, old))
    atomic_write(str(tmp_path / "web.json"), b"{}")
    assert remove_stale_temps(str(tmp_path)) == 1
    assert not ours.exists() and young.exists() and other.exists() and directory.is_dir()
    assert (tmp_path / "web.json").read_bytes() == b"{}"
