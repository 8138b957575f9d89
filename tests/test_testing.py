"""
mailgate.testing: Twisted's own POP3 and SMTP clients against mailgate's
servers, in memory, as an embedder would use it.
"""

from io import BytesIO

from twisted.internet import defer
from twisted.mail.pop3 import AdvancedPOP3Client
from twisted.mail.smtp import ESMTPSenderFactory, SMTPDeliveryError, SMTPSenderFactory

from mailgate.testing import (
    FaultInjectingStore,
    addUser,
    connectClient,
    deliver,
    memoryStore,
    pop3Factory,
    resultOf,
    smtpFactory,
)


def send(store, sender, recipients, message, esmtp=True, **factoryOptions):
    done = defer.Deferred()
    if esmtp:
        factory = ESMTPSenderFactory(
            None, None, sender, recipients, BytesIO(message), done,
            requireAuthentication=False, requireTransportSecurity=False,
        )
    else:
        factory = SMTPSenderFactory(sender, recipients, BytesIO(message), done)
    connection = connectClient(smtpFactory(store, **factoryOptions), factory.buildProtocol(None))
    connection.flush()
    return done


def test_twistedSMTPClientDeliversAndTwistedPOP3ClientFetches():
    store = memoryStore()
    addUser(store, "alice@example.org", "secret", apop=True)
    # Twisted's SMTP client expects LF line ends in the file it sends.
    done = send(store, "bob@example.net", ["alice@example.org"], b"Subject: hi\n\n.dotted\nbody\n")
    count, accepted = resultOf(done)
    assert count == 1 and accepted[0][1] == 250

    client = AdvancedPOP3Client()
    connection = connectClient(pop3Factory(store), client)
    # The greeting carries an APOP timestamp, so Twisted's client logs in
    # with APOP: which never works against Twisted's own server.
    login = client.login(b"alice@example.org", b"secret")
    connection.flush()
    assert resultOf(login).startswith(b"alice@example.org has 1 messages")
    sizes = client.listSize()
    connection.flush()
    lines = client.retrieve(0)
    connection.flush()
    lines = resultOf(lines)
    assert lines[0] == b"Return-Path: <bob@example.net>"
    assert lines[-3:] == [b"", b".dotted", b"body"]
    assert resultOf(sizes) == [sum(len(line) + 2 for line in lines)]
    quit = client.quit()
    connection.flush()
    resultOf(quit)


def test_twistedPOP3ClientWithUserPass():
    store = memoryStore()
    addUser(store, "alice@example.org", "secret")
    client = AdvancedPOP3Client()
    client.allowInsecureLogin = True
    connection = connectClient(pop3Factory(store, apop=False), client)
    login = client.login(b"alice@example.org", b"secret")
    connection.flush()
    assert resultOf(login).startswith(b"alice@example.org has 0 messages")


def test_twistedSMTPClientSeesRelayRefusal():
    store = memoryStore()
    addUser(store, "alice@example.org", "secret")
    done = send(store, "x@example.net", ["someone@elsewhere.example"], b"Subject: x\n\nx\n", esmtp=False)
    failures = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(SMTPDeliveryError)
    assert failures[0].value.code == 550


def test_theInMemoryStoresProvideTheirInterfaces():
    """
    What an embedder's tests are handed keeps the contracts the protocols
    rely on: the synchronous store, and the fault-injecting wrappers of
    it, its maildrops and their message bodies.
    """
    from zope.interface.verify import verifyObject

    from mailgate.interfaces import ILifecycleStore, IMaildrop, IMailStore, IMessageBody

    store = memoryStore()
    assert verifyObject(IMailStore, store) and verifyObject(ILifecycleStore, store)
    faulty = FaultInjectingStore(store)
    assert verifyObject(IMailStore, faulty)
    addUser(faulty, "alice@example.org", "secret")
    deliver(faulty, ["alice@example.org"], b"Subject: x\r\n\r\nbody\r\n")
    maildrop = resultOf(faulty.openMaildrop(resultOf(faulty.findUser("alice@example.org"))))
    assert verifyObject(IMaildrop, maildrop)
    assert verifyObject(IMessageBody, resultOf(maildrop.openMessage(0)))
    resultOf(maildrop.release())


