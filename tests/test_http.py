"""The agent's HTTP face (--http_address) as an operator and Prometheus meet it: a real agent on a free
loopback port, real containers, every endpoint's shape and values (Mesos's /state and
/monitor/statistics, Prometheus /metrics parsed with prometheus_client's own parser), the probes
(/readyz 503 during recovery, then 200; /healthz), 404/405, and the flag errors (a port in use).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.http import Health, HttpServer, response
from reconciler.metrics import AgentMetrics, container_lines
from tests.conftest import running, wait_agent
from tests.test_isolator_net_cls import net_cls_mount_left_as_found  # noqa: F401 - autouse: leaves the host's mounts as found

SPEC = {"kill_grace_period": "1secs", "resources": {"cpus": 0.1, "mem": 32}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def get_json(port: int, path: str) -> Any:
    status, headers, body = get(port, path)
    assert status == 200, (path, status, body)
    assert headers["content-type"] == "application/json"
    return json.loads(body)


def eventually(probe: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, http.client.HTTPException, AssertionError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"{what or probe} never held within {timeout}s; last: {last!r}")


def metrics(port: int) -> dict[str, Any]:
    """name -> family, parsed by prometheus_client (samples keyed by (sample name, sorted labels))."""
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in text_string_to_metric_families(body.decode()):
        family.values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = family
    return families


def write(env: Any, name: str, command: str = "exec sleep 300", **extra: Any) -> None:
    doc = {"apiVersion": "reconciler/v1", "kind": "Container", "metadata": {"name": name},
           "spec": {**SPEC, "command": {"value": command}, **extra}}
    tmp = env.manifests / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    os.rename(tmp, env.manifests / f"{name}.yaml")


# the agent, end to end -------------------------------------------------------------------------

@pytest.mark.root
def test_every_endpoint_with_net_cls_cgroups_and_disk(agent_env: Any) -> None:
    env = agent_env
    env.launcher = "linux"
    env.isolation = "cgroups/cpu,cgroups/mem,cgroups/net_cls,disk/du"
    port = free_port()
    write(env, "web", restart_policy="Always")
    write(env, "api", resources={"cpus": 0.1, "mem": 32, "disk": 16})
    agent = env.start("--cgroups_net_cls_primary_handle=0x0042", "--cgroups_net_cls_secondary_handles=0x10,0x13",
                      "--container_disk_watch_interval=200ms", f"--http_address=127.0.0.1:{port}")
    web = env.wait_status("web", running, timeout=30)
    api = env.wait_status("api", lambda s: running(s) and (s.get("disk") or {}).get("used_bytes") is not None, timeout=30)
    assert get(port, "/readyz")[0] == 200

    # /state: the Mesos agent's keys, and each container's status document with its ContainerStatus.
    state = eventually(lambda: (s := get_json(port, "/state")) and
                       {c["name"]: c for c in s["containers"]}["api"].get("disk") and s, what="/state shows api's disk")
    for key in ("id", "pid", "hostname", "version", "start_time", "flags", "attributes"):
        assert key in state, key
    assert state["pid"] == f"reconciler@127.0.0.1:{port}"
    assert state["hostname"] == socket.gethostname()
    assert state["os_pid"] == agent.pid
    assert state["flags"]["http_address"] == f"127.0.0.1:{port}"
    assert state["flags"]["isolation"] == env.isolation.split(",")
    assert state["ready"] is True and abs(state["start_time"] - time.time()) < 120
    containers = {c["name"]: c for c in state["containers"]}
    assert set(containers) == {"web", "api"}
    for name, status in (("web", web), ("api", api)):
        entry = containers[name]
        assert entry["phase"] == "Running" and entry["pid"] == status["pid"]
        assert entry["container_id"] == status["container_id"]
        assert entry["net_cls"] == status["net_cls"]
        assert entry["container_status"]["container_id"] == {"value": status["container_id"]}
        assert entry["container_status"]["executor_pid"] == status["pid"]
        classid = entry["container_status"]["cgroup_info"]["net_cls"]["classid"]
        assert classid == status["net_cls"]["classid_int"] and classid >> 16 == 0x42
    assert containers["api"]["disk"]["limit_bytes"] == 16 * 1024 * 1024
    again = get_json(port, "/state.json")
    assert again["id"] == state["id"], "the agent id is stable"

    # /monitor/statistics: Mesos's array of {executor_id, executor_name, framework_id, source, statistics}.
    def with_usage() -> Any:
        entries = get_json(port, "/monitor/statistics")
        # Listed from the first moment (a reading at launch, before the command ran: rss may be 0);
        # here, until a reading after the commands started.
        return entries if all(e["statistics"].get("mem_rss_bytes", 0) > 0 for e in entries) and len(entries) == 2 \
            else None
    entries = {e["executor_id"]: e for e in eventually(with_usage, what="statistics with usage")}
    assert set(entries) == {"web", "api"}
    for name, entry in entries.items():
        assert set(entry) == {"container_id", "executor_id", "executor_name", "framework_id", "source", "statistics"}
        assert entry["executor_name"] == name and entry["framework_id"] == "reconciler"
        assert entry["source"] == str(env.manifests / f"{name}.yaml")
        assert entry["container_id"] == containers[name]["container_id"]
        stats = entry["statistics"]
        for field in ("timestamp", "cpus_user_time_secs", "cpus_system_time_secs", "cpus_limit", "mem_limit_bytes",
                      "mem_rss_bytes"):
            assert field in stats, (field, stats)
        assert stats["cpus_limit"] == 0.1 and stats["mem_limit_bytes"] == 32 * 1024 * 1024
        assert abs(stats["timestamp"] - time.time()) < 60

    # /metrics, through Prometheus's own parser.
    families = metrics(port)
    for family in families.values():
        assert family.name.startswith("reconciler_"), family.name
        assert family.documentation, f"{family.name} has no HELP"
    phases = families["reconciler_containers"].values
    assert phases[("reconciler_containers", (("phase", "Running"),))] == 2
    assert phases[("reconciler_containers", (("phase", "Failed"),))] == 0
    assert families["reconciler_launch_latency_seconds"].type == "histogram"
    launches = families["reconciler_launch_latency_seconds"].values[("reconciler_launch_latency_seconds_count", ())]
    assert launches == 2
    assert 0 < families["reconciler_launch_latency_seconds"].values[("reconciler_launch_latency_seconds_sum", ())] < 30
    reconciles = families["reconciler_reconciles"].values
    assert reconciles[("reconciler_reconciles_total", (("result", "ok"),))] >= 2
    duration = families["reconciler_reconcile_duration_seconds"]
    assert duration.type == "histogram"
    assert duration.values[("reconciler_reconcile_duration_seconds_count", (("result", "ok"),))] == \
        reconciles[("reconciler_reconciles_total", (("result", "ok"),))]
    handles = families["reconciler_net_cls_handles"].values
    assert handles[("reconciler_net_cls_handles", (("primary", "0x0042"), ("state", "used")))] == 2
    assert handles[("reconciler_net_cls_handles", (("primary", "0x0042"), ("state", "free")))] == 2
    assert handles[("reconciler_net_cls_handles", (("primary", "0x0042"), ("state", "total")))] == 4
    disk = families["reconciler_container_disk_used_bytes"].values
    assert disk[("reconciler_container_disk_used_bytes", (("container", "api"),))] >= 0
    assert families["reconciler_container_disk_limit_bytes"].values[
        ("reconciler_container_disk_limit_bytes", (("container", "api"),))] == 16 * 1024 * 1024
    assert families["reconciler_container_memory_rss_bytes"].values[
        ("reconciler_container_memory_rss_bytes", (("container", "web"),))] > 0
    restarts = families["reconciler_container_restarts"].values
    assert restarts[("reconciler_container_restarts_total", (("container", "web"),))] == 0

    # A container dies: it is restarted, and the counter and /state follow.
    os.kill(web["pid"], signal.SIGKILL)
    env.wait_status("web", lambda s: running(s) and s["restarts"] == 1, timeout=30)
    eventually(lambda: metrics(port)["reconciler_container_restarts"].values[
        ("reconciler_container_restarts_total", (("container", "web"),))] == 1, what="restarts_total 1")
    eventually(lambda: {c["name"]: c for c in get_json(port, "/state")["containers"]}["web"]["restarts"] == 1)

    # A removed manifest: gone from every endpoint, its handle back in the free count.
    (env.manifests / "api.yaml").unlink()
    env.wait_gone("api", timeout=30)
    eventually(lambda: [c["name"] for c in get_json(port, "/state")["containers"]] == ["web"], what="api gone")
    eventually(lambda: [e["executor_id"] for e in get_json(port, "/monitor/statistics")] == ["web"])
    families = eventually(lambda: (f := metrics(port)) and f["reconciler_net_cls_handles"].values[
        ("reconciler_net_cls_handles", (("primary", "0x0042"), ("state", "used")))] == 1 and f)
    assert ("reconciler_container_restarts_total", (("container", "api"),)) not in \
        families["reconciler_container_restarts"].values
    env.stop(agent)


@pytest.mark.root
def test_monitor_statistics_lists_a_container_from_its_first_moment(agent_env: Any) -> None:
    # Issue 11: /monitor/statistics stayed [] until the first statistics pass (--resync_interval) after a
    # launch. A container is listed as soon as it runs, with its limits and a first usage reading.
    env = agent_env
    env.launcher, env.isolation = "linux", "cgroups/cpu,cgroups/mem"
    port = free_port()
    agent = env.start(f"--http_address=127.0.0.1:{port}", resync_interval="1hrs")
    wait_agent(env, agent)
    assert get_json(port, "/monitor/statistics") == []
    env.write_manifest("plain", "exec sleep 300", kill_grace_period="1secs")     # no resources: no limits to show
    write(env, "limited")                                                         # cpus 0.1, mem 32
    for name in ("plain", "limited"):
        status = env.wait_status(name, running, timeout=30)
        seen_running = time.monotonic()

        def listed() -> Any:
            return next((e for e in get_json(port, "/monitor/statistics") if e["container_id"] == status["container_id"]),
                        None)
        entry = eventually(listed, timeout=1.0, what=f"{name} in /monitor/statistics within 1 s of Running")
        assert time.monotonic() - seen_running < 1.0
        assert entry["executor_id"] == name and entry["source"] == str(env.manifests / f"{name}.yaml")
        stats = entry["statistics"]
        for field in ("timestamp", "cpus_user_time_secs", "cpus_system_time_secs", "mem_total_bytes"):
            assert field in stats, (name, field, stats)
        assert abs(stats["timestamp"] - time.time()) < 60
        if name == "limited":
            assert stats["cpus_limit"] == 0.1 and stats["mem_limit_bytes"] == 32 * 1024 * 1024, stats
        else:
            assert "cpus_limit" not in stats and "mem_limit_bytes" not in stats, stats
    env.stop(agent)


@pytest.mark.root
def test_readyz_503_while_recovering_then_200_healthz_and_http_details(agent_env: Any) -> None:
    env = agent_env
    env.launcher, env.isolation = "posix", "posix/cpu,posix/mem"
    # A recovery with work to do: orphan sandboxes that no checkpoint owns, each cleaned up before
    # the first listing.
    sandboxes = env.work_dir / "sandboxes"
    sandboxes.mkdir(parents=True)
    for i in range(300):
        (sandboxes / f"orphan-{i:04d}").mkdir()
    write(env, "web")
    port = free_port()
    agent = env.start(f"--http_address=127.0.0.1:{port}", "--log_level=warning")

    # The first answer (the request waits in the listen backlog until the server thread runs) is 503.
    first = eventually(lambda: get(port, "/readyz", timeout=30), what="a first answer")
    assert first[0] == 503, first
    assert b"recovering" in first[2]
    assert get(port, "/healthz")[0] == 200, "alive while recovering"
    eventually(lambda: get(port, "/readyz")[0] == 200, timeout=60, what="readyz 200")
    assert not any(p.name.startswith("orphan-") for p in sandboxes.iterdir()), "ready only after recovery"
    status, headers, body = get(port, "/healthz")
    assert (status, body) == (200, b"ok\n") and headers["content-type"].startswith("text/plain")
    env.wait_status("web", running, timeout=30)

    # 404 and 405, HEAD, a query string, keep-alive.
    status, _, body = get(port, "/nope")
    assert status == 404 and b"/metrics" in body
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = get(port, "/state", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD", method
    status, headers, body = get(port, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert get(port, "/metrics?x=1")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for path in ("/state", "/metrics", "/healthz", "/monitor/statistics"):
            conn.request("GET", path)
            reply = conn.getresponse()
            assert reply.status == 200, path
            assert len(reply.read()) == int(reply.getheader("content-length"))
    finally:
        conn.close()
    # A raw malformed request line gets 400, not a hang or a crash.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"garbage\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    assert get(port, "/readyz")[0] == 200, "still serving"
    out = env.stop(agent)
    assert agent.returncode == 0, out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.root
@pytest.mark.parametrize("command", ["run", "once"])
def test_port_in_use_stops_the_agent_with_one_line_exit_2(agent_env: Any, command: str) -> None:
    env = agent_env
    env.launcher, env.isolation = "posix", "posix/cpu,posix/mem"
    write(env, "web")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "reconciler", command, *env.flags(),
                                 f"--http_address=127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"reconciler: flag --http_address: cannot listen on 127.0.0.1:{port}: "
                     "Address already in use (another process listens there: choose another port)"], result.stderr
    assert env.status("web") is None, "nothing was launched"


@pytest.mark.parametrize("value", ["5051", "localhost", "127.0.0.1:0", "127.0.0.1:70000", "[::1:80", "a b:80"])
def test_malformed_http_address_is_a_flag_error(agent_env: Any, value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "reconciler", "once", *agent_env.flags(launcher="posix"),
                             f"--http_address={value}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "flag --http_address" in lines[0] and "Traceback" not in result.stderr, result.stderr


# the pieces, in process ------------------------------------------------------------------------

def test_healthz_reports_a_stalled_loop_and_a_stalled_listing_with_the_reason() -> None:
    health = Health(resync_interval=20.0)
    now = time.monotonic()
    assert health.alive(now) is None
    assert health.readiness() is not None
    health.ready = True
    assert health.readiness() is None
    health.loop_tick = now - 11
    assert "event loop has not run for 11" in health.alive(now)
    health.loop_tick = now
    health.last_listing = now - 59
    assert health.alive(now) is None, "3 x resync_interval = 60 s"
    health.last_listing = now - 61
    reason = health.alive(now)
    assert "no listing of the manifest directory" in reason and "3 x --resync_interval" in reason


def test_server_answers_the_live_health_and_closes_cleanly() -> None:
    health = Health(resync_interval=1.0)
    health.ready = True
    routes = {b"/healthz": lambda: response("200 OK", "text/plain", b"ok\n") if health.alive(time.monotonic()) is None
              else response("503 Service Unavailable", "text/plain", health.alive(time.monotonic()).encode())}
    server = HttpServer(f"127.0.0.1:{free_port()}", routes)
    server.start()
    try:
        assert get(server.port, "/healthz")[0] == 200
        health.loop_tick -= 60
        status, _, body = get(server.port, "/healthz")
        assert status == 503 and b"event loop has not run" in body
        # A request split across packets is still read whole.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET /heal")
            time.sleep(0.05)
            raw.sendall(b"thz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 503")
    finally:
        server.close()


def test_a_client_that_never_reads_does_not_stall_the_others() -> None:
    # 2,000 pipelined requests for a large answer, never read: the accept thread must not wait on it.
    big = response("200 OK", "application/json", b"x" * 200_000)
    routes = {b"/state": lambda: big, b"/healthz": lambda: response("200 OK", "text/plain", b"ok\n")}
    server = HttpServer(f"127.0.0.1:{free_port()}", routes)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as hostile:
            hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hostile.sendall(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
            time.sleep(0.2)
            for _ in range(3):
                started = time.monotonic()
                assert get(server.port, "/healthz", timeout=2)[0] == 200
                assert time.monotonic() - started < 1.0
    finally:
        server.close()


def test_metrics_render_parses_with_prometheus_parser_and_escapes_labels() -> None:
    m = AgentMetrics("9.9.9")
    m.reconciled(0.003, "ok")
    m.reconciled(0.2, "error")
    m.launch_latency.observe(0.4)
    m.sync_duration.observe(1.5)
    odd = 'we"ird\\name\n'
    docs = {odd: {"restarts": 3, "disk": {"used_bytes": 10, "limit_bytes": 100},
                  "statistics": {"mem_rss_bytes": 5, "cpus_user_time_secs": 1.5, "cpus_system_time_secs": 0.25}}}
    text = m.render({n: container_lines(n, d) for n, d in docs.items()}, {"Running": 1},
                    {"managed": True, "primary": "0x0010", "handles_used": 1, "handles_free": 9, "handles_total": 10},
                    {"invalid_file": 2}).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("reconciler_build_info", (("version", "9.9.9"),))] == 1
    assert samples[("reconciler_reconcile_duration_seconds_bucket", (("le", "0.005"), ("result", "ok")))] == 1
    assert samples[("reconciler_reconcile_duration_seconds_bucket", (("le", "0.1"), ("result", "error")))] == 0
    assert samples[("reconciler_reconcile_duration_seconds_bucket", (("le", "+Inf"), ("result", "error")))] == 1
    assert samples[("reconciler_reconciles_total", (("result", "error"),))] == 1
    assert samples[("reconciler_launch_latency_seconds_count", ())] == 1
    assert samples[("reconciler_container_restarts_total", (("container", odd),))] == 3
    assert samples[("reconciler_container_cpu_seconds_total", (("container", odd), ("mode", "system")))] == 0.25
    assert samples[("reconciler_container_disk_used_bytes", (("container", odd),))] == 10
    assert samples[("reconciler_net_cls_handles", (("primary", "0x0010"), ("state", "free")))] == 9
    assert samples[("reconciler_manifest_errors", (("kind", "invalid_file"),))] == 2
    assert samples[("reconciler_containers", (("phase", "Pending"),))] == 0
    assert families["reconciler_sync_duration_seconds"].type == "histogram"
