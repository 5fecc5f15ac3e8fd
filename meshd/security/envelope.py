"""The envelope around every UDP packet and TCP frame.

Encrypted form (the default)::

    0x01 | key id (4) | nonce (12) | AES-GCM ciphertext + tag (16)

The associated data binds the protocol, the cluster label and the header, so a packet from a
cluster with another label fails authentication just like a forged one. Nonces are random
96-bit values (one key sees far fewer than 2**32 messages between rotations).

Plaintext form (only with ``--insecure``)::

    0x00 | label length (1) | label | payload

A node never accepts the other form: an encrypted node drops plaintext packets and vice versa.
"""

from __future__ import annotations

import os
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshd.security.keyring import KEY_ID_SIZE, Keyring, key_id

MODE_PLAIN: Final = 0x00
MODE_AESGCM: Final = 0x01
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
HEADER_SIZE: Final = 1 + KEY_ID_SIZE + NONCE_SIZE
_AAD_PREFIX: Final = b"meshd/1\x00"

SealErrorReason = Literal[
    "empty",
    "unknown_mode",
    "plaintext_refused",
    "encrypted_refused",
    "unknown_key",
    "auth_failed",
    "label_mismatch",
    "malformed",
]


class SealError(ValueError):
    """An envelope that cannot be opened; ``reason`` is a short metric label."""

    def __init__(self, reason: SealErrorReason) -> None:
        super().__init__(reason)
        self.reason: SealErrorReason = reason


class Envelope:
    """Seals and opens payloads with a keyring (or in plaintext when insecure)."""

    def __init__(self, keyring: Keyring | None, label: str = "") -> None:
        self.keyring = keyring
        self.label = label.encode("utf-8")
        if len(self.label) > 255:
            raise ValueError("label longer than 255 bytes")
        self._aad_base = _AAD_PREFIX + bytes([len(self.label)]) + self.label
        self._ciphers: dict[bytes, list[AESGCM]] = {}
        self._primary: tuple[bytes, AESGCM] | None = None
        self._cache_key: tuple[int, int] = (-1, -1)

    @property
    def secure(self) -> bool:
        return self.keyring is not None

    @property
    def overhead(self) -> int:
        """Bytes the envelope adds to a payload."""
        if self.keyring is None:
            return 2 + len(self.label)
        return HEADER_SIZE + TAG_SIZE

    def _refresh(self, keyring: Keyring) -> None:
        """Rebuild the cipher cache when the keyring changed (rotation on a live node)."""
        cache_key = (id(keyring), keyring.version)
        if self._cache_key == cache_key and self._primary is not None:
            return
        ciphers: dict[bytes, list[AESGCM]] = {}
        for key in keyring.keys:
            ciphers.setdefault(key_id(key), []).append(AESGCM(key))
        self._ciphers = ciphers
        self._primary = (key_id(keyring.primary), AESGCM(keyring.primary))
        self._cache_key = cache_key

    def seal(self, payload: bytes) -> bytes:
        if self.keyring is None:
            return bytes([MODE_PLAIN, len(self.label)]) + self.label + payload
        self._refresh(self.keyring)
        assert self._primary is not None
        kid, cipher = self._primary
        header = bytes([MODE_AESGCM]) + kid + os.urandom(NONCE_SIZE)
        return header + cipher.encrypt(header[1 + KEY_ID_SIZE :], payload, self._aad_base + header)

    def open(self, data: bytes | bytearray) -> bytes:
        if not data:
            raise SealError("empty")
        mode = data[0]
        if mode == MODE_PLAIN:
            if self.keyring is not None:
                raise SealError("plaintext_refused")
            if len(data) < 2:
                raise SealError("malformed")
            size = data[1]
            if data[2 : 2 + size] != self.label or len(data) < 2 + size:
                raise SealError("label_mismatch")
            return bytes(data[2 + size :])
        if mode != MODE_AESGCM:
            raise SealError("unknown_mode")
        if self.keyring is None:
            raise SealError("encrypted_refused")
        if len(data) < HEADER_SIZE + TAG_SIZE:
            raise SealError("malformed")
        self._refresh(self.keyring)
        header = bytes(data[:HEADER_SIZE])
        candidates = self._ciphers.get(header[1 : 1 + KEY_ID_SIZE])
        if not candidates:
            raise SealError("unknown_key")
        nonce = header[1 + KEY_ID_SIZE :]
        aad = self._aad_base + header
        body = memoryview(data)[HEADER_SIZE:]  # no copy of a large frame
        for cipher in candidates:
            try:
                return cipher.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise SealError("auth_failed")
