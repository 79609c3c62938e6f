"""A container's bandwidth: what the CNI `bandwidth` plugin is asked for at ADD, and changed in place.

The plugin (containernetworking/plugins, `bandwidth`) shapes with token bucket filters on the host:
what the container receives on the host side of its veth (tbf as that device's root qdisc), what it
sends on an ifb device its veth's ingress is redirected to (tbf there). A later change of rate is a
`tc qdisc replace` of those tbfs (through pyroute2's netlink), found among the host interfaces of the
ADD's result by their kind (veth, ifb): nothing restarts and no packet path is rebuilt.

Rates are bytes per second, as Mesos's --egress_rate_limit_per_container; the plugin takes bits. The
burst is a tenth of a second of the rate (at least 64 KiB, what a 10 ms timer tick at 50 Mbit/s
passes): enough to fill the link between ticks, too little to show above the rate over seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from reconciler.network.netns import in_new_thread

if TYPE_CHECKING:
    from reconciler.network.cni import Attachment

MIN_BURST_BYTES = 64 * 1024
LATENCY = "25ms"      # what the plugin gives its tbfs: the longest a packet waits for tokens
ROOT_HANDLE = 0x10000


class ShapingError(Exception):
    """A change the running shaping cannot take in place."""


@dataclass(frozen=True)
class Bandwidth:
    ingress: int | None = None     # bytes per second the container may receive; None: unlimited
    egress: int | None = None      # bytes per second it may send

    def __bool__(self) -> bool:
        return bool(self.ingress or self.egress)

    def runtime_config(self) -> dict[str, int]:
        """The plugin's `bandwidth` capability (bits, as CNI's runtimeConfig says); zero: no limit."""
        doc = {"ingressRate": 0, "ingressBurst": 0, "egressRate": 0, "egressBurst": 0}
        for direction, rate in (("ingress", self.ingress), ("egress", self.egress)):
            if rate:
                doc[f"{direction}Rate"] = rate * 8
                doc[f"{direction}Burst"] = burst_bytes(rate) * 8
        return doc

    @classmethod
    def from_runtime_config(cls, doc: Any) -> Bandwidth:
        if not isinstance(doc, dict):
            return cls()
        return cls(ingress=(doc.get("ingressRate") or 0) // 8 or None, egress=(doc.get("egressRate") or 0) // 8 or None)


def burst_bytes(rate: int) -> int:
    return max(rate // 10, MIN_BURST_BYTES)


def apply(attachment: Attachment, had: Bandwidth, wanted: Bandwidth) -> None:
    """Change the tbfs of one attachment from `had` to `wanted`. A direction the ADD left unlimited has
    no tbf (nor, for egress, an ifb to put one on): limiting it needs a new ADD, so it is refused."""
    in_new_thread("bandwidth", lambda: _apply(attachment, had, wanted))


def _apply(attachment: Attachment, had: Bandwidth, wanted: Bandwidth) -> None:
    devices = _host_devices(attachment)
    with IPRoute() as ipr:
        for direction, kind in (("ingress", "veth"), ("egress", "ifb")):
            before, after = getattr(had, direction), getattr(wanted, direction)
            if before == after:
                continue
            index = devices.get(kind)
            if index is None or not before:
                raise ShapingError(
                    f"the {direction} of CNI network '{attachment.network.name}' was not limited when the container "
                    f"joined it: a new {direction} limit takes a new container (change its spec to replace it)")
            if after:
                # pyroute2 takes a number as bytes per second (tc would say "4mbit").
                ipr.tc("replace", "tbf", index, ROOT_HANDLE, rate=after, burst=burst_bytes(after), latency=LATENCY)
            else:
                ipr.tc("del", index=index, root=True)


def _host_devices(attachment: Attachment) -> dict[str, int]:
    """kind -> ifindex of the host interfaces the ADD reported (veth's host side, the egress ifb)."""
    result = attachment.result
    names = [i.name for i in result.interfaces if not i.sandbox] if result is not None else []
    found: dict[str, int] = {}
    with IPRoute() as ipr:
        for name in names:
            indexes = ipr.link_lookup(ifname=name)
            if not indexes:
                continue
            [link] = ipr.get_links(indexes[0])
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind in ("veth", "ifb") and kind not in found:
                found[kind] = indexes[0]
    return found
