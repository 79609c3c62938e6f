"""The agent's Prometheus metrics, rendered in the text exposition format (version 0.0.4).

The agent's own figures (reconcile and pass durations, launch latency) are counted here as they
happen, on the event loop; per-container figures are read from the status documents the loop
publishes. `render` turns both into one text page, which the HTTP face serves as pre-rendered bytes:
nothing is computed while a scrape is answered.

Written by hand rather than with prometheus_client: the format is a few lines of text, and the
agent needs a page built at publish time and swapped in whole, not a registry walked on every
scrape from the server thread (which would compete with the busy loop for the GIL).

Metrics (all `reconciler_…`):
  reconcile_duration_seconds{result}   histogram  one reconcile of one name; result ok|failed|error
  reconciles_total{result}             counter    the same, counted
  sync_duration_seconds                histogram  a listing until the loop is idle again (a full pass)
  launch_latency_seconds               histogram  a spec first seen in a listing → its container Running
  containers{phase}                    gauge      names by the phase of their status document
  container_restarts_total{container}  counter    the status document's `restarts`
  container_disk_used_bytes / _limit_bytes{container}   gauge  from the disk isolator's status block
  container_memory_rss_bytes{container}, container_cpu_seconds_total{container,mode}  from statistics
  net_cls_handles{state}               gauge      used|free|total secondary handles (cgroups/net_cls)
  cni_operations_total{network,command,result}  counter  CNI ADD/DEL runs per network (network/cni)
  cni_operation_seconds_total{network,command,result}  counter  time in them
  manifest_errors{kind}                gauge      invalid documents, unparseable files, duplicate names
  build_info{version}                  gauge      1
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PHASES = ("Pending", "Running", "Succeeded", "Failed", "BackOff", "Terminating", "Invalid")

RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LAUNCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{key}="{escape(str(value))}"' for key, value in pairs)
    return "{" + inner + "}" if inner else ""


def header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


class Histogram:
    """One histogram family, children keyed by a tuple of label values."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...],
                 label_names: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.buckets, self.label_names = name, help_text, buckets, label_names
        self.children: dict[tuple[str, ...], list[Any]] = {}   # values -> [bucket counts, sum, count]

    def observe(self, value: float, *label_values: str) -> None:
        child = self.children.get(label_values)
        if child is None:
            child = self.children[label_values] = [[0] * len(self.buckets), 0.0, 0]
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            child[0][index] += 1
        child[1] += value
        child[2] += 1

    def count(self, *label_values: str) -> int:
        child = self.children.get(label_values)
        return child[2] if child else 0

    def render(self) -> str:
        out = [header(self.name, "histogram", self.help)]
        for values, (counts, total, count) in sorted(self.children.items()):
            base = list(zip(self.label_names, values, strict=True))
            cumulative = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                cumulative += n
                out.append(f"{self.name}_bucket{labels(base + [('le', number(float(bound)))])} {cumulative}\n")
            out.append(f"{self.name}_bucket{labels(base + [('le', '+Inf')])} {count}\n")
            out.append(f"{self.name}_sum{labels(base)} {number(total)}\n")
            out.append(f"{self.name}_count{labels(base)} {count}\n")
        return "".join(out)


class Counter:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, label_names
        self.children: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1) -> None:
        self.children[label_values] = self.children.get(label_values, 0) + amount

    def render(self) -> str:
        out = [header(self.name, "counter", self.help)]
        for values, value in sorted(self.children.items()):
            out.append(f"{self.name}{labels(zip(self.label_names, values, strict=True))} {number(value)}\n")
        return "".join(out)


