"""network/cni: a container's own network namespace, joined to CNI networks (Mesos's network/cni).

A manifest's `container.network_infos` names networks of --network_cni_config_dir; none, or one
without a name, is the host network (as Mesos). `none` (built in) is loopback only.

Unlike Mesos, the namespace is made and attached in `prepare`, before the container's init exists:
the namespace is bind-mounted under `<work_dir>/cni/netns/<id>` (reconciler.network.netns), every
network's plugin chain ADDs an interface (eth0, eth1, ... in `network_infos` order), and the
container's /etc/hosts, /etc/hostname and /etc/resolv.conf are written from the results; the init
then joins the namespace (setns) and bind-mounts those files read-only. So a container's address is
in its /etc/hosts from its first instruction, and nothing is written to a file a container holds.

Write-ahead: each attachment (the exact configuration list used, the interface, the arguments) is
checkpointed in `<work_dir>/cni/<id>/networks.json` before its ADD, and again with the result after
it. Whatever point an agent dies at, cleanup finds enough for a DEL: plugins release what they gave a
container id (host-local's address, portmap's rules, bridge's veth). Cleanup DELs in reverse order
with the checkpointed configuration and result (the directory may have changed since), removes the
namespace, then the directory; it is idempotent, and orphans under `<work_dir>/cni` are cleaned at
recovery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from reconciler.container import ContainerConfig, ContainerState
from reconciler.fsutil import atomic_write, read_json
from reconciler.isolators.base import PRIVATE_ROOT, Isolator, IsolatorSetupError, LaunchInfo, PermanentError
from reconciler.launch_spec import MountStep
from reconciler.linux import syscalls
from reconciler.linux.mounts import remount_flags
from reconciler.network import cni, etc_files, netns, shaping
from reconciler.network.shaping import Bandwidth

if TYPE_CHECKING:
    from reconciler.config import AgentConfig
    from reconciler.models import NetworkInfo, Resources

log = logging.getLogger(__name__)

NONE_NETWORK = "none"          # loopback only, as Docker's and Kubernetes's "none"
CHECKPOINT = "networks.json"
ETC_DIR = "etc"
NETNS_DIR = "netns"
ETC_TARGETS = (("/etc/hosts", etc_files.HOSTS_FILE), ("/etc/hostname", etc_files.HOSTNAME_FILE),
               ("/etc/resolv.conf", etc_files.RESOLV_CONF_FILE))


def joined_networks(config: ContainerConfig) -> list["NetworkInfo"]:
    """The CNI networks a container joins, in order; empty for the host network."""
    container = config.spec.container
    if container is None:
        return []
    return [network for network in container.network_infos if network.name is not None]


class NetworkCniIsolator(Isolator):
    def __init__(self, config: "AgentConfig") -> None:
        super().__init__(config)
        if os.geteuid() != 0:
            raise IsolatorSetupError("flag --isolation: The 'network/cni' isolator requires root permissions")
        if not config.network_cni_plugins_dir:
            raise IsolatorSetupError("flag --network_cni_plugins_dir: Missing required '--network_cni_plugins_dir' "
                                     "flag (the network/cni isolator's plugins, e.g. /usr/lib/cni)")
        missing = [d for d in config.network_cni_plugin_path if not os.path.isdir(d)]
        if missing:
            raise IsolatorSetupError(f"flag --network_cni_plugins_dir: The CNI plugin directory '{missing[0]}' "
                                     "does not exist")
        if not config.network_cni_config_dir:
            raise IsolatorSetupError("flag --network_cni_config_dir: Missing required '--network_cni_config_dir' "
                                     "flag (the network/cni isolator's network configurations)")
        if not os.path.isdir(config.network_cni_config_dir):
            raise IsolatorSetupError(f"flag --network_cni_config_dir: The CNI network configuration directory "
                                     f"'{config.network_cni_config_dir}' does not exist")
        self.config_dir = config.network_cni_config_dir
        self.root = config.network_path
        self.netns_dir = os.path.join(self.root, NETNS_DIR)
        self.client = cni.CNIClient(config.network_cni_plugin_path, timeout=config.network_cni_plugin_timeout)
        self.metrics = config.network_cni_metrics
        self.default_dns = etc_files.DefaultContainerDns.from_mesos_json(config.default_container_dns) \
            if config.default_container_dns else None
        self.attachments: dict[str, list[cni.Attachment]] = {}   # container id -> its networks, in order
        # (network, ok) -> [count, seconds], for /metrics
        self.results: dict[str, dict[tuple[str, bool], list[float]]] = {"add": {}, "del": {}}
        self.check_failures = 0                                    # CNI CHECKs of adopted containers that failed

    # --- paths ---------------------------------------------------------------------------------
    def _dir(self, container_id: str) -> str:
        return os.path.join(self.root, container_id)

    def _checkpoint(self, container_id: str) -> str:
        return os.path.join(self._dir(container_id), CHECKPOINT)

    def _netns_path(self, container_id: str) -> str:
        # Through the directory's real path, as netns.create makes it (and CNI_NETNS names it).
        return netns.path_of(os.path.realpath(self.netns_dir), container_id)

    # --- prepare: namespace, ADDs, /etc files ----------------------------------------------------
    def prepare(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        networks = joined_networks(config)
        if not networks:
            return None
        joined = [network for network in networks if network.name != NONE_NETWORK]
        lists = [self._network_config(network.name) for network in joined]   # all known before anything is made
        bandwidth = self._bandwidth(config.spec.resources)
        path = self._netns_path(container_id)
        # Planned (and refused, for a limit no plugin can give) before the namespace is made.
        planned = [self._plan(container_id, path, index, network, config_list, bandwidth)
                   for index, (network, config_list) in enumerate(zip(joined, lists, strict=True))]
        os.makedirs(self._dir(container_id), mode=0o700, exist_ok=True)
        netns.create(self.netns_dir, container_id)
        done: list[cni.Attachment] = []
        for attachment in planned:
            self._write_checkpoint(container_id, [*done, attachment])      # write-ahead: a crash still DELs it
            done.append(self._timed("add", attachment.network.name, lambda a=attachment: a.add(self.client)))
            self._write_checkpoint(container_id, done)
        self.attachments[container_id] = done
        hostname = self._hostname(config)
        files = self._write_etc_files(container_id, hostname, done, [n.name for n in networks if n.name])
        return self._launch_info(config, path, hostname, files)

    async def prepare_async(self, container_id: str, config: ContainerConfig) -> LaunchInfo | None:
        if not joined_networks(config):
            return None
        return await asyncio.to_thread(self.prepare, container_id, config)   # plugins: up to their timeout

    async def cleanup_async(self, container_id: str) -> None:
        await asyncio.to_thread(self.cleanup, container_id)

    def _network_config(self, name: str | None) -> cni.NetworkConfigList:
        try:
            return cni.get_network(self.config_dir, str(name))
        except cni.UnknownNetworkError as exc:
            raise PermanentError(str(exc)) from None
        except cni.NetworkConfigError as exc:
            raise PermanentError(f"CNI network '{name}': {exc}") from None

    def _bandwidth(self, resources: "Resources") -> Bandwidth:
        egress = resources.net_egress_rate or self.config.egress_rate_limit_per_container
        return Bandwidth(resources.net_ingress_rate, egress)

    @staticmethod
    def _plan(container_id: str, path: str, index: int, network: "NetworkInfo",
              config_list: cni.NetworkConfigList, bandwidth: Bandwidth) -> cni.Attachment:
        labels = network.labels.labels if network.labels is not None else []
        capabilities: dict[str, Any] = {}
        if bandwidth:
            if not any(plugin.capabilities.get("bandwidth") for plugin in config_list.plugins):
                raise PermanentError(f"CNI network '{config_list.name}' cannot limit bandwidth: none of its "
                                     "plugins has the bandwidth capability (add {\"type\": \"bandwidth\", "
                                     "\"capabilities\": {\"bandwidth\": true}} to its plugins)")
            capabilities["bandwidth"] = bandwidth.runtime_config()
        if network.port_mappings:
            capabilities["portMappings"] = [{"hostPort": m.host_port, "containerPort": m.container_port,
                                             "protocol": m.protocol} for m in network.port_mappings]
        return cni.Attachment(network=config_list, container_id=container_id, netns_path=path, ifname=f"eth{index}",
                              args={label.key: label.value for label in labels if _cni_arg(label.key, label.value)},
                              capabilities=capabilities)

    def _timed(self, command: str, network: str, call: Any) -> Any:
        started = time.monotonic()
        ok = False
        try:
            value = call()
            ok = True
            return value
        finally:
            entry = self.results[command].setdefault((network, ok), [0, 0.0])
            entry[0] += 1
            entry[1] += time.monotonic() - started

    def _write_checkpoint(self, container_id: str, attachments: list[cni.Attachment]) -> None:
        doc = {"attachments": [attachment.to_json() for attachment in attachments]}
        atomic_write(self._checkpoint(container_id), json.dumps(doc).encode(), mode=0o600)

    @staticmethod
    def _hostname(config: ContainerConfig) -> str:
        container = config.spec.container
        return (container.hostname if container is not None and container.hostname else None) or config.name

    def _write_etc_files(self, container_id: str, hostname: str, attachments: list[cni.Attachment],
                         names: list[str]) -> etc_files.EtcFiles:
        addresses = [address.ip for a in attachments if a.result is not None for address in a.result.ip_addresses()]
        dns = [etc_files.DnsConfig(nameservers=a.result.dns.nameservers, domain=a.result.dns.domain,
                                   search=a.result.dns.search, options=a.result.dns.options,
                                   where=f"CNI network '{a.network.name}'")
               for a in attachments if a.result is not None and a.result.dns.nameservers]
        directory = os.path.join(self._dir(container_id), ETC_DIR)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        default = self.default_dns.for_networks(names) if self.default_dns is not None else None
        return etc_files.write_files(directory, hostname=hostname, addresses=addresses,
                                     network_dns=etc_files.DnsConfig.merged(dns) if dns else None, default_dns=default)

    @staticmethod
    def _launch_info(config: ContainerConfig, path: str, hostname: str, files: etc_files.EtcFiles) -> LaunchInfo:
        mounts: list[MountStep] = [PRIVATE_ROOT.copy()]
        if config.rootfs is None:
            # The host's /sys shows the host's interfaces (sysfs shows the namespace of whoever mounted
            # it): a sysfs mounted once in the container's namespace shows its own (as Mesos does).
            mounts.append({"source": "sysfs", "target": "/sys", "fstype": "sysfs", "data": None,
                           "flags": syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC | syscalls.MS_RDONLY})
        sources = {etc_files.HOSTS_FILE: files.hosts, etc_files.HOSTNAME_FILE: files.hostname,
                   etc_files.RESOLV_CONF_FILE: files.resolv_conf}
        for target, name in ETC_TARGETS:
            at = config.in_rootfs(target)
            mounts.append({"source": sources[name], "target": at, "fstype": None, "flags": syscalls.MS_BIND,
                           "data": None, "file": True})
            mounts.append({"source": None, "target": at, "fstype": None,
                           "flags": remount_flags(sources[name], syscalls.MS_RDONLY), "data": None})
        container = config.spec.container
        # filesystem/linux names an image container's UTS namespace when container.hostname is given.
        named_elsewhere = config.rootfs is not None and container is not None and container.hostname is not None
        return LaunchInfo(clone_namespaces=syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS, mounts=mounts,
                          hostname=None if named_elsewhere else hostname, network_namespace=path)

    # --- update: bandwidth in place --------------------------------------------------------------
    def update(self, container_id: str, resources: "Resources") -> None:
        """A new net_ingress_rate or net_egress_rate, applied to the token buckets the bandwidth plugin
        made at ADD (the host side of the container's veth, and the ifb its egress is redirected to)."""
        attachments = self.attachments.get(container_id)
        if not attachments:
            return
        wanted = self._bandwidth(resources)
        updated = []
        for attachment in attachments:
            had = Bandwidth.from_runtime_config(attachment.capabilities.get("bandwidth"))
            if wanted == had:
                updated.append(attachment)
                continue
            try:
                shaping.apply(attachment, had, wanted)
            except shaping.ShapingError as exc:
                raise PermanentError(str(exc)) from None
            capabilities = {k: v for k, v in attachment.capabilities.items() if k != "bandwidth"}
            if wanted:
                capabilities["bandwidth"] = wanted.runtime_config()
            updated.append(dataclasses.replace(attachment, capabilities=capabilities))
        self.attachments[container_id] = updated
        self._write_checkpoint(container_id, updated)

    # --- cleanup: DEL in reverse, namespace, files -------------------------------------------------
    def cleanup(self, container_id: str) -> None:
        attachments = self._load(container_id)
        errors = []
        for attachment in reversed(attachments):
            try:
                self._timed("del", attachment.network.name, lambda a=attachment: a.delete(self.client))
            except cni.CNIError as exc:
                errors.append(str(exc))
        if errors:
            # Kept: the next cleanup (a retried destroy, or the next agent's recovery) DELs again.
            raise RuntimeError("; ".join(errors))
        netns.remove(self.netns_dir, container_id)
        shutil.rmtree(self._dir(container_id), ignore_errors=True)
        self.attachments.pop(container_id, None)

    def _load(self, container_id: str) -> list[cni.Attachment]:
        known = self.attachments.get(container_id)
        if known is not None:
            return known
        try:
            doc = read_json(self._checkpoint(container_id))
        except (OSError, ValueError) as exc:
            log.warning("network/cni: the networks of container %s are unreadable (%s): removing its namespace only",
                        container_id, exc)
            return []
        if not isinstance(doc, dict):
            return []
        attachments = []
        for i, entry in enumerate(doc.get("attachments") or []):
            try:
                attachments.append(cni.Attachment.from_json(entry, f"{self._checkpoint(container_id)} [{i}]"))
            except cni.NetworkConfigError as exc:
                log.warning("network/cni: %s", exc)
        return attachments

    # --- recovery ------------------------------------------------------------------------------
    def recover(self, states: list[ContainerState], orphans: set[str]) -> None:
        live = {state.config.container_id for state in states}
        for state in states:
            if joined_networks(state.config):
                self.attachments[state.config.container_id] = self._load(state.config.container_id)
                self._check(state.config.container_id)
        known = set(netns.list_names(self.netns_dir)) if os.path.isdir(self.netns_dir) else set()
        if os.path.isdir(self.root):
            known |= {entry for entry in os.listdir(self.root) if entry != NETNS_DIR}
        for container_id in sorted((known - live) | (orphans & known)):
            try:
                self.cleanup(container_id)
            except Exception as exc:  # noqa: BLE001 - one orphan must not stop the agent's recovery
                log.error("network/cni: failed to clean up the networks of orphan container %s: %s",
                          container_id, exc)

    def _check(self, container_id: str) -> None:
        """CNI CHECK of an adopted container's attachments: what went wrong while the agent was away (a
        veth deleted, an address taken) is said in the log and counted in _agent.json; the container keeps
        running, as kubelet's runtimes do. Plugins whose CHECK fails on healthy containers are skipped."""
        for attachment in self.attachments.get(container_id, []):
            if attachment.result is None:
                continue
            try:
                report = self.client.check(attachment.network, attachment.container_id, attachment.netns_path,
                                           attachment.ifname, attachment.args, attachment.capabilities,
                                           attachment.result)
            except cni.CNIError as exc:
                self.check_failures += 1
                log.warning("network/cni: CHECK of container %s on CNI network '%s' failed: %s", container_id,
                            attachment.network.name, exc)
                continue
            for note in report.notes:
                log.info("network/cni: container %s: %s", container_id, note)

    # --- what it publishes -----------------------------------------------------------------------
    def status(self, container_id: str) -> dict[str, Any]:
        attachments = self.attachments.get(container_id)
        if attachments is None:
            return {}
        infos = []
        for attachment in attachments:
            addresses = attachment.result.ip_addresses() if attachment.result is not None else []
            infos.append({"name": attachment.network.name, "interface": attachment.ifname, "ip_addresses": [
                {"protocol": f"IPv{address.version}", "ip_address": str(address.ip)} for address in addresses],
                "port_mappings": [{"host_port": m["hostPort"], "container_port": m["containerPort"],
                                   "protocol": m["protocol"]}
                                  for m in attachment.capabilities.get("portMappings", [])]})
        return {"network_infos": infos or [{"name": NONE_NETWORK, "interface": "lo", "ip_addresses": [],
                                            "port_mappings": []}]}

    def usage(self, container_id: str) -> dict[str, float | int]:
        if not self.metrics or container_id not in self.attachments:
            return {}
        try:
            return dict(netns.statistics(self._netns_path(container_id)).as_resource_statistics())
        except OSError:
            return {}

    def agent_status(self) -> dict[str, Any]:
        operations = [{"command": command, "network": network, "result": "ok" if ok else "error", "count": count,
                       "seconds": round(seconds, 6)}
                      for command, by_network in self.results.items()
                      for (network, ok), (count, seconds) in sorted(by_network.items())]
        return {"config_dir": self.config_dir, "plugins_dir": self.config.network_cni_plugins_dir,
                "containers": len(self.attachments), "operations": operations,
                "check_failures": self.check_failures}


def _cni_arg(key: str, value: str) -> bool:
    """Labels become CNI_ARGS only when CNI_ARGS can carry them (`K=V;K=V`)."""
    return all(c not in key + value for c in ";=") and key.isascii() and value.isascii()
