# -*- test-case-name: tests.test_testing -*-
"""
Test helpers for mailgate and for applications that embed it.

Two levels:
  - L{POP3Session} and L{SMTPSession} feed raw lines to one server protocol
    and return its raw replies: for testing the protocol itself.
  - L{connectClient} runs a real client protocol (Twisted's
    C{AdvancedPOP3Client}, C{ESMTPSenderFactory}, your own) against
    mailgate's server in memory, on C{twisted.test.iosim}: for testing an
    application that talks to mailgate.

Everything here runs without sockets and without threads: the store is a
real SQLite database (in memory, or a file you name) driven synchronously,
and protocols talk over L{StringTransport} with a L{Clock} for timers.  This
is the same machinery mailgate's own protocol tests use.

    from mailgate.testing import memoryStore, addUser, deliver, POP3Session

    store = memoryStore()
    addUser(store, "alice@example.org", "secret")
    deliver(store, ["alice@example.org"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    session = POP3Session(store)
    session.command("USER alice@example.org")
    session.command("PASS secret")
    assert session.command("STAT").startswith("+OK 1 ")
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

from mailgate.auth.passwords import makeCredentials
from mailgate.auth.realm import makePortal
from mailgate.auth.sasl import SASLServer
from mailgate.message import spoolBytes
from mailgate.pop3 import POP3Factory
from mailgate.smtp import LMTPFactory, LocalDelivery, SMTPFactory
from mailgate.store import openSynchronousStore

# Cheap scrypt parameters for tests: the hash format carries its own cost,
# so verification works exactly as for production hashes.
TEST_HASH_COST = 10


def resultOf(d):
    """
    The result of a L{Deferred} that has already fired; raises its failure.
    """
    box = []
    d.addBoth(box.append)
    if not box:
        raise AssertionError(f"{d!r} has not fired")
    value = box[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


def runInline(function, *args):
    """
    Stand-in for a thread pool: run C{function} now, in this thread.
    """
    return defer.maybeDeferred(function, *args)


def memoryStore(url="sqlite:///:memory:"):
    """
    A store whose operations run synchronously: a private in-memory SQLite
    database by default, or the database at C{url}.
    """
    return openSynchronousStore(url)


def addUser(store, address, password, apop=False, cost=TEST_HASH_COST):
    """
    Add a user, hashing the password with cheap parameters.
    """
    return resultOf(store.addUser(address, makeCredentials(password, apop=apop, logN=cost)))


def deliver(store, addresses, message):
    """
    Deliver C{message} (L{bytes}, any line ends) to C{addresses}.

    @return: a dict of address to unique id.
    """
    return resultOf(store.deliver(addresses, spoolBytes(message)))


LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that can start TLS, in name only: after
    C{startTLS} it provides L{ISSLTransport} and records what was written
    before and after, so tests can check what went out in the clear.

    @ivar tlsStarted: the context factory passed to C{startTLS}, or C{None}.
    @ivar clearText: what was written before TLS started.
    """

    tlsStarted = None
    clearText = None

    def startTLS(self, contextFactory, normal=True):
        self.tlsStarted = contextFactory
        self.clearText = self.value()
        directlyProvides(self, ISSLTransport)


class _Session:
    """
    What the in-memory sessions share: feeding octets to a server protocol
    and collecting what it wrote, on a clock the test controls.
    """

    def _take(self):
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data):
        """
        Feed raw octets to the server; return what it wrote in response,
        including anything due at once (timers of zero seconds), as a real
        reactor would run them.
        """
        self.protocol.dataReceived(data)
        self.clock.advance(0)
        return self._take()

    def command(self, line):
        """
        Send one command line (CRLF added); return the reply as L{str}.
        """
        return self.send(line.encode("utf-8") + b"\r\n").decode("utf-8", "replace")

    def advance(self, seconds):
        """
        Let C{seconds} pass on the session's clock; return what was written.
        """
        self.clock.advance(seconds)
        return self._take()

    @property
    def disconnected(self):
        return self.transport.disconnecting or self.protocol._closed


