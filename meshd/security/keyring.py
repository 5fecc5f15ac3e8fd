"""The keyring: one primary key that encrypts, every installed key decrypts.

This is what makes key rotation on a live cluster possible (Serf's procedure): install the new
key everywhere, make it primary everywhere, then remove the old one. Keys are identified on the
wire by a 4-byte id (a hash prefix), so a receiver does not have to try every key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

KEY_SIZES: Final = (16, 24, 32)
KEY_ID_SIZE: Final = 4
MAX_KEYS: Final = 16


class KeyringError(ValueError):
    """A keyring operation that cannot be done (bad key, removing the primary, ...)."""


def key_id(key: bytes) -> bytes:
    """The key's wire id: a prefix of its SHA-256, never the key material itself."""
    return hashlib.sha256(b"meshd-key-id\x00" + key).digest()[:KEY_ID_SIZE]


def parse_key(text: str) -> bytes:
    """Decode a base64 key and check its size (AES-128/192/256)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("key is not valid base64") from None
    if len(key) not in KEY_SIZES:
        raise KeyringError(f"key must decode to 16, 24 or 32 bytes, not {len(key)}")
    return key


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


class Keyring:
    """Installed keys, the first being primary. Mutations validate before changing anything."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys: list[bytes] = []
        for key in keys:
            self._check(key)
            if key not in self._keys:
                self._keys.append(key)
        if not self._keys:
            raise KeyringError("a keyring needs at least one key")
        if len(self._keys) > MAX_KEYS:
            raise KeyringError(f"at most {MAX_KEYS} keys")
        self.version = 0  # bumped on every change; lets users cache derived objects

    @staticmethod
    def _check(key: bytes) -> None:
        if len(key) not in KEY_SIZES:
            raise KeyringError(f"key must be 16, 24 or 32 bytes, not {len(key)}")

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> tuple[bytes, ...]:
        return tuple(self._keys)

    def install(self, key: bytes) -> bool:
        """Add a key for decryption; returns False if it was already installed."""
        self._check(key)
        if key in self._keys:
            return False
        if len(self._keys) >= MAX_KEYS:
            raise KeyringError(f"at most {MAX_KEYS} keys")
        self._keys.append(key)
        self.version += 1
        return True

    def use(self, key: bytes) -> bool:
        """Make an installed key primary; returns False if it already was."""
        if key not in self._keys:
            raise KeyringError("key is not installed; install it first")
        if self._keys[0] == key:
            return False
        self._keys.remove(key)
        self._keys.insert(0, key)
        self.version += 1
        return True

    def remove(self, key: bytes) -> bool:
        """Remove a non-primary key; returns False if it was not installed."""
        if key not in self._keys:
            return False
        if self._keys[0] == key:
            raise KeyringError("cannot remove the primary key; make another key primary first")
        self._keys.remove(key)
        self.version += 1
        return True

    # Persistence: a small JSON file, written atomically with mode 0600.

    def to_json(self) -> str:
        return json.dumps({"keys": [encode_key(k) for k in self._keys]}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        try:
            data = json.loads(text)
            keys = data["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise TypeError("keys must be a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyringError(f"malformed keyring file: {exc}") from None
        return cls(parse_key(k) for k in keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=target.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
