"""
End-to-end guard: a long-running server gives back what its sessions took,
however they end.  A real C{twistd mailgate} (SQLite file) with POP3, POP3S,
SMTP, LMTP and metrics listeners on 127.0.0.1 serves a few sessions of each
way a session can end (QUIT, the client's close or reset before the greeting
is read, mid-SASL, mid-RETR, mid-DATA, mid-BDAT, in a TLS handshake, an HTTP
line); then its open descriptors and threads are back to the baseline taken
after a warm-up (give or take the metrics request's own connection), the
connection and maildrop-lock gauges are back to 0, and the user whose
sessions were cut off logs in at once.

Each ending's session count is small (the loop counts what would leak, it
is not a load test); every wait is bounded by L{e2e.DEADLINE}.
"""

import itertools
import os
import socket
import ssl
import struct
import time
import urllib.request

from certs import makeCertificate
from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
ALICE_PW = "wonder land"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
# Sessions of each ending after the warm-up: enough that one descriptor or
# thread kept per session stands far above the slack.
SESSIONS = 15
# Descriptors the process may hold beyond the baseline for reasons of its own
# (the metrics request just answered, a database connection opened later).
SLACK = 3
MESSAGE = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300


class Client:
    """
    Opens connections to the server, each from another 127.0.0.x address so
    that no per-address limit or penalty comes into play.
    """

    def __init__(self, server, certificatePath):
        self.server = server
        self.context = ssl.create_default_context(cafile=str(certificatePath))
        self._sources = (f"127.0.{b}.{c}" for b, c in itertools.product(range(1, 250), range(2, 250)))

    def connect(self, name):
        sock = socket.socket()
        sock.settimeout(DEADLINE)
        sock.bind((next(self._sources), 0))
        sock.connect(("127.0.0.1", self.server.portOf(name)))
        return sock


