"""
What the protocols report: the Metrics calls (checked with a recording
Metrics), and the log events every connection emits (a stable C{event}
name, the session id, the protocol, the client's address and the user),
which never carry a password, a SASL response or message content.
"""

import hashlib
import ssl

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from mailgate.errors import TemporaryFailure
from mailgate.metrics import Metrics
from mailgate.testing import POP3Session, SMTPSession, addUser, deliver, pop3Factory, resultOf, smtpFactory

from test_admission import RecordingPolicy
from test_sasl import plain, scramExchange

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "Tr0ub4dor-s3cret"
CLIENT = IPv4Address("TCP", "192.0.2.44", 6110)


class RecordingMetrics(Metrics):
    """
    Records every call, with its arguments.
    """

    def __init__(self):
        self.calls = []

    def _record(name):
        def record(self, *args, **kwargs):
            self.calls.append((name, *args, *sorted(kwargs.items())))

        return record

    for _name in (
        "connectionOpened", "connectionClosed", "connectionRefused", "tlsFailed", "login", "pop3Command", "retrieved",
        "deleted", "delivery", "databaseOperation", "databaseError", "groupCommit",
        "authCache", "maildropLocks", "bans", "recipientRefused", "senderRefused",
    ):
        locals()[_name] = _record(_name)
    del _name, _record

    def named(self, name):
        return [call[1:] for call in self.calls if call[0] == name]


@pytest.fixture
def users(store):
    addUser(store, ALICE, PASSWORD, apop=True)
    addUser(store, BOB, PASSWORD)
    return store


def pop3(store, metrics, policy=None, **options):
    options.setdefault("trustedNetworks", ["192.0.2.0/24"])
    factory = pop3Factory(store, metrics=metrics, policy=policy, **options)
    return POP3Session(store, factory=factory, clock=factory.reactor, peer=CLIENT)


def smtp(store, metrics, lmtp=False, **options):
    factory = smtpFactory(store, lmtp=lmtp, metrics=metrics, **options)
    s = SMTPSession(store, factory=factory, clock=factory.reactor, peer=CLIENT)
    assert s.command("LHLO client.test" if lmtp else "EHLO client.test").startswith("250")
    return s


# -- metrics ---------------------------------------------------------------------------


def test_pop3SessionMetrics(users):
    deliver(users, [ALICE], b"Subject: one\r\n\r\nfirst\r\n")
    deliver(users, [ALICE], b"Subject: two\r\n\r\nsecond\r\n")
    metrics = RecordingMetrics()
    s = pop3(users, metrics)
    assert metrics.calls == [("connectionOpened", "pop3")]
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    for command in ("STAT", "RETR 1", "TOP 2 0", "DELE 2", "XYZZY", "QUIT"):
        s.command(command)
    s.protocol.connectionLost(None)
    assert metrics.named("login") == [("pop3", "user", "ok")]
    assert [c for (c,) in metrics.named("pop3Command")] == [
        "USER", "PASS", "STAT", "RETR", "TOP", "DELE", "OTHER", "QUIT",
    ]
    assert metrics.named("retrieved") == [(len(b"Subject: one\r\n\r\nfirst\r\n"),)]
    assert metrics.named("deleted") == [(1,)]
    assert metrics.calls[-1] == ("connectionClosed", "pop3")
    assert metrics.named("connectionClosed") == [("pop3",)]


def test_everyRefusedCommandLineCountsAsOther(users):
    """
    README: POP3 commands are counted by their RFC name, anything else as
    OTHER.  A line refused before its verb is looked up (control
    characters, not UTF-8, a verb that is not ASCII, too long) is
    answered as a bad command as an unknown verb is, and counts as one:
    a scanner's binary garbage showed in no series.  A SASL response is
    no command, too long or not.
    """
    metrics = RecordingMetrics()
    s = pop3(users, metrics)
    for line in (b"XYZZY", b"\x00\x01", "\u00dcSER x".encode(), b"\xff\xfe", b"A" * 300):
        assert s.send(line + b"\r\n").startswith(b"-ERR"), line
    assert s.send(b"AUTH PLAIN\r\n").startswith(b"+ ")
    assert s.send(b"A" * 5000 + b"\r\n").startswith(b"-ERR [AUTH] SASL response too long")
    assert [c for (c,) in metrics.named("pop3Command")] == ["OTHER"] * 5 + ["AUTH"]


