"""Sandbox log rotation (Mesos's logrotate container logger, done by the agent) and `reconciler logs`.

Unit tests pin down rotation and reading on plain files; the agent tests run a container that
writes numbered lines faster than a small limit, and check what an operator sees: at most N kept
files, a live file that starts again from 0, `logs` printing the whole history in order, and
`logs -f` following across rotations until the container is destroyed.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler import cli as cli_module
from reconciler import logs
from tests.test_fsutil import root_only_file

LIMIT = 8192


# Sizes and flags ---------------------------------------------------------------------------------

def test_bad_logger_flag_stops_the_agent_with_one_line(agent_env):
    result = agent_env.once("--container_logger_max_stdout_size=12parsecs")
    assert result.returncode == 2
    assert result.stderr.strip() == ("reconciler: flag --container_logger_max_stdout_size (from command line): "
                                     "invalid size '12parsecs': expected bytes or a number with a unit, "
                                     "e.g. 10MB, 512KB, 4096B")
    result = agent_env.once("--container_logger_keep=-1")
    assert result.returncode == 2 and "flag --container_logger_keep" in result.stderr


# Rotation on plain files -------------------------------------------------------------------------

def numbered(start: int, count: int) -> bytes:
    return b"".join(b"line-%d\n" % i for i in range(start, start + count))


def numbers(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"line-(\d+)\n", data)]


def missing(nums: list[int]) -> int:
    return sum(b - a - 1 for a, b in zip(nums, nums[1:]) if b > a + 1)


def collapse_supported(directory: Path) -> bool:
    """Whether this filesystem can cut the front of a file (ext4, XFS): rotation then loses nothing."""
    probe = directory / ".collapse-probe"
    block = os.statvfs(directory).f_bsize
    probe.write_bytes(b"x" * block * 2)
    try:
        with open(probe, "r+b") as f:
            return logs._libc.fallocate(f.fileno(), logs.FALLOC_FL_COLLAPSE_RANGE, 0, block) == 0
    finally:
        probe.unlink()


@pytest.fixture(params=["collapse", "truncate"])
def mode(request, tmp_path, monkeypatch):
    """Both ways a rotation cuts the live file: collapse where the filesystem can, else truncate."""
    if request.param == "collapse" and not collapse_supported(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no FALLOC_FL_COLLAPSE_RANGE (not ext4/XFS)")
    if request.param == "truncate":
        monkeypatch.setattr(logs, "FALLOC_FL_COLLAPSE_RANGE", 0x4000_0000)   # unknown mode: EOPNOTSUPP
    return request.param


def test_rotation_keeps_n_files_and_the_appending_writer_starts_again_at_zero(tmp_path, mode):
    sandbox = tmp_path
    block = os.statvfs(sandbox).f_bsize
    writer = os.open(sandbox / "stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    policy = logs.RotationPolicy(max_stdout_size=LIMIT, max_stderr_size=LIMIT, keep=3)
    written = b""
    try:
        for round_ in range(6):
            chunk = numbered(round_ * 1000, 1000)    # ~10 KB: over the limit each round
            os.write(writer, chunk)
            written += chunk
            assert logs.rotate_if_needed(str(sandbox), policy) == [str(sandbox / "stdout")]
            live_size = (sandbox / "stdout").stat().st_size
            assert live_size == 0 if mode == "truncate" else live_size < block
        os.write(writer, b"after\n")
        written += b"after\n"
    finally:
        os.close(writer)
    names = sorted(p.name for p in sandbox.iterdir())
    assert names == ["stdout", "stdout.1", "stdout.2", "stdout.3"]          # keep=3: the oldest dropped
    live = (sandbox / "stdout").read_bytes()
    # The appending writer's bytes land at the live file's new end: no hole where the old content was.
    assert b"\0" not in live
    if mode == "truncate":
        assert live == b"after\n"
        assert (sandbox / "stdout.1").read_bytes() == numbered(5000, 1000)  # newest rotated
        assert (sandbox / "stdout.3").read_bytes() == numbered(3000, 1000)  # oldest kept
    else:
        assert live.endswith(b"after\n") and len(live) < block + len(b"after\n")
        for index in (1, 2, 3):
            assert (sandbox / f"stdout.{index}").stat().st_size % block == 0
    assert (sandbox / "stdout.1").stat().st_mode & 0o777 == 0o640           # as the live file
    # Read back in order, the kept files and the live one are exactly the end of what was written.
    history = b"".join(logs.History(str(sandbox), "stdout").all())
    assert written.endswith(history) and len(history) > 3 * LIMIT
    # Under the limit: nothing happens.
    assert logs.rotate_if_needed(str(sandbox), policy) == []


def test_keep_zero_drops_the_output_and_size_zero_turns_rotation_off(tmp_path):
    (tmp_path / "stdout").write_bytes(numbered(0, 2000))
    (tmp_path / "stderr").write_bytes(numbered(0, 2000))
    logs.rotate_if_needed(str(tmp_path), logs.RotationPolicy(max_stdout_size=LIMIT, max_stderr_size=0, keep=0))
    assert (tmp_path / "stdout").stat().st_size == 0
    assert (tmp_path / "stderr").read_bytes() == numbered(0, 2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr", "stdout"]


def test_tail_spans_the_rotated_files(tmp_path):
    (tmp_path / "stdout.2").write_bytes(numbered(0, 5))
    (tmp_path / "stdout.1").write_bytes(numbered(5, 5))
    (tmp_path / "stdout").write_bytes(numbered(10, 2))
    history = logs.History(str(tmp_path), "stdout")
    assert history.tail(4) == numbered(8, 4)
    assert history.live_offset == len(numbered(10, 2))
    assert logs.History(str(tmp_path), "stdout").tail(100) == numbered(0, 12)
    assert logs.History(str(tmp_path), "stdout").tail(0) == b""


def test_follower_reads_across_rotations_without_losing_or_repeating(tmp_path, mode):
    path = tmp_path / "stdout"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(writer, numbered(0, 1000))
        follower = logs.Follower(str(tmp_path), "stdout", offset=0)
        got = follower.read()
        os.write(writer, numbered(1000, 1000))       # not read yet when the rotation comes
        logs.rotate(str(path), keep=2)
        os.write(writer, numbered(2000, 1000))
        got += follower.read()
        logs.rotate(str(path), keep=2)
        got += follower.read()                       # nothing new: no repeat
        os.write(writer, numbered(3000, 500))
        got += follower.read()
        os.write(writer, numbered(3500, 500))
        got += follower.read()                       # read past the next cut before it happens
        logs.rotate(str(path), keep=2)
        os.write(writer, numbered(4000, 10))
        got += follower.read()
        follower.close()
    finally:
        os.close(writer)
    assert got == numbered(0, 4010)


def test_follower_that_fell_behind_several_rotations_catches_up_in_order(tmp_path, mode):
    path = tmp_path / "stdout"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(writer, numbered(0, 1000))
        follower = logs.Follower(str(tmp_path), "stdout", offset=0)
        got = follower.read()
        for start in (1000, 2000, 3000):             # three rotations while it is not reading
            os.write(writer, numbered(start, 1000))
            logs.rotate(str(path), keep=5)
        os.write(writer, numbered(4000, 10))
        got += follower.read()
        follower.close()
    finally:
        os.close(writer)
    assert got == numbered(0, 4010)


WRITER_PROCESS = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while True:
    os.write(fd, b"line-%d\\n" % i)
    i += 1
"""


