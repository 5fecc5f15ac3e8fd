"""Wire formats between daemons: membership messages, compound packets and stream frames.

Everything is CBOR (via the client's safe codec) inside the security envelope.
"""
