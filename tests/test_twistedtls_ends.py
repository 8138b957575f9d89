"""
Sessions served under Twisted's own TLS (an C{ssl:} listener, or an
embedding host's C{TLSMemoryBIOFactory}; README Embedding) end as those
under mailgate's TLS layer do: a handshake that fails is C{reason='TLS
failed'} C{tls=no}, with its C{session.tls_failed} line and its count in
C{mailgate_tls_failures_total}; a client gone mid-handshake is
C{reason='connection lost in TLS handshake'} C{tls=no}; neither names a
version or a cipher.  Before, Twisted's failures (pyOpenSSL's errors, not
Python's C{ssl.SSLError}) were taken for a connection lost over TLS:
C{reason='connection lost'} C{tls=yes}, uncounted.

In memory over C{twisted.test.iosim} first, then a real C{twistd
mailgate} with C{ssl:} listeners and real clients.
"""

import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from twisted.internet import ssl as twistedSSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from certs import makeCertificate
from e2e import DEADLINE, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)
from test_e2e_sessionends import records, untilClosed
from mailgate.logs import eventAsRecord
from mailgate.testing import addUser, pop3Factory, smtpFactory

PEER = IPv4Address("TCP", "198.51.100.7", 40000)
ENDS = ("pop3.disconnect", "pop3.logout", "smtp.disconnect")


@pytest.fixture
def certificate(tmp_path):
    certificatePath, keyPath = makeCertificate(tmp_path, "localhost")
    return Path(certificatePath).read_text(), Path(keyPath).read_text()


class Garbage(Protocol):
    """
    A client that speaks no TLS: an HTTP request where a ClientHello goes.
    """

    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.1\r\nHost: mail.example.org\r\n\r\n")


class Lines(LineReceiver):
    def connectionMade(self):
        self.factory.lines = []

    def lineReceived(self, line):
        self.factory.lines.append(line)


def serve(factory, clock, certificate, client):
    """
    Serve C{factory} under Twisted's TLS to C{client} (a protocol, maybe
    under Twisted's TLS too), in memory; return the pump and its flush.
    """
    certificateText, keyText = certificate
    options = twistedSSL.PrivateCertificate.loadPEM(certificateText + keyText).options()
    server = TLSMemoryBIOFactory(options, False, factory, clock=clock).buildProtocol(PEER)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, isServer=True, peerAddress=PEER),
        client, iosim.FakeTransport(client, isServer=False),
    )

    def flush():
        for _ in range(10):
            pump.flush()
            clock.advance(0)

    return pump, flush


def tlsClient(certificate, trusted=True, protocol=Lines):
    certificateText, _ = certificate
    if trusted:
        root = twistedSSL.Certificate.loadPEM(certificateText)
    else:
        # Another certificate: the client refuses the server's (an alert).
        root = None
    options = twistedSSL.optionsForClientTLS("localhost", trustRoot=root)
    return TLSMemoryBIOFactory(options, True, Factory.forProtocol(protocol), clock=Clock()).buildProtocol(None)


def ends(events):
    return [(e["event"], formatEvent(e), eventAsRecord(e)) for e in events if e.get("event") in ENDS]


def counted(factory, name, **labels):
    return factory.metrics.registry.get_sample_value(name, labels) or 0


def makeFactory(protocol, store):
    clock = Clock()
    if protocol == "pop3":
        addUser(store, "alice@example.org", "secret")
        return pop3Factory(store, clock, apop=False), clock
    return smtpFactory(store, clock, domains=["example.org"]), clock


@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
def test_aClientSpeakingNoTLSFailsItsHandshake(store, logEvents, certificate, protocol):
    factory, clock = makeFactory(protocol, store)
    pump, flush = serve(factory, clock, certificate, Garbage())
    flush()
    [(event, text, record)] = ends(logEvents)
    assert event == f"{protocol}.disconnect"
    assert (record["reason"], record["tls"]) == ("TLS failed", False), text
    assert "tls=no" in text and "tls_version" not in text and "tlsVersion" not in record
    [failed] = [e for e in logEvents if e.get("event") == "session.tls_failed"]
    assert formatEvent(failed).startswith(f"{protocol} TLS failed peer=198.51.100.7:40000 reason=")
    assert counted(factory, "mailgate_tls_failures_total", protocol=protocol) == 1
    assert counted(factory, "mailgate_tls_sessions_total", protocol=protocol, version="TLSv1.3") == 0


