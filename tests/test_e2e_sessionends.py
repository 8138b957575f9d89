"""
End-to-end: every admitted POP3 session ends with one line in the log,
however it ends, as Dovecot's C{pop3-login: Disconnected (...)} line and
mailgate's SMTP end line do: a real C{twistd mailgate} (JSON log), real
sockets on 127.0.0.1, TLS for POP3S and STLS.  A session that logs in
keeps its C{pop3.logout} line; one that did not has C{pop3.disconnect}.
Every wait is bounded (L{e2e.DEADLINE}).
"""

import json
import socket
import ssl
import struct

from certs import makeCertificate
from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
ALICE_PW = "wonder land"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"


def records(server, event):
    found = []
    for line in server.stdout.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


def readLine(sock):
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def untilClosed(sock):
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


@sqliteOnly
def test_everyPOP3SessionEndsWithOneLine(mailgate_server, mailgate_cli, tmp_path):
    """
    QUIT without login, failed logins then a close, an RST, a forbidden
    HTTP line, a POP3S handshake dropped, STLS then dropped: one
    C{pop3.disconnect} each, with its reason, the failed logins, TLS and
    the duration; no user name that did not log in.  A logged-in session
    still has its C{pop3.logout} line and no other.  (Before: none of the
    sessions that did not log in had a closing line.)
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    certificatePath, keyPath = makeCertificate(directory, "localhost", name="server")
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        "--log-format", "json", "--tls-cert", str(certificatePath), "--tls-key", str(keyPath),
        "--pop3", LOOPBACK_TCP, "--pop3s", LOOPBACK_TCP, "--auth-failure-delay", "0",
    )
    pop3, pop3s = server.portOf("POP3"), server.portOf("POP3S")
    expected = []

    with socket.create_connection(("127.0.0.1", pop3), timeout=DEADLINE) as sock:
        readLine(sock)
        sock.sendall(b"QUIT\r\n")
        readLine(sock)
        untilClosed(sock)
    expected.append(("quit", 0, False))

    with socket.create_connection(("127.0.0.1", pop3), timeout=DEADLINE) as sock:
        readLine(sock)
        for _ in range(2):
            sock.sendall(b"USER mallory@example.org\r\n")
            readLine(sock)
            sock.sendall(b"PASS guessed\r\n")
            assert readLine(sock).startswith(b"-ERR")
    expected.append(("connection lost", 2, False))

    sock = socket.create_connection(("127.0.0.1", pop3), timeout=DEADLINE)
    readLine(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    expected.append(("connection lost", 0, False))

    with socket.create_connection(("127.0.0.1", pop3), timeout=DEADLINE) as sock:
        readLine(sock)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        untilClosed(sock)
    expected.append(("forbidden command", 0, False))

    with socket.create_connection(("127.0.0.1", pop3s), timeout=DEADLINE) as sock:
        # A ClientHello's first octets, then nothing: the client gives up.
        sock.sendall(b"\x16\x03\x01\x00\xc8\x01")
    expected.append(("connection lost in TLS handshake", 0, False))

    with socket.create_connection(("127.0.0.1", pop3), timeout=DEADLINE) as sock:
        readLine(sock)
        sock.sendall(b"STLS\r\n")
        assert readLine(sock).startswith(b"+OK")
    expected.append(("connection lost in TLS handshake", 0, False))

    context = ssl.create_default_context(cafile=str(certificatePath))
    with socket.create_connection(("127.0.0.1", pop3s), timeout=DEADLINE) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            readLine(sock)
            sock.sendall(b"QUIT\r\n")
            readLine(sock)
    expected.append(("quit", 0, True))

    with socket.create_connection(("127.0.0.1", pop3), timeout=DEADLINE) as sock:
        readLine(sock)
        sock.sendall(f"USER {ALICE}\r\n".encode())
        readLine(sock)
        sock.sendall(f"PASS {ALICE_PW}\r\n".encode())
        assert readLine(sock).startswith(b"+OK")
        sock.sendall(b"QUIT\r\n")
        readLine(sock)

    waitFor(lambda: len(records(server, "pop3.disconnect")) >= len(expected) and records(server, "pop3.logout"),
            "a closing line for every session")
    lines = records(server, "pop3.disconnect")
    assert [(r["reason"], r["authFailed"], r["tls"]) for r in lines] == expected, server.stdout
    for record in lines:
        assert "user" not in record and record["seconds"] >= 0
        assert record["text"].startswith(f"pop3 disconnect peer={record['peer']} reason=")
    assert "mallory" not in "".join(r["text"] for r in lines)
    [logout] = records(server, "pop3.logout")
    assert logout["user"] == ALICE and logout["reason"] == "quit"
