"""An API session spoken by hand over the Unix socket, for what a well-behaved client never
sends: raw bytes, frames out of order, partial frames. Shared by the API server's unit tests
and the hostile-input end-to-end tests."""

from __future__ import annotations

from typing import Any

import trio

from meshd_client.protocol import messages
from meshd_client.protocol.framing import FrameDecoder, encode_frame


class RawApi:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    @classmethod
    async def open(cls, path: str) -> RawApi:
        return cls(await trio.open_unix_socket(path))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.stream.send_all(encode_frame(frame))

    async def send_bytes(self, data: bytes) -> bool:
        """False if the daemon closed the connection first."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next frame; None once the daemon closed the connection."""
        with trio.fail_after(timeout):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return frame
                try:
                    data = await self.stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    return None
                self.decoder.feed(data)

    async def hello(self, client: str = "raw-test", timeout: float = 5.0) -> dict[str, Any] | None:
        """Send a hello; the daemon's answer (a hello, or the error that ends the session)."""
        await self.send_bytes(encode_frame(messages.hello(client)))
        return await self.recv(timeout)

    async def handshake(self) -> dict[str, Any]:
        """A hello that must succeed."""
        reply = await self.hello()
        assert reply is not None
        assert reply["t"] == "hello", reply
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()