def test_rotation_under_a_writer_that_never_pauses_loses_nothing(tmp_path):
    if not collapse_supported(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no FALLOC_FL_COLLAPSE_RANGE: copy-then-truncate may lose a little")
    writer = subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, str(tmp_path / "stdout")])
    rotations = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if logs.rotate_if_needed(str(tmp_path), logs.RotationPolicy(LIMIT * 8, LIMIT * 8, keep=100_000)):
                rotations += 1
            time.sleep(0.005)
    finally:
        writer.kill()
        writer.wait()
    seen = numbers(b"".join(logs.History(str(tmp_path), "stdout").all()))
    assert rotations >= 10
    assert seen == list(range(len(seen))), f"lost {missing(seen)} lines in {rotations} rotations"


# The agent rotates; `reconciler logs` reads -----------------------------------------------------

@pytest.fixture
def env(agent_env):
    agent_env.launcher, agent_env.isolation = "posix", "posix/cpu,posix/mem"
    return agent_env


WRITER = "i=0; while :; do i=$((i+1)); echo line-$i; [ $((i % 100)) = 0 ] && sleep 0.01; done"


def cli(env, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args, f"--work_dir={env.work_dir}"],
                          capture_output=True, timeout=timeout, cwd=env.tmp)


def test_agent_rotates_logs_reads_and_follow_crosses_rotations(env):
    lossless = collapse_supported(env.tmp)
    env.write_manifest("chatty", WRITER, kill_grace_period="1secs")
    agent = env.start(resync_interval="300ms", container_logger_max_stdout_size="8KB", container_logger_keep=2)
    status = env.wait_status("chatty", lambda s: s["phase"] == "Running", timeout=30)
    sandbox = env.sandbox(status)
    followed_out = open(env.tmp / "followed", "wb")
    follow = subprocess.Popen([sys.executable, "-m", "reconciler", "logs", "chatty", "-f",
                               f"--work_dir={env.work_dir}"], stdout=followed_out, stderr=subprocess.PIPE,
                              cwd=env.tmp)
    try:
        # Wait for several rotations: `.1` replaced again and again, `.2` there, never a `.3`.
        seen_rotations = set()
        deadline = time.monotonic() + 30
        while len(seen_rotations) < 4 and time.monotonic() < deadline:
            try:
                seen_rotations.add(os.stat(sandbox / "stdout.1").st_ino)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        assert len(seen_rotations) >= 4, "the agent did not rotate stdout"
        names = {p.name for p in sandbox.iterdir() if not p.name.startswith(".")}   # not a rotation's temp file
        assert names == {"stdout", "stdout.1", "stdout.2", "stderr"}, names
        rotated_1 = numbers((sandbox / "stdout.1").read_bytes())
        assert len((sandbox / "stdout.2").read_bytes()) > LIMIT
        # The live file started again from 0 after the last rotation and carries on from `.1`.
        live = numbers((sandbox / "stdout").read_bytes())
        if live:
            assert live[0] > rotated_1[-1]
        # `logs`: the kept history in order, oldest first, ending with the live file.
        result = cli(env, "logs", "chatty")
        assert result.returncode == 0, result.stderr
        history = numbers(result.stdout)
        assert history == sorted(history) and history[0] > 1          # line-1 was rotated out (keep=2)
        assert missing(history) == 0 or not lossless, missing(history)
        tail = cli(env, "logs", "chatty", "--tail", "5")
        assert len(numbers(tail.stdout)) == 5 and tail.stdout.endswith(b"\n")

        # Removing the manifest destroys the container: `logs -f` ends by itself.
        (env.manifests / "chatty.yaml").unlink()
        _, err = follow.communicate(timeout=30)
        assert follow.returncode == 0, err
        assert b"ended" in err
        followed = numbers((env.tmp / "followed").read_bytes())
        assert followed[0] <= history[0], "-f printed the history kept when it started"
        assert followed == sorted(followed) and followed[-1] > rotated_1[-1]
        assert missing(followed) == 0 or not lossless, (missing(followed), [(a, b) for a, b in zip(followed, followed[1:]) if b != a + 1][:5])
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
        followed_out.close()
        env.stop(agent)


