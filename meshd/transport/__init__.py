"""Inter-daemon transport: sealed UDP datagrams and sealed, framed TCP streams with channels.

Protocol cores never see sockets; their trio drivers use this package.
"""
