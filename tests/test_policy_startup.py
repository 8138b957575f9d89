"""
A server's first connections, as a restart under attack brings them: the
bans in the database hold from the first connection it accepts, not from
its first refresh of them.
"""

import socket
import sys

from e2e import DEADLINE, ServerProcess, mailgateHere

BANNED = "127.0.0.2"
OTHER = "127.0.0.3"

# Put the socket at descriptor 3, say so in the environment for this very
# process, and become twistd (exec keeps the pid), as systemd starts a
# socket-activated service.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class ActivatedServer(ServerProcess):
    """
    twistd given C{listening} as systemd passes a socket unit's socket:
    descriptor 3, C{LISTEN_FDS=1}, C{LISTEN_PID} its pid.
    """

    def __init__(self, database, listening, options=(), **kw):
        super().__init__(database, options, listen=False, **kw)
        self.fd = listening.fileno()
        self.passFds = (self.fd,)
        self.env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp"})

    @property
    def argv(self):
        return [sys.executable, "-c", _ACTIVATE, str(self.fd)] + super().argv


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
