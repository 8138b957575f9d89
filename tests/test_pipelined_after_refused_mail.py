"""
The RCPTs and the DATA (or BDAT) a client pipelined behind a MAIL that was
refused (RFC 2920 section 3.1: it reads the MAIL's reply after sending
them) are answered 503 and not counted as its errors; the MAIL still is.
Without sockets, SMTP and LMTP alike.

Postfix (3.7.11) checks a message's size against the server's SIZE before
its MAIL on a new connection only: over a cached one it sends MAIL with
SIZE over the limit, its RCPT and DATA pipelined behind it, and RSET after
the refusal (and an RSET probe before it reuses the connection).  Each such
message was three errors, and the seventh in a row closed the connection
with 421 (tests/test_postfix_oversize_pipelined.py runs it through a real
Postfix).
"""

import pytest

from mailgate.smtp.protocol import SMTPServer
from mailgate.testing import SMTPSession, addUser

ALICE = "alice@example.org"
LIMIT = 4096
TOO_LARGE = f"552 5.3.4 message size exceeds the limit of {LIMIT} octets\r\n"
NO_MAIL = "503 5.5.1 need MAIL command first\r\n"
CLOSED = "421 4.7.0 mailgate.test too many errors, closing connection\r\n"


@pytest.fixture(params=["smtp", "lmtp"])
def session(request, store):
    """
    A session of each protocol with a limit of 4 KiB, said hello to as
    Postfix says it; Alice is a user.
    """
    addUser(store, ALICE, "secret")
    lmtp = request.param == "lmtp"
    s = SMTPSession(store, lmtp=lmtp, maxMessageSize=LIMIT)
    assert s.command("LHLO postfix.test" if lmtp else "EHLO postfix.test").startswith("250-")
    return s


def oversizedAsPostfixSends(s, recipients=(ALICE,)):
    """
    A message over the limit as Postfix sends it over a cached connection:
    the RSET probe, MAIL, its RCPTs and DATA pipelined, and the RSET ending
    the refused transaction.  Return every reply.
    """
    group = b"MAIL FROM:<bob@elsewhere.test> SIZE=7508\r\n"
    group += b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients) + b"DATA\r\n"
    out = s.command("RSET")
    out += s.send(group).decode()
    return out + s.command("RSET")


def goodAsPostfixSends(s):
    out = s.command("RSET")
    out += s.send(b"MAIL FROM:<bob@elsewhere.test> SIZE=40\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n").decode()
    return out + s.send(b"Subject: good\r\n\r\nstill delivered\r\n.\r\n").decode()


def test_oversizedMessagesOverACachedConnectionKeepIt(session):
    """
    19 oversized messages in a row (each one error now: its MAIL), some for
    several recipients: each answered as before, the connection kept, and
    the good message after them delivered.  Before, the seventh was closed
    421 after its RCPT's 503.
    """
    for n in range(19):
        recipients = [ALICE] + [f"other{i}@example.org" for i in range(n % 3)]
        out = oversizedAsPostfixSends(session, recipients)
        assert out == "250 2.0.0 OK\r\n" + TOO_LARGE + NO_MAIL * (len(recipients) + 1) + "250 2.0.0 OK\r\n", (n, out)
    out = goodAsPostfixSends(session)
    assert "421" not in out and (" delivered as " in out or "message accepted as " in out), out
    assert not session.disconnected


def test_aClientSendingOnlyRefusedTransactionsIsStillClosed(session):
    """
    The refused MAIL still counts: a client that sends nothing but refused
    MAIL, RCPT and DATA is closed at its 20th MAIL, the 421 right after
    that MAIL's 552 (never after a 250, where Postfix would take it for the
    reply to its next message's MAIL).
    """
    for n in range(SMTPServer.maxBadCommands):
        out = session.send(b"MAIL FROM:<> SIZE=9999\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n").decode()
        if session.disconnected:
            break
        assert out == TOO_LARGE + NO_MAIL * 2, (n, out)
    assert n == SMTPServer.maxBadCommands - 1
    assert out == TOO_LARGE + CLOSED


def test_atMostMaxRecipientsRCPTsAreForgivenAMAIL(store):
    """
    Behind one refused MAIL, as many RCPTs as a transaction may have
    recipients are forgiven; the ones past them count as the client's
    errors, so that a refused MAIL followed by RCPTs for ever is closed.
    """
    addUser(store, ALICE, "secret")
    s = SMTPSession(store, maxMessageSize=LIMIT, maxRecipients=5)
    s.command("EHLO postfix.test")
    out = s.send(b"MAIL FROM:<> SIZE=9999\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 40).decode()
    # The MAIL, then 19 RCPTs past the five forgiven: the 20th error.
    assert out == TOO_LARGE + NO_MAIL * 24 + CLOSED, out
    assert s.disconnected


@pytest.mark.parametrize("between", ["RSET", "NOOP", "HELP", "EHLO again.test"])
def test_onlyWhatFollowsTheRefusedMAILIsForgiven(store, between):
    """
    Another command after the refused MAIL (RSET, NOOP, HELP, EHLO)
    ends what is forgiven: an RCPT or DATA without a transaction after it is
    the client's error, as it always was (20 of them close the session).
    """
    addUser(store, ALICE, "secret")
    s = SMTPSession(store, maxMessageSize=LIMIT)
    s.command("EHLO postfix.test")
    s.command("MAIL FROM:<> SIZE=9999")
    s.command(between)
    for n in range(SMTPServer.maxBadCommands):
        out = s.command("RCPT TO:<alice@example.org>" if n % 2 else "DATA")
        if s.disconnected:
            break
    assert out == NO_MAIL + CLOSED
    # The MAIL was one too.
    assert n == SMTPServer.maxBadCommands - 2


def test_aRCPTWithoutAnyMAILIsStillAnError(store):
    s = SMTPSession(store, lmtp=True)
    s.command("LHLO postfix.test")
    out = "".join(s.command("RCPT TO:<alice@example.org>" if n % 2 else "DATA") for n in range(20))
    assert out == NO_MAIL * 20 + CLOSED, out


def test_chunksBehindARefusedMAILAreNotErrors(session):
    """
    A client with CHUNKING pipelines BDAT behind MAIL and RCPT as DATA:
    its chunks (their octets read and dropped) are refused 503, not counted
    as errors.
    """
    for n in range(SMTPServer.maxBadCommands):
        out = session.send(
            b"MAIL FROM:<> SIZE=9999\r\nRCPT TO:<alice@example.org>\r\nBDAT 5\r\nhello"
            b"BDAT 5 LAST\r\nworld"
        ).decode()
        if session.disconnected:
            break
        assert out == TOO_LARGE + NO_MAIL * 3, (n, out)
        assert session.command("RSET") == "250 2.0.0 OK\r\n"
    # The 20th MAIL closed it, the 421 right after its 552.
    assert n == SMTPServer.maxBadCommands - 1
    assert out == TOO_LARGE + CLOSED, out
