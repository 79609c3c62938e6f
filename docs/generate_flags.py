"""Writes docs/flags.md from the agent's own flag list (reconciler/config.py), so the page cannot
drift from the code: tests/test_docs.py fails when a flag has no entry here or the page is stale.

    python3 docs/generate_flags.py            # rewrite docs/flags.md
    python3 docs/generate_flags.py --check    # exit 1 if docs/flags.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from reconciler import config
from reconciler.units import format_bytes, megabytes_to_bytes

PAGE = Path(__file__).with_name("flags.md")

# flag -> (group, how its default reads, what it does). The default is read from AgentConfig unless
# the second field says otherwise ("root": it depends on who runs the agent).
FLAGS: dict[str, tuple[str, str, str]] = {
    "manifests": ("Manifests and state", "", "The watched directory of manifests (`*.yaml`, `*.yml`, `*.json`). A ConfigMap volume or a git-sync link works: the swap of `..data` or of the link is seen."),
    "work_dir": ("Manifests and state", "root", "Checkpoints (`containers/<id>/`) and sandboxes (`sandboxes/<id>/`). Keep it across agent restarts and upgrades: the next agent adopts containers from it."),
    "status_dir": ("Manifests and state", "`<work_dir>/status`", "One `<name>.json` per container and the agent's `_agent.json`."),
    "resync_interval": ("Manifests and state", "duration", "Full re-list and re-check, besides file events; also the statistics refresh. At least `100ms`: each one re-lists the manifests and rewrites `_agent.json`."),
    "attributes": ("Manifests and state", "", "This node's attributes `k:v;k:v`, matched by a manifest's `spec.node_selector`; a manifest that does not match is not run here."),
    "default_container_info": ("Manifests and state", "", "JSON of a Mesos `ContainerInfo`, merged into manifests that give no `container`."),
    "isolation": ("Isolation and cgroups", "root", "Mesos isolator names, comma-separated; they run in Mesos's fixed order whatever the order given. An empty value is an error (leave the flag out for the default)."),
    "launcher": ("Isolation and cgroups", "root", "`linux` (namespaces, a cgroup per container, needs root) or `posix` (a process session)."),
    "cgroups_root": ("Isolation and cgroups", "", "Every container is `<hierarchy>/<cgroups_root>/<id>`; nothing outside it is touched. Use a different root per agent on one host."),
    "disallow_sharing_agent_pid_namespace": ("Isolation and cgroups", "", "Refuse `linux_info.share_pid_namespace: true`."),
    "effective_capabilities": ("Isolation and cgroups", "", "With `linux/capabilities`: what containers get (`NET_ADMIN,CHOWN` or Mesos's `{\"capabilities\": [...]}`; empty = none)."),
    "bounding_capabilities": ("Isolation and cgroups", "", "With `linux/capabilities`: the most a container may ask for."),
    "cgroups_net_cls_primary_handle": ("net_cls", "", "With `cgroups/net_cls`: the primary handle (16 bits, decimal or hexadecimal, e.g. `0x0100`) of the classids it hands out."),
    "cgroups_net_cls_secondary_handles": ("net_cls", "handles", "With `cgroups/net_cls`: the range of secondary handles, one per container."),
    "container_disk_watch_interval": ("Disk", "duration", "With `disk/du` and `disk/xfs`: how often sandboxes' usage is read (at least `1ms`)."),
    "enforce_container_disk_quota": ("Disk", "", "With `disk/du`: a container over its `disk` resource is destroyed (`Failed`, reason `DiskLimitation`). With `disk/xfs`: writes past `disk` fail (EDQUOT)."),
    "xfs_project_range": ("Disk", "range", "With `disk/xfs`: the XFS project ids it may use, one per container: `[low-high]`, within `[1-4294967295]` (32 bits; 0 is no project)."),
    "xfs_kill_containers": ("Disk", "", "With `disk/xfs` and `--enforce_container_disk_quota`: the soft limit is `disk`, the hard one `disk` + headroom, and a container past the soft limit is destroyed (`DiskLimitation`)."),
    "xfs_quota_headroom": ("Disk", "mb", "With `disk/xfs`: the room between the soft and the hard limit, a size (`10MB`, `512KB`); a bare number is MB, as it always was."),
    "image_providers": ("Images", "", "`docker` to run `container.image` (needs `filesystem/linux` and `docker/runtime` in `--isolation`)."),
    "docker_registry": ("Images", "`<work_dir>/images`", "Where images come from: a local directory of `<reference>.tar` archives or OCI layouts (Mesos's local registry)."),
    "docker_store_dir": ("Images", "`<work_dir>/store/docker`", "Where image layers are extracted, shared by every container."),
    "container_logger_max_stdout_size": ("Container logs", "bytes", "A sandbox's `stdout` is rotated past this size (at least a page; a bare number is bytes), checked every `--resync_interval` (Mesos's logrotate container logger; 0: never rotated)."),
    "container_logger_max_stderr_size": ("Container logs", "bytes", "The same for `stderr`."),
    "container_logger_keep": ("Container logs", "", "Rotated files kept (`stdout.1` ... `stdout.N`); 0 drops rotated output."),
    "http_address": ("HTTP", "", "`host:port` of `/healthz`, `/readyz`, `/metrics`, `/state`, `/monitor/statistics`; off when unset."),
    "seccomp_config_dir": ("Security", "", "Mesos's `linux/seccomp`: a directory of seccomp profiles in Docker's JSON format, named by `--seccomp_profile_name` and a manifest's `linux_info.seccomp.profile_name`."),
    "seccomp_profile_name": ("Security", "", "The seccomp profile of every container that names none: a file of `--seccomp_config_dir`, or `unconfined` for none. Unset: the agent's own default profile (docs/security.md)."),
    "allow_privileged": ("Security", "", "Let a manifest ask for `linux_info.privileged: true` (every capability, every device, no seccomp filter, no masked paths). Refused otherwise."),
    "docker_ignore_image_user": ("Security", "", "Mesos's behaviour: an image's `User` is ignored (with a warning) and the command runs as `command.user`, else root. Off: the image's `User` applies as in Docker."),
    "manifests_strict_modes": ("Security", "", "As sshd's StrictModes: manifests are read only from a directory (and its ancestors) and files owned by root (or the agent's user) and writable by nobody else; a sticky ancestor such as /tmp, and a read-only mount, are accepted. A refused directory destroys nothing. `false` relaxes it (also a flag of `reconciler validate`)."),
    "network_cni_config_dir": ("Networking", "", "With `network/cni`: the CNI network configurations (`.conf`, `.conflist`, `.json`; CNI spec up to 1.0.0), re-read at every launch. Required with `network/cni`."),
    "network_cni_plugins_dir": ("Networking", "", "With `network/cni`: where CNI plugins are found, a search path (`/usr/lib/cni:/opt/cni/bin`). Required with `network/cni`; a missing directory stops the agent at start."),
    "network_cni_metrics": ("Networking", "", "With `network/cni`: each container's interface counters (`net_rx_bytes`, ... `net_tx_dropped`) in its statistics."),
    "network_cni_plugin_timeout": ("Networking", "duration", "With `network/cni`: a plugin still running after this long is killed with its process group, and its ADD or DEL fails (at least `100ms`)."),
    "default_container_dns": ("Networking", "", "With `network/cni`: Mesos's JSON (`{\"mesos\": [{\"network_mode\": \"CNI\", \"network_name\": \"net1\", \"dns\": {\"nameservers\": [...]}}]}`) for networks whose plugins give no DNS; else the host's `/etc/resolv.conf` without loopback nameservers."),
    "egress_rate_limit_per_container": ("Networking", "", "With `network/cni`: what a container on CNI networks may send per second (`10MB`), unless its `resources.net_egress_rate` says; Mesos's flag. Needs a plugin with the `bandwidth` capability in the network's chain. Unset: no limit."),
    "docker_max_image_size": ("Images", "bytes", "The most an image's layers may expand to, all together (sparse files counted at their full size); a bigger image is refused. A bare number is bytes."),
}

ROOT_DEFAULTS = {
    "work_dir": "`/var/lib/reconciler` as root, else `./.reconciler/work`",
    "isolation": f"`{config.ROOT_ISOLATION}` as root, else `{config.USER_ISOLATION}`",
    "launcher": "`linux` as root, else `posix`",
}


def default_text(name: str, how: str) -> str:
    if how == "root":
        return ROOT_DEFAULTS[name]
    if how.startswith("`"):
        return how
    value: Any = config.AgentConfig.model_fields[name].default
    if how == "duration":
        return f"`{value:g}secs`"
    if how == "bytes":
        return f"`{format_bytes(value)}`"
    if how == "mb":
        return f"`{format_bytes(megabytes_to_bytes(value))}`"
    if how == "handles":
        return f"`{value[0]:#06x},{value[1]:#06x}`"
    if how == "range":
        return f"`[{value[0]}-{value[1]}]`"
    if value is None or value == [] or value == {}:
        return "unset"
    if value is False:
        return "off"
    return f"`{value}`"


def generate() -> str:
    missing = [n for n in config.FLAG_NAMES if n not in FLAGS]
    if missing:
        raise SystemExit(f"docs/generate_flags.py: no entry for flag --{missing[0]} (reconciler/config.py); add one to FLAGS")
    gone = [n for n in FLAGS if n not in config.FLAG_NAMES]
    if gone:
        raise SystemExit(f"docs/generate_flags.py: --{gone[0]} is no longer a flag of reconciler/config.py; remove it")
    lines = [
        "# Flags of `reconciler run` and `reconciler once`",
        "",
        "<!-- Generated by `python3 docs/generate_flags.py` from reconciler/config.py: edit that script, not this page. -->",
        "",
        "The names are Mesos's. Each flag can be given three ways; the command line wins over the",
        "environment, and the environment over the file:",
        "",
        "- on the command line: `--resync_interval=30secs` (a boolean flag alone means true);",
        "- as an environment variable `RECONCILER_<FLAG>`: `RECONCILER_RESYNC_INTERVAL=30secs` (the systemd",
        "  unit's `EnvironmentFile`, a pod's `env`);",
        "- as a key of the YAML file given by `--config FILE` (or `RECONCILER_CONFIG`): `resync_interval: 30secs`.",
        "",
        "A bad value stops the agent at start with one line naming the flag and where the value came from,",
        "and exit status 2. A value is one line of UTF-8 text (JSON of `--default_container_info` may span",
        "lines). An empty value (`--isolation=`, `RECONCILER_ISOLATION=`) is an error, except for a flag that is",
        "unset by default, where it means unset (and for the capability flags, where it means none).",
        "Durations use Mesos syntax (`500ms`, `15secs`, `1mins`, `2hrs`; `15s`, `1m` too), at most `365days`.",
        "Sizes use Mesos syntax: a whole number and a unit `B`, `KB`, `MB`, `GB` or `TB`, binary multiples",
        "(`1KB` = 1024 bytes), no space: `512KB`, `10MB`, `20GB`.",
        "`--log_level debug|info|warning|error` (default `info`) sets what the agent logs on stderr.",
        "",
    ]
    groups: dict[str, list[str]] = {}
    for name in config.FLAG_NAMES:
        group, how, text = FLAGS[name]
        shown = f"`--{name}`" + (" [BOOL]" if name in config.BOOL_FLAGS else "")
        groups.setdefault(group, []).append(f"| {shown} | `RECONCILER_{name.upper()}` | {default_text(name, how)} | {text} |")
    for group, rows in groups.items():
        lines += [f"## {group}", "", "| flag | environment | default | meaning |", "|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def main() -> int:
    text = generate()
    if "--check" in sys.argv[1:]:
        if not PAGE.exists() or PAGE.read_text() != text:
            print("docs/flags.md is stale: run python3 docs/generate_flags.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
