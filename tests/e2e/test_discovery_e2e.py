"""Discovery through DNS on loopback: a dnslib server stands in for a Kubernetes headless
Service. ``dns:`` seeds resolve through SRV (with and without glue) or A/AAAA records, and a
daemon whose name does not resolve yet joins once it does, on a retry."""

from __future__ import annotations

from pathlib import Path

import anyio
import yaml

from e2e.dns_stub import AAAA, SRV, A, dns_server
from meshd.config.model import DnsSeed
from meshd.node.discovery import SeedLookup
from meshd.testing.localcluster import LocalCluster, free_port

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "meshd.yaml"


async def test_seed_lookup_reads_srv_a_and_aaaa_records() -> None:
    with dns_server() as (zone, port):
        resolver = ("127.0.0.1", port)
        # SRV with the targets' addresses in the additional section (what Kubernetes sends).
        zone.set("_gossip._udp.meshd.test.", "SRV", SRV(10, 50, 7001, "h1.test."))
        zone.glue["_gossip._udp.meshd.test."] = [("h1.test.", A("127.0.0.11"))]
        # SRV without glue: the target is looked up; lower priority comes first.
        zone.set("srv.test.", "SRV", SRV(20, 1, 7003, "h3.test."), SRV(10, 1, 7002, "h2.test."))
        zone.set("h2.test.", "A", A("127.0.0.12"))
        zone.set("h3.test.", "A", A("127.0.0.13"))
        zone.set("h3.test.", "AAAA", AAAA("::1"))
        # No SRV: A and AAAA records with the seed's port.
        zone.set("rr.test.", "A", A("127.0.0.21"), A("127.0.0.22"))
        lookup = SeedLookup(
            (
                DnsSeed("_gossip._udp.meshd.test"),
                DnsSeed("srv.test"),
                DnsSeed("rr.test", 7100),
                DnsSeed("missing.test"),
                ("127.0.0.1", 7200),
            ),
            resolver,
        )
        found, failed = await lookup.resolve()
        assert found == [
            ("127.0.0.11", 7001),
            ("127.0.0.12", 7002),
            ("127.0.0.13", 7003),
            ("::1", 7003),
            ("127.0.0.21", 7100),
            ("127.0.0.22", 7100),
            ("127.0.0.1", 7200),
        ]
        assert failed == ["dns:missing.test"]
        assert zone.asked("h1.test.", "A") == 0  # the glue was used
        # Looked up anew each time: a changed record is seen at once (TTL or not).
        zone.set("rr.test.", "A", A("127.0.0.23"))
        found, _ = await lookup.resolve()
        assert ("127.0.0.23", 7100) in found and ("127.0.0.21", 7100) not in found
    # The server is gone: the dns: seed fails (within the lookup timeout), nothing raises.
    gone = SeedLookup((DnsSeed("rr.test"), ("127.0.0.1", 7200)), resolver)
    with anyio.fail_after(30):
        found, failed = await gone.resolve()
    assert (found, failed) == ([("127.0.0.1", 7200)], ["dns:rr.test"])


async def test_daemons_join_through_dns_seeds(cluster: LocalCluster) -> None:
    with dns_server() as (zone, port):
        n1 = cluster.add("n1")
        await cluster.wait_ready([n1])
        # n2's name does not resolve yet (the Service has no endpoints): it keeps retrying.
        dns_args = ["--set", f"node.dns_resolver=127.0.0.1:{port}"]
        n2 = cluster.add("n2", seeds=["dns:_gossip._udp.meshd.test"], extra=dns_args)
        info = await cluster.wait_answering(n2)
        with anyio.fail_after(30):
            while info["stats"]["join_failures"] < 1:
                await anyio.sleep(0.1)
                info = await n2.call("info")
        assert not info["joined"]
        asked = zone.asked("_gossip._udp.meshd.test.", "SRV")
        assert asked >= 2  # at start, and again for the retry
        # The record appears: a later retry looks it up again and joins.
        zone.set("_gossip._udp.meshd.test.", "SRV", SRV(0, 0, n1.port, "n1.meshd.test."))
        zone.set("n1.meshd.test.", "A", A("127.0.0.1"))
        # n3 through plain A records and the port in the seed.
        zone.set("hosts.meshd.test.", "A", A("127.0.0.1"))
        n3 = cluster.add("n3", seeds=[f"dns:hosts.meshd.test:{n1.port}"], extra=dns_args)
        await cluster.wait_ready([n2, n3], timeout=60)
        await cluster.wait_converged({"n1", "n2", "n3"})
    assert "seed did not resolve" in n2.log_text()
    assert "seed resolves again" in n2.log_text()


async def test_the_kubernetes_configuration_joins_through_its_service(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """deploy/k8s/meshd.yaml's meshd.toml, as each pod runs it, with a DNS server that
    answers for the headless Service as Kubernetes' DNS would (SRV records, A glue)."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    conf = tmp_path / "meshd.toml"
    conf.write_text(configmap["data"]["meshd.toml"])
    service = "_gossip._udp.meshd.meshd.svc.cluster.local."
    with dns_server() as (zone, port):
        pods = []
        for i in (1, 2, 3):
            extra = [
                f"--config={conf}",
                f"--metrics-bind=127.0.0.1:{free_port()}",
                f"--set=node.dns_resolver=127.0.0.1:{port}",
            ]
            pods.append(cluster.add(f"node-{i}", extra=extra, start=False))
        # Every pod is in the Service at once (publishNotReadyAddresses), each its own target.
        zone.set(
            service,
            "SRV",
            *(SRV(0, 1, pod.port, f"pod-{i}.meshd.meshd.svc.cluster.local.") for i, pod in
              enumerate(pods)),
        )  # fmt: skip
        zone.glue[service] = [
            (f"pod-{i}.meshd.meshd.svc.cluster.local.", A("127.0.0.1")) for i in range(3)
        ]
        for pod in pods:
            pod.spawn()
        await cluster.wait_ready(timeout=60)
        await cluster.wait_converged({"node-1", "node-2", "node-3"}, timeout=60)