def test_aFaultInjectingStoreKeepsTheStoresQuotasAndLifecycle():
    """
    Wrapping a store changes nothing but the failures asked for: its
    quotas are still checked (a message larger than the mailbox's whole
    quota is 552 5.2.3, as without the wrapper), its ILifecycleStore
    operations pass through it and can be failed too.  Before, the wrapper
    provided IMailStore only, so the protocols took the store for one
    without quotas: the same message was answered 452 4.2.2 "mailbox
    full" (try again, for days) through it.
    """
    from zope.interface.verify import verifyObject

    from mailgate.interfaces import ILifecycleStore
    from mailgate.testing import SMTPSession

    message = b"Subject: big\r\n\r\n" + b"x" * 500 + b"\r\n"
    replies = []
    for wrapped in (False, True):
        store = memoryStore()
        addUser(store, "alice@example.org", "secret")
        resultOf(store.setQuota("alice@example.org", 100, None))
        session = SMTPSession(FaultInjectingStore(store) if wrapped else store, domains=["example.org"])
        replies.append(session.sendMail("sender@example.net", ["alice@example.org"], message).splitlines()[-1])
    assert replies[0].startswith("552 5.2.3 ")
    assert replies[1] == replies[0]

    faulty = FaultInjectingStore(memoryStore())
    assert verifyObject(ILifecycleStore, faulty)
    addUser(faulty, "alice@example.org", "secret")
    resultOf(faulty.setQuota("alice@example.org", 1000, None))
    assert resultOf(faulty.quotaOf("alice@example.org")).quotaOctets == 1000
    assert ("setQuota", ("alice@example.org", 1000, None)) in faulty.calls
    # Called as the store is, an argument not given left as it is.
    resultOf(faulty.setQuota("alice@example.org", messages=5))
    quota = resultOf(faulty.quotaOf("alice@example.org"))
    assert (quota.quotaOctets, quota.quotaMessages) == (1000, 5)
    faulty.fail("quotaOf")
    session = SMTPSession(faulty, domains=["example.org"])
    session.command("EHLO client.test")
    session.command("MAIL FROM:<sender@example.net>")
    assert session.command("RCPT TO:<alice@example.org>").startswith("451 ")
    # Its settings are the store's: makeService sets its limits.
    faulty.limits = faulty.store.limits
    assert faulty.retention is faulty.store.retention


def test_theHostsOwnTLSContextFactoryServesImplicitTLS(tmp_path):
    """
    README (Embedding): a host serving mailgate's POP3 factory under its
    own TLS (a pyOpenSSL context factory, through Twisted's
    TLSMemoryBIOFactory as an ssl: endpoint does) has TLS sessions: a
    client from a network not trusted with passwords in the clear logs in
    with USER/PASS, and is offered no STLS.  In memory, over iosim.
    """
    import sys
    from pathlib import Path

    from twisted.internet import ssl
    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import Factory
    from twisted.internet.task import Clock
    from twisted.protocols.basic import LineReceiver
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test import iosim

    sys.path.insert(0, str(Path(__file__).parent))
    from certs import makeCertificate

    certificatePath, keyPath = makeCertificate(tmp_path, "localhost")
    certificate = Path(certificatePath).read_text()
    serverOptions = ssl.PrivateCertificate.loadPEM(certificate + Path(keyPath).read_text()).options()
    clientOptions = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(certificate))

    store = memoryStore()
    addUser(store, "alice@example.org", "secret")
    peer = IPv4Address("TCP", "198.51.100.7", 40000)
    # Twisted's TLS gathers small writes until the next turn of the clock.
    clock = Clock()
    factory = pop3Factory(store, clock, apop=False)
    server = TLSMemoryBIOFactory(serverOptions, False, factory, clock=clock).buildProtocol(peer)
    lines = []

    class Client(LineReceiver):
        def lineReceived(self, line):
            lines.append(line)

    client = TLSMemoryBIOFactory(clientOptions, True, Factory.forProtocol(Client), clock=clock).buildProtocol(None)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, isServer=True, peerAddress=peer),
        client, iosim.FakeTransport(client, isServer=False),
    )

    def flush():
        for _ in range(5):
            pump.flush()
            clock.advance(0)

    def command(line):
        del lines[:]
        client.wrappedProtocol.sendLine(line)
        flush()
        return lines[:]

    flush()
    assert lines and lines[0].startswith(b"+OK")
    capabilities = command(b"CAPA")
    assert b"USER" in capabilities and b"STLS" not in capabilities
    assert command(b"USER alice@example.org")[0].startswith(b"+OK")
    assert command(b"PASS secret")[0].startswith(b"+OK alice@example.org has 0 messages")
    # The version negotiated is counted, read from the OpenSSL connection
    # under Twisted's TLS (the handshake's end raised AttributeError).
    counted = {
        version: factory.metrics.registry.get_sample_value(
            "mailgate_tls_sessions_total", {"protocol": "pop3", "version": version}
        ) or 0
        for version in ("TLSv1.2", "TLSv1.3", "other")
    }
    assert counted == {"TLSv1.2": 0, "TLSv1.3": 1, "other": 0}
