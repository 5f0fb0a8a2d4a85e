import socket

import pytest


def test_connections_beyond_this_machine_are_blocked():
    with pytest.raises(RuntimeError, match="network access"):
        socket.create_connection(("192.0.2.1", 9))  # TEST-NET-1: never a real host
    with pytest.raises(RuntimeError, match="network access"):
        socket.socket().connect(("192.0.2.1", 9))
    with pytest.raises(ConnectionRefusedError):  # this machine's own addresses are reachable (nothing listens here)
        socket.create_connection(("127.0.0.1", 9))


def test_only_this_machines_names_resolve():
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("huggingface.co", 443)
    assert socket.getaddrinfo("127.0.0.1", 9)
