"""A DNS server on loopback for the ``dns:`` seed tests (dnslib, in a thread of the test
process): answers from a table the test changes while it runs, NXDOMAIN for other names."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from meshd.testing.localcluster import free_port


class Zone(BaseResolver):  # type: ignore[misc]
    """``records[(name, type)]`` -> rdata list; names are absolute ("seeds.test.")."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.glue: dict[str, list[Any]] = {}  # SRV name -> additional A/AAAA records
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def set(self, name: str, rtype: str, *rdata: Any) -> None:
        with self.lock:
            self.records[(name, rtype)] = list(rdata)

    def clear(self) -> None:
        with self.lock:
            self.records.clear()
            self.glue.clear()

    def asked(self, name: str, rtype: str) -> int:
        with self.lock:
            return self.queries.count((name, rtype))

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname)
        rtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, rtype))
            answers = self.records.get((name, rtype))
            known = any(n == name for n, _ in self.records)
            glue = list(self.glue.get(name, ())) if rtype == "SRV" else []
        for rdata in answers or ():
            reply.add_answer(RR(name, QTYPE.reverse[rtype], rdata=rdata, ttl=1))
        for target, rdata in glue:
            kind = "AAAA" if isinstance(rdata, AAAA) else "A"
            reply.add_ar(RR(target, QTYPE.reverse[kind], rdata=rdata, ttl=1))
        if not answers and not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@contextmanager
def dns_server() -> Iterator[tuple[Zone, int]]:
    """A running server on 127.0.0.1 (UDP and TCP): (its zone, its port)."""
    zone = Zone()
    port = free_port()
    quiet = DNSLogger(logf=lambda _line: None)
    udp = DNSServer(zone, address="127.0.0.1", port=port, logger=quiet)
    tcp = DNSServer(zone, address="127.0.0.1", port=port, tcp=True, logger=quiet)
    udp.start_thread()
    tcp.start_thread()
    try:
        yield zone, port
    finally:
        udp.stop()
        tcp.stop()
        udp.server.server_close()
        tcp.server.server_close()


__all__ = ["AAAA", "SRV", "A", "Zone", "dns_server"]
