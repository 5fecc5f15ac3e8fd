"""Cluster-wide key management (``meshctl keys``), Serf-style.

An operation is sent to every live member over the KEYRING channel, sealed with the current
primary key, and only then applied locally — so ``use`` never locks this node out of telling
the others. The answer lists which members acknowledged, so the operator can see whether a
rotation step reached everyone before taking the next one:

1. ``keys install NEW`` — everyone can now decrypt NEW;
2. ``keys use NEW`` — everyone encrypts with NEW;
3. ``keys remove OLD``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from meshd.logs import kv
from meshd.membership.events import MemberView
from meshd.security.envelope import Envelope
from meshd.security.keyring import Keyring, KeyringError, key_id
from meshd.transport.stats import TransportStats
from meshd.transport.streams import Channel, FramedStream, StreamError, request
from meshd_client.protocol import cbor, errors

OPS = ("list", "install", "use", "remove")


def describe(keyring: Keyring) -> dict[str, Any]:
    """Key ids (hex) only: the key material never leaves a node in a listing."""
    return {
        "primary": key_id(keyring.primary).hex(),
        "keys": [key_id(k).hex() for k in keyring.keys],
    }


class KeyService:
    def __init__(
        self,
        keyring: Keyring | None,
        keyring_file: str | None,
        envelope: Envelope,
        stats: TransportStats,
        members: Callable[[], list[MemberView]],
        self_name: str,
        log: logging.Logger,
        timeout: float = 5.0,
    ) -> None:
        self.keyring = keyring
        self.keyring_file = keyring_file
        self.envelope = envelope
        self.stats = stats
        self.members = members
        self.self_name = self_name
        self.log = log
        self.timeout = timeout

    def apply(self, op: str, key: bytes | None) -> dict[str, Any]:
        """Apply one operation to this node's keyring; returns the resulting listing."""
        if self.keyring is None:
            raise errors.Invalid("this cluster runs without encryption (--insecure)")
        if op != "list":
            if key is None:
                raise errors.Invalid(f"keys {op} needs a key")
            try:
                changed = {
                    "install": self.keyring.install,
                    "use": self.keyring.use,
                    "remove": self.keyring.remove,
                }[op](key)
            except KeyringError as exc:
                raise errors.Conflict(str(exc)) from None
            if changed:
                self.log.warning("keyring changed", extra=kv(op=op, key=key_id(key).hex()))
                if self.keyring_file:
                    self.keyring.save(self.keyring_file)
        return describe(self.keyring)

    async def serve_stream(self, stream: FramedStream) -> None:
        """KEYRING channel: one request ``{op, key}``, one reply ``{ok, error, ...}``."""
        with trio.fail_after(self.timeout):
            raw = await stream.receive()
            try:
                value = cbor.loads(raw)
                if not isinstance(value, dict) or value.get("op") not in OPS:
                    raise errors.Invalid("malformed key operation")
                key = value.get("key")
                if key is not None and not isinstance(key, bytes):
                    raise errors.Invalid("malformed key")
                reply: dict[str, Any] = {"ok": True, **self.apply(value["op"], key)}
            except cbor.CodecError:
                reply = {"ok": False, "error": "malformed key operation"}
            except errors.MeshError as exc:
                reply = {"ok": False, "error": exc.message}
            await stream.send(cbor.dumps(reply))

    async def cluster_op(self, op: str, key: bytes | None) -> dict[str, Any]:
        """Run ``op`` on every live member, then here. Returns per-member results."""
        if op not in OPS:
            raise errors.Invalid(f"unknown key operation {op!r}")
        if self.keyring is None:
            raise errors.Invalid("this cluster runs without encryption (--insecure)")
        if key is not None and op == "install":
            try:
                Keyring([key])  # validate size before telling anyone
            except KeyringError as exc:
                raise errors.Invalid(str(exc)) from None
        peers = [m for m in self.members() if m.name != self.self_name and m.status.up]
        results: dict[str, dict[str, Any]] = {}
        payload = cbor.dumps({"op": op, "key": key})

        async def ask(member: MemberView) -> None:
            try:
                raw = await request(
                    member.addr,
                    Channel.KEYRING,
                    payload,
                    self.envelope,
                    self.stats,
                    timeout=self.timeout,
                )
                value = cbor.loads(raw)
                results[member.name] = (
                    value if isinstance(value, dict) else {"ok": False, "error": "malformed reply"}
                )
            except (OSError, trio.TooSlowError, StreamError, cbor.CodecError) as exc:
                results[member.name] = {"ok": False, "error": f"unreachable: {exc!r}"}

        async with trio.open_nursery() as nursery:
            for member in peers:
                nursery.start_soon(ask, member)
        try:
            results[self.self_name] = {"ok": True, **self.apply(op, key)}
        except errors.MeshError as exc:
            results[self.self_name] = {"ok": False, "error": exc.message}
        counts: dict[str, int] = {}
        primaries: dict[str, int] = {}
        for result in results.values():
            for kid in result.get("keys", []) if result.get("ok") else []:
                counts[kid] = counts.get(kid, 0) + 1
            if result.get("ok") and isinstance(result.get("primary"), str):
                primaries[result["primary"]] = primaries.get(result["primary"], 0) + 1
        return {
            "op": op,
            "members": len(results),
            "acknowledged": sum(1 for r in results.values() if r.get("ok")),
            "keys": counts,
            "primaries": primaries,
            "results": results,
        }
