"""Seeds to addresses: host names through the system's resolver, ``dns:`` names through DNS.

A ``dns:NAME[:PORT]`` seed is looked up each time the membership core is about to join (at
start and before every retry, see :class:`~meshd.membership.events.ResolveSeeds`): NAME's
SRV records give hosts and their ports (targets resolved from the answer's additional
section, else by A/AAAA lookups); a name without SRV records gives its A and AAAA records
with PORT. This is how meshd runs behind a Kubernetes headless Service or a DNS round robin.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.name

from meshd.config.model import Address, DnsSeed, Seed
from meshd.logs import kv

# Each lookup (one record type of one name) gives up after this long.
DNS_TIMEOUT: Final = 2.0
# Addresses taken from one dns: seed (SRV targets times their addresses, or A/AAAA records).
MAX_DNS_ADDRESSES: Final = 64

log = logging.getLogger("meshd.discovery")


async def resolve_host(host: str, port: int) -> Address | None:
    """A "host:port" seed: its first address from the system's resolver (None: no answer)."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return str(sockaddr[0]), int(sockaddr[1])
    return None


class SeedLookup:
    """The configured seeds, turned into addresses on demand. Never raises: a seed that does
    not resolve is left out and named in the result (and logged once when it starts
    failing)."""

    def __init__(self, seeds: Sequence[Seed], resolver: Address | None = None) -> None:
        self.seeds = tuple(seeds)
        self.resolver_addr = resolver
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._failing: set[str] = set()

    @property
    def follows_dns(self) -> bool:
        return any(isinstance(s, DnsSeed) for s in self.seeds)

    async def resolve(self) -> tuple[list[Address], list[str]]:
        """(addresses, the seeds that gave none)."""
        out: list[Address] = []
        failed: list[str] = []
        for seed in self.seeds:
            if isinstance(seed, DnsSeed):
                label = f"dns:{seed.name}"
                found, error = await self._lookup(seed)
                out += found
            else:
                label = f"{seed[0]}:{seed[1]}"
                addr = await resolve_host(*seed)
                found, error = ([addr], "") if addr else ([], "no address")
                out += found
            if not found:
                failed.append(label)
            self._note(label, found, error)
        return list(dict.fromkeys(out)), failed

    def _note(self, label: str, found: list[Address], error: str) -> None:
        if not found and label not in self._failing:
            self._failing.add(label)
            log.warning("seed did not resolve", extra=kv(seed=label, error=error))
        elif found and label in self._failing:
            self._failing.discard(label)
            log.info("seed resolves again", extra=kv(seed=label, addresses=len(found)))

    def _dns(self) -> dns.asyncresolver.Resolver:
        # dnspython is imported on the first dns: lookup (about 0.15 s a daemon without
        # dns: seeds does not spend at start).
        import dns.asyncresolver

        if self._resolver is None:
            if self.resolver_addr is None:
                self._resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [self.resolver_addr[0]]
                resolver.port = self.resolver_addr[1]
                self._resolver = resolver
        return self._resolver

    async def _lookup(self, seed: DnsSeed) -> tuple[list[Address], str]:
        """Every address of a dns: seed, or none and why."""
        import dns.exception
        import dns.rdatatype

        try:
            resolver = self._dns()
            srv = await resolver.resolve(
                seed.name, "SRV", lifetime=DNS_TIMEOUT, search=True, raise_on_no_answer=False
            )
            if srv.rrset:
                glue: dict[dns.name.Name, list[str]] = {}
                for rrset in srv.response.additional:
                    if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                        glue.setdefault(rrset.name, []).extend(r.address for r in rrset)
                out: list[Address] = []
                for rr in sorted(srv.rrset, key=lambda r: (r.priority, -r.weight)):
                    hosts = glue.get(rr.target) or await self._addresses(resolver, rr.target)
                    out += [(host, int(rr.port)) for host in hosts]
                    if len(out) >= MAX_DNS_ADDRESSES:
                        break
                return out[:MAX_DNS_ADDRESSES], ""
            hosts = await self._addresses(resolver, seed.name)
            return [(h, seed.port) for h in hosts[:MAX_DNS_ADDRESSES]], "no SRV, A or AAAA records"
        except dns.exception.DNSException as exc:
            return [], str(exc) or type(exc).__name__

    @staticmethod
    async def _addresses(
        resolver: dns.asyncresolver.Resolver, name: str | dns.name.Name
    ) -> list[str]:
        import dns.resolver

        out: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(
                    name, rdtype, lifetime=DNS_TIMEOUT, search=True, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                break
            out += [r.address for r in answer.rrset or ()]
        return out
