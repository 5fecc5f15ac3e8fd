"""The local Unix-socket API: sessions, requests, streams (the protocol is in meshd_client)."""
