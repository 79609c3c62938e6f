"""The Helm chart, checked with Helm's own Go code: `helm lint` (helm-sdkpy), offline rendering and
values.schema.json validation (helm-python-sdk), then assertions on the rendered objects.

Both packages need Python >= 3.12; they live in the virtualenv .ci/run makes (/opt/helmvenv, or
$RECONCILER_HELM_VENV) and are driven through tests/helm_driver.py in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import config as agent_config

from tests.conftest import REPO

CHART = REPO / "helm" / "reconciler"
VENV = Path(os.environ.get("RECONCILER_HELM_VENV", "/opt/helmvenv"))
PYTHON = VENV / "bin" / "python"
DRIVER = Path(__file__).with_name("helm_driver.py")


def _venv_problem() -> str | None:
    if not PYTHON.exists():
        return f"{PYTHON} is missing: .ci/run makes it (python3.12 -m venv {VENV}; pip install helm-sdkpy helm-python-sdk)"
    probe = subprocess.run([str(PYTHON), "-c", "import helm_sdkpy, helm_python"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{VENV} lacks helm-sdkpy or helm-python-sdk: {probe.stderr.strip().splitlines()[-1:]}"
    return None


PROBLEM = _venv_problem()
if PROBLEM and os.environ.get("CI"):
    # In CI .ci/run has made the virtualenv: its absence is a failure, never a quiet skip.
    raise RuntimeError(f"the Helm test environment is broken: {PROBLEM}")
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def helm(op: str, values: dict[str, Any] | None = None, chart: Path = CHART, **extra: Any) -> dict[str, Any]:
    request = {"op": op, "chart": str(chart), "values": values, **extra}
    done = subprocess.run([str(PYTHON), str(DRIVER)], input=json.dumps(request), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def render(values: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The rendered chart: {"Kind/name": object}, plus "NOTES" (text)."""
    answer = helm("render", values, **extra)
    assert answer["ok"], answer
    objects: dict[str, Any] = {}
    for path, text in answer["result"].items():
        if path.endswith("NOTES.txt"):
            objects["NOTES"] = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def daemonset(objects: dict[str, Any]) -> dict[str, Any]:
    [ds] = [o for k, o in objects.items() if k.startswith("DaemonSet/")]
    return ds


def container(ds: dict[str, Any], name: str = "agent") -> dict[str, Any]:
    [c] = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


def volumes(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}


def flag(c: dict[str, Any], name: str) -> str | None:
    found = [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}=")]
    assert len(found) <= 1, c["args"]
    return found[0] if found else None


# helm lint ---------------------------------------------------------------------------------------

def test_helm_lint_through_helm_sdkpy_finds_nothing_worse_than_info():
    answer = helm("sdk_lint")
    assert answer["ok"], answer
    worse = [m for m in answer["result"]["messages"] if m["severity"] >= 2]   # 2 warning, 3 error
    assert not worse and not answer["result"]["errors"], answer


@pytest.mark.parametrize("values", [
    {},
    {"manifests": {"source": "hostPath", "hostPath": {"path": "/srv/manifests"}}},
    {"manifests": {"source": "gitSync", "gitSync": {"repo": "https://git.example/ops/fleet.git", "path": "pools/gpu",
                                                     "sshSecretName": "deploy-key"}}},
    {"manifests": {"source": "configMap", "configMap": {"create": False, "name": "fleet-manifests"}},
     "agent": {"attributes": {"pool": "gpu"}, "statusDir": "/run/reconciler/status"}},
], ids=["defaults", "hostPath", "gitSync", "existing-configMap"])
def test_helm_lint_strict_passes_for_each_manifest_source(values):
    answer = helm("lint", values)
    assert answer["ok"], answer
    problems = [m for m in answer["result"]["messages"] if m["severity"] >= 2]
    assert not problems and not answer["result"]["errors"], answer["result"]


def test_helm_lint_reports_a_broken_template(tmp_path):
    broken = tmp_path / "reconciler"
    shutil.copytree(CHART, broken)
    ds = broken / "templates" / "daemonset.yaml"
    ds.write_text(ds.read_text().replace("{{- end }}\n      volumes:", "      volumes:", 1))
    answer = helm("lint", None, chart=broken)
    assert answer["ok"], answer
    assert any(m["severity"] == 3 and "daemonset.yaml" in (m["error"] + m["path"]) for m in answer["result"]["messages"]), answer


