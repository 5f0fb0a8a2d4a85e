import socket

import pytest


def test_socket_connections_are_blocked():
    with pytest.raises(RuntimeError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))
