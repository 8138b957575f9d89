"""
Refusals are logged, not only counted: an administrator asked "mail to X
bounced" or "my phone says the mailbox is locked" finds one line for it.

  - SMTP/LMTP: every refused MAIL (C{smtp.sender_refused}) and RCPT
    (C{smtp.recipient_refused}), and every
    message refused at or after DATA, once (C{smtp.rejected}, or the
    event that already named that failure: C{smtp.data_too_slow},
    C{smtp.spool_failed}, C{smtp.delivery_failed}), naming the
    transaction, the sender, the recipients and the reply.
  - POP3: a login refused with C{[IN-USE]} or C{[LOGIN-DELAY]} is an
    C{auth.failed} line like a wrong password's, with its own reason.

The tests read what an administrator reads: the formatted line, and the
structured fields the JSON format writes.
"""

import re

import pytest
from twisted.internet import defer
from twisted.logger import Logger, LogLevel, formatEvent

from mailgate.errors import TemporaryFailure
from mailgate.testing import POP3Session, SMTPSession, addUser, resultOf

from test_observability import RecordingMetrics
from test_sasl import plain

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "Tr0ub4dor-s3cret"
SENDER = "sender@remote.test"
PEER = "127.0.0.1:40000"


@pytest.fixture
def users(store):
    addUser(store, ALICE, PASSWORD)
    addUser(store, BOB, PASSWORD)
    return store


def capture(session):
    """
    Every event the session logs from now on, in order.
    """
    events = []
    session.protocol.log = Logger(observer=events.append)
    return events


def intake(store, kind, **options):
    s = SMTPSession(store, lmtp=kind == "lmtp", **options)
    assert s.command("LHLO client.test" if kind == "lmtp" else "EHLO client.test").startswith("250")
    return s


def transactionId(s):
    return s.protocol._envelope.transactionId


kinds = pytest.mark.parametrize("kind", ["smtp", "lmtp"])


# -- RCPT ------------------------------------------------------------------------


@kinds
def test_eachRefusedRecipientIsLoggedOnceWithSenderRecipientAndReply(users, kind):
    resultOf(users.setQuota(BOB, octets=10))
    s = intake(users, kind, maxRecipients=1)
    events = capture(s)
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=100").startswith("250")
    refusals = [
        ("RCPT TO:<nobody@example.org>", "550 5.1.1", "nobody@example.org", "no such user"),
        ("RCPT TO:<someone@elsewhere.test>", "550 5.7.1", "someone@elsewhere.test", "relay denied"),
        ("RCPT TO:<not an address>", "501 5.1.3", "not an address", "bad address syntax"),
        (f"RCPT TO:<{BOB}>", "552 5.2.3", BOB, "larger than the quota"),
        (f"RCPT TO:<{ALICE}> NOTIFY=NEVER", "555 5.5.4", ALICE, "bad parameters"),
    ]
    for command, reply, _, _ in refusals:
        assert s.command(command).startswith(reply + " "), command
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert s.command(f"RCPT TO:<{BOB}>").startswith("452 4.5.3")
    refusals.append((None, "452 4.5.3", BOB, "too many recipients"))
    assert len(events) == len(refusals)
    for event, (_, reply, recipient, reason) in zip(events, refusals):
        assert formatEvent(event) == (
            f"{kind} recipient refused from=<{SENDER}> to=<{recipient}> peer={PEER}: {reply} {reason}"
        )
        assert event["event"] == f"{kind}.recipient_refused"
        assert event["log_level"] == LogLevel.info
        assert (event["sender"], event["recipient"], event["reason"]) == (SENDER, recipient, reason)
        assert f"{event['code']} {event['enhanced']}" == reply
        assert (event["session"], event["protocol"], event["peer"]) == (s.protocol.sessionId, kind, PEER)


