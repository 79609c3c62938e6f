"""What a failure means for the control loop, carried by its type (kopf's PermanentError and
TemporaryError(delay), controller-runtime's TerminalError): the loop decides whether and when to try
again from the type alone, in one place (reconciler.loop.launch_failure), and the work queue owns the
backoff of failures nobody classified.

    PermanentError           not retried until the manifest changes (a bad user, an unsatisfiable request)
    TemporaryError(delay)    retried after `delay` seconds, or with backoff when it names none
    ResourceExhaustedError   retried as soon as a container's destroy gives a node resource back
    any other exception      a temporary error: retried with backoff

`reason` is what the container's status shows (Mesos-style: LaunchFailed, ProvisioningFailed, ...), and
`shows_failed` whether the container is Failed, rather than Pending, while it waits for its next try.
Stdlib only: every layer may raise these.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """A failure whose type tells the loop what to do with it."""

    reason = "LaunchFailed"
    shows_failed = False


class PermanentError(ReconcileError):
    """A launch that cannot succeed until the manifest changes (bad user, unsatisfiable request)."""


class TemporaryError(ReconcileError):
    """Worth another try: after `delay` seconds when given, else with the loop's backoff."""

    def __init__(self, *args: object, delay: float | None = None) -> None:
        super().__init__(*args)
        self.delay = delay


class ResourceExhaustedError(TemporaryError):
    """A node-local resource the launch needs is used up (net_cls handles, XFS project ids). The container
    is Failed with `reason`; its launch is tried again as soon as a container's destroy gives one back."""

    reason = "ResourceExhausted"
    shows_failed = True
