"""
LMTP's junk-command count (NOOP, RSET, LHLO... past 100 each an error, 20
errors end the session with 421) against what Postfix's LMTP client sends
over a cached connection, without sockets.

Postfix (3.7.11, as mailgate's trace of it shows) pipelines
MAIL, RCPT and DATA; when every recipient was refused it sends RSET to end
the transaction before caching the connection, and an RSET probe before
it reuses it: two RSETs a refused message.  A flood for unknown users
over one cached connection reached the limit after some 60 messages.  The
421 came after the 250 to the 20th error's RSET: after the probe's (an
odd count of errors since the last delivery, as an oversized message's
three give), Postfix took the connection as good, sent the next message's
MAIL, read the 421 as its reply and deferred that message to its queue's
next retry, however good.
"""

from mailgate.smtp.protocol import SMTPServer
from mailgate.testing import SMTPSession, addUser

ALICE = "alice@example.org"


def lmtp(store, **options):
    s = SMTPSession(store, lmtp=True, **options)
    assert s.command("LHLO postfix.test").startswith("250-")
    return s


def refusedAsPostfixSends(s, n, probe=True):
    """
    A message for an unknown user as Postfix's LMTP client delivers it over
    a cached connection: the RSET probe, MAIL, RCPT and DATA pipelined, and
    the RSET ending the refused transaction.  Return every reply.
    """
    out = s.command("RSET") if probe else ""
    out += s.send(b"MAIL FROM:<> SIZE=321\r\nRCPT TO:<nobody%d@example.org>\r\nDATA\r\n" % n).decode()
    return out + s.command("RSET")


def goodAsPostfixSends(s):
    """
    A message for Alice as Postfix delivers it over a cached connection;
    return every reply.
    """
    out = s.command("RSET")
    out += s.send(b"MAIL FROM:<bob@elsewhere.test> SIZE=40\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n").decode()
    return out + s.send(b"Subject: good\r\n\r\nstill delivered\r\n.\r\n").decode()


def assertDelivered(out):
    replies = out.split("\r\n")
    assert replies[:4] == [
        "250 2.0.0 OK",
        "250 2.1.0 sender <bob@elsewhere.test> OK",
        "250 2.1.5 recipient <alice@example.org> OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ], out
    assert replies[4].startswith("250 2.0.0 <alice@example.org> delivered as ") and replies[5:] == [""], out


def test_aFloodForUnknownUsersOverACachedConnectionKeepsIt(store):
    """
    Every message refused, 300 of them over one connection, as Postfix
    hands on a dictionary attack it took for a domain it has no user list
    for: each answered transaction is the client doing its work, and the
    session stays open for the good message after them.
    """
    addUser(store, ALICE, "secret")
    s = lmtp(store)
    for n in range(300):
        out = refusedAsPostfixSends(s, n, probe=n > 0)
        assert "421" not in out, (n, out)
    assertDelivered(goodAsPostfixSends(s))
    assert not s.disconnected


def test_theMessageAfterAnRSETProbeIsNotRefused421(store):
    """
    An oversized message (refused at MAIL: one error, the RCPT and DATA
    pipelined after it not counted; three before) and then a flood of
    refused messages: the 20th error fell on an RSET probe, answered 250
    and then 421, which Postfix read as the reply to the next message's
    MAIL (status=deferred, "421 4.7.0 ... (in reply to MAIL FROM
    command)").  Now the good message is delivered.
    """
    addUser(store, ALICE, "secret")
    s = lmtp(store, maxMessageSize=4096)
    out = s.send(b"MAIL FROM:<> SIZE=7508\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n").decode()
    assert out.startswith("552 5.3.4 "), out
    assert s.command("RSET") == "250 2.0.0 OK\r\n"
    for n in range(200):
        out = refusedAsPostfixSends(s, n)
        assert "421" not in out, (n, out)
    assertDelivered(goodAsPostfixSends(s))
    assert not s.disconnected


def test_addressVerificationProbesOverACachedConnectionKeepIt(store):
    """
    Postfix's address verification (reject_unverified_recipient, the
    README's pairing) asks mailgate with MAIL and RCPT, ends with RSET, and
    probes the cached connection with RSET before the next: a dictionary
    attack on Postfix's smtpd makes hundreds of them.
    """
    addUser(store, ALICE, "secret")
    s = lmtp(store)
    for n in range(300):
        out = s.command("RSET") if n else ""
        out += s.send(b"MAIL FROM:<double-bounce@postfix.test>\r\nRCPT TO:<nobody%d@example.org>\r\n" % n).decode()
        out += s.command("RSET")
        assert "421" not in out, (n, out)
    assert not s.disconnected


def test_aClientThatOnlyResetsAfterItsTransactionIsStillClosed(store):
    """
    The count starts again at each transaction answered, not for good: a
    client that then only sends RSET (or NOOP), each within the idle
    timeout, is closed after 100 of them and 20 more, as before.
    """
    addUser(store, ALICE, "secret")
    s = lmtp(store)
    out = s.send(b"MAIL FROM:<> SIZE=321\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n").decode()
    assert out.endswith("503 5.5.1 no valid recipients\r\n"), out
    rounds = 0
    for n in range(200):
        reply = s.command("NOOP" if n % 2 else "RSET")
        s.clock.advance(SMTPServer.idleTimeout - 10)
        if s.disconnected:
            break
        rounds += 1
    assert rounds == 119
    assert reply == "250 2.0.0 OK\r\n421 4.7.0 mailgate.test too many errors, closing connection\r\n"