def test_logs_stderr_tail_and_a_container_that_ended(env):
    env.write_manifest("job", "echo one; echo two; echo oops >&2", restart_policy="Never")
    result = env.once()
    assert result.returncode == 0, result.stderr
    assert cli(env, "logs", "job").stdout == b"one\ntwo\n"
    assert cli(env, "logs", "job", "--stderr").stdout == b"oops\n"
    assert cli(env, "logs", "job", "--tail", "1").stdout == b"two\n"
    # -f on a container that already ended prints what it wrote and returns.
    followed = cli(env, "logs", "job", "-f", timeout=10)
    assert followed.returncode == 0 and followed.stdout == b"one\ntwo\n"


def test_logs_of_an_unknown_container_names_it(env):
    result = cli(env, "logs", "ghost")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().startswith("reconciler logs: no container named 'ghost': no status file ")


def test_logs_of_an_invalid_manifest_says_why_there_is_nothing(env):
    (env.manifests / "bad.yaml").write_text(
        '{"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "bad"}, "spec": {}}')
    env.once()
    result = cli(env, "logs", "bad")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("reconciler logs: container 'bad' has no sandbox: it is Invalid")


# --- the sandbox is the container's: rotation never writes or cuts through its links --------------

def test_rotation_refuses_a_stream_that_links_to_a_host_file(tmp_path: Path) -> None:
    sandbox, host = tmp_path / "sandbox", tmp_path / "host-file"
    sandbox.mkdir()
    host.write_bytes(b"precious\n" * 10_000)
    (sandbox / "stdout").symlink_to(host)
    os.link(host, sandbox / "stderr")                       # a hard link: the same file under two names
    policy = logs.RotationPolicy(max_stdout_size=4096, max_stderr_size=4096, keep=3)
    assert logs.rotate_if_needed(str(sandbox), policy) == []     # each refused (and logged), none followed
    with pytest.raises(OSError, match="regular file with a single link"):
        logs.rotate(str(sandbox / "stderr"), keep=3)
    assert host.read_bytes() == b"precious\n" * 10_000
    assert sorted(p.name for p in sandbox.iterdir()) == ["stderr", "stdout"]


