"""Waiting for a distributed condition in tests: poll with a deadline, fail naming what.

End-to-end tests never sleep a fixed time and never assert on durations: they wait until a
condition holds, bounded, and a timeout fails the test with a message saying what did not
happen.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10.0
) -> T:
    """Poll ``check`` until it returns something other than None (or fail naming ``what``)."""
    try:
        with anyio.fail_after(timeout):
            while True:
                value = await check()
                if value is not None:
                    return value
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a synchronous ``condition`` until it holds (or fail naming ``what``)."""

    async def check() -> bool | None:
        return True if condition() else None

    await eventually(check, what, timeout)
