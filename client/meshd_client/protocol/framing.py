"""Local API framing: a 4-byte big-endian length, then one CBOR map.

The decoder is sans-IO: feed it bytes as they arrive and take whole frames out. A frame whose
announced length is over the limit is an error as soon as its 4-byte length arrives, before
the rest is buffered, so a peer cannot make either side allocate without bound (bytes already
fed with that length are held until the caller closes the connection).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from meshd_client.protocol import cbor

HEADER: Final = struct.Struct(">I")
DEFAULT_MAX_FRAME: Final = 1 << 20  # 1 MiB


class FrameError(ValueError):
    """The byte stream is not a valid sequence of frames; the connection must be closed."""


def encode_frame(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    body = cbor.dumps(message)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes, then call ``next_frame()`` until it returns
    None for the complete messages."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def head_size(self) -> int | None:
        """The size the next frame announced (None until its length arrived)."""
        if len(self._buffer) < HEADER.size:
            return None
        size: int = HEADER.unpack_from(self._buffer)[0]
        return size

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self.max_frame:
                raise FrameError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")

    def next_frame(self) -> dict[str, Any] | None:
        """The next complete frame, or None if more bytes are needed."""
        buf = self._buffer
        if len(buf) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(buf)
        if size > self.max_frame:
            raise FrameError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")
        end = HEADER.size + size
        if len(buf) < end:
            return None
        body = bytes(buf[HEADER.size : end])
        del buf[:end]
        try:
            message = cbor.loads(body)
        except cbor.CodecError as exc:
            raise FrameError(str(exc)) from None
        if not isinstance(message, dict):
            raise FrameError("a frame must hold a CBOR map")
        # An oversized header right behind this frame is refused by the next call, before
        # any more bytes are fed: this good frame is still delivered.
        return message
