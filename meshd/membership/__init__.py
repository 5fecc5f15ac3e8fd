"""SWIM membership with Lifeguard: a sans-IO core (`core`) and its trio driver (`driver`).

The core takes packets, stream replies and the current time, and returns packets to send,
stream requests, membership events and its next deadline. It never touches a socket or a
clock, which is what lets the same code run on real sockets and in a simulated network of a
thousand nodes in virtual time.
"""
