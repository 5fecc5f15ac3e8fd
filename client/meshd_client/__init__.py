"""Thin client for the meshd daemon: run agents anywhere in a meshd cluster.

Async (asyncio or trio, via anyio)::

    from meshd_client import Mesh

    async with Mesh.connect() as mesh:
        await mesh.serve("echo", lambda ctx, msg: echo(msg))
        reply = await mesh.request("echo", {"hello": "world"})

Synchronous code uses :mod:`meshd_client.sync`, which wraps the same implementation.
"""

from meshd_client._version import __version__
from meshd_client.agents import Agent, AgentContext, Handler
from meshd_client.mesh import Mesh
from meshd_client.protocol import errors
from meshd_client.protocol.errors import (
    Closed,
    Conflict,
    ErrorKind,
    Internal,
    Invalid,
    MeshError,
    NotFound,
    Overloaded,
    Timeout,
    Unauthorized,
    Unreachable,
)
from meshd_client.state import StateDoc
from meshd_client.types import AgentInfo, Message, RegistryEvent, Signal

__all__ = [
    "Agent",
    "AgentContext",
    "AgentInfo",
    "Closed",
    "Conflict",
    "ErrorKind",
    "Handler",
    "Internal",
    "Invalid",
    "Mesh",
    "MeshError",
    "Message",
    "NotFound",
    "Overloaded",
    "RegistryEvent",
    "Signal",
    "StateDoc",
    "Timeout",
    "Unauthorized",
    "Unreachable",
    "__version__",
    "errors",
]
