"""The offline network block of the test session, shared by conftest.py and the scripts tests run in fresh
interpreters. A module of its own (not conftest.py) so that any subset of test folders imports the same one."""

# Prepended to scripts run in fresh interpreters: the same network block as the test session. Only this machine's own
# addresses are reachable (the app's server and the browser driver listen there), and only its own names resolve, as
# on a machine without a network, whatever the machine running the tests has.
BLOCK_NETWORK = """
import socket
_LOCAL = (None, "localhost", "127.0.0.1", "::1")
def _local(address):
    return isinstance(address, tuple) and address[0] in _LOCAL
def _blocked(*args, **kwargs):
    raise RuntimeError("network access attempted in an offline test")
_connect, _connect_ex, _create_connection, _getaddrinfo = (
    socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)
def _connect_locally(sock, address):
    return _connect(sock, address) if _local(address) else _blocked()
def _connect_ex_locally(sock, address):
    return _connect_ex(sock, address) if _local(address) else _blocked()
def _create_connection_locally(address, *args, **kwargs):
    return _create_connection(address, *args, **kwargs) if _local(address) else _blocked()
def _resolve_local_only(host, *args, **kwargs):
    if host not in _LOCAL:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect = _connect_locally
socket.socket.connect_ex = _connect_ex_locally
socket.create_connection = _create_connection_locally
socket.getaddrinfo = _resolve_local_only
"""