def test_onlyACommittedQuitCountsItsDeletions(users):
    """
    README: mailgate_pop3_deleted_messages_total counts what a QUIT
    removed; marks undone by RSET, or left by a session that ended
    without QUIT, are not counted.
    """
    for n in range(3):
        deliver(users, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % n)
    metrics = RecordingMetrics()
    s = pop3(users, metrics)
    s.login(ALICE, PASSWORD)
    for command in ("DELE 1", "DELE 2", "RSET", "DELE 3"):
        assert s.command(command).startswith("+OK"), command
    s.protocol.connectionLost(None)
    assert metrics.named("deleted") == []
    s = pop3(users, metrics)
    s.login(ALICE, PASSWORD)
    for command in ("DELE 1", "DELE 2", "RSET", "DELE 3", "QUIT"):
        assert s.command(command).startswith("+OK"), command
    assert metrics.named("deleted") == [(1,)]


def test_aStreamedRetrIsCountedOnceSent(users):
    big = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 20000
    deliver(users, [ALICE], big)
    metrics = RecordingMetrics()
    s = pop3(users, metrics)
    s.login(ALICE, PASSWORD)
    assert s.send(b"RETR 1\r\n").endswith(b"\r\n.\r\n")
    assert metrics.named("retrieved") == [(len(big),)]


def test_loginResults(users):
    metrics = RecordingMetrics()
    # failed, by every mechanism
    s = pop3(users, metrics, authFailureDelay=0)
    s.login(ALICE, "wrong")
    s.command(f"AUTH PLAIN {plain(ALICE, 'wrong')}")
    digest = hashlib.md5(s.challenge.encode() + b"wrong").hexdigest()
    s.command(f"APOP {ALICE} {digest}")
    other = pop3(users, metrics, authFailureDelay=0)
    assert scramExchange(other, BOB, "wrong")[2].startswith("-ERR [AUTH]")
    assert metrics.named("login") == [
        ("pop3", "user", "failed"),
        ("pop3", "plain", "failed"),
        ("pop3", "apop", "failed"),
        ("pop3", "scram-sha-256", "failed"),
    ]
    del metrics.calls[:]
    # ok, then in_use for a second session on the same maildrop
    first = pop3(users, metrics)
    digest = hashlib.md5(first.challenge.encode() + PASSWORD.encode()).hexdigest()
    assert first.command(f"APOP {ALICE} {digest}").startswith("+OK")
    second = pop3(users, metrics)
    assert second.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}").startswith("-ERR [IN-USE]")
    # banned
    policy = RecordingPolicy()
    policy.isBanned = lambda address: True
    banned = pop3(users, metrics, policy=policy)
    assert banned.login(BOB, PASSWORD) == "-ERR [SYS/TEMP] banned\r\n"
    assert metrics.named("login") == [
        ("pop3", "apop", "ok"), ("pop3", "plain", "in_use"), ("pop3", "user", "banned"),
    ]


def test_aLoginTheStoreCannotServeIsATempfail(users):
    metrics = RecordingMetrics()
    s = pop3(users, metrics)
    factory = s.factory
    factory.portal.login = lambda *args: defer.fail(TemporaryFailure("database down"))
    assert s.login(ALICE, PASSWORD).startswith("-ERR [SYS/TEMP]")
    assert metrics.named("login") == [("pop3", "user", "tempfail")]


