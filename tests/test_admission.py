"""
Connection admission: every POP3, SMTP and LMTP connection is put to the
factory's connection policy (mailgate.interfaces.IConnectionPolicy) once
the client's address is known, before the greeting.  A refused client gets
one reply and is closed, at no cost in database work or password hashing;
an admitted one is reported closed exactly once.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import Logger

from mailgate.session import OpenPolicy
from mailgate.testing import POP3Session, SMTPSession, addUser, pop3Factory, smtpFactory

ALICE = "alice@example.org"
PASSWORD = "wonderland"
CLIENT = IPv4Address("TCP", "198.51.100.7", 4711)


class RecordingPolicy(OpenPolicy):
    """
    Admits, or refuses with C{refuse}; records every call.
    """

    def __init__(self, refuse=None):
        self.refuse = refuse
        self.calls = []
        # The password given with each authenticationFailed.
        self.passwords = []

    def admit(self, protocol, address):
        self.calls.append(("admit", protocol, address))
        return self.refuse

    def connectionClosed(self, protocol, address):
        self.calls.append(("connectionClosed", protocol, address))

    def isBanned(self, address):
        self.calls.append(("isBanned", address))
        return False

    def authenticationDelay(self, address, login):
        self.calls.append(("authenticationDelay", address, login))
        return 0

    def authenticationFailed(self, address, login, password=None):
        self.calls.append(("authenticationFailed", address, login))
        self.passwords.append(password)

    def authenticationSucceeded(self, address, login):
        self.calls.append(("authenticationSucceeded", address, login))


class UntouchablePortal:
    """
    A portal that fails the test if anything logs in through it.
    """

    def login(self, *args):
        raise AssertionError("a refused connection reached the portal")


class UntouchableStore:
    def __getattr__(self, name):
        raise AssertionError(f"a refused connection used the store ({name})")


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return ALICE


def test_pop3RefusedConnectionGetsOneReplyAndNoWork(store, alice):
    policy = RecordingPolicy(refuse="too many connections")
    clock = Clock()
    factory = pop3Factory(store, clock, policy=policy)
    factory.portal = UntouchablePortal()
    events = []
    s = POP3Session(store, clock=clock, factory=factory, peer=CLIENT)
    assert s.greeting == "-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n"
    assert s.disconnected
    assert s.challenge is None
    # Whatever the client sends next is not run.
    s.protocol.log = Logger(observer=events.append)
    assert s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nAUTH PLAIN AGFsaWNlAHg=\r\n".encode()) == b""
    s.protocol.connectionLost(None)
    assert policy.calls == [("admit", "pop3", CLIENT)]
    assert events == []


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_smtpRefusedConnectionGets421(lmtp):
    policy = RecordingPolicy(refuse="banned")
    clock = Clock()
    factory = smtpFactory(UntouchableStore(), clock, lmtp=lmtp, policy=policy)
    s = SMTPSession(None, factory=factory, clock=clock, peer=CLIENT)
    assert s.greeting == "421 4.7.0 banned\r\n"
    assert s.disconnected
    assert s.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\n") == b""
    s.protocol.connectionLost(None)
    assert policy.calls == [("admit", "lmtp" if lmtp else "smtp", CLIENT)]


def test_refusalIsLoggedWithTheClientsAddress(store, alice):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        POP3Session(store, factory=pop3Factory(store, policy=RecordingPolicy(refuse="banned")), peer=CLIENT)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("event") == "session.refused"]
    assert event["peer"] == "198.51.100.7:4711"
    assert event["protocol"] == "pop3"
    assert event["reason"] == "banned"
    assert event["session"]


def test_aRefusedIPv6NetworkIsALineAMinuteWhateverAddressesItTakes(store, alice):
    """
    A banned IPv6 client is its /64, and so is its refusals' line a
    minute: one taking a new address of its /64 for every connection
    (2**64 to choose from) does not get each refusal logged.  An IPv4
    client reaching a dual-stack listener is its IPv4 address.
    """
    from twisted.internet.address import IPv6Address
    from twisted.logger import globalLogPublisher

    clock = Clock()
    factory = pop3Factory(store, clock, policy=RecordingPolicy(refuse="banned"))
    peers = [IPv6Address("TCP", f"2001:db8:1:2::{n:x}", 4711) for n in range(1, 21)]
    peers += [CLIENT, IPv6Address("TCP", "::ffff:198.51.100.7", 4712)]
    peers.append(IPv6Address("TCP", "2001:db8:1:3::1", 4711))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for peer in peers:
            POP3Session(store, clock=clock, factory=factory, peer=peer)
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e["peer"] for e in events if e.get("event") == "session.refused"]
    assert logged == ["[2001:db8:1:2::1]:4711", "198.51.100.7:4711", "[2001:db8:1:3::1]:4711"]
    # A minute later, one line says how many went unlogged.
    clock.advance(60)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        POP3Session(store, clock=clock, factory=factory, peer=IPv6Address("TCP", "2001:db8:1:2::99", 1))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("event") == "session.refused"]
    assert event["unlogged"] == 19


def test_anAdmittedConnectionIsReportedClosedExactlyOnce(store, alice):
    policy = RecordingPolicy()
    s = POP3Session(store, factory=pop3Factory(store, policy=policy), peer=CLIENT)
    assert s.greeting.startswith("+OK mailgate POP3 server ready")
    assert s.command("QUIT").startswith("+OK")
    s.protocol.connectionLost(None)
    s.protocol.connectionLost(None)
    assert policy.calls == [("admit", "pop3", CLIENT), ("connectionClosed", "pop3", CLIENT)]


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_smtpAdmittedConnectionIsReportedClosedOnce(store, lmtp):
    policy = RecordingPolicy()
    s = SMTPSession(store, lmtp=lmtp, factory=smtpFactory(store, lmtp=lmtp, policy=policy), peer=CLIENT)
    assert s.greeting.startswith("220 ")
    s.protocol.connectionLost(None)
    s.protocol.connectionLost(None)
    name = "lmtp" if lmtp else "smtp"
    assert policy.calls == [("admit", name, CLIENT), ("connectionClosed", name, CLIENT)]


def test_everySessionHasItsOwnId(store, alice):
    ids = {POP3Session(store).protocol.sessionId for _ in range(50)}
    ids |= {SMTPSession(store).protocol.sessionId for _ in range(50)}
    assert len(ids) == 100
    prefixes = {i.rpartition(".")[0] for i in ids}
    assert len(prefixes) == 1 and len(next(iter(prefixes))) == 12
