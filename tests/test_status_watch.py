"""`reconciler status --watch`: a live table, redrawn in place on a terminal, appended snapshots otherwise.

It only reads status files, so these tests write the documents themselves and run the real CLI:
once through a pipe (with --count to bound it) and once in a pseudo-terminal until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


def write_status(directory: Path, name: str, phase: str, pid: int | None = 4242, message: str = "") -> None:
    doc = {"apiVersion": "reconciler/v1", "kind": "ContainerStatus", "name": name, "phase": phase, "pid": pid,
           "restarts": 0, "started_at": "2026-01-01T00:00:00.000Z", "message": message}
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    os.rename(tmp, directory / f"{name}.json")


def watch_command(status_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", "status", "--watch", f"--status_dir={status_dir}", *extra]


def test_snapshots_are_appended_when_not_a_terminal_and_follow_the_files(tmp_path):
    write_status(tmp_path, "web", "Running")
    proc = subprocess.Popen(watch_command(tmp_path, "--interval=200ms", "--count=6"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("--- ") and first.strip().endswith("Z")
        assert proc.stdout.readline().split()[:2] == ["NAME", "PHASE"]
        assert proc.stdout.readline().split()[:3] == ["web", "Running", "4242"]
        # The container fails and another appears: a later snapshot shows both.
        write_status(tmp_path, "web", "Failed", pid=None, message="Command exited with status 3")
        write_status(tmp_path, "db", "Pending", pid=None)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    snapshots = ("\n" + rest).split("\n--- ")[1:]
    assert len(snapshots) == 5, rest                     # --count=6, the first read above
    assert "\x1b[" not in rest, "no terminal escapes into a pipe"
    last = snapshots[-1].splitlines()
    rows = {line.split()[0]: line.split() for line in last[2:] if line.strip()}
    assert rows["web"][:5] == ["web", "Failed", "-", "-", "0"] and "Command exited with status 3" in snapshots[-1]
    assert rows["db"][:2] == ["db", "Pending"]


def test_redrawn_in_place_on_a_terminal_until_ctrl_c(tmp_path):
    write_status(tmp_path, "web", "Running")
    master, slave = pty.openpty()
    proc = subprocess.Popen(watch_command(tmp_path, "--interval=100ms"), stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while output.count(b"\x1b[H") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                output += os.read(master, 65536)
        assert output.count(b"\x1b[H") >= 3, output
        os.killpg(proc.pid, signal.SIGINT)                # what Ctrl-C sends to the foreground group
        assert proc.wait(timeout=10) == 0
        try:
            while True:
                ready, _, _ = select.select([master], [], [], 0.2)
                if not ready:
                    break
                output += os.read(master, 65536)
        except OSError:
            pass     # EIO: the terminal's other side is closed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = output.decode()
    assert text.startswith("\x1b[H\x1b[2J"), repr(text[:40])   # cleared once, then homed for each redraw
    assert text.count("\x1b[2J") == 1
    assert "Every 100ms: reconciler status" in text
    assert "web" in text and "Running" in text and "\x1b[K" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


def test_bad_interval_is_one_line_exit_2(tmp_path):
    result = subprocess.run(watch_command(tmp_path, "--interval=soon"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().startswith("reconciler status: flag --interval: invalid duration 'soon'")


def test_watch_without_any_status_file_shows_the_empty_table(tmp_path):
    result = subprocess.run(watch_command(tmp_path / "none", "--count=1"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("--- ") and lines[1].split()[:2] == ["NAME", "PHASE"] and len(lines) == 2