# the DaemonSet ------------------------------------------------------------------------------------

def test_daemonset_runs_the_agent_privileged_with_the_hosts_pids_cgroups_and_directories():
    objects = render(name="edge", namespace="ops")
    ds = daemonset(objects)
    assert ds["metadata"]["name"] == "edge-reconciler" and ds["metadata"]["namespace"] == "ops"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    agent = container(ds)
    assert agent["securityContext"] == {"privileged": True}
    assert agent["image"] == "reconciler:0.1.0"      # the tag defaults to the chart's appVersion
    # The agent enters the host's cgroup namespace, then runs.
    assert agent["command"] == ["nsenter", "--cgroup=/proc/1/ns/cgroup", "--", "reconciler", "run"]

    vols, mnts = volumes(ds), mounts(agent)
    assert vols["cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert mnts["/sys/fs/cgroup"]["name"] == "cgroup"
    # work_dir is the host's, at the same path, so the next pod finds the checkpoints.
    assert vols["work-dir"]["hostPath"] == {"path": "/var/lib/reconciler", "type": "DirectoryOrCreate"}
    assert mnts["/var/lib/reconciler"]["name"] == "work-dir"
    assert mnts["/var/lib/reconciler"]["mountPropagation"] == "Bidirectional"   # namespaces outlive the pod
    assert flag(agent, "work_dir") == "/var/lib/reconciler"
    assert flag(agent, "status_dir") == "/var/lib/reconciler/status"   # inside the work-dir volume
    assert flag(agent, "launcher") == "linux"
    assert flag(agent, "cgroups_root") == "reconciler"
    assert flag(agent, "attributes") is None
    # No subPath anywhere: a subPath mount never sees a ConfigMap update.
    assert not [m for m in agent["volumeMounts"] if "subPath" in m or "subPathExpr" in m]


def test_probes_metrics_and_the_http_address_agree_on_one_port():
    ds = daemonset(render({"http": {"port": 6060}}))
    agent = container(ds)
    assert agent["ports"] == [{"name": "http", "containerPort": 6060, "protocol": "TCP"}]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert agent["livenessProbe"]["failureThreshold"] >= 3
    assert flag(agent, "http_address") == "$(POD_IP):6060"
    [pod_ip] = [e for e in agent["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "6060", "prometheus.io/path": "/metrics"}
    bound = container(daemonset(render({"http": {"port": 6060, "bindAddress": "127.0.0.1"},
                                        "metrics": {"scrapeAnnotations": False}})))
    assert flag(bound, "http_address") == "127.0.0.1:6060"


def test_update_strategy_grace_period_resources_tolerations_and_node_selector():
    ds = daemonset(render({
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "20%"}},
        "terminationGracePeriodSeconds": 45,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "nodeSelector": {"pool": "gpu"},
        "image": {"repository": "registry.example/reconciler", "tag": "1.2.3"},
    }))
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "20%"}}
    assert pod["terminationGracePeriodSeconds"] == 45
    assert container(ds)["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert container(ds)["image"] == "registry.example/reconciler:1.2.3"
    defaults = daemonset(render())
    assert defaults["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert defaults["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]


def test_node_pool_attributes_become_the_attributes_flag():
    agent = container(daemonset(render({"agent": {"attributes": {"zone": "eu-1", "pool": "gpu", "gpus": 8}},
                                        "nodeSelector": {"pool": "gpu"}})))
    assert flag(agent, "attributes") == "gpus:8;pool:gpu;zone:eu-1"   # sorted: a stable pod template


def test_rendered_args_are_flags_the_agent_accepts(tmp_path):
    """The chart's command line, parsed by the agent's own flag code (reconciler/config.py)."""
    agent = container(daemonset(render({"agent": {"attributes": {"pool": "gpu", "rack": "r12"},
                                                  "extraArgs": ["--enforce_container_disk_quota"]}})))
    args = [a.replace("$(POD_IP)", "10.1.2.3") for a in agent["args"]]
    if os.geteuid() != 0:
        args = [a for a in args if not a.startswith("--launcher=")]   # linux needs root: not under test here
    parser = argparse.ArgumentParser()
    agent_config.add_flags(parser)
    parsed = agent_config.load(parser.parse_args(args), environ={})
    assert parsed.manifests == "/etc/reconciler/manifests"
    assert parsed.status_path == "/var/lib/reconciler/status"
    assert parsed.attributes == {"pool": "gpu", "rack": "r12"}
    assert parsed.isolation == agent_config.ROOT_ISOLATION.split(",")
    assert parsed.resync_interval == 10.0
    assert parsed.enforce_container_disk_quota is True
    assert parsed.http_address == "10.1.2.3:5051"


def test_a_status_dir_outside_the_work_dir_gets_its_own_host_path():
    ds = daemonset(render({"agent": {"statusDir": "/run/reconciler/status"}}))
    agent = container(ds)
    assert flag(agent, "status_dir") == "/run/reconciler/status"
    assert volumes(ds)["status-dir"]["hostPath"] == {"path": "/run/reconciler/status", "type": "DirectoryOrCreate"}
    assert mounts(agent)["/run/reconciler/status"]["name"] == "status-dir"
    assert "status-dir" not in volumes(daemonset(render()))


def test_the_service_account_has_no_token_and_can_be_left_out():
    objects = render(name="edge")
    assert objects["ServiceAccount/edge-reconciler"]["automountServiceAccountToken"] is False
    assert daemonset(objects)["spec"]["template"]["spec"]["serviceAccountName"] == "edge-reconciler"
    without = render({"serviceAccount": {"create": False}}, name="edge")
    assert not [k for k in without if k.startswith("ServiceAccount/")]
    assert daemonset(without)["spec"]["template"]["spec"]["serviceAccountName"] == "default"


# manifest sources ----------------------------------------------------------------------------------

def test_configmap_of_manifests_is_mounted_as_a_directory():
    examples = {p.name: p.read_text() for p in sorted((REPO / "manifests").glob("*.yaml"))}
    objects = render({"manifests": {"configMap": {"files": {**examples, "inline.yaml": {
        "apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": "inline"},
        "spec": {"command": {"value": "exec sleep 300"}}}}}}}, name="edge")
    cm = objects["ConfigMap/edge-reconciler-manifests"]
    assert sorted(cm["data"]) == sorted([*examples, "inline.yaml"])
    for name, text in examples.items():
        assert list(yaml.safe_load_all(cm["data"][name])) == list(yaml.safe_load_all(text)), name
    assert yaml.safe_load(cm["data"]["inline.yaml"])["metadata"]["name"] == "inline"
    ds = daemonset(objects)
    agent = container(ds)
    assert volumes(ds)["manifests"] == {"name": "manifests", "configMap": {"name": "edge-reconciler-manifests"}}
    mount = mounts(agent)["/etc/reconciler/manifests"]
    assert mount == {"name": "manifests", "mountPath": "/etc/reconciler/manifests", "readOnly": True}
    assert flag(agent, "manifests") == "/etc/reconciler/manifests"


