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

A user, a message delivered to them, and a POP3 session reading it:

    from mailgate.testing import POP3Session, addUser, deliver, memoryStore

    store = memoryStore()
    addUser(store, "alice@example.org", "secret")
    deliver(store, ["alice@example.org"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    session = POP3Session(store)
    session.command("USER alice@example.org")
    session.command("PASS secret")
    assert session.command("STAT").startswith("+OK 1 ")

To see how a protocol copes when storage fails, wrap the store in a
L{FaultInjectingStore} and name the operations that should fail:

    from mailgate.testing import FaultInjectingStore

    store = FaultInjectingStore(memoryStore())
    addUser(store, "alice@example.org", "secret")
    deliver(store, ["alice@example.org"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    store.fail("expunge")
    session = POP3Session(store)
    session.login("alice@example.org", "secret")
    session.command("DELE 1")
    assert session.command("QUIT").startswith("-ERR [SYS/TEMP]")
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.test import iosim
from zope.interface import alsoProvides, directlyProvides, implementer

from mailgate.auth.passwords import makeCredentials
from mailgate.errors import TemporaryFailure
from mailgate.interfaces import KEEP, ILifecycleStore, IMaildrop, IMailStore, IMessageBody
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


def readWhole(body, limit=10000):
    """
    Every octet of an opened message (an L{IMessageBody} whose reads have
    already fired), read piece by piece until the empty one; at most
    C{limit} pieces, so a body that never ends fails the test instead of
    hanging it.
    """
    pieces = []
    for _ in range(limit):
        piece = resultOf(body.read())
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)
    raise AssertionError(f"{body!r} did not end within {limit} reads")


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
    spool = spoolBytes(message)
    try:
        return resultOf(store.deliver(addresses, spool))
    finally:
        # Now, not when the garbage collector frees it: the memory a spool
        # holds counts in the process's budget until then, and a test of
        # that budget would see it given back in its middle.
        spool.close()


class _Faults:
    """
    The failures a L{FaultInjectingStore} injects, and the calls it saw.
    """

    operations = (
        frozenset(IMailStore.names()) | frozenset(ILifecycleStore.names()) | frozenset(IMaildrop.names())
        | frozenset(IMessageBody.names())
    )

    def __init__(self):
        self.calls = []
        self._failing = {}

    def fail(self, operation, error=None, when=None):
        if operation not in self.operations:
            raise ValueError(f"no storage operation is called {operation!r}")
        if error is None:
            error = TemporaryFailure(f"injected failure of {operation}")
        self._failing[operation] = (error, when)

    def heal(self, operation=None):
        if operation is None:
            self._failing.clear()
        else:
            self._failing.pop(operation, None)

    def call(self, operation, method, *args):
        self.calls.append((operation, args))
        failing = self._failing.get(operation)
        if failing is not None:
            error, when = failing
            if when is None or when(*args):
                return defer.fail(error() if isinstance(error, type) else error)
        return method(*args)


@implementer(IMailStore)
class FaultInjectingStore:
    """
    An L{IMailStore} that passes every call on to a real store and fails the
    ones a test names, the way a failing database would fail them: with a
    L{Deferred} that fails (by default with L{TemporaryFailure}), having
    changed nothing.  It also records every call, so a test can say what a
    protocol asked of its store without looking at SQL.

    The maildrops it opens and the message bodies they open are wrapped
    alike: their operations (C{openMessage}, C{uniqueIds}, C{expunge},
    C{release}, and the body's C{read}) can be made to fail too.

    A store that is also an L{ILifecycleStore} (L{memoryStore}'s, every
    SQL store) makes a wrapper that is one too, its quotas, retention and
    sessions the store's, its operations (C{quotaOf}, C{setQuota}, ...)
    passed on and failed alike: the protocols ask a store without one no
    quota, and a message over a mailbox's whole quota, refused for good
    (552) by the store, was answered "mailbox full, try again" (452)
    through the wrapper.

    @ivar store: the real store underneath.
    @ivar calls: every call, in order, as C{(operation, args)}, keyword
        arguments given as positional ones.
    """

    def __init__(self, store=None):
        self.store = memoryStore() if store is None else store
        self._faults = _Faults()
        if ILifecycleStore.providedBy(self.store):
            alsoProvides(self, ILifecycleStore)

    @property
    def calls(self):
        return self._faults.calls

    def fail(self, operation, error=None, when=None):
        """
        From now on, fail calls of C{operation}.

        @param operation: a method name of L{IMailStore}, L{IMaildrop} or
            L{IMessageBody} (e.g. C{"deliver"}, C{"expunge"}, C{"read"}).
        @param error: the exception (an instance, or a class to make one
            per call); a L{TemporaryFailure} if not given.
        @param when: fail only calls for which C{when(*args)} is true.
        @raise ValueError: for a name that is no storage operation.
        """
        self._faults.fail(operation, error, when)

    def heal(self, operation=None):
        """
        Stop failing C{operation}, or every operation.
        """
        self._faults.heal(operation)

    def _call(self, name, *args):
        return self._faults.call(name, getattr(self.store, name), *args)

    def findUser(self, address):
        return self._call("findUser", address)

    def findUsers(self, addresses):
        return self._call("findUsers", addresses)

    def findAlias(self, address):
        return self._call("findAlias", address)

    def findAliases(self, addresses):
        return self._call("findAliases", addresses)

    def findMasterUser(self, name):
        return self._call("findMasterUser", name)

    def hasDomain(self, domain):
        return self._call("hasDomain", domain)

    def hasAPOPUsers(self):
        return self._call("hasAPOPUsers")

    def digestLoginUsers(self):
        return self._call("digestLoginUsers")

    def sharedSecret(self, name):
        return self._call("sharedSecret", name)

    def scramParameters(self):
        return self._call("scramParameters")

    def addUser(self, address, credentials):
        return self._call("addUser", address, credentials)

    def addUsers(self, users):
        return self._call("addUsers", users)

    def setCredentials(self, address, credentials):
        return self._call("setCredentials", address, credentials)

    def upgradeCredentials(self, address, oldHash, credentials, hashOnly=False):
        return self._call("upgradeCredentials", address, oldHash, credentials, hashOnly)

    def deleteUser(self, address, progress=None):
        return self._faults.call(
            "deleteUser", lambda address, progress: self.store.deleteUser(address, progress=progress), address, progress
        )

    def userSummary(self, address):
        return self._call("userSummary", address)

    def listUsers(self, page=None):
        return self._call("listUsers", page)

    def listMessages(self, address, page=None):
        return self._call("listMessages", address, page)

    def deliver(self, addresses, source, partial=True):
        return self._call("deliver", addresses, source, partial)

    def openMaildrop(self, identity, peer=None):
        d = self._call("openMaildrop", identity) if peer is None else self._call("openMaildrop", identity, peer)
        return d.addCallback(_FaultInjectingMaildrop, self._faults)

    def recordLogin(self, identity, minimumInterval):
        return self._call("recordLogin", identity, minimumInterval)

    def close(self):
        return self._call("close")

    # -- ILifecycleStore, when the store is one ---------------------------------

    @property
    def limits(self):
        return self.store.limits

    @limits.setter
    def limits(self, limits):
        self.store.limits = limits

    @property
    def retention(self):
        return self.store.retention

    @property
    def sessions(self):
        return self.store.sessions

    def setQuota(self, address, octets=KEEP, messages=KEEP):
        # Not given, left as it is, as the store's own setQuota leaves it.
        return self._call("setQuota", address, octets, messages)

    def setExpire(self, address, days):
        return self._call("setExpire", address, days)

    def quotaOf(self, address):
        return self._call("quotaOf", address)

    def expireMessages(self, users=100, messagesPerTransaction=500):
        return self._call("expireMessages", users, messagesPerTransaction)

    def purgeDeleted(self, limit=500):
        return self._call("purgeDeleted", limit)

    def forgetDeliveries(self, limit=500):
        return self._call("forgetDeliveries", limit)

    def listDeleted(self, address, page=None):
        return self._call("listDeleted", address, page)

    def exportMessages(self, address, page=None):
        return self._call("exportMessages", address, page)

    def restoreDeleted(self, address, uidls=None, since=None, asNew=False, progress=None):
        def restore(address, uidls, since, asNew, progress):
            return self.store.restoreDeleted(address, uidls, since, asNew, progress=progress)

        return self._faults.call("restoreDeleted", restore, address, uidls, since, asNew, progress)

    def listSessions(self, address=None, kicked=False):
        return self._call("listSessions", address, kicked)

    def listNodes(self):
        return self._call("listNodes")

    def disableUser(self, address, reason=None):
        return self._call("disableUser", address, reason)

    def enableUser(self, address):
        return self._call("enableUser", address)

    def setAllowedNetworks(self, address, networks):
        return self._call("setAllowedNetworks", address, networks)

    def kickSessions(self, address):
        return self._call("kickSessions", address)

    def importMessages(self, address, items, source=None):
        return self._call("importMessages", address, items, source)

    def claimImported(self, address, source, uidls):
        return self._call("claimImported", address, source, uidls)

    def forgetImported(self, address, uidls=None):
        return self._call("forgetImported", address, uidls)

    def existingUidls(self, address, uidls):
        return self._call("existingUidls", address, uidls)

    def removeImportedGone(self, address, source, listed, soleSource=False):
        return self._call("removeImportedGone", address, source, listed, soleSource)

    def addAlias(self, alias, address):
        return self._call("addAlias", alias, address)

    def addAliases(self, pairs):
        return self._call("addAliases", pairs)

    def removeAlias(self, alias):
        return self._call("removeAlias", alias)

    def listAliases(self, address=None):
        return self._call("listAliases", address)

    def addMasterUser(self, name, passwordHash, networks=None):
        return self._call("addMasterUser", name, passwordHash, networks)

    def setMasterUserNetworks(self, name, networks):
        return self._call("setMasterUserNetworks", name, networks)

    def setMasterUserPassword(self, name, passwordHash):
        return self._call("setMasterUserPassword", name, passwordHash)

    def removeMasterUser(self, name):
        return self._call("removeMasterUser", name)

    def listMasterUsers(self):
        return self._call("listMasterUsers")

    def renameUser(self, old, new):
        return self._call("renameUser", old, new)

    def expungeMessages(self, address, olderThanDays=None, progress=None):
        def expunge(address, olderThanDays, progress):
            return self.store.expungeMessages(address, olderThanDays, progress=progress)

        return self._faults.call("expungeMessages", expunge, address, olderThanDays, progress)

    def recountUsage(self, address):
        return self._call("recountUsage", address)


@implementer(IMaildrop)
class _FaultInjectingMaildrop:
    def __init__(self, maildrop, faults):
        self._maildrop = maildrop
        self._faults = faults
        self.address = maildrop.address
        self.sizes = maildrop.sizes

    def _call(self, name, *args):
        return self._faults.call(name, getattr(self._maildrop, name), *args)

    def uniqueIds(self, first, count):
        return self._call("uniqueIds", first, count)

    def openMessage(self, index, headerOnly=False):
        d = self._call("openMessage", index, headerOnly)
        return d.addCallback(_FaultInjectingBody, self._faults)

    @property
    def expireDays(self):
        return self._maildrop.expireDays

    def sessionStarted(self, peer, end, lockLost=None, master=None):
        # Synchronous, and no storage work of its own: passed straight on.
        self._faults.calls.append(("sessionStarted", (peer, end)))
        self._maildrop.sessionStarted(peer, end, lockLost, master)

    def expunge(self, indexes, peer=None):
        return self._call("expunge", indexes, peer)

    def release(self):
        return self._call("release")


@implementer(IMessageBody)
class _FaultInjectingBody:
    def __init__(self, body, faults):
        self._body = body
        self._faults = faults
        self.size = body.size
        self.headerSize = body.headerSize
        self.needsStuffing = body.needsStuffing
        self.dotOffsets = body.dotOffsets
        # A body that came whole is never read: it can fail only if read.
        self.whole = None if "read" in faults._failing else body.whole

    def read(self):
        return self._faults.call("read", self._body.read)


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
    runs inline and whose timers run on C{clock}; with SASL (SCRAM-SHA-256,
    PLAIN and LOGIN, and CRAM-MD5 as L{POP3Factory.offersCramMD5} says)
    unless C{sasl=False}.

    APOP is offered (as C{--apop}) unless C{apop=False}.  Twisted's
    C{AdvancedPOP3Client} logs in with APOP whenever the greeting offers
    it, which works only for a user added with C{apop=True}; for USER/PASS
    give C{apop=False} here and set the client's C{allowInsecureLogin}.
    """
    defaultRealm = options.get("defaultRealm")
    # OAUTHBEARER and XOAUTH2 with this TokenValidator, if given.
    tokens = options.pop("tokens", None)
    # Master users' logins (as --master-users), by PLAIN's authorisation
    # identity and, with masterUserSeparator, by name.
    masterUsers = options.pop("masterUsers", False)
    portal = makePortal(
        store, runInline, apop=apop, loginDelay=options.get("loginDelay"), defaultRealm=defaultRealm, tokens=tokens,
        masterUsers=masterUsers,
    )
    options.setdefault("authFailureDelay", 0)
    factory = POP3Factory(
        portal,
        hostname=hostname,
        reactor=clock or Clock(),
        apop=apop,
        **options,
    )
    if sasl:
        factory.sasl = SASLServer(
            store.findUser,
            hostname,
            offerCramMD5=factory.offersCramMD5,
            sharedSecret=store.sharedSecret,
            defaultRealm=defaultRealm,
            bearerTokens=tokens is not None,
            # Test stores that stand in for a few operations have none.
            scramParameters=getattr(store, "scramParameters", None),
            clock=factory.reactor.seconds,
            masterUsers=masterUsers,
            masterUserSeparator=options.get("masterUserSeparator"),
        )
    return factory


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
