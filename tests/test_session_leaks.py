"""
End-to-end guard: a long-running server gives back what its sessions took,
however they end.  A real C{twistd mailgate} (SQLite file) with POP3, POP3S,
SMTP, LMTP and metrics listeners on 127.0.0.1 serves a few sessions of each
way a session can end (QUIT, the client's close or reset before the greeting
is read, mid-SASL, mid-RETR, mid-DATA, mid-BDAT, in a TLS handshake, an HTTP
line), and over LMTP on a Unix socket (as Postfix delivers) and POP3 on
C{::1} (a reset mid-RETR, a connection refused as one /64's one too many);
then its open descriptors and threads are back to the baseline taken
after a warm-up (give or take the metrics request's own connection), the
connection and maildrop-lock gauges are back to 0, and the user whose
sessions were cut off logs in at once.

Each ending's session count is small (the loop counts what would leak, it
is not a load test); every wait is bounded by L{e2e.DEADLINE}.
"""

import itertools
import os
import re
import socket
import ssl
import struct
import time
import urllib.request

from certs import makeCertificate
from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)
from test_e2e_ipv6 import ON_IPV6_LOOPBACK, _hasIPv6Loopback

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

    def connectUnix(self):
        """
        A connection to the LMTP listener on a Unix socket.
        """
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(DEADLINE)
        sock.connect(next(p for p in self.server.ports["LMTP"] if isinstance(p, str)))
        return sock

    def connect6(self):
        """
        A connection from C{::1} to the POP3 listener on C{::1}.
        """
        port = re.search(r"\bPOP3 listening on \[::1\]:(\d+) \(", self.server.stdout).group(1)
        sock = socket.socket(socket.AF_INET6)
        sock.settimeout(DEADLINE)
        sock.connect(("::1", int(port)))
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


def popLogin(client, served=None):
    """
    A POP3 session logged in as alice (on a connection C{served()} returns,
    its greeting read).  Her maildrop lock is released as the server sees
    the previous session's end, a moment after the client closed it:
    C{[IN-USE]} is tried again, a bounded number of times.
    """
    if served:
        sock = served()
    else:
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


def resetMidUnixLMTPDATA(client):
    """
    Postfix's LMTP client gone in a big message's DATA, its replies unread
    (a Unix socket's close with unread data is its peer's ECONNRESET).
    """
    sock = client.connectUnix()
    readLine(sock)
    sock.sendall(f"LHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode())
    sock.sendall(b"Subject: cut\r\n\r\n" + MESSAGE * 3)
    sock.close()


def servedOverIPv6(client):
    """
    A connection from C{::1}, served (C{--max-connections-per-ip 1}): the
    previous one from there ends as the server sees it, so a refused one is
    tried again, a bounded number of times.  Its greeting is read.
    """
    for _ in range(int(DEADLINE / 0.02)):
        sock = client.connect6()
        if readLine(sock).startswith(b"+OK"):
            return sock
        untilClosed(sock)
        time.sleep(0.02)
    raise AssertionError("::1's connection count stayed at the limit")


def resetMidRETROverIPv6(client):
    sock = popLogin(client, lambda: servedOverIPv6(client))
    sock.sendall(b"RETR 1\r\n")
    sock.recv(4096)
    reset(sock)


def refusedOverIPv6(client):
    """
    A connection from C{::1} refused as its /64's one too many
    (C{--max-connections-per-ip 1}), beside one held from there.
    """
    first = servedOverIPv6(client)
    second = client.connect6()
    assert readLine(second).startswith(b"-ERR [SYS/TEMP]"), "a second connection from ::1 was served"
    untilClosed(second)
    first.sendall(b"QUIT\r\n")
    readLine(first)
    untilClosed(first)


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
    goneInTheSTARTTLSHandshake, failedPOP3SHandshake, quitOverPOP3S, httpLine, resetMidUnixLMTPDATA,
]
IPV6_ENDINGS = [resetMidRETROverIPv6, refusedOverIPv6] if _hasIPv6Loopback() else []


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
        "--smtp", LOOPBACK_TCP, "--lmtp", LOOPBACK_TCP, "--lmtp", f"unix:{tmp_path / 'lmtp'}", "--metrics",
        LOOPBACK_TCP, *(["--pop3", ON_IPV6_LOOPBACK] if IPV6_ENDINGS else []),
        "--domain", "example.org", "--auth-failure-delay", "0",
        # Limited per address, as no client from 127.0.0.x is twice at once.
        "--exempt-network", "none", "--max-connections-per-ip", "1",
    )
    client = Client(server, certificatePath)
    for ending in ENDINGS + IPV6_ENDINGS:
        ending(client)
    settled(server)
    baseline = held(server)

    for ending in ENDINGS + IPV6_ENDINGS:
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
