"""Gossip security: the keyring and the authenticated-encryption envelope around every packet
and stream frame."""

from meshd.security.envelope import Envelope, SealError
from meshd.security.keyring import KEY_SIZES, Keyring, KeyringError, key_id, parse_key

__all__ = ["KEY_SIZES", "Envelope", "Keyring", "KeyringError", "SealError", "key_id", "parse_key"]