def container_lines(name: str, doc: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """One container's samples, per family (restarts, disk used, disk limit, rss, cpu): rendered once
    per change of its status document, joined at every render."""
    tag = labels([("container", name)])
    restarts = f"reconciler_container_restarts_total{tag} {number(doc.get('restarts') or 0)}\n"
    disk = doc.get("disk") or {}
    used = f"reconciler_container_disk_used_bytes{tag} {number(disk['used_bytes'])}\n" \
        if disk.get("used_bytes") is not None else ""
    limit = f"reconciler_container_disk_limit_bytes{tag} {number(disk['limit_bytes'])}\n" \
        if disk.get("limit_bytes") is not None else ""
    statistics = doc.get("statistics") or {}
    rss = f"reconciler_container_memory_rss_bytes{tag} {number(statistics['mem_rss_bytes'])}\n" \
        if statistics.get("mem_rss_bytes") is not None else ""
    cpu = ""
    for mode in ("user", "system"):
        value = statistics.get(f"cpus_{mode}_time_secs")
        if value is not None:
            tags = labels([("container", name), ("mode", mode)])
            cpu += f"reconciler_container_cpu_seconds_total{tags} {number(value)}\n"
    return restarts, used, limit, rss, cpu


CONTAINER_FAMILIES = (
    ("reconciler_container_restarts_total", "counter",
     "Restarts of the container under its current spec (status `restarts`)."),
    ("reconciler_container_disk_used_bytes", "gauge",
     "Disk used by the container's sandbox, as the disk isolator last measured it."),
    ("reconciler_container_disk_limit_bytes", "gauge", "The container's disk limit (its `disk` resource)."),
    ("reconciler_container_memory_rss_bytes", "gauge", "Resident memory of the container (statistics mem_rss_bytes)."),
    ("reconciler_container_cpu_seconds_total", "counter",
     "CPU time of the container (statistics cpus_user/system_time_secs)."),
)


def cni_lines(operations: list[dict[str, Any]]) -> list[str]:
    """network/cni: CNI ADD and DEL of each network, by result, and the time they took (a sum: its rate
    over the count's is the mean latency)."""
    def tags(op: dict[str, Any]) -> str:
        return labels([("network", op["network"]), ("command", op["command"].upper()), ("result", op["result"])])

    out = [header("reconciler_cni_operations_total", "counter",
                  "CNI plugin chain runs (ADD, DEL) per network, by result.")]
    for op in operations:
        out.append(f"reconciler_cni_operations_total{tags(op)} {op['count']}\n")
    out.append(header("reconciler_cni_operation_seconds_total", "counter",
                      "Time spent in CNI plugin chains (ADD, DEL) per network, by result."))
    for op in operations:
        out.append(f"reconciler_cni_operation_seconds_total{tags(op)} {number(op['seconds'])}\n")
    return out


class AgentMetrics:
    """What the loop counts as it goes; per-container samples come from status documents at render time."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.reconcile_duration = Histogram(
            "reconciler_reconcile_duration_seconds",
            "Time to reconcile one name (read desired and observed state, act), by result.",
            RECONCILE_BUCKETS, ("result",))
        self.reconciles = Counter("reconciler_reconciles_total", "Reconciles of one name, by result "
                                  "(ok; failed: a launch failure is recorded; error: an unexpected exception).",
                                  ("result",))
        self.sync_duration = Histogram(
            "reconciler_sync_duration_seconds",
            "A full pass: from a listing of the manifest directory until every name it woke was reconciled.",
            SYNC_BUCKETS)
        self.launch_latency = Histogram(
            "reconciler_launch_latency_seconds",
            "From the listing that first showed a spec to its container's status Running.",
            LAUNCH_BUCKETS)

    def reconciled(self, seconds: float, result: str) -> None:
        self.reconcile_duration.observe(seconds, result)
        self.reconciles.inc(result)

    def render(self, containers: dict[str, tuple[str, str, str, str, str]], phases: dict[str, int],
               net_cls: dict[str, Any] | None, manifest_errors: dict[str, int],
               cni: dict[str, Any] | None = None) -> bytes:
        out = [header("reconciler_build_info", "gauge", "The agent's version."),
               f"reconciler_build_info{labels([('version', self.version)])} 1\n",
               self.reconcile_duration.render(), self.reconciles.render(), self.sync_duration.render(),
               self.launch_latency.render(),
               header("reconciler_containers", "gauge", "Containers (names) by the phase of their status document.")]
        for phase in sorted(set(PHASES) | set(phases)):
            out.append(f"reconciler_containers{labels([('phase', phase)])} {phases.get(phase, 0)}\n")
        names = sorted(containers)
        for index, (family, kind, help_text) in enumerate(CONTAINER_FAMILIES):
            out.append(header(family, kind, help_text))
            out.extend(containers[name][index] for name in names)
        if net_cls is not None and net_cls.get("managed"):
            out.append(header("reconciler_net_cls_handles", "gauge",
                              "net_cls secondary handles of the primary handle, by state (used, free, total)."))
            primary = str(net_cls.get("primary", ""))
            for state in ("used", "free", "total"):
                value = net_cls.get(f"handles_{state}")
                if value is not None:
                    tags = labels([("primary", primary), ("state", state)])
                    out.append(f"reconciler_net_cls_handles{tags} {value}\n")
        if cni is not None:
            out.extend(cni_lines(cni.get("operations") or []))
        out.append(header("reconciler_manifest_errors", "gauge", "Problems in the manifest directory now: "
                          "invalid documents, unparseable files, duplicate names."))
        for kind in ("invalid_document", "invalid_file", "duplicate_name"):
            out.append(f"reconciler_manifest_errors{labels([('kind', kind)])} {manifest_errors.get(kind, 0)}\n")
        return "".join(out).encode()