def test_rotation_never_writes_through_a_planted_temp_link(tmp_path: Path) -> None:
    sandbox, target = tmp_path / "sandbox", tmp_path / "target"
    sandbox.mkdir()
    target.write_bytes(b"untouched")
    (sandbox / "stdout").write_bytes(b"line\n" * 5000)
    (sandbox / ".stdout.rotating").symlink_to(target)
    (sandbox / "stdout.1").symlink_to(target)
    logs.rotate(str(sandbox / "stdout"), keep=3)
    assert target.read_bytes() == b"untouched"
    assert (sandbox / "stdout.1").is_file() and not (sandbox / "stdout.1").is_symlink()
    assert (sandbox / "stdout.2").is_symlink()              # the container's own link, shifted, never followed


# --- `reconciler logs` never reads a host file through the container's links, nor blocks on its FIFOs --

SECRET = b"root:$6$not-a-real-hash-but-a-secret-4f1c9e:19700:0:99999:7:::\n"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """Stands in for /etc/shadow: a root-only file on the host."""
    return root_only_file(tmp_path / "host-secret", SECRET)


def test_history_and_follower_skip_links_and_fifos_the_container_planted(tmp_path: Path, secret_file: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "stderr.7").symlink_to(secret_file)          # the attack of issue 10, item 7
    os.mkfifo(sandbox / "stderr.3")                         # would block a plain open() forever
    (sandbox / "stderr.1").write_bytes(b"old\n")
    (sandbox / "stderr").write_bytes(b"new\n")
    started = time.monotonic()
    history = logs.History(str(sandbox), "stderr")
    assert b"".join(history.all()) == b"old\nnew\n"
    assert logs.History(str(sandbox), "stderr").tail(10) == b"old\nnew\n"
    assert time.monotonic() - started < 5
    assert history.skipped == ["stderr.7 is a symbolic link, not a regular file", "stderr.3 is a FIFO, not a regular file"]

    # The live file swapped for a link, and a planted `.1` while following: neither is read.
    follower = logs.Follower(str(sandbox), "stderr", offset=0)
    try:
        assert follower.read() == b"new\n"
        (sandbox / "stderr").unlink()
        (sandbox / "stderr").symlink_to(secret_file)
        (sandbox / "stderr.1").unlink()
        (sandbox / "stderr.1").symlink_to(secret_file)
        assert follower.read() == b""
        follower._file = None                                # as if the live file had gone: reopen
        assert follower.read() == b""
        assert "stderr is a symbolic link, not a regular file" in follower.skipped
    finally:
        follower.close()
    assert secret_file.read_bytes() == SECRET


def test_the_sandbox_itself_is_never_reached_through_a_link(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "stdout").write_bytes(b"x" * 3 * 4096)
    (tmp_path / "sandbox").symlink_to(real)
    with pytest.raises(OSError) as error:
        b"".join(logs.History(str(tmp_path / "sandbox"), "stdout").all())
    assert error.value.errno in (errno.ENOTDIR, errno.ELOOP)
    with pytest.raises(OSError):
        logs.rotate_if_needed(str(tmp_path / "sandbox"), logs.RotationPolicy(4096, 4096, 3))
    assert sorted(p.name for p in real.iterdir()) == ["stdout"]        # not rotated through the link
    found = cli_module.FoundContainer("web", "c1", str(tmp_path / "sandbox"), str(tmp_path / "c1"), str(tmp_path / "s"))
    with pytest.raises(cli_module.LogsError, match="is a symbolic link, not the sandbox the agent made"):
        found.open_sandbox()


def test_logs_command_prints_no_host_file_the_container_linked(env, secret_file: Path) -> None:
    # The container plants, in its own sandbox, what the issue saw: a rotated name linked to a host
    # file, a FIFO, and a live stdout swapped for a link.
    env.write_manifest("planter", f"echo mine >&2; ln -s {secret_file} stderr.7; mkfifo stderr.3; "
                                  f"echo out; rm stdout; ln -s {secret_file} stdout", restart_policy="Never")
    result = env.once()
    assert result.returncode == 0, result.stderr
    for args in (("--stderr",), ("--stderr", "-f"), ("--stderr", "--tail", "5"), (), ("-f",)):
        shown = cli(env, "logs", "planter", *args, timeout=20)
        assert shown.returncode == 0, shown.stderr
        assert b"not-a-real-hash" not in shown.stdout + shown.stderr
        assert shown.stdout == (b"mine\n" if "--stderr" in args else b"")
    warned = cli(env, "logs", "planter", "--stderr").stderr.decode()
    assert "not read: stderr.7 is a symbolic link, not a regular file" in warned, warned
    assert "not read: stderr.3 is a FIFO, not a regular file" in warned, warned
    assert secret_file.read_bytes() == SECRET
