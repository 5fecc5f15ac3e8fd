"""Registry entries: what is stored for each agent, and strict validation of stored bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshd_client.protocol import cbor

MAX_NAME: Final = 256
MAX_KIND: Final = 128
MAX_CAPABILITIES: Final = 64
MAX_CAPABILITY: Final = 128
MAX_METADATA_BYTES: Final = 4096

Scalar = str | int | float | bool | None


class EntryError(ValueError):
    """An entry (from a caller or from a replicated document) that is not acceptable."""


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    node: str
    kind: str
    capabilities: tuple[str, ...]
    metadata: dict[str, Scalar]
    registered_at: int  # wall-clock milliseconds at registration
    entry_id: str  # unique per registration: "<node>/<epoch>/<counter>"

    def encode(self) -> bytes:
        return cbor.dumps(
            [
                self.node,
                self.kind,
                list(self.capabilities),
                self.metadata,
                self.registered_at,
                self.entry_id,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node": self.node,
            "kind": self.kind,
            "capabilities": list(self.capabilities),
            "metadata": self.metadata,
            "registered_at": self.registered_at,
            "entry_id": self.entry_id,
        }


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise EntryError(f"agent name must be 1..{MAX_NAME} printable characters")
    return name


def check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or len(kind) > MAX_KIND or not kind.isprintable():
        raise EntryError(f"kind must be at most {MAX_KIND} printable characters")
    return kind


def check_capabilities(capabilities: Any) -> tuple[str, ...]:
    if not isinstance(capabilities, list | tuple) or len(capabilities) > MAX_CAPABILITIES:
        raise EntryError(f"capabilities must be a list of at most {MAX_CAPABILITIES} strings")
    out: list[str] = []
    for cap in capabilities:
        if not isinstance(cap, str) or not 0 < len(cap) <= MAX_CAPABILITY:
            raise EntryError(f"each capability must be 1..{MAX_CAPABILITY} characters")
        if cap not in out:
            out.append(cap)
    return tuple(out)


def check_metadata(metadata: Any, *, encoded_within: int | None = None) -> dict[str, Scalar]:
    """Validate metadata. ``encoded_within``: the size of an encoding that contains it, so
    the size check needs no re-encoding when that is already within the limit."""
    if not isinstance(metadata, dict):
        raise EntryError("metadata must be a map")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise EntryError("metadata keys must be strings")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise EntryError("metadata values must be strings, numbers, booleans or null")
    if (encoded_within is None or encoded_within > MAX_METADATA_BYTES) and len(
        cbor.dumps(metadata)
    ) > MAX_METADATA_BYTES:
        raise EntryError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
    return metadata


def _same(value: Any) -> Any:
    return value


class Interner:
    """Shares equal strings and capability tuples between entries: 100,000 entries of a few
    kinds on a few nodes need a few objects, not 100,000 copies."""

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        return self._values.setdefault(value, value)


def decode_entry(name: str, data: Any, owner: str, intern: Interner | None = None) -> Entry:
    """An entry read from ``owner``'s document; it must claim ``owner`` as its node."""
    if not isinstance(data, bytes | bytearray):
        raise EntryError("entry is not bytes")
    try:
        value = cbor.loads(bytes(data))
    except cbor.CodecError as exc:
        raise EntryError(str(exc)) from None
    if not isinstance(value, list) or len(value) != 6:
        raise EntryError("entry: expected 6 fields")
    node, kind, caps, metadata, registered_at, entry_id = value
    if node != owner:
        raise EntryError("entry names another node than its document's owner")
    if type(registered_at) is not int or registered_at < 0:
        raise EntryError("registered_at must be a non-negative integer")
    if not isinstance(entry_id, str) or not 0 < len(entry_id) <= 256:
        raise EntryError("bad entry id")
    share: Callable[[Any], Any] = intern if intern is not None else _same
    return Entry(
        check_name(name),
        share(owner),
        share(check_kind(kind)),
        share(check_capabilities(caps)),
        check_metadata(metadata, encoded_within=len(data)),
        registered_at,
        entry_id,
    )