def readLine(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def untilClosed(sock):
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def popLogin(client):
    """
    A POP3 session logged in as alice.  Her maildrop lock is released as the
    server sees the previous session's end, a moment after the client closed
    it: C{[IN-USE]} is tried again, a bounded number of times.
    """
    sock = client.connect("POP3")
    readLine(sock)
    for _ in range(int(DEADLINE / 0.02)):
        sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n".encode())
        readLine(sock)
        answer = readLine(sock)
        if answer.startswith(b"+OK"):
            return sock
        assert b"[IN-USE]" in answer, answer
        time.sleep(0.02)
    raise AssertionError("alice's maildrop stayed locked")


def smtpStarted(client, name="SMTP", hello=b"EHLO"):
    sock = client.connect(name)
    readLine(sock)
    sock.sendall(hello + b" client.test\r\n")
    while readLine(sock)[3:4] == b"-":
        pass
    sock.sendall(f"MAIL FROM:<a@example.net>\r\nRCPT TO:<{ALICE}>\r\n".encode())
    readLine(sock)
    readLine(sock)
    return sock


def quitWithoutLogin(client):
    sock = client.connect("POP3")
    readLine(sock)
    sock.sendall(b"QUIT\r\n")
    readLine(sock)
    untilClosed(sock)


def quitLoggedIn(client):
    sock = popLogin(client)
    sock.sendall(b"QUIT\r\n")
    readLine(sock)
    untilClosed(sock)


def closedBeforeTheGreeting(client):
    client.connect("POP3").close()


def resetBeforeTheGreeting(client):
    reset(client.connect("SMTP"))


def closedMidSASL(client):
    sock = client.connect("POP3")
    readLine(sock)
    sock.sendall(b"AUTH PLAIN\r\n")
    readLine(sock)
    sock.close()


def resetMidRETR(client):
    sock = popLogin(client)
    sock.sendall(b"RETR 1\r\n")
    sock.recv(4096)
    reset(sock)


def closedMidRETR(client):
    sock = popLogin(client)
    sock.sendall(b"RETR 1\r\n")
    sock.recv(4096)
    sock.close()


def closedMidDATA(client):
    sock = smtpStarted(client)
    sock.sendall(b"DATA\r\n")
    readLine(sock)
    sock.sendall(b"Subject: cut\r\n\r\n" + b"y" * 20000)
    sock.close()


def resetMidLMTPDATA(client):
    sock = smtpStarted(client, "LMTP", b"LHLO")
    sock.sendall(b"DATA\r\n")
    readLine(sock)
    sock.sendall(b"Subject: cut\r\n\r\n" + b"y" * 20000)
    reset(sock)


def resetMidBDAT(client):
    sock = smtpStarted(client)
    sock.sendall(b"BDAT 100000\r\n" + b"z" * 30000)
    reset(sock)


def goneInTheSTLSHandshake(client):
    sock = client.connect("POP3")
    readLine(sock)
    sock.sendall(b"STLS\r\n")
    readLine(sock)
    sock.sendall(b"\x16\x03\x01\x00\xc8\x01")
    sock.close()


def goneInTheSTARTTLSHandshake(client):
    sock = client.connect("SMTP")
    readLine(sock)
    sock.sendall(b"EHLO client.test\r\n")
    while readLine(sock)[3:4] == b"-":
        pass
    sock.sendall(b"STARTTLS\r\n")
    readLine(sock)
    reset(sock)


def failedPOP3SHandshake(client):
    sock = client.connect("POP3S")
    try:
        # The default trust store does not know the test certificate.
        ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")
    except ssl.SSLError:
        pass
    sock.close()


def quitOverPOP3S(client):
    sock = client.context.wrap_socket(client.connect("POP3S"), server_hostname="localhost")
    readLine(sock)
    sock.sendall(b"QUIT\r\n")
    readLine(sock)
    sock.close()


def httpLine(client):
    sock = client.connect("POP3")
    readLine(sock)
    sock.sendall(b"GET / HTTP/1.1\r\n")
    untilClosed(sock)


ENDINGS = [
    quitWithoutLogin, quitLoggedIn, closedBeforeTheGreeting, resetBeforeTheGreeting, closedMidSASL,
    resetMidRETR, closedMidRETR, closedMidDATA, resetMidLMTPDATA, resetMidBDAT, goneInTheSTLSHandshake,
    goneInTheSTARTTLSHandshake, failedPOP3SHandshake, quitOverPOP3S, httpLine,
]


def gauges(server):
    """
    The connection gauges and the maildrop-lock gauge, by series.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{server.portOf('METRICS')}/metrics", timeout=DEADLINE) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(("mailgate_connections{", "mailgate_maildrop_locks ")):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def held(server):
    """
    The server's open descriptors and threads.
    """
    pid = server.process.pid
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def settled(server):
    """
    Wait until no connection is served and no maildrop is locked.
    """
    waitFor(lambda: set(gauges(server).values()) == {0.0}, "every session's end")


@sqliteOnly
def test_everyWayASessionEndsGivesBackWhatItTook(mailgate_server, mailgate_cli, tmp_path):
    """
    After C{SESSIONS} sessions of each ending, the process holds the
    descriptors and threads it held after the warm-up (within L{SLACK}, a
    tenth of one descriptor per session), the gauges are 0, and alice logs
    in at once.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    certificatePath, keyPath = makeCertificate(directory, "localhost", name="server")
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.deliver(ALICE, MESSAGE)
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath), "--pop3s", LOOPBACK_TCP,
        "--smtp", LOOPBACK_TCP, "--lmtp", LOOPBACK_TCP, "--metrics", LOOPBACK_TCP,
        "--domain", "example.org", "--auth-failure-delay", "0",
    )
    client = Client(server, certificatePath)
    for ending in ENDINGS:
        ending(client)
    settled(server)
    baseline = held(server)

    for ending in ENDINGS:
        for _ in range(SESSIONS):
            ending(client)
    settled(server)

    descriptors, threads = held(server)
    assert descriptors <= baseline[0] + SLACK, (baseline, (descriptors, threads))
    assert threads <= baseline[1] + SLACK, (baseline, (descriptors, threads))
    sock = client.connect("POP3")
    readLine(sock)
    sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n".encode())
    readLine(sock)
    assert readLine(sock).startswith(b"+OK"), "alice's maildrop is still locked once every session ended"
    sock.sendall(b"QUIT\r\n")
    readLine(sock)
    sock.close()
