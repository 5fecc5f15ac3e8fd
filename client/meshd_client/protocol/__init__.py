"""The one definition of meshd's local API shared by daemon and client: framing, message
types, error kinds and limits. The daemon imports this package; nothing here depends on trio,
pycrdt or the daemon.
"""

from meshd_client.protocol.errors import ErrorKind, MeshError
from meshd_client.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame
from meshd_client.protocol.messages import API_VERSION, SUPPORTED_VERSIONS

__all__ = [
    "API_VERSION",
    "DEFAULT_MAX_FRAME",
    "SUPPORTED_VERSIONS",
    "ErrorKind",
    "FrameDecoder",
    "FrameError",
    "MeshError",
    "encode_frame",
]
