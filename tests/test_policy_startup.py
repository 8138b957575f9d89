"""
A server's first connections, as a restart under attack brings them: the
bans in the database hold from the first connection it accepts, not from
its first refresh of them.
"""

import socket

from e2e import DEADLINE, mailgateHere
from test_systemd import ActivatedServer

BANNED = "127.0.0.2"
OTHER = "127.0.0.3"


def _queued(port, source):
    """
    A client connected from C{source} to a listening socket no process
    accepts on yet: the kernel holds it in the socket's queue.
    """
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))


def _firstLine(sock):
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[0]


def test_aBannedClientQueuedWhileTheServerStartsIsRefused(tmp_path, databaseURL):
    """
    A socket-activated SMTP listener (mailgate.socket) holds the
    connections made while the service (re)starts.  One from an address
    banned in the database is refused (421) like every later one; one from
    another address is served.  Before, the server accepted the queued
    connections before its first read of the bans came back: the banned
    client was greeted 220 and its message taken (seen on real twistd
    nodes on PostgreSQL: 5 restarts, 5 messages taken from a banned
    address by a client connecting as the node listened).
    """
    for argv in (("db", "upgrade"), ("ban", "add", BANNED)):
        code, out, err = mailgateHere(databaseURL, *argv)
        assert code == 0, (argv, out, err)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    banned, other = _queued(port, BANNED), _queued(port, OTHER)
    server = ActivatedServer(
        databaseURL, listening, [
            "--smtp", "systemd:domain=INET:index=0", "--pop3", "tcp:0:interface=127.0.0.1",
            "--exempt-network", "none",
        ],
        cwd=tmp_path,
    )
    server.spawn()
    listening.close()
    try:
        assert _firstLine(banned) == b"421 4.7.0 banned", server.log()
        assert _firstLine(other).startswith(b"220 "), server.log()
        server.waitUntilListening()
    finally:
        banned.close()
        other.close()
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()