class POP3Session(_Session):
    """
    A mailgate POP3 server session over a L{StringTransport}.

    @ivar clock: the L{Clock} driving the session's timers.
    @ivar transport: the L{StringTransport}.
    @ivar protocol: the L{mailgate.pop3.POP3Server}.
    @ivar greeting: the greeting line, as L{str}.
    """

    def __init__(self, store, clock=None, factory=None, hostname="mailgate.test",
                 peer=LOOPBACK, **options):
        self.clock = Clock() if clock is None else clock
        if factory is None:
            factory = pop3Factory(store, self.clock, hostname=hostname, **options)
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self._take().decode("utf-8")

    @property
    def challenge(self):
        """
        The APOP timestamp of this session's greeting, or C{None}.
        """
        return self.protocol.challenge

    def login(self, address, password):
        """
        USER and PASS; return the PASS reply.
        """
        self.command(f"USER {address}")
        return self.command(f"PASS {password}")


class SMTPSession(_Session):
    """
    A mailgate SMTP (or, with C{lmtp=True}, LMTP) server session over a
    L{StringTransport}, delivering into C{store}.

    @param domains: accepted domains; C{None} accepts the domains of the
        store's users.
    """

    def __init__(self, store, lmtp=False, domains=None, clock=None, factory=None,
                 hostname="mailgate.test", peer=None, **options):
        self.clock = Clock() if clock is None else clock
        if factory is None:
            factoryClass = LMTPFactory if lmtp else SMTPFactory
            factory = factoryClass(
                LocalDelivery(store, domains), hostname=hostname, reactor=self.clock, **options
            )
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.transport = TLSStringTransport(peerAddress=peer or LOOPBACK)
        self.protocol.makeConnection(self.transport)
        self.greeting = self._take().decode("utf-8")

    def sendMail(self, sender, recipients, message, hello="EHLO client.test"):
        """
        Run one whole transaction; return every reply as one L{str}.
        """
        out = [self.command(hello)] if hello else []
        out.append(self.command(f"MAIL FROM:<{sender}>"))
        for recipient in recipients:
            out.append(self.command(f"RCPT TO:<{recipient}>"))
        out.append(self.command("DATA"))
        stuffed = message.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        out.append(self.send(stuffed + b".\r\n").decode("utf-8", "replace"))
        return "".join(out)


def pop3Factory(store, clock=None, hostname="mailgate.test", apop=True, sasl=True, **options):
    """
    A mailgate POP3 server factory over C{store} whose password hashing
    runs inline and whose timers run on C{clock}; with SASL (PLAIN and
    SCRAM-SHA-256) unless C{sasl=False}.
    """
    portal = makePortal(store, runInline, apop=apop, loginDelay=options.get("loginDelay"))
    options.setdefault("authFailureDelay", 0)
    return POP3Factory(
        portal,
        hostname=hostname,
        reactor=clock or Clock(),
        apop=apop,
        sasl=SASLServer(store.findUser) if sasl else None,
        **options,
    )


def smtpFactory(store, clock=None, lmtp=False, domains=None, hostname="mailgate.test", **options):
    """
    A mailgate SMTP (or LMTP) server factory delivering into C{store}.
    """
    factoryClass = LMTPFactory if lmtp else SMTPFactory
    return factoryClass(
        LocalDelivery(store, domains), hostname=hostname, reactor=clock or Clock(), **options
    )


class MemoryConnection:
    """
    A client and a mailgate server connected in memory.

    @ivar server: the server protocol.
    @ivar client: the client protocol.
    @ivar pump: the L{iosim.IOPump} moving bytes between them.
    """

    def __init__(self, server, client, pump):
        self.server = server
        self.client = client
        self.pump = pump

    def flush(self):
        """
        Move bytes both ways until neither side has anything to say.
        """
        self.pump.flush()


def connectClient(serverFactory, client, peer=("127.0.0.1", 40000)):
    """
    Connect a client protocol to a server built by C{serverFactory}, in
    memory, and deliver the server's greeting.

    @param serverFactory: e.g. L{pop3Factory} or L{smtpFactory}.
    @param client: a client protocol instance, e.g.
        C{twisted.mail.pop3.AdvancedPOP3Client()} or the protocol of a
        C{twisted.mail.smtp.ESMTPSenderFactory}.
    @return: a L{MemoryConnection}; call its C{flush} after each client call.
    """
    serverAddress = IPv4Address("TCP", "127.0.0.1", 110)
    clientAddress = IPv4Address("TCP", *peer)
    server = serverFactory.buildProtocol(clientAddress)
    serverTransport = iosim.FakeTransport(server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress)
    clientTransport = iosim.FakeTransport(client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress)
    pump = iosim.connect(server, serverTransport, client, clientTransport, greet=True)
    return MemoryConnection(server, client, pump)
