"""deploy/k8s/meshd.yaml: valid against the Kubernetes schemas (kubernetes-validate, strict,
offline), and consistent with itself and with meshd: the configuration it ships loads, its
seeds name the Service's SRV records, the socket and data paths are the mounted hostPaths."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshd.config.loader import build_config
from meshd.config.model import DnsSeed

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "meshd.yaml"
VERSION = kubernetes_validate.latest_version()


def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_every_document_is_valid_against_the_kubernetes_schema() -> None:
    docs = documents()
    assert set(docs) == {"Namespace", "Service", "ConfigMap", "DaemonSet"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validation_can_fail() -> None:
    daemonset = copy.deepcopy(documents()["DaemonSet"])
    daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSION, strict=True)


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [meshd] = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return meshd


def test_the_shipped_configuration_loads(tmp_path: Path) -> None:
    docs = documents()
    conf = tmp_path / "meshd.toml"
    conf.write_text(docs["ConfigMap"]["data"]["meshd.toml"])
    env = {e["name"]: e.get("value", "") for e in container(docs)["env"]}
    assert set(env) == {"MESHD_NODE_NAME", "POD_IP", "MESHD_NODE_ADVERTISE", "MESHD_SECURITY_KEYS"}
    config = build_config(
        str(conf),
        {
            "MESHD_NODE_NAME": "node-1",  # what the downward API and the Secret give
            "MESHD_NODE_ADVERTISE": env["MESHD_NODE_ADVERTISE"].replace("$(POD_IP)", "10.1.2.3"),
            "MESHD_SECURITY_KEYS": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        },
        {},
    )
    assert config.node.advertise == ("10.1.2.3", 7946)
    service = docs["Service"]
    ns = service["metadata"]["namespace"]
    udp = next(p for p in service["spec"]["ports"] if p["protocol"] == "UDP")
    srv = f"_{udp['name']}._udp.{service['metadata']['name']}.{ns}.svc.cluster.local"
    assert config.node.seeds == (DnsSeed(srv),)
    assert udp["port"] == config.node.bind[1]
    # The socket and the data directory are the node's hostPaths; the probes use that socket.
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in docs["DaemonSet"]["spec"]["template"]["spec"]["volumes"]}
    assert Path(config.api.socket).parent == Path(mounts["api-socket"])
    assert config.node.data_dir == mounts["data"]
    assert volumes["api-socket"]["hostPath"]["path"] == "/run/meshd"
    assert volumes["data"]["hostPath"]["path"] == "/var/lib/meshd"
    probes = str(container(docs)["readinessProbe"]) + str(container(docs)["livenessProbe"])
    assert probes.count(config.api.socket) == 2
    assert config.metrics.enabled and config.metrics.bind[1] == 9464


def test_the_service_is_headless_and_lists_pods_before_they_are_ready() -> None:
    docs = documents()
    spec = docs["Service"]["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    labels = docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in container(docs)["ports"]}
    for port in spec["ports"]:
        assert ports[port["targetPort"]]["protocol"] == port["protocol"]
    key = next(e for e in container(docs)["env"] if e["name"] == "MESHD_SECURITY_KEYS")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "meshd-key", "key": "key"}
    tomllib.loads(docs["ConfigMap"]["data"]["meshd.toml"])