class SlowDelivery:
    """
    A delivery that commits when the test says so.
    """

    def __init__(self, delivery):
        self._delivery = delivery
        self.pending = []

    def checkRecipient(self, mailbox, size=None):
        return self._delivery.checkRecipient(mailbox, size)

    def deliver(self, envelope, source, partial=True):
        d = defer.Deferred()
        self.pending.append((d, self._delivery.deliver(envelope, source, partial)))
        return d

    def commit(self):
        for d, result in self.pending:
            result.chainDeferred(d)
        del self.pending[:]


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_deliveryMetrics(users, lmtp):
    name = "lmtp" if lmtp else "smtp"
    metrics = RecordingMetrics()
    s = smtp(users, metrics, lmtp=lmtp, maxMessageSize=2000)
    slow = SlowDelivery(s.factory.delivery)
    s.factory.delivery = slow
    for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>", "DATA"):
        s.command(line)
    assert s.send(b"Subject: m\r\n\r\nhello\r\n.\r\n") == b""
    s.advance(2.5)
    slow.commit()
    assert b"250 2.0.0" in s.advance(0)
    [(protocol, result, octets, seconds)] = metrics.named("delivery")
    assert (protocol, result) == (name, "accepted")
    stored = users.listMessages(ALICE).result[0].size
    assert octets == ("octets", stored)
    assert seconds == ("seconds", 2.5)
    # Too large: rejected.
    del metrics.calls[:]
    for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>", "DATA"):
        s.command(line)
    s.send(b"x" * 990 + b"\r\n" + b"y" * 990 + b"\r\n" + b"z" * 990 + b"\r\n.\r\n")
    assert metrics.named("delivery") == [(name, "rejected")]
    # The store fails: tempfail.
    del metrics.calls[:]
    s.factory.delivery = slow._delivery
    s.factory.delivery.deliver = lambda *args, **kwargs: defer.fail(TemporaryFailure("down"))
    for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>", "DATA"):
        s.command(line)
    assert b"451 4.3.0" in s.send(b"Subject: m\r\n\r\nhello\r\n.\r\n")
    assert metrics.named("delivery") == [(name, "tempfail")]


def test_anLMTPRecipientDeletedSinceItsRCPTIsRejectedNotDelivered(users):
    """
    LMTP answers each recipient: one deleted between its RCPT and the end
    of DATA gets 550 5.1.1, a rejected delivery; a message that reached
    nobody is not counted accepted (nor its octets).
    """
    metrics = RecordingMetrics()
    s = smtp(users, metrics, lmtp=True)
    for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>", f"RCPT TO:<{BOB}>", "DATA"):
        s.command(line)
    resultOf(users.deleteUser(BOB))
    replies = s.send(b"Subject: m\r\n\r\nhello\r\n.\r\n")
    assert replies.startswith(b"250 2.0.0") and f"550 5.1.1 <{BOB}>".encode() in replies
    assert [call[:2] for call in metrics.named("delivery")] == [("lmtp", "accepted"), ("lmtp", "rejected")]
    del metrics.calls[:]
    for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>", "DATA"):
        s.command(line)
    resultOf(users.deleteUser(ALICE))
    reply = s.send(b"Subject: m\r\n\r\nhello\r\n.\r\n")
    assert reply == f"550 5.1.1 <{ALICE}> no such user here\r\n".encode()
    assert metrics.named("delivery") == [("lmtp", "rejected")]


def test_refusedConnectionsAreCountedAsRefusedOnly(users):
    """
    A connection the policy refuses opens no session (neither the open
    connections nor the sessions count it): it is counted as refused,
    with the policy's reason.
    """
    metrics = RecordingMetrics()
    s = pop3(users, metrics, policy=RecordingPolicy(refuse="too many connections"))
    s.protocol.connectionLost(None)
    assert metrics.calls == [("connectionRefused", "pop3", "too many connections")]


def test_aRefusedConnectionsFailedHandshakeIsCountedAsRefusedOnly(users):
    """
    A connection refused as it arrived on an implicit-TLS port waits for
    the client's handshake to say why; a scanner (or a client refusing
    the certificate) then fails it.  README: refused connections are
    counted in no other series, so not as a TLS failure either (a banned
    scanner hammering port 995 would otherwise look like clients refusing
    a new certificate).
    """
    metrics = RecordingMetrics()
    s = pop3(users, metrics, policy=RecordingPolicy(refuse="banned"))
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    s.protocol.connectionLost(Failure(error))
    assert metrics.calls == [("connectionRefused", "pop3", "banned")]