def test_an_existing_configmap_is_mounted_not_made():
    objects = render({"manifests": {"configMap": {"create": False, "name": "fleet"}}})
    assert not [k for k in objects if k.startswith("ConfigMap/")]
    assert volumes(daemonset(objects))["manifests"]["configMap"] == {"name": "fleet"}
    answer = helm("render", {"manifests": {"configMap": {"create": False}}})
    assert not answer["ok"] and "manifests.configMap.name is required" in answer["message"], answer


def test_host_path_manifests():
    objects = render({"manifests": {"source": "hostPath", "hostPath": {"path": "/srv/fleet"}}})
    assert not [k for k in objects if k.startswith("ConfigMap/")]
    ds = daemonset(objects)
    agent = container(ds)
    assert volumes(ds)["manifests"]["hostPath"] == {"path": "/srv/fleet", "type": "DirectoryOrCreate"}
    assert mounts(agent)["/srv/fleet"]["readOnly"] is True
    assert flag(agent, "manifests") == "/srv/fleet"


def test_git_sync_sidecar_feeds_the_agent_through_a_shared_volume():
    ds = daemonset(render({"manifests": {"source": "gitSync", "gitSync": {
        "repo": "git@git.example:ops/fleet.git", "ref": "main", "path": "/pools/gpu/", "period": "15s",
        "sshSecretName": "fleet-deploy-key"}}}))
    agent, sync = container(ds), container(ds, "git-sync")
    assert flag(agent, "manifests") == "/git/current/pools/gpu"
    assert mounts(agent)["/git"] == {"name": "git", "mountPath": "/git", "readOnly": True}
    assert "manifests" not in volumes(ds)
    assert volumes(ds)["git"] == {"name": "git", "emptyDir": {}}
    env = {e["name"]: e.get("value") for e in sync["env"]}
    assert env["GITSYNC_REPO"] == "git@git.example:ops/fleet.git" and env["GITSYNC_REF"] == "main"
    assert env["GITSYNC_ROOT"] == "/git" and env["GITSYNC_LINK"] == "current" and env["GITSYNC_PERIOD"] == "15s"
    assert env["GITSYNC_SSH_KEY_FILE"] == "/etc/git-secret/ssh"
    assert mounts(sync)["/git"]["name"] == "git" and not mounts(sync)["/git"].get("readOnly")
    assert volumes(ds)["git-secret"]["secret"] == {"secretName": "fleet-deploy-key", "defaultMode": 0o440}
    assert ds["spec"]["template"]["spec"]["securityContext"] == {"fsGroup": 65533}   # git-sync's group
    assert sync["image"].startswith("registry.k8s.io/git-sync/git-sync:v4")
    assert "securityContext" not in sync            # only the agent is privileged
    top = container(daemonset(render({"manifests": {"source": "gitSync", "gitSync": {"repo": "https://g/x.git"}}})))
    assert flag(top, "manifests") == "/git/current"