@kinds
def test_eachRefusedSenderIsLoggedOnceWithTheReply(users, kind):
    """
    A MAIL refused is a line too (C{smtp.sender_refused}), as a RCPT is:
    above all a message whose declared size is over the limit, which an
    MTA bounces without ever reaching DATA, and a sender it cannot take.
    """
    s = intake(users, kind, maxMessageSize=1000)
    events = capture(s)
    refusals = [
        (f"MAIL FROM:<{SENDER}> SIZE=5000", "552 5.3.4", SENDER, "message too large"),
        ("MAIL FROM:<sender\u00e9@remote.test>", "553 5.6.7", "sender\u00e9@remote.test", "non-ASCII address"),
        ("MAIL FROM:<not an address>", "501 5.1.7", "not an address", "bad address syntax"),
        (f"MAIL FROM:<{SENDER}> RET=HDRS", "555 5.5.4", SENDER, "bad parameters"),
    ]
    if kind == "lmtp":
        # LMTP takes a non-ASCII sender without SMTPUTF8 (an MTA's smtpd
        # took it: test_lmtpTakesNonASCIIAddressesWithoutSMTPUTF8), and a
        # sender that is no mailbox as <> (test_smtp_protocol's
        # test_lmtpTakesASenderThatIsNoMailboxAsTheNullSender).
        del refusals[1:3]
    for command, reply, _, _ in refusals:
        assert s.command(command).startswith(reply + " "), command
    assert len(events) == len(refusals)
    for event, (_, reply, sender, reason) in zip(events, refusals):
        assert formatEvent(event) == f"{kind} sender refused from=<{sender}> peer={PEER}: {reply} {reason}"
        assert event["event"] == f"{kind}.sender_refused"
        assert event["log_level"] == LogLevel.info
        assert (event["sender"], event["reason"]) == (sender, reason)
        assert f"{event['code']} {event['enhanced']}" == reply
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=500").startswith("250")
    assert len(events) == len(refusals)


def test_aRefusedRecipientIsLoggedBoundedAndPrintable(users):
    """
    The recipient is the client's text (here an address too long to
    parse, as the client wrote it): at most 256 characters, and
    nothing that would break or disguise the line (a line separator, a
    right-to-left override) gets into it.
    """
    s = intake(users, "smtp")
    events = capture(s)
    assert s.command("MAIL FROM:<> SMTPUTF8").startswith("250")
    local = "x\u2028\u202e" * 40 + "y" * 200
    assert s.command(f'RCPT TO:<"{local}"@example.org>').startswith("501 5.1.3 ")
    [event] = events
    assert event["sender"] == ""
    assert event["recipient"] == ('"' + "x??" * 40 + "y" * 200)[:256]
    assert formatEvent(event) == (
        f"smtp recipient refused from=<> to=<{event['recipient']}> peer={PEER}: 501 5.1.3 bad address syntax"
    )


def test_aRecipientLookupFailureNamesTheRecipient(users):
    s = intake(users, "smtp")
    s.factory.delivery.checkRecipient = lambda *args: defer.fail(TemporaryFailure("database down"))
    events = capture(s)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("451 4.3.0")
    [event] = events
    assert event["event"] == "smtp.recipient_failed"
    assert formatEvent(event) == (
        f"smtp recipient lookup failed from=<{SENDER}> to=<{ALICE}> peer={PEER}: database down"
    )
    assert (event["sender"], event["recipient"]) == (SENDER, ALICE)


# -- DATA ------------------------------------------------------------------------


def begin(s, recipients=(ALICE, BOB)):
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    for recipient in recipients:
        assert s.command(f"RCPT TO:<{recipient}>").startswith("250")
    assert s.command("DATA").startswith("354")
    return transactionId(s)


