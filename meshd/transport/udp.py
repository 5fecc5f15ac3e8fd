"""A sealed UDP endpoint: every datagram is enveloped (encrypted and authenticated)."""

from __future__ import annotations

import logging

import trio

from meshd.logs import RateLimitedLog
from meshd.security.envelope import Envelope, SealError
from meshd.transport.stats import TransportStats
from meshd.wire.validate import Address

MAX_DATAGRAM = 65535


class PacketEndpoint:
    """Owns the UDP socket. ``receive()`` yields only datagrams that opened successfully."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        envelope: Envelope,
        stats: TransportStats,
        max_packet: int,
        log: logging.Logger,
    ) -> None:
        self.sock = sock
        self.envelope = envelope
        self.stats = stats
        self.max_packet = max_packet  # sealed size limit (plaintext budget + envelope)
        self._log = RateLimitedLog(log)

    @property
    def payload_budget(self) -> int:
        """Plaintext bytes a packet may carry."""
        return self.max_packet - self.envelope.overhead

    async def receive(self) -> tuple[Address, bytes]:
        while True:
            try:
                data, src = await self.sock.recvfrom(MAX_DATAGRAM)
            except OSError as exc:  # e.g. ICMP errors surfacing on some platforms
                self.stats.reject("recv_error")
                self._log.debug("recv_error", "udp receive failed", error=str(exc))
                continue
            self.stats.udp_packets_in += 1
            self.stats.udp_bytes_in += len(data)
            addr: Address = (src[0], src[1])
            if len(data) > self.max_packet:
                self.stats.reject("oversized")
                self._log.warning(
                    "oversized", "dropped oversized packet", src=addr[0], size=len(data)
                )
                continue
            try:
                return addr, self.envelope.open(data)
            except SealError as exc:
                self.stats.reject(exc.reason)
                self._log.warning(
                    exc.reason, "dropped packet that failed to open", src=addr[0], reason=exc.reason
                )

    async def send(self, addr: Address, payload: bytes) -> None:
        data = self.envelope.seal(payload)
        try:
            await self.sock.sendto(data, addr)
        except OSError as exc:
            self.stats.udp_send_errors += 1
            self._log.debug("send_error", "udp send failed", dst=addr[0], error=str(exc))
            return
        self.stats.udp_packets_out += 1
        self.stats.udp_bytes_out += len(data)