def test_notes_say_where_the_status_files_are():
    notes = render({"agent": {"statusDir": "/run/reconciler/status", "attributes": {"pool": "gpu"}}}, name="edge")["NOTES"]
    assert "/run/reconciler/status/<name>.json" in notes and "/run/reconciler/status/_agent.json" in notes
    assert "pool:gpu" in notes
    assert "SIGTERM" in notes and "adopts" in notes


# values.schema.json --------------------------------------------------------------------------------

@pytest.mark.parametrize("values, where", [
    ({"http": {"port": 70000}}, "/http/port"),
    ({"http": {"port": "5051"}}, "/http/port"),
    ({"manifests": {"source": "s3"}}, "/manifests/source"),
    ({"manifests": {"source": "gitSync"}}, "/manifests/gitSync"),
    ({"agent": {"attributes": {"pool": "a;b"}}}, "/agent/attributes"),
    ({"agent": {"attributes": {"po:ol": "gpu"}}}, "'po:ol'"),      # a bad key: named, not located
    ({"agent": {"workDir": "var/lib/reconciler"}}, "/agent/workDir"),
    ({"agent": {"cgroupsRoot": "../escape"}}, "/agent/cgroupsRoot"),
    ({"agent": {"resyncInterval": "soon"}}, "/agent/resyncInterval"),
    ({"agent": {"extraArgs": ["-v"]}}, "/agent/extraArgs"),
    ({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}}}, "/updateStrategy"),
    ({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}, "/updateStrategy"),
    ({"replicas": 3}, "replicas"),
    ({"manifests": {"configMap": {"files": {"web.txt": "x"}}}}, "'web.txt'"),
])
def test_values_schema_rejects_bad_values_naming_the_key(values, where):
    answer = helm("validate", values)
    assert not answer["ok"] and answer["error"] == "HelmValuesError", answer
    assert where in answer["message"], answer["message"]
    # ... and rendering (helm install / template) refuses them the same way.
    assert not helm("render", values)["ok"]


def test_values_schema_accepts_the_defaults_and_documented_settings():
    for values in ({}, {"agent": {"attributes": {"pool": "gpu", "gpus": 8}}, "http": {"port": 6060}},
                   {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}},
                   {"updateStrategy": {"type": "OnDelete"}}):
        answer = helm("validate", values)
        assert answer["ok"], (values, answer)
