"""Issue 10, escape 7: `reconciler logs NAME --stderr`, run as root, followed a `stderr.7 -> <host file>`
link the container planted and printed the host file; a planted FIFO would hang it. The attacker
plants both (and stdout.3 -> the secret); the operator's command must print neither, and still show
the container's own output."""

from __future__ import annotations

from tests.security.conftest import Scenario


def test_logs_never_follow_what_the_container_planted(scenario: Scenario) -> None:
    out = scenario.logs_output
    assert scenario.canaries["host"] not in out
    assert "TIMED OUT" not in out, out
    assert "== end" in out                  # the container's own output is still shown
    assert "stderr.7" in out, out           # and the link it skipped is named
