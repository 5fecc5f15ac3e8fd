"""The shipped Grafana dashboard and Prometheus alert rules against a real daemon: the rules
pass ``promtool check rules`` and their unit tests, every dashboard query parses, every
metric they name is in a real daemon's /metrics, and every exported name follows the
Prometheus conventions (base units at the end, ``_total`` on counters only)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from meshd.metrics.naming import check
from meshd.metrics.registry import Kind
from meshd.testing.localcluster import LocalCluster, free_port
from meshd_client import Mesh

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "meshd-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "meshd-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "meshd-alerts.test.yml"
# Series Prometheus makes itself, not the daemon.
SYNTHETIC = {"up"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (make system-deps installs Debian's prometheus)")
    return found


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 20
    return exprs


def rule_exprs() -> list[str]:
    # One rule per "expr:" line in this file (checked by promtool for the rest).
    return [
        line.split("expr:", 1)[1].strip()
        for line in RULES.read_text().splitlines()
        if line.strip().startswith("expr:")
    ]


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:meshd_[a-z0-9_]+|up)\b", expr))


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    tool = promtool()
    subprocess.run([tool, "check", "rules", str(RULES)], check=True, timeout=60)
    subprocess.run(
        [tool, "test", "rules", str(RULE_TESTS)], check=True, timeout=60, cwd=RULES.parent
    )
    # The dashboard's queries, with Grafana's variables filled in, as recording rules:
    # promtool parses every one of them.
    rules = [
        {
            "record": f"meshd:dashboard_query:{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    queries = tmp_path / "dashboard-queries.yml"
    queries.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    subprocess.run([tool, "check", "rules", str(queries)], check=True, timeout=60)


def test_dashboard_panels_are_wired_to_the_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def parse_metrics(text: str) -> tuple[set[str], list[tuple[str, Kind]]]:
    """(every sample name, (sample name, its family's kind) pairs) of Prometheus text."""
    kinds: dict[str, Kind] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        kinds[name] = kind
    samples: list[tuple[str, Kind]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = re.match(r"[^{\s]+", line)
        assert name is not None, line
        sample = name.group(0)
        family = re.sub(r"_(bucket|sum|count)$", "", sample)
        samples.append((sample, kinds.get(sample) or kinds[family]))
    return {s for s, _ in samples}, samples


async def test_every_name_the_dashboard_and_rules_use_is_exported(cluster: LocalCluster) -> None:
    port = free_port()
    a = cluster.add("a", extra=[f"--metrics-bind=127.0.0.1:{port}"])
    b = cluster.add("b", seeds=[a.addr])
    await cluster.wait_ready()
    await cluster.wait_converged({"a", "b"})
    # Some API traffic and a majority write, so every histogram has been observed.
    async with Mesh.connect(a.socket_path) as mesh:
        state = mesh.state("dash/doc")
        await state.set(["k"], 1, durability="majority")
    await a.call("members")
    del b
    # And a datagram without the cluster key: rejected input is counted (meshd_rejected_total).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"not a meshd packet", ("127.0.0.1", a.port))

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    with anyio.fail_after(20):
        text = await anyio.to_thread.run_sync(fetch)
        while "meshd_rejected_total{" not in text:  # the datagram is handled meanwhile
            await anyio.sleep(0.1)
            text = await anyio.to_thread.run_sync(fetch)
    exported, samples = parse_metrics(text)
    used: set[str] = set()
    for expr in dashboard_exprs() + rule_exprs():
        used |= names_in(expr)
    missing = sorted(used - exported - SYNTHETIC)
    assert missing == [], missing
    assert {"meshd_api_request_duration_seconds_bucket", "meshd_routing_breakers"} <= exported
    assert check(samples) == []
    # Each histogram counted what happened: the majority write, the API calls.
    values = dict(re.findall(r"^(\S+) (\S+)$", text, re.MULTILINE))
    assert float(values["meshd_replication_majority_wait_seconds_count"]) >= 1
    assert float(values['meshd_api_request_duration_seconds_count{op="members"}']) >= 1


def test_naming_rules_catch_what_they_should() -> None:
    bad: list[tuple[str, Any]] = [
        ("meshd_transport_bytes_in_total", "counter"),
        ("meshd_probes", "counter"),
        ("meshd_queue_total", "gauge"),
        ("meshd_fsync_ms", "histogram"),
        ("meshd_latency", "histogram"),
        ("meshd_disk_kib", "gauge"),
        ("Meshd_Bad", "gauge"),
    ]
    for name, kind in bad:
        assert check([(name, kind)]), name
    good: list[tuple[str, Any]] = [
        ("meshd_transport_received_bytes_total", "counter"),
        ("meshd_api_request_duration_seconds_bucket", "histogram"),
        ("meshd_members", "gauge"),
        ("meshd_storage_log_bytes", "gauge"),
    ]
    assert check(good) == []
