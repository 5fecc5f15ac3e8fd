"""Transport counters (read by the metrics exporter)."""

from __future__ import annotations

from dataclasses import dataclass

from meshd.rejections import Rejections


@dataclass(slots=True)
class TransportStats(Rejections):
    udp_packets_in: int = 0
    udp_packets_out: int = 0
    udp_bytes_in: int = 0
    udp_bytes_out: int = 0
    udp_send_errors: int = 0
    tcp_accepted: int = 0
    tcp_dialed: int = 0
    tcp_frames_in: int = 0
    tcp_frames_out: int = 0
    tcp_bytes_in: int = 0
    tcp_bytes_out: int = 0
    tcp_refused_busy: int = 0
    tcp_resets: int = 0  # connections the peer reset (read or write failed with ECONNRESET)
