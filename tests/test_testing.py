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