@kinds
@pytest.mark.parametrize(
    "body, reply, reason",
    [
        (b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n", "552 5.3.4", "message too large"),
        (b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n", "500 5.5.2", "line too long"),
    ],
    ids=["too-large", "line-too-long"],
)
def test_aMessageRefusedAtTheEndOfDataIsLoggedOnce(users, kind, body, reply, reason):
    # Lines of any length are accepted unless a limit is set.
    s = intake(users, kind, maxMessageSize=1500, maxLineLength=1000)
    events = capture(s)
    tid = begin(s)
    replies = s.send(body + b".\r\n").decode()
    assert replies.startswith(reply)
    [event] = events
    assert formatEvent(event) == (
        f"{kind} rejected id={tid} from=<{SENDER}> to={ALICE},{BOB} peer={PEER}: {reply} {reason}"
    )
    assert event["event"] == f"{kind}.rejected"
    assert (event["id"], event["sender"], event["recipients"]) == (tid, SENDER, f"{ALICE},{BOB}")
    assert (f"{event['code']} {event['enhanced']}", event["reason"]) == (reply, reason)
    assert "x" * 50 not in repr(event)


def test_dataTooSlowIsLoggedOnceWithItsTransaction(users):
    s = intake(users, "smtp")
    events = capture(s)
    tid = begin(s, [ALICE])
    s.send(b"Subject: slow\r\n")
    assert s.advance(240) == b""
    s.send(b"x\r\n")
    assert s.advance(240).startswith(b"421 4.4.2 mailgate.test message data too slow")
    [event] = events
    assert event["event"] == "smtp.data_too_slow"
    assert formatEvent(event) == (
        f"smtp data too slow id={tid} from=<{SENDER}> to={ALICE} peer={PEER} "
        f"octets=18 seconds=480: 421 4.4.2 data too slow"
    )
    assert (event["id"], event["code"], event["enhanced"], event["octets"]) == (tid, 421, "4.4.2", 18)


def test_aSpoolFailureIsLoggedOnceWithItsTransaction(users, monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-directory"))
    s = intake(users, "smtp")
    events = capture(s)
    tid = begin(s, [ALICE])
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1200
    assert s.send(body + b".\r\n").startswith(b"451 4.3.0")
    [event] = events
    assert event["event"] == "smtp.spool_failed" and event["log_level"] == LogLevel.error
    # The error itself, not a guess at a full directory.
    assert formatEvent(event) == (
        f"smtp spool failed id={tid} from=<{SENDER}> to={ALICE} peer={PEER}: "
        f"451 4.3.0 cannot spool message data: No such file or directory"
    )
    assert (event["id"], event["recipients"], event["reason"]) == (tid, ALICE, "spool failed")


@kinds
def test_aStoreFailureIsLoggedOnceWithItsTransaction(users, kind):
    s = intake(users, kind)
    s.factory.delivery.deliver = lambda *args, **kwargs: defer.fail(TemporaryFailure("database down"))
    events = capture(s)
    tid = begin(s)
    assert s.send(b"Subject: m\r\n\r\nhello\r\n.\r\n").startswith(b"451 4.3.0")
    [event] = events
    assert event["event"] == f"{kind}.delivery_failed" and event["log_level"] == LogLevel.warn
    assert formatEvent(event) == (
        f"{kind} delivery failed id={tid} from=<{SENDER}> to={ALICE},{BOB} peer={PEER}: "
        f"451 4.3.0 store unavailable: database down"
    )
    assert (event["id"], event["sender"], event["reason"]) == (tid, SENDER, "store unavailable")


def test_aMessageRefusedForAFullMailboxIsLoggedOnce(users):
    resultOf(users.setQuota(ALICE, octets=600))
    s = intake(users, "smtp")
    events = capture(s)
    tid = begin(s)
    assert s.send(b"Subject: q\r\n\r\n" + b"z" * 800 + b"\r\n.\r\n").startswith(b"452 4.2.2")
    [event] = events
    assert event["event"] == "smtp.delivery_failed" and event["reason"] == "mailbox full"
    assert formatEvent(event) == (
        f"smtp delivery failed id={tid} from=<{SENDER}> to={ALICE},{BOB} peer={PEER}: "
        f"452 4.2.2 <{ALICE}>: mailbox full"
    )


def test_anLmtpRecipientGoneSinceRcptIsNamedInTheDeliveryLine(users):
    s = intake(users, "lmtp")
    events = capture(s)
    begin(s)
    resultOf(users.deleteUser(BOB))
    replies = s.send(b"Subject: m\r\n\r\nhello\r\n.\r\n").decode().split("\r\n")
    assert replies[1] == f"550 5.1.1 <{BOB}> no such user here"
    [event] = events
    assert re.fullmatch(
        rf"lmtp delivered id=\S+ from=<{re.escape(SENDER)}> to={re.escape(ALICE)},{re.escape(BOB)} "
        rf"uids=\S+,- gone={re.escape(BOB)} peer=\S+",
        formatEvent(event),
    ), formatEvent(event)
    assert event["gone"] == [BOB]


# -- POP3 ------------------------------------------------------------------------


def pop3(store, **options):
    return POP3Session(store, authFailureDelay=0, **options)


def test_aLoginRefusedInUseIsAnAuthFailedLine(users):
    first = pop3(users)
    assert first.login(ALICE, PASSWORD).startswith("+OK")
    second = pop3(users)
    second.factory.metrics = metrics = RecordingMetrics()
    events = capture(second)
    assert second.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}").startswith("-ERR [IN-USE]")
    [event] = events
    assert formatEvent(event) == (
        f"pop3 login refused user='{ALICE}' peer={PEER}: maildrop in use by another POP3 session"
    )
    assert (event["event"], event["user"], event["mechanism"], event["reason"]) == (
        "auth.failed", ALICE, "plain", "in_use",
    )
    assert metrics.named("login") == [("pop3", "plain", "in_use")]
    assert PASSWORD not in repr(event) and plain(ALICE, PASSWORD) not in repr(event)


def test_aRefusedLoginNameIsLoggedBoundedAndPrintable(users):
    """
    The login name of a refused login is the client's text: in the line
    and in the C{user} field, at most 64 characters, and nothing that
    would disguise the line (a terminal escape, a right-to-left override)
    gets into it.
    """
    s = pop3(users)
    events = capture(s)
    name = "al\x1b[31mice\u202e\u2028" + "x" * 100
    assert s.command(f"AUTH PLAIN {plain(name, 'wrong')}").startswith("-ERR [AUTH]")
    [event] = events
    shown = ("al?[31mice??" + "x" * 100)[:64]
    assert event["user"] == shown
    assert formatEvent(event) == f"pop3 authentication failed user='{shown}' peer={PEER}"


def test_aPasswordSentAfterTheUserNameOnOneLineIsNotLogged(users):
    """
    C{USER name password} on one line makes the password part of the
    login name, which auth.failed logs: what follows white space in a
    login name is shown as C{[...]}, in the line and in the C{user} field
    (a tab too, which would otherwise show as C{?} before the password).
    """
    for separator in (" ", "\t", "  "):
        s = pop3(users)
        events = capture(s)
        assert s.command(f"USER {ALICE}{separator}{PASSWORD}").startswith("+OK")
        assert s.command(f"PASS {PASSWORD}").startswith("-ERR [AUTH]")
        [event] = events
        assert event["user"] == f"{ALICE} [...]"
        assert PASSWORD not in formatEvent(event) and PASSWORD not in repr(event)
    s = pop3(users)
    events = capture(s)
    assert s.command(f"AUTH PLAIN {plain(ALICE + ' ' + PASSWORD, 'wrong')}").startswith("-ERR [AUTH]")
    [event] = events
    assert event["user"] == f"{ALICE} [...]" and PASSWORD not in formatEvent(event)


def test_aLoginRefusedForItsLoginDelayIsAnAuthFailedLine(users):
    first = pop3(users, loginDelay=3600)
    assert first.login(ALICE, PASSWORD).startswith("+OK")
    first.command("QUIT")
    second = pop3(users, loginDelay=3600)
    second.factory.metrics = metrics = RecordingMetrics()
    events = capture(second)
    assert second.login(ALICE, PASSWORD).startswith("-ERR [LOGIN-DELAY]")
    [event] = events
    assert formatEvent(event) == (
        f"pop3 login refused user='{ALICE}' peer={PEER}: "
        f"login delay (the minimum time between logins is 3600 seconds)"
    )
    assert (event["event"], event["user"], event["mechanism"], event["reason"]) == (
        "auth.failed", ALICE, "user", "login_delay",
    )
    # The metric's result stays what it was.
    assert metrics.named("login") == [("pop3", "user", "tempfail")]
    assert PASSWORD not in repr(event)


def test_aLoginTheStoreCannotServeIsLoggedOnceWithItsReason(users):
    s = pop3(users)
    s.factory.portal.login = lambda *args: defer.fail(TemporaryFailure("database down"))
    events = capture(s)
    assert s.login(ALICE, PASSWORD).startswith("-ERR [SYS/TEMP]")
    [event] = events
    assert formatEvent(event) == f"pop3 login failed user='{ALICE}' peer={PEER}: tempfail (database down)"
    assert (event["event"], event["user"], event["mechanism"], event["reason"]) == (
        "pop3.login_failed", ALICE, "user", "tempfail",
    )
    assert event["log_level"] == LogLevel.warn