def test_aFailedTLSHandshakeIsCountedOnce(users):
    """
    A connection whose TLS fails (here a client that sent something else
    than a handshake) counts in the TLS failures, and the connection
    gauge goes back down as for any other end.
    """
    metrics = RecordingMetrics()
    s = smtp(users, metrics)
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    s.protocol.connectionLost(Failure(error))
    assert metrics.named("tlsFailed") == [("smtp",)]
    assert metrics.named("connectionClosed") == [("smtp",)]


# -- log events ---------------------------------------------------------------------------



def sessionEvents(captured):
    return [e for e in captured if e.get("log_namespace", "").startswith("mailgate.")]


BODY = b"Subject: private\r\n\r\nthe-secret-body-CONTENT-4711\r\n"


def test_noPasswordSASLResponseOrMessageContentIsEverLogged(users, logEvents):
    metrics = RecordingMetrics()
    # USER/PASS, right and wrong; AUTH PLAIN, right and wrong (the
    # response carries the password); a delivery; a logout.
    s = pop3(users, metrics, authFailureDelay=0)
    s.login(ALICE, "wrong-" + PASSWORD)
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    s.command("QUIT")
    a = pop3(users, metrics, authFailureDelay=0)
    a.command(f"AUTH PLAIN {plain(BOB, 'wrong-' + PASSWORD)}")
    assert a.command(f"AUTH PLAIN {plain(BOB, PASSWORD)}").startswith("+OK")
    a.protocol.connectionLost(None)
    for lmtp in (False, True):
        m = smtp(users, metrics, lmtp=lmtp)
        for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>", "DATA"):
            m.command(line)
        assert b"250 2.0.0" in m.send(BODY + b".\r\n")
    p = pop3(users, metrics)
    p.login(ALICE, PASSWORD)
    assert b"the-secret-body-CONTENT-4711" in p.send(b"RETR 1\r\nQUIT\r\n")

    logged = sessionEvents(logEvents)
    names = {e.get("event") for e in logged}
    assert {"pop3.login", "pop3.logout", "auth.failed", "smtp.delivered", "lmtp.delivered"} <= names
    secrets = [
        PASSWORD,
        plain(BOB, PASSWORD),
        plain(BOB, "wrong-" + PASSWORD),
        "the-secret-body-CONTENT-4711",
        "private",
    ]
    for event in logged:
        text = formatEvent(event) + repr(event)
        for secret in secrets:
            assert secret not in text, (secret, event)


def test_everyEventOfAConnectionCarriesItsContext(users, logEvents):
    s = pop3(users, RecordingMetrics(), authFailureDelay=0)
    s.login(ALICE, "wrong")
    s.login(ALICE, PASSWORD)
    s.command("QUIT")
    m = smtp(users, RecordingMetrics())
    for line in ("MAIL FROM:<x@remote.test>", f"RCPT TO:<{BOB}>", "DATA"):
        m.command(line)
    m.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
    logged = sessionEvents(logEvents)
    assert len(logged) == 4
    for event in logged:
        assert event["event"] and event["peer"] == "192.0.2.44:6110"
        assert event["session"] in (s.protocol.sessionId, m.protocol.sessionId)
        assert event["protocol"] == ("pop3" if event["session"] == s.protocol.sessionId else "smtp")
    failed, login, logout, delivered = logged
    assert (failed["event"], failed["user"], failed["mechanism"]) == ("auth.failed", ALICE, "user")
    assert (login["event"], login["user"], login["mechanism"]) == ("pop3.login", ALICE, "user")
    assert (logout["event"], logout["user"]) == ("pop3.logout", ALICE)
    assert delivered["event"] == "smtp.delivered" and "user" not in delivered
    assert formatEvent(login) == f"pop3 login user={ALICE} peer=192.0.2.44:6110 mechanism=user"