def test_aClientRefusingTheCertificateFailsItsHandshake(store, logEvents, certificate):
    """
    A client that finds the certificate untrusted and says so (an alert)
    after the server chose the version and the cipher: no TLS session.
    """
    factory, clock = makeFactory("pop3", store)
    pump, flush = serve(factory, clock, certificate, tlsClient(certificate, trusted=False))
    flush()
    [(event, text, record)] = ends(logEvents)
    assert (event, record["reason"], record["tls"]) == ("pop3.disconnect", "TLS failed", False), text
    assert "tlsVersion" not in record and "tlsCipher" not in record
    assert counted(factory, "mailgate_tls_failures_total", protocol="pop3") == 1


def test_aClientGoneMidHandshake(store, logEvents, certificate):
    factory, clock = makeFactory("pop3", store)

    class Gone(Protocol):
        def connectionMade(self):
            self.transport.loseConnection()

    pump, flush = serve(factory, clock, certificate, Gone())
    flush()
    [(event, text, record)] = ends(logEvents)
    assert (record["reason"], record["tls"]) == ("connection lost in TLS handshake", False), text
    assert counted(factory, "mailgate_tls_failures_total", protocol="pop3") == 0


def test_aCompletedHandshakeIsTLS(store, logEvents, certificate):
    """
    What did work stays so: a session over it is TLS, with its version
    and cipher, counted.
    """
    factory, clock = makeFactory("pop3", store)
    client = tlsClient(certificate)
    pump, flush = serve(factory, clock, certificate, client)
    flush()
    client.wrappedProtocol.sendLine(b"QUIT")
    flush()
    assert client.wrappedProtocol.factory.lines[-1].startswith(b"+OK")
    pump.client.loseConnection()
    flush()
    [(event, text, record)] = ends(logEvents)
    assert (record["reason"], record["tls"], record["tlsVersion"]) == ("quit", True, "TLSv1.3"), text
    assert counted(factory, "mailgate_tls_sessions_total", protocol="pop3", version="TLSv1.3") == 1
    assert counted(factory, "mailgate_tls_failures_total", protocol="pop3") == 0


# -- a real twistd mailgate ------------------------------------------------


@sqliteOnly
def test_sslListenersLogAndCountFailedHandshakes(mailgate_server, tmp_path):
    """
    C{twistd mailgate --pop3 ssl:...} and C{--smtp ssl:...} (Twisted's TLS):
    an HTTP request sent where the handshake goes, and a client gone
    before it, are no TLS sessions; a POP3S client that says QUIT is one.
    (Before: all three C{tls=yes}, the first C{reason='connection lost'},
    C{mailgate_tls_failures_total} 0.)
    """
    certificatePath, keyPath = makeCertificate(tmp_path, "localhost", name="server")
    listener = f"ssl:0:interface=127.0.0.1:certKey={certificatePath}:privateKey={keyPath}"
    # (Its POP3 listener alone: not the fixture's cleartext one besides.)
    server = mailgate_server.spawn(
        "--log-format", "json", "--pop3", listener, "--smtp", listener, "--domain", "example.org",
        "--metrics", "tcp:0:interface=127.0.0.1", listen=False,
    )
    server.waitUntilListening()
    for name in ("POP3", "SMTP"):
        with socket.create_connection(("127.0.0.1", server.portOf(name)), timeout=DEADLINE) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: mail.example.org\r\n\r\n")
            untilClosed(sock)
    with socket.create_connection(("127.0.0.1", server.portOf("POP3")), timeout=DEADLINE):
        pass
    context = ssl.create_default_context(cafile=str(certificatePath))
    with socket.create_connection(("127.0.0.1", server.portOf("POP3")), timeout=DEADLINE) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.recv(1024)
            sock.sendall(b"QUIT\r\n")
            untilClosed(sock)
    waitFor(lambda: len(records(server, "pop3.disconnect")) == 3 and records(server, "smtp.disconnect"),
            "the end lines")
    pop3 = [(r["reason"], r["tls"], r.get("tlsVersion")) for r in records(server, "pop3.disconnect")]
    assert sorted(pop3) == [
        ("TLS failed", False, None), ("connection lost in TLS handshake", False, None), ("quit", True, "TLSv1.3"),
    ], server.log()
    [smtp] = records(server, "smtp.disconnect")
    assert (smtp["reason"], smtp["tls"], smtp.get("tlsVersion")) == ("TLS failed", False, None)
    assert {r["protocol"] for r in records(server, "session.tls_failed")} == {"pop3", "smtp"}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.portOf('METRICS')}/metrics", timeout=DEADLINE) as page:
        exposition = page.read().decode()
    assert 'mailgate_tls_failures_total{protocol="pop3"} 1.0' in exposition
    assert 'mailgate_tls_failures_total{protocol="smtp"} 1.0' in exposition
    assert 'mailgate_tls_sessions_total{protocol="pop3",version="TLSv1.3"} 1.0' in exposition
