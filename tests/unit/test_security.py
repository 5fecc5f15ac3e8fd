"""The keyring (install / use / remove, persistence) and the sealing envelope."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from meshd.security import KEY_SIZES, Envelope, Keyring, KeyringError, SealError, key_id, parse_key
from meshd.security.envelope import HEADER_SIZE, MODE_AESGCM, MODE_PLAIN, NONCE_SIZE, TAG_SIZE
from meshd.security.keyring import KEY_ID_SIZE, MAX_KEYS, encode_key

K1 = bytes(range(16))
K2 = bytes(range(100, 124))
K3 = bytes(range(200, 232))
PAYLOAD = b"\x82\x01\x41\x00 some membership packet"


# ---------------------------------------------------------------------------- keyring


def test_first_key_is_primary_and_duplicates_collapse() -> None:
    ring = Keyring([K1, K2, K1])
    assert ring.primary == K1
    assert ring.keys == (K1, K2)


@pytest.mark.parametrize("size", KEY_SIZES)
def test_aes_key_sizes_are_accepted(size: int) -> None:
    key = bytes([7]) * size
    assert Keyring([key]).primary == key
    assert parse_key(encode_key(key)) == key


@pytest.mark.parametrize("size", [0, 1, 8, 15, 17, 20, 23, 25, 31, 33, 64])
def test_other_key_sizes_are_refused_everywhere(size: int) -> None:
    key = bytes([7]) * size
    with pytest.raises(KeyringError):
        Keyring([key])
    ring = Keyring([K1])
    with pytest.raises(KeyringError):
        ring.install(key)
    assert ring.keys == (K1,)
    with pytest.raises(KeyringError):
        parse_key(base64.b64encode(key).decode())


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA====AAAA", "%%%%"])
def test_parse_key_refuses_bad_base64(text: str) -> None:
    with pytest.raises(KeyringError):
        parse_key(text)


def test_parse_key_strips_whitespace() -> None:
    assert parse_key("  " + encode_key(K3) + "\n") == K3


def test_empty_keyring_is_refused() -> None:
    with pytest.raises(KeyringError):
        Keyring([])


def test_install_adds_a_decryption_key() -> None:
    ring = Keyring([K1])
    version = ring.version
    assert ring.install(K2)
    assert ring.keys == (K1, K2)
    assert ring.primary == K1
    assert ring.version > version
    version = ring.version
    assert not ring.install(K2)  # already there
    assert ring.version == version


def test_keyring_size_is_bounded() -> None:
    keys = [i.to_bytes(16, "big") for i in range(MAX_KEYS)]
    ring = Keyring(keys)
    with pytest.raises(KeyringError):
        ring.install(K3)
    with pytest.raises(KeyringError):
        Keyring([*keys, K3])


def test_use_makes_an_installed_key_primary() -> None:
    ring = Keyring([K1, K2])
    assert ring.use(K2)
    assert ring.primary == K2
    assert set(ring.keys) == {K1, K2}
    assert not ring.use(K2)  # already primary


def test_use_requires_the_key_to_be_installed() -> None:
    ring = Keyring([K1])
    with pytest.raises(KeyringError):
        ring.use(K2)
    assert ring.keys == (K1,)


def test_primary_cannot_be_removed() -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(KeyringError):
        ring.remove(K1)
    assert ring.keys == (K1, K2)
    ring.use(K2)
    assert ring.remove(K1)
    assert ring.keys == (K2,)
    assert not ring.remove(K1)  # no longer installed
    with pytest.raises(KeyringError):
        ring.remove(K2)  # the last key is always primary


def test_persistence_round_trip_and_file_mode(tmp_path: Path) -> None:
    ring = Keyring([K2, K1, K3])
    path = tmp_path / "sub" / "keyring.json"
    old_umask = os.umask(0)
    try:
        ring.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Keyring.load(path)
    assert loaded.keys == (K2, K1, K3)
    assert loaded.primary == K2
    # Saving again replaces the file atomically and leaves no temporary files behind.
    loaded.use(K3)
    loaded.save(path)
    assert Keyring.load(path).primary == K3
    assert [p.name for p in path.parent.iterdir()] == ["keyring.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_file_does_not_contain_the_key_ids_or_anything_but_keys(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring([K1]).save(path)
    text = path.read_text()
    assert encode_key(K1) in text
    assert Keyring.from_json(text).keys == (K1,)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"keys": "abc"}',
        '{"keys": [1]}',
        '{"keys": []}',
        '{"keys": ["not base64"]}',
        '{"keys": ["' + base64.b64encode(bytes(10)).decode() + '"]}',
        "not json",
    ],
)
def test_malformed_keyring_files_are_refused(text: str) -> None:
    with pytest.raises(KeyringError):
        Keyring.from_json(text)


def test_key_id_is_a_short_hash_not_the_key() -> None:
    kid = key_id(K1)
    assert len(kid) == KEY_ID_SIZE
    assert kid not in K1
    assert key_id(K1) == kid
    assert key_id(K2) != kid


# ---------------------------------------------------------------------------- envelope


def pair(*keys: bytes, label: str = "") -> tuple[Envelope, Envelope]:
    return Envelope(Keyring(keys), label), Envelope(Keyring(keys), label)


def test_round_trip() -> None:
    sender, receiver = pair(K1)
    sealed = sender.seal(PAYLOAD)
    assert receiver.open(sealed) == PAYLOAD
    assert len(sealed) == len(PAYLOAD) + sender.overhead
    assert sealed[0] == MODE_AESGCM
    assert sealed[1 : 1 + KEY_ID_SIZE] == key_id(K1)
    assert PAYLOAD not in sealed


def test_empty_payload_round_trips() -> None:
    sender, receiver = pair(K3)
    assert receiver.open(sender.seal(b"")) == b""


def test_nonces_are_fresh() -> None:
    sender, _ = pair(K1)
    a, b = sender.seal(PAYLOAD), sender.seal(PAYLOAD)
    assert a[1 + KEY_ID_SIZE : HEADER_SIZE] != b[1 + KEY_ID_SIZE : HEADER_SIZE]
    assert a != b


def test_any_installed_key_opens() -> None:
    sender = Envelope(Keyring([K2]))
    receiver = Envelope(Keyring([K1, K2, K3]))
    assert receiver.open(sender.seal(PAYLOAD)) == PAYLOAD


def test_wrong_key_is_an_unknown_key() -> None:
    sender = Envelope(Keyring([K1]))
    receiver = Envelope(Keyring([K2]))
    with pytest.raises(SealError) as info:
        receiver.open(sender.seal(PAYLOAD))
    assert info.value.reason == "unknown_key"


def colliding_keys() -> tuple[bytes, bytes]:
    """Two AES-128 keys whose 4-byte wire ids collide (found by a birthday search)."""
    a, b = (28312).to_bytes(16, "big"), (50504).to_bytes(16, "big")
    assert a != b and key_id(a) == key_id(b)
    return a, b


def test_key_id_collision_tries_every_candidate() -> None:
    a, b = colliding_keys()
    receiver = Envelope(Keyring([a, b]))
    assert receiver.open(Envelope(Keyring([a])).seal(PAYLOAD)) == PAYLOAD
    assert receiver.open(Envelope(Keyring([b])).seal(PAYLOAD)) == PAYLOAD
    # With only the other key of the pair, the id matches but authentication fails.
    with pytest.raises(SealError) as info:
        Envelope(Keyring([a])).open(Envelope(Keyring([b])).seal(PAYLOAD))
    assert info.value.reason == "auth_failed"


def test_label_mismatch_fails_authentication() -> None:
    sender = Envelope(Keyring([K1]), "prod")
    for label in ("staging", "", "prod "):
        with pytest.raises(SealError) as info:
            Envelope(Keyring([K1]), label).open(sender.seal(PAYLOAD))
        assert info.value.reason == "auth_failed"
    assert Envelope(Keyring([K1]), "prod").open(sender.seal(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize(
    "position",
    [
        HEADER_SIZE - NONCE_SIZE,  # first nonce byte
        HEADER_SIZE - 1,  # last nonce byte
        HEADER_SIZE,  # first ciphertext byte
        HEADER_SIZE + len(PAYLOAD) - 1,  # last ciphertext byte
        -TAG_SIZE,  # first tag byte
        -1,  # last tag byte
    ],
)
def test_tampering_fails_authentication(position: int) -> None:
    sender, receiver = pair(K1)
    sealed = bytearray(sender.seal(PAYLOAD))
    sealed[position] ^= 0x01
    with pytest.raises(SealError) as info:
        receiver.open(bytes(sealed))
    assert info.value.reason == "auth_failed"


def test_tampered_key_id_is_an_unknown_key() -> None:
    sender, receiver = pair(K1)
    sealed = bytearray(sender.seal(PAYLOAD))
    sealed[1] ^= 0x01
    with pytest.raises(SealError) as info:
        receiver.open(bytes(sealed))
    assert info.value.reason == "unknown_key"


def test_appended_or_removed_bytes_fail_authentication() -> None:
    sender, receiver = pair(K1)
    sealed = sender.seal(PAYLOAD)
    for data in (sealed + b"\x00", sealed[:-1]):
        with pytest.raises(SealError) as info:
            receiver.open(data)
        assert info.value.reason == "auth_failed"


@pytest.mark.parametrize("length", [1, 2, HEADER_SIZE, HEADER_SIZE + TAG_SIZE - 1])
def test_truncated_input_is_malformed(length: int) -> None:
    sender, receiver = pair(K1)
    with pytest.raises(SealError) as info:
        receiver.open(sender.seal(PAYLOAD)[:length])
    assert info.value.reason == "malformed"


def test_empty_input() -> None:
    _, receiver = pair(K1)
    with pytest.raises(SealError) as info:
        receiver.open(b"")
    assert info.value.reason == "empty"
    with pytest.raises(SealError) as info:
        Envelope(None).open(b"")
    assert info.value.reason == "empty"


def test_unknown_mode() -> None:
    for envelope in (Envelope(Keyring([K1])), Envelope(None)):
        with pytest.raises(SealError) as info:
            envelope.open(b"\x02" + bytes(40))
        assert info.value.reason == "unknown_mode"


def test_plaintext_is_refused_by_a_secure_node() -> None:
    plain = Envelope(None)
    secure = Envelope(Keyring([K1]))
    with pytest.raises(SealError) as info:
        secure.open(plain.seal(PAYLOAD))
    assert info.value.reason == "plaintext_refused"


def test_encrypted_is_refused_by_an_insecure_node() -> None:
    plain = Envelope(None)
    secure = Envelope(Keyring([K1]))
    with pytest.raises(SealError) as info:
        plain.open(secure.seal(PAYLOAD))
    assert info.value.reason == "encrypted_refused"


def test_plaintext_round_trip_with_label() -> None:
    sender, receiver = Envelope(None, "lab"), Envelope(None, "lab")
    assert not sender.secure
    sealed = sender.seal(PAYLOAD)
    assert sealed == bytes([MODE_PLAIN, 3]) + b"lab" + PAYLOAD
    assert len(sealed) == len(PAYLOAD) + sender.overhead
    assert receiver.open(sealed) == PAYLOAD


def test_plaintext_label_mismatch() -> None:
    sealed = Envelope(None, "lab").seal(PAYLOAD)
    for label in ("", "lab2", "la"):
        with pytest.raises(SealError) as info:
            Envelope(None, label).open(sealed)
        assert info.value.reason == "label_mismatch"


def test_truncated_plaintext() -> None:
    with pytest.raises(SealError) as info:
        Envelope(None).open(b"\x00")
    assert info.value.reason == "malformed"
    for data in (b"\x00\x05lab", b"\x00\x05"):
        with pytest.raises(SealError) as info:
            Envelope(None, "label").open(data)
        assert info.value.reason in ("label_mismatch", "malformed")


def test_label_longer_than_255_bytes_is_refused() -> None:
    Envelope(None, "x" * 255)
    with pytest.raises(ValueError, match="label"):
        Envelope(None, "x" * 256)
    with pytest.raises(ValueError, match="label"):
        Envelope(Keyring([K1]), "é" * 128)  # 256 bytes in UTF-8


def test_overheads() -> None:
    assert Envelope(Keyring([K1])).overhead == 1 + KEY_ID_SIZE + NONCE_SIZE + TAG_SIZE
    assert Envelope(None, "abc").overhead == 5


# ---------------------------------------------------------------------------- rotation


def test_rotation_on_a_live_node() -> None:
    """Serf's procedure: install the new key everywhere, use it, then remove the old one."""
    ring = Keyring([K1])
    node = Envelope(ring)
    peer = Envelope(Keyring([K1]))
    old_packet = peer.seal(PAYLOAD)
    assert node.open(old_packet) == PAYLOAD

    ring.install(K2)
    assert node.open(old_packet) == PAYLOAD
    assert node.seal(PAYLOAD)[1 : 1 + KEY_ID_SIZE] == key_id(K1)  # still sealing with K1

    ring.use(K2)
    new_packet = node.seal(PAYLOAD)
    assert new_packet[1 : 1 + KEY_ID_SIZE] == key_id(K2)
    assert node.open(old_packet) == PAYLOAD  # the old key is still installed
    assert node.open(new_packet) == PAYLOAD
    with pytest.raises(SealError):
        peer.open(new_packet)  # a peer without the new key cannot read it yet

    ring.remove(K1)
    with pytest.raises(SealError) as info:
        node.open(old_packet)
    assert info.value.reason == "unknown_key"
    assert node.open(new_packet) == PAYLOAD


def test_replacing_the_keyring_object_takes_effect() -> None:
    node = Envelope(Keyring([K1]))
    sealed = Envelope(Keyring([K1])).seal(PAYLOAD)
    assert node.open(sealed) == PAYLOAD
    node.keyring = Keyring([K2])
    with pytest.raises(SealError) as info:
        node.open(sealed)
    assert info.value.reason == "unknown_key"
