"""
SMTP and LMTP intake without sockets: an L{SMTPSession} drives
L{mailgate.smtp.SMTPServer} (or L{mailgate.smtp.LMTPServer}) over a
StringTransport, with a clock for timers, against a real SQLite file.

The tests assert what a client sees: reply codes and texts, and the octets
stored (read back from the SQLite file itself and through POP3 RETR).
"""

import email
import email.utils
import json
import re
import sqlite3

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from mailgate.logs import eventAsJSONLine
from mailgate.smtp.protocol import SMTPServer
from mailgate.testing import POP3Session, SMTPSession, addUser, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
DAVE = "dave@example.org"
PASSWORD = "secret"
SENDER = "sender@remote.test"

ENHANCED = re.compile(r"^[245][0-9]{2}[ -][245]\.[0-9]{1,3}\.[0-9]{1,3} ")
TRACE = re.compile(
    rb"^Return-Path: <(?P<sender>[^>]*)>\r\n"
    rb"Received: from (?P<helo>\S+) \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mailgate\.test \(mailgate\) with (?P<protocol>E?SMTP|LMTP|UTF8SMTP|UTF8LMTP) id (?P<id>[0-9A-F]{12})"
    rb"(?:\r\n\tfor <(?P<for>[^>]+)>)?; (?P<date>[^\r\n]+)\r\n"
)


@pytest.fixture
def users(store):
    for address in (ALICE, BOB, CAROL):
        addUser(store, address, PASSWORD)
    return store


def session(store, hello="EHLO client.test", **options):
    s = SMTPSession(store, **options)
    if hello:
        reply = s.command(hello)
        assert reply.startswith("250"), reply
    return s


def lmtp(store, **options):
    return session(store, hello="LHLO client.test", lmtp=True, **options)


def lines(reply):
    """
    The reply lines of a piece of server output, without line ends.
    """
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8")
    assert reply == "" or reply.endswith("\r\n"), reply
    return reply.split("\r\n")[:-1]


def stuff(message):
    """
    The wire form of a message in DATA: dot-stuffed and terminated.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def envelope(s, recipients, sender=SENDER):
    """
    MAIL, RCPT for each recipient and DATA; return the replies.
    """
    out = [s.command(f"MAIL FROM:<{sender}>")]
    out += [s.command(f"RCPT TO:<{r}>") for r in recipients]
    out.append(s.command("DATA"))
    return lines("".join(out))


def storedMessages(dbpath, address):
    """
    The octets of every message in C{address}'s maildrop, read from the
    SQLite file by another connection.
    """
    with sqlite3.connect(dbpath) as db:
        rows = db.execute(
            "SELECT m.body_owner, m.body_id, m.size FROM maildrop m "
            "JOIN users u ON u.user_id = m.user_id WHERE u.address = ? ORDER BY m.uid",
            (address,),
        ).fetchall()
        messages = []
        for owner, bodyId, size in rows:
            chunks = db.execute(
                "SELECT data FROM body_chunks WHERE owner_id = ? AND body_id = ? ORDER BY seq",
                (owner, bodyId),
            ).fetchall()
            message = b"".join(bytes(c) for c, in chunks)
            assert len(message) == size
            messages.append(message)
    return messages


def rowCounts(dbpath):
    with sqlite3.connect(dbpath) as db:
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("bodies", "body_chunks", "maildrop")
        }


def nothingStored(dbpath):
    return rowCounts(dbpath) == {"bodies": 0, "body_chunks": 0, "maildrop": 0}


def retr(store, address, number=1):
    """
    RETR through a POP3 session: the raw response, and the message it
    carries (un-stuffed).
    """
    pop = POP3Session(store)
    assert pop.login(address, PASSWORD).startswith("+OK")
    raw = pop.send(b"RETR %d\r\n" % number)
    pop.command("QUIT")
    status, _, body = raw.partition(b"\r\n")
    assert status.startswith(b"+OK"), raw
    assert body.endswith(b".\r\n")
    body = body[:-3]
    if body.startswith(b".."):
        body = body[1:]
    return raw, body.replace(b"\r\n..", b"\r\n.")


def trace(message):
    match = TRACE.match(message)
    assert match is not None, message[:300]
    return match


@pytest.mark.parametrize(
    "host, literal",
    [
        ("2001:db8::7", b"[IPv6:2001:db8::7]"),
        ("::ffff:192.0.2.7", b"[192.0.2.7]"),
        ("192.0.2.7", b"[192.0.2.7]"),
        ("fe80::20%v0", b"[IPv6:fe80::20]"),
    ],
)
def test_theReceivedFieldNamesTheClientByItsAddressLiteral(users, dbpath, host, literal):
    """
    RFC 5321 section 4.1.3: an IPv6 address in the Received field is
    tagged C{IPv6:}, as Postfix writes it, or a reader takes it for
    something else; an IPv4 client seen by a dual-stack listener is named
    by its IPv4 address.  A link-local client's address comes with the
    server's interface (C{%v0}), which no address literal has: the field
    said C{[IPv6:fe80::20%v0]}.
    """
    version = IPv6Address if ":" in host else IPv4Address
    s = SMTPSession(users, peer=version("TCP", host, 40000))
    assert "250 2.0.0 OK" in s.sendMail(SENDER, [ALICE], b"Subject: v6\r\n\r\nx\r\n")
    [message] = storedMessages(dbpath, ALICE)
    assert message.split(b"\r\n")[1] == b"Received: from client.test (" + literal + b")", message


# -- greeting and hello ------------------------------------------------------


def test_greeting(store):
    assert SMTPSession(store).greeting == "220 mailgate.test ESMTP mailgate ready\r\n"
    assert SMTPSession(store, lmtp=True).greeting == "220 mailgate.test LMTP mailgate ready\r\n"


def test_ehloAdvertisesTheExtensions(store):
    s = SMTPSession(store, maxMessageSize=12345)
    reply = lines(s.command("EHLO client.test"))
    assert reply[0] == "250-mailgate.test greets client.test"
    assert all(line.startswith("250-") for line in reply[:-1])
    assert reply[-1].startswith("250 ")
    keywords = [line[4:] for line in reply[1:]]
    for keyword in ("SIZE 12345", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"):
        assert keyword in keywords


def test_defaultSizeIsAdvertised(store):
    reply = SMTPSession(store).command("EHLO client.test")
    assert f"250-SIZE {SMTPServer.maxMessageSize}\r\n" in reply


def test_helo(users, dbpath):
    s = SMTPSession(users)
    assert s.command("HELO client.test") == "250 mailgate.test greets client.test\r\n"
    # Without EHLO there are no ESMTP parameters...
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=10") == "555 5.5.4 MAIL parameters need EHLO\r\n"
    # ...but mail goes through.
    out = envelope(s, [ALICE])
    assert out[0] == f"250 2.1.0 sender <{SENDER}> OK"
    assert out[-1].startswith("354 ")
    assert s.send(b"Subject: helo\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0 ")
    [message] = storedMessages(dbpath, ALICE)
    assert trace(message)["protocol"] == b"SMTP"


@pytest.mark.parametrize(
    "useLMTP, hello, commands",
    [(False, "EHLO", ["EHLO client.test"]), (False, "HELO", ["HELO client.test"]),
     (False, "EHLO", [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{ALICE}>", "EHLO client.test"]),
     (True, "LHLO", ["LHLO client.test"])],
    ids=["EHLO", "HELO", "a transaction dropped by EHLO", "LHLO"],
)
def test_aClientThatOnlyGreetsAgainAndAgainIsClosed(users, useLMTP, hello, commands):
    """
    EHLO, HELO and LHLO deliver nothing and can be repeated for ever, as
    NOOP can: they are junk commands too (Postfix's smtpd flags HELO and
    EHLO so).  Sent instead of a NOOP every few minutes (each restarting
    the idle timer), one kept its connection for good, and a transaction
    begun and dropped by EHLO did the same; now, as for NOOP, past 100 of
    them each counts as an error, and 20 more end the session.
    """
    s = SMTPSession(users, lmtp=useLMTP)
    greeted = commands[0].startswith("MAIL")
    if greeted:
        assert s.command("EHLO client.test").startswith("250-")
    rounds = 0
    for _ in range(200):
        for command in commands:
            reply = s.command(command)
        s.advance(SMTPServer.idleTimeout - 10)
        if s.disconnected:
            break
        rounds += 1
    # The 120th greeting is the 20th error.
    assert rounds == 119 - greeted
    assert reply.endswith("421 4.7.0 mailgate.test too many errors, closing connection\r\n")
    assert reply.startswith("250-mailgate.test greets client.test\r\n" if hello != "HELO" else "250 mailgate.test")


def test_greetingAgainIsForgivenByADelivery(users, dbpath):
    """
    Counted as NOOP is: since the last delivered message.  A client that
    delivers a message and greets again before the next is never closed.
    """
    s = session(users)
    for i in range(150):
        assert s.command("EHLO client.test").startswith("250-")
        out = envelope(s, [ALICE])
        assert out[-1].startswith("354 ")
        assert s.send(b"Subject: %d\r\n\r\nhi\r\n.\r\n" % i).startswith(b"250 2.0.0 ")
    assert not s.disconnected


@pytest.mark.parametrize("command", ["EHLO", "HELO", "EHLO ", "EHLO two words"])
def test_helloNeedsOneName(store, command):
    s = SMTPSession(store)
    assert s.command(command).startswith("501 5.5.4 syntax: ")
    assert s.command(f"MAIL FROM:<{SENDER}>") == "503 5.5.1 send EHLO first\r\n"


def test_everyReplyCarriesAnEnhancedStatusCode(users):
    """
    RFC 2034: after EHLO, every 2xx, 4xx and 5xx reply carries an enhanced
    status code (the greeting, the EHLO reply and the 354 are exempt).
    """
    s = session(users)
    out = []
    for command in [
        "NOOP",
        "HELP",
        "VRFY alice",
        "EXPN list",
        "XYZZY",
        "RCPT TO:<alice@example.org>",
        "DATA",
        f"MAIL FROM:<{SENDER}>",
        f"MAIL FROM:<{SENDER}>",
        "MAIL FROM:<broken",
        "RCPT TO:<nobody@example.org>",
        "RCPT TO:<somebody@elsewhere.test>",
        "RCPT TO:<broken",
        "RCPT TO:<alice@example.org> NOTIFY=NEVER",
        "RCPT TO:<alice@example.org>",
        "DATA now",
        "DATA",
    ]:
        out += lines(s.command(command))
    out += lines(s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n"))
    out += lines(s.command(f"MAIL FROM:<{SENDER}> SIZE=999999999999"))
    out += lines(s.command(f"MAIL FROM:<{SENDER}> FOO=BAR"))
    out += lines(s.command("RSET"))
    out += lines(s.command("RSET x"))
    out += lines(s.command("LHLO client.test"))
    out += lines(s.command("QUIT"))
    assert len(out) == 24
    for line in out:
        if line.startswith("354 "):
            continue
        assert ENHANCED.match(line), line


# -- command sequence --------------------------------------------------------


def test_mailBeforeHello(users):
    s = SMTPSession(users)
    assert s.command(f"MAIL FROM:<{SENDER}>") == "503 5.5.1 send EHLO first\r\n"


def test_nestedMail(users):
    s = session(users)
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 2.1.0")
    assert s.command(f"MAIL FROM:<{SENDER}>") == "503 5.5.1 nested MAIL command\r\n"
    # The first transaction is still there.
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")


def test_lmtpDataWithoutAcceptedRecipientIs503(users, dbpath):
    """
    RFC 2033 section 4.2: in LMTP, DATA after no successful RCPT MUST fail
    with 503 (SMTP answers 554); the transaction goes on.
    """
    s = lmtp(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("RCPT TO:<nobody@example.org>").startswith("550 ")
    assert s.command("DATA") == "503 5.5.1 no valid recipients\r\n"
    assert nothingStored(dbpath)
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 ")


def test_rcptBeforeMail(users):
    s = session(users)
    assert s.command(f"RCPT TO:<{ALICE}>") == "503 5.5.1 need MAIL command first\r\n"


def test_dataBeforeMail(users):
    s = session(users)
    assert s.command("DATA") == "503 5.5.1 need MAIL command first\r\n"


def test_dataWithoutAcceptedRecipient(users, dbpath):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("DATA") == "554 5.5.1 no valid recipients\r\n"
    assert s.command("RCPT TO:<nobody@example.org>").startswith("550 ")
    assert s.command("DATA") == "554 5.5.1 no valid recipients\r\n"
    # Still in command mode: the transaction can go on.
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 ")
    assert s.command("DATA").startswith("354 ")
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, ALICE)) == 1


def test_mailParameters(users):
    s = session(users, maxMessageSize=1000)
    for argument, reply in [
        ("SIZE=1000 BODY=8BITMIME", "250 2.1.0 "),
        ("BODY=7BIT", "250 2.1.0 "),
        ("SMTPUTF8", "250 2.1.0 "),
        ("SIZE=abc", "501 5.5.4 SIZE needs a number"),
        ("SIZE", "501 5.5.4 SIZE needs a number"),
        # RFC 5321 section 4.1.1.11: a parameter the server cannot
        # implement is answered 555, a malformed one 501.
        ("BODY=BINARYMIME", "555 5.5.4 unsupported body type BODY=BINARYMIME"),
        ("BODY=binarymime", "555 5.5.4 unsupported body type BODY=binarymime"),
        ("BODY", "501 5.5.4 BODY needs a value"),
        ("SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"),
        ("AUTH=<>", "555 5.5.4 unsupported MAIL parameter AUTH"),
        ("SIZE=1 SIZE=2", "501 5.5.4 bad MAIL parameters: duplicate parameter SIZE"),
        ("SIZE=", "501 5.5.4 bad MAIL parameters: malformed parameter 'SIZE='"),
    ]:
        assert s.command(f"MAIL FROM:<{SENDER}> {argument}").startswith(reply), argument
        s.command("RSET")


def test_rcptParametersAreRefused(users):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command(f"RCPT TO:<{ALICE}> NOTIFY=NEVER") == "555 5.5.4 unsupported RCPT parameter NOTIFY\r\n"
    assert s.command(f"RCPT TO:<{ALICE}> X=") == "501 5.5.4 bad RCPT parameters: malformed parameter 'X='\r\n"


def test_malformedAddresses(users):
    s = session(users)
    assert s.command("MAIL FROM:sender@remote.test").startswith("501 5.1.7 bad sender address syntax")
    assert s.command("MAIL FROM:<>") == "250 2.1.0 sender <> OK\r\n"
    assert s.command("RCPT TO:<>").startswith("501 5.1.3 bad recipient address syntax")
    assert s.command("RCPT TO:alice@example.org").startswith("501 5.1.3 ")
    assert s.command("RCPT TO:<alice@example.org").startswith("501 5.1.3 ")


def test_commandsAreCaseInsensitive(users, dbpath):
    s = SMTPSession(users)
    assert s.command("ehlo client.test").startswith("250-")
    assert s.command(f"mail from:<{SENDER}>").startswith("250 2.1.0")
    assert s.command(f"Rcpt To:<{ALICE}>").startswith("250 2.1.5")
    assert s.command("data").startswith("354 ")
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0")


def test_nonASCIISenderNeedsSMTPUTF8(users):
    """
    A non-ASCII address without SMTPUTF8 is not permitted (RFC 6531's
    X.6.7), which Postfix (strict_smtputf8) answers with 553 5.6.7 over
    SMTP (LMTP takes it: test_lmtpTakesNonASCIIAddressesWithoutSMTPUTF8): a client that knows the
    code retries with SMTPUTF8 or bounces, it did not make a syntax error.
    """
    s = session(users)
    assert s.command("MAIL FROM:<jörg@remote.test>") == (
        "553 5.6.7 bad sender address: non-ASCII address without SMTPUTF8\r\n"
    )
    assert s.command("MAIL FROM:<jörg@remote.test> SMTPUTF8") == "250 2.1.0 sender <jörg@remote.test> OK\r\n"


def test_nonASCIIRecipientNeedsSMTPUTF8(users):
    s = session(users)
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert s.command("RCPT TO:<jörg@example.org>") == (
        "553 5.6.7 bad recipient address: non-ASCII address without SMTPUTF8\r\n"
    )
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")


def test_aRecipientNamedBackUnderSMTPUTF8IsPrintable(users):
    """
    A recipient refused under SMTPUTF8 is named back in the reply with
    whatever invisible character it held (a right-to-left override, which
    turns the rest of the reply around in the client's log or bounce) as
    C{?}, as the server's own log shows it; its visible letters stay.
    """
    s = session(users)
    assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
    reply = s.command("RCPT TO:<j\u00f6\u202erg@example.org>")
    assert reply == "550 5.1.1 <j\u00f6?rg@example.org>: no such user here\r\n"


def test_lmtpTakesNonASCIIAddressesWithoutSMTPUTF8(store, dbpath):
    """
    Postfix's smtpd takes a non-ASCII sender from a client that did not
    say SMTPUTF8 (strict_smtputf8 = no, its default) and hands the mail
    over by LMTP without SMTPUTF8: refused at MAIL with 553 5.6.7, mail
    Postfix had accepted bounced (seen with a private Postfix relaying to
    mailgate's LMTP).  LMTP takes such addresses, as Dovecot's does; the
    replies naming them stay ASCII, the client not having asked for UTF-8.
    """
    addUser(store, ALICE, PASSWORD)
    addUser(store, "bob@xn--bcher-kva.example", PASSWORD)
    s = lmtp(store)
    assert s.command("MAIL FROM:<jörg@remote.test>") == "250 2.1.0 sender <j?rg@remote.test> OK\r\n"
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")
    assert s.command("RCPT TO:<bob@bücher.example>") == "250 2.1.5 recipient <bob@b?cher.example> OK\r\n"
    assert s.command("RCPT TO:<jörg@example.org>") == "550 5.1.1 <j?rg@example.org>: no such user here\r\n"
    assert s.command("DATA").startswith("354 ")
    reply = s.send(b"Subject: from j\xc3\xb6rg\r\n\r\n.\r\n")
    assert reply.isascii() and reply.count(b"250 2.0.0 ") == 2, reply
    (stored,) = storedMessages(dbpath, ALICE)
    assert stored.startswith("Return-Path: <jörg@remote.test>\r\n".encode("utf-8"))
    assert len(storedMessages(dbpath, "bob@xn--bcher-kva.example")) == 1
    # SMTP's clients are told to say SMTPUTF8 (test_nonASCIISenderNeedsSMTPUTF8).
    assert session(store).command("MAIL FROM:<jörg@remote.test>").startswith("553 5.6.7 ")


@pytest.mark.parametrize(
    "sender", ["a@b@example.net", "undisclosed-recipients:;", "a@", "a@[300.0.0.1]", "\"a\"b@remote.test"]
)
def test_lmtpTakesASenderThatIsNoMailboxAsTheNullSender(store, dbpath, sender):
    """
    fetchmail hands a message over by LMTP with the sender its Return-Path
    or From: field gives, which may be no address at all; refused (501
    5.1.7), the message was never delivered and fetchmail tried again at
    every poll.  LMTP takes it as <>, as Dovecot's LMTP does: nothing of
    the broken text reaches the message, and one log line names it.
    SMTP's clients still get 501 5.1.7.
    """
    addUser(store, ALICE, PASSWORD)
    s = lmtp(store)
    events = []
    s.protocol.log = Logger(observer=events.append)
    assert s.command(f"MAIL FROM:<{sender}> SIZE=100") == "250 2.1.0 sender <> OK\r\n"
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")
    assert s.command("DATA").startswith("354 ")
    assert s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n").startswith(b"250 2.0.0 ")
    (stored,) = storedMessages(dbpath, ALICE)
    assert stored.startswith(b"Return-Path: <>\r\n")
    assert sender.encode("utf-8") not in stored
    [taken] = [e for e in events if e.get("event") == "lmtp.sender_broken"]
    shown = "".join(c if c.isprintable() else "?" for c in sender)
    assert formatEvent(taken).startswith(f"lmtp sender taken as <> from=<{shown}> peer=")
    assert taken["sender"] == shown
    # Its parameters are still those of a MAIL command.
    s.command("RSET")
    assert s.command(f"MAIL FROM:<{sender}> FOO=1").startswith("555 5.5.4 ")
    assert s.command(f"MAIL FROM:<{sender}> SIZE=x").startswith("501 5.5.4 ")
    assert s.command("MAIL FROM:a@b").startswith("501 5.1.7 ")
    # White space or line separators in it: refused, as Dovecot's LMTP
    # refuses them.
    for spaced in ("a @example.net", "x\u2028y@remote.test", '"a b"c@remote.test'):
        assert s.command(f"MAIL FROM:<{spaced}>").startswith("501 5.1.7 "), spaced
    reply = session(store).command(f"MAIL FROM:<{sender}>")
    # (A non-ASCII one is refused over SMTP before its syntax is read.)
    assert reply[:9] in ("501 5.1.7", "553 5.6.7"), reply


@pytest.mark.parametrize("lmtpSession", [False, True], ids=["smtp", "lmtp"])
@pytest.mark.parametrize("domains", [None, ["xn--bcher-kva.example"]], ids=["users-domains", "--domain"])
def test_aRecipientsDomainInUnicodeIsItsASCIIForm(store, dbpath, lmtpSession, domains):
    """
    An SMTPUTF8 client may write a recipient's domain in Unicode (RFC 6531
    section 3.2): alice@bücher.example is the user alice@xn--bcher-kva.example,
    as Postfix looks it up.  It was refused as another domain, 550 5.7.1
    relay access denied, and the sender's mail bounced.
    """
    user = "alice@xn--bcher-kva.example"
    addUser(store, user, PASSWORD)
    s = SMTPSession(store, lmtp=lmtpSession, domains=domains)
    assert s.command("LHLO client.test" if lmtpSession else "EHLO client.test").startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
    assert s.command("RCPT TO:<alice@BÜCHER.example>") == "250 2.1.5 recipient <alice@BÜCHER.example> OK\r\n"
    # A domain with no ASCII form is no domain here.
    assert s.command("RCPT TO:<alice@b\u00fccher\u2060\u0301.example>").startswith("550 5.7.1 ")
    assert s.command("DATA").startswith("354 ")
    assert s.send(b"Subject: idn\r\n\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, user)) == 1


@pytest.mark.parametrize("lmtpSession", [False, True], ids=["smtp", "lmtp"])
@pytest.mark.parametrize("domains", [None, ["example.org"]], ids=["users-domains", "--domain"])
def test_aRecipientsDomainWithATrailingDotIsAnsweredAlikeWhetherRememberedOrNot(store, lmtpSession, domains):
    """
    alice@example.org. is alice's (as her login takes it, and as Postfix
    strips the dot): its domain is checked in the address's normal form.
    It was checked as sent, so the first RCPT got 550 5.7.1 relay access
    denied, and the same RCPT once alice@example.org had been accepted (a
    remembered address skips the domain check) got 250.
    """
    addUser(store, ALICE, PASSWORD)
    s = SMTPSession(store, lmtp=lmtpSession, domains=domains)
    assert s.command("LHLO client.test" if lmtpSession else "EHLO client.test").startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert s.command(f"RCPT TO:<{ALICE}.>") == f"250 2.1.5 recipient <{ALICE}.> OK\r\n"
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")
    assert s.command(f"RCPT TO:<{ALICE}.>") == f"250 2.1.5 recipient <{ALICE}.> OK\r\n"
    assert s.command("RCPT TO:<alice@example.net.>").startswith("550 5.7.1 ")


def test_nonASCIIHelloNameIsNotEchoedNorStoredInAnASCIIMessage(users, dbpath):
    """
    The client cannot have asked for UTF-8 replies before MAIL, and a
    message without SMTPUTF8 has ASCII header fields (RFC 5322 section
    2.2): a non-ASCII EHLO name shows as C{?} in the reply and in the
    Received field, and as sent in the Received field of an SMTPUTF8
    message.
    """
    s = SMTPSession(users)
    reply = s.send("EHLO bücher.example\r\n".encode("utf-8"))
    assert reply.startswith(b"250-mailgate.test greets b?cher.example\r\n"), reply
    assert reply.isascii()
    envelope(s, [ALICE])
    assert s.send(b"Subject: ascii\r\n\r\n.\r\n").startswith(b"250 ")
    s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8")
    s.command(f"RCPT TO:<{ALICE}>")
    s.command("DATA")
    assert s.send(b"Subject: utf8\r\n\r\n.\r\n").startswith(b"250 ")
    ascii, utf8 = storedMessages(dbpath, ALICE)
    assert trace(ascii)["helo"] == b"b?cher.example"
    assert ascii.isascii()
    assert trace(utf8)["helo"] == "bücher.example".encode("utf-8")


def test_helloNameCannotChangeHowTheReceivedFieldReads(users, dbpath):
    """
    An EHLO name is taken as the client gives it, but its RFC 5322
    specials are not copied into the Received field, as Postfix's smtpd
    neuters them: a C{;} there ended the field's tokens, so that a reader
    took the name's rest for the date, and a C{"} opened a quoted string
    that swallowed the real date; C{<}, C{>} and C{@} made an address.
    """
    s = SMTPSession(users)
    reply = s.command('EHLO x;Mon,"a<b>@c.test')
    assert reply.startswith("250-mailgate.test greets x?Mon,?a?b??c.test\r\n"), reply
    envelope(s, [ALICE])
    assert s.send(b"Subject: helo\r\n\r\n.\r\n").startswith(b"250 ")
    message, = storedMessages(dbpath, ALICE)
    assert trace(message)["helo"] == b"x?Mon,?a?b??c.test"
    received = email.message_from_bytes(message)["Received"]
    # The date is what follows the field's first semicolon (RFC 5322
    # section 3.6.7).
    tokens, _, date = received.partition(";")
    assert email.utils.parsedate_to_datetime(date.strip()).year >= 2024, received
    assert '"' not in tokens and "<" not in tokens.partition("for <")[0], received


@pytest.mark.parametrize("chunks", [False, True], ids=["data", "bdat"])
def test_contentCannotContinueTheReceivedField(users, dbpath, chunks):
    """
    A message whose first line begins with a space or a tab: stored right
    after mailgate's Received field, that line continued it (RFC 5322
    section 2.2.3), and the sender wrote what it liked into mailgate's
    own trace field, after its date.  An empty line ends the header with
    mailgate's fields first, as Postfix's cleanup does, and the content
    is the body, as it came.
    """
    content = b" (authenticated as the administrator)\r\nSubject: folded\r\n\r\nbody\r\n"
    s = session(users)
    if chunks:
        s.command(f"MAIL FROM:<{SENDER}>")
        s.command(f"RCPT TO:<{ALICE}>")
        # The first chunk of one octet: the space alone.
        assert s.send(b"BDAT 1\r\n ").startswith(b"250 ")
        rest = content[1:]
        assert s.send(b"BDAT %d LAST\r\n" % len(rest) + rest).startswith(b"250 ")
    else:
        envelope(s, [ALICE])
        assert s.send(stuff(content)).startswith(b"250 ")
    message, = storedMessages(dbpath, ALICE)
    header, _, body = message.partition(b"\r\n\r\n")
    assert b"administrator" not in header, message
    assert body == content, message
    assert email.message_from_bytes(message)["Received"].rstrip().endswith("+0000"), message


@pytest.mark.parametrize("lmtpSession", [False, True], ids=["smtp", "lmtp"])
def test_smtputf8MessageIsReceivedWithUTF8SMTP(users, dbpath, lmtpSession):
    """
    RFC 6531's "with" types: the Received field of a message that came with
    SMTPUTF8 says so, C{with UTF8SMTP} (C{UTF8LMTP} for LMTP), as Postfix
    writes it; other messages keep C{ESMTP} and C{LMTP}.
    """
    s = lmtp(users) if lmtpSession else session(users)
    for parameter in ("", " SMTPUTF8"):
        assert s.command(f"MAIL FROM:<{SENDER}>{parameter}").startswith("250 ")
        s.command(f"RCPT TO:<{ALICE}>")
        s.command("DATA")
        assert s.send(b"Subject: x\r\n\r\n.\r\n").startswith(b"250 ")
    plain, utf8 = storedMessages(dbpath, ALICE)
    base = b"LMTP" if lmtpSession else b"ESMTP"
    assert trace(plain)["protocol"] == base
    assert trace(utf8)["protocol"] == b"UTF8" + base.lstrip(b"E")


def test_helloReplyStaysWithinTheReplyLineLimit(store):
    """
    RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets, CRLF
    included; the longest EHLO name a command line can carry is not
    echoed whole after the server's own name.
    """
    s = SMTPSession(store, hostname="h" * 63 + "." + "o" * 63 + "." + "s" * 63 + "." + "t" * 61)
    reply = lines(s.command("EHLO " + "c" * 255))
    assert reply[0].startswith("250-")
    assert all(len(line) + 2 <= 512 for line in reply), [len(line) for line in reply]


def test_smtputf8AddressWithLineSeparatorsIsRefused(users, dbpath):
    """
    Unicode line ends in an address (NEL, U+2028) would reach the
    Return-Path field, where a reader splitting on them sees fields the
    sender made up: refused, and the transaction can go on.
    """
    s = session(users)
    for sender in ('"a\u2028X-Evil: 1"@remote.test', "a\x85b@remote.test", "j\u00f6rg\u2029@remote.test"):
        reply = s.command(f"MAIL FROM:<{sender}> SMTPUTF8")
        assert reply.startswith("501 5.1.7 bad sender address syntax: control or line-separator"), reply
    assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
    reply = s.command("RCPT TO:<b\u2028@example.org>")
    assert reply.startswith("501 5.1.3 bad recipient address syntax: control or line-separator"), reply
    assert nothingStored(dbpath)


def test_smtputf8TransactionAllowsUTF8Recipients(users):
    """
    RFC 6531 section 3.4: SMTPUTF8 is given on MAIL and covers the whole
    transaction; RCPT has no such parameter.  A UTF-8 recipient is therefore
    well-formed in an SMTPUTF8 transaction: no such user here (550), not a
    syntax error (501).
    """
    s = session(users)
    assert s.command(f"MAIL FROM:<{SENDER}> SMTPUTF8").startswith("250 ")
    assert s.command("RCPT TO:<jörg@example.org>") == "550 5.1.1 <jörg@example.org>: no such user here\r\n"
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")


# -- recipients: local users of accepted domains only ------------------------


def test_unknownUserInAcceptedDomain(users):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("RCPT TO:<nobody@example.org>") == "550 5.1.1 <nobody@example.org>: no such user here\r\n"


def test_recipientsAreMatchedWithoutRegardToCase(users, dbpath):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("RCPT TO:<Alice@EXAMPLE.Org>") == "250 2.1.5 recipient <Alice@EXAMPLE.Org> OK\r\n"
    s.command("DATA")
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0")
    assert len(storedMessages(dbpath, ALICE)) == 1


@pytest.mark.parametrize("quoted", ['"alice"', '"ali\\ce"', '"Alice"'])
def test_quotedLocalPartIsTheSameMailbox(users, dbpath, quoted):
    """
    The quotes (and backslashes) of a quoted local part are not part of the
    mailbox's name (RFC 5322 section 3.2.4, which RFC 5321's Quoted-string
    is): C{"alice"@example.org} is alice's mailbox, as Postfix delivers
    it, not an unknown user; the sender's is unquoted alike.
    """
    s = session(users)
    assert s.command('MAIL FROM:<"bob"@remote.test>') == "250 2.1.0 sender <bob@remote.test> OK\r\n"
    reply = s.command(f"RCPT TO:<{quoted}@example.org>")
    assert reply.startswith("250 2.1.5 recipient <"), reply
    s.command("DATA")
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0")
    [message] = storedMessages(dbpath, ALICE)
    assert trace(message)["sender"] == b"bob@remote.test"


def test_quotedLocalPartThatNeedsItsQuotesIsAnotherMailbox(users):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command('RCPT TO:<"alice smith"@example.org>') == (
        '550 5.1.1 <"alice smith"@example.org>: no such user here\r\n'
    )


def test_explicitDomains(users):
    addUser(users, "erin@example.net", PASSWORD)
    s = session(users, domains=["example.org"])
    s.command(f"MAIL FROM:<{SENDER}>")
    # A user, but not in an accepted domain.
    assert s.command("RCPT TO:<erin@example.net>") == "550 5.7.1 <erin@example.net>: relay access denied\r\n"
    assert s.command("RCPT TO:<x@elsewhere.test>") == "550 5.7.1 <x@elsewhere.test>: relay access denied\r\n"
    assert s.command("RCPT TO:<nobody@example.org>").startswith("550 5.1.1 ")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")


def test_defaultDomainsAreTheUsersDomains(users):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("RCPT TO:<x@elsewhere.test>") == "550 5.7.1 <x@elsewhere.test>: relay access denied\r\n"
    assert s.command("RCPT TO:<x@example.net>") == "550 5.7.1 <x@example.net>: relay access denied\r\n"
    addUser(users, "erin@example.net", PASSWORD)
    assert s.command("RCPT TO:<x@example.net>").startswith("550 5.1.1 ")
    assert s.command("RCPT TO:<erin@example.net>").startswith("250 2.1.5 ")


def test_noUsersNoDomains(store):
    s = session(store)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("550 5.7.1 ")


RELAY_ATTEMPTS = [
    "<victim@elsewhere.test>",
    "<postmaster@elsewhere.test>",
    "<@example.org:victim@elsewhere.test>",
    "<@example.org,@mail.example.org:victim@elsewhere.test>",
    "<victim%elsewhere.test@example.org>",
    '<"victim@elsewhere.test"@example.org>',
    "<elsewhere.test!victim@example.org>",
    "<victim@elsewhere.test@example.org>",
    "<victim@[192.0.2.1]>",
    "<victim@[127.0.0.1]>",
    "<victim@[IPv6:::1]>",
    "<victim@[ipv6:::1]>",
    "<victim@example.org.elsewhere.test>",
    "<victim@sub.example.org>",
    "<victim@elsewhere.test.>",
    "<victim@org>",
    "<alice@example.org@elsewhere.test>",
    '<"alice@example.org"@elsewhere.test>',
]


@pytest.mark.parametrize("domains", [None, ["example.org"]], ids=["users-domains", "explicit"])
@pytest.mark.parametrize("path", RELAY_ATTEMPTS)
def test_neverAnOpenRelay(users, dbpath, domains, path):
    s = session(users, domains=domains)
    s.command(f"MAIL FROM:<{SENDER}>")
    reply = s.command(f"RCPT TO:{path}")
    assert reply[0] == "5" and ENHANCED.match(reply), reply
    assert s.command("DATA") == "554 5.5.1 no valid recipients\r\n"
    assert nothingStored(dbpath)


def test_vrfyRevealsNothing(users):
    s = session(users)
    known = s.command(f"VRFY {ALICE}")
    unknown = s.command("VRFY nobody@example.org")
    assert known == unknown
    assert known.startswith("252 2.5.0 ")
    assert s.command("EXPN staff") == "502 5.5.1 EXPN is not supported\r\n"


@pytest.mark.parametrize("useLMTP", [False, True])
def test_authIsSaidNotToBeEnabled(users, useLMTP):
    """
    A client set up to authenticate (an MUA given this host as its
    outgoing server) is told that authentication is not enabled, as
    Postfix without SASL tells it, not that AUTH is an unknown command;
    the session goes on.
    """
    s = lmtp(users) if useLMTP else session(users)
    assert s.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == (
        "502 5.5.1 authentication is not enabled: this server takes mail for its users, "
        "it does not send mail for them\r\n"
    )
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


def test_repliesNamingWhatTheClientSentStayWithinTheReplyLineLimit(users):
    """
    RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets, CRLF
    included, however long what it names: an unknown parameter's keyword
    (ASCII, nearly the whole command line), or an address of multi-octet
    characters in an SMTPUTF8 transaction (within RFC 5321's 256
    characters, but up to twice as many octets as the reply can hold
    around it).  The reply is cut at a character, not dropped.
    """
    s = session(users)
    keyword = "X" + "K" * 490
    reply = s.command(f"MAIL FROM:<> {keyword}")
    assert reply.startswith("555 5.5.4 unsupported MAIL parameter XKKK"), reply[:60]
    assert len(reply.encode("utf-8")) <= 512 and reply.endswith("K\r\n")
    label = "\u4e2d" * 53
    wide = f"a@{label}.{label}.{label}.example"
    sender = s.command(f"MAIL FROM:<{wide}> SMTPUTF8")
    recipient = s.command(f"RCPT TO:<{wide}>")
    assert sender.startswith("250 2.1.0 sender <a@\u4e2d"), sender[:40]
    assert recipient.startswith("550 5.7.1 <a@\u4e2d"), recipient[:40]
    for reply in (sender, recipient):
        assert reply.endswith("\r\n") and reply.count("\r\n") == 1
        assert "\ufffd" not in reply
        assert len(reply.encode("utf-8")) <= 512, len(reply.encode("utf-8"))
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")


def test_malformedParameterIsNamedInASCII(users):
    """
    RFC 6531: no UTF-8 in a reply to a client that has not asked for
    SMTPUTF8; a malformed parameter is named with its non-ASCII escaped.
    """
    s = session(users)
    reply = s.send("MAIL FROM:<> \u00fc=1\r\n".encode("utf-8"))
    assert reply == b"501 5.5.4 bad MAIL parameters: malformed parameter '\\xfc=1'\r\n"


def test_vrfyNeedsAnArgument(users):
    """
    RFC 5321 section 4.1.1.6: C{VRFY SP String}; without one it is a
    syntax error (Postfix: 501 5.5.4), not a 252 about nobody.
    """
    s = session(users)
    assert s.command("VRFY") == "501 5.5.4 syntax: VRFY address\r\n"
    assert s.command("VRFY ") == "501 5.5.4 syntax: VRFY address\r\n"
    assert s.command("VRFY alice").startswith("252 2.5.0 ")


# -- size --------------------------------------------------------------------


def test_declaredSizeOverTheLimit(users):
    s = session(users, maxMessageSize=1000)
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=1001") == (
        "552 5.3.4 message size exceeds the limit of 1000 octets\r\n"
    )
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=1000") == f"250 2.1.0 sender <{SENDER}> OK\r\n"


def test_actualSizeOverTheLimit(users, dbpath):
    """
    A message larger than the limit is refused after the final dot (not
    before: the client is still sending), nothing is stored, and the
    session goes on.
    """
    s = session(users, maxMessageSize=1000)
    envelope(s, [ALICE, BOB])
    line = b"x" * 98 + b"\r\n"
    for _ in range(20):
        assert s.send(line) == b""
    assert s.send(b".\r\n") == b"552 5.3.4 message size exceeds the limit of 1000 octets\r\n"
    assert nothingStored(dbpath)
    # A following transaction succeeds.
    out = envelope(s, [ALICE])
    assert out[0].startswith("250 ") and out[-1].startswith("354 ")
    assert s.send(stuff(b"Subject: small\r\n\r\nok\r\n")).startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert storedMessages(dbpath, BOB) == []


def test_messageOfExactlyTheLimit(users, dbpath):
    s = session(users, maxMessageSize=1000)
    message = b"Subject: limit\r\n\r\n" + b"y" * (1000 - 18 - 2) + b"\r\n"
    assert len(message) == 1000
    envelope(s, [ALICE])
    assert s.send(stuff(message)).startswith(b"250 2.0.0 ")
    [stored] = storedMessages(dbpath, ALICE)
    assert stored.endswith(b"\r\n" + message)


# -- command lines -----------------------------------------------------------


def test_commandLineLimit(users):
    s = session(users)
    exactly = "NOOP " + "x" * (512 - 5 - 2)
    assert len(exactly) + 2 == 512
    assert s.command(exactly) == "250 2.0.0 OK\r\n"
    assert s.command(exactly + "x") == "500 5.5.2 line too long (the limit is 512 octets)\r\n"
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


def test_overLongCommandInOnePacketWithOthers(users):
    s = session(users)
    reply = s.send(b"NOOP\r\nNOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert lines(reply) == [
        "250 2.0.0 OK",
        "500 5.5.2 line too long (the limit is 512 octets)",
        "250 2.0.0 OK",
    ]


def test_endlessCommandLineIsNotBuffered(users):
    """
    A 1 MB command line without a line end: refused once, discarded as it
    arrives (the protocol's buffer stays small), and its tail, which looks
    like a command, is not run when the line finally ends.
    """
    s = session(users)
    out = b""
    for _ in range(256):
        out += s.send(b"A" * 4096)
        assert len(s.protocol._buffer) < SMTPServer.maxCommandLength
    out += s.send(b" QUIT\r\n")
    assert out == b"500 5.5.2 line too long (the limit is 512 octets)\r\n"
    assert not s.disconnected
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


def test_endlessCommandLineInOnePacket(users):
    s = session(users)
    reply = s.send(b"MAIL FROM:<" + b"a" * (1 << 20))
    assert reply == b"500 5.5.2 line too long (the limit is 512 octets)\r\n"
    assert len(s.protocol._buffer) < SMTPServer.maxCommandLength
    assert s.send(b">\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    "garbage, text",
    [
        (b"MAIL FROM:<a\x00b@remote.test>", "invalid characters in command"),
        (b"NOOP\x1b[2J", "invalid characters in command"),
        (b"NOOP\rRSET", "invalid characters in command"),
        (b"X\x7fELF\x02\x01", "invalid characters in command"),
        (b"X\xff\xfe\xfd\xfc", "command is not valid UTF-8"),
        (b"MAIL FROM:<\xe9@remote.test>", "command is not valid UTF-8"),
        (b"get / HTTP/1.1", "command not recognized"),
        (b"", "command not recognized"),
        (b"   ", "command not recognized"),
        (b" NOOP", "command not recognized"),
    ],
)
def test_garbage(users, garbage, text):
    """
    A line that begins with a letter (or is empty, or begins with spaces
    before a letter, as Postfix's Bogus rule reads it) is refused and the
    session goes on; see test_aLineThatBeginsWithNoLetterEndsTheSession.
    """
    s = session(users)
    assert s.send(garbage + b"\r\n") == f"500 5.5.2 {text}\r\n".encode()
    assert not s.disconnected
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


#: An HTTP request a browser or proxy is made to send to an SMTP or LMTP
#: port (the HTTP-to-SMTP form smuggling, ALPACA): its body is a mail
#: transaction, each line of it a command if the server reads on.
SMUGGLED = (
    b"MAIL FROM:<" + SENDER.encode() + b">\r\nRCPT TO:<" + ALICE.encode() + b">\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsent by a browser\r\n.\r\nQUIT\r\n"
)
HTTP_POST = (
    b"POST /send HTTP/1.1\r\nHost: mail.example.org:25\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n" % len(SMUGGLED)
) + SMUGGLED


def forbiddenLines(logEvents):
    return [formatEvent(e) for e in logEvents if e.get("event") == "session.forbidden_command"]


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_anHTTPRequestEndsTheSessionBeforeItsBodyRuns(users, dbpath, logEvents, protocol):
    """
    An HTTP request line ends the session at once with 421 4.7.0, whether
    sent first or after commands: no line of the request's body runs (no
    message is stored), the session is logged once, with who sent it and
    the method alone, and counted.  It was answered 500 line by line, and
    the body's transaction delivered the message.  LMTP too: an LMTP port
    reachable by mistake is no less open to it.
    """
    kind = protocol.upper()
    s = SMTPSession(users, lmtp=protocol == "lmtp")
    assert s.send(HTTP_POST) == f"421 4.7.0 mailgate.test that line is no {kind} command, closing connection\r\n".encode()
    assert s.disconnected
    assert storedMessages(dbpath, ALICE) == []
    [line] = forbiddenLines(logEvents)
    assert line == f"{protocol} forbidden command peer=127.0.0.1:40000 why='HTTP request' verb=POST: session closed"
    s.protocol.connectionLost(Failure(ConnectionDone()))
    [end] = [formatEvent(e) for e in logEvents if e.get("event") == f"{protocol}.disconnect"]
    assert "reason='forbidden command' commands=1 errors=1 " in end, end
    registry = s.factory.metrics.registry
    assert registry.get_sample_value("mailgate_forbidden_commands_total", {"protocol": protocol}) == 1

    # After commands, in a session whose transaction is under way: the
    # same, and the transaction is dropped.
    s = session(users) if protocol == "smtp" else lmtp(users)
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert lines(s.send(b"GET / HTTP/1.0\r\nDATA\r\nSubject: x\r\n\r\n.\r\n")) == [
        f"421 4.7.0 mailgate.test that line is no {kind} command, closing connection"
    ]
    assert storedMessages(dbpath, ALICE) == []
    assert s.factory.metrics.registry.get_sample_value(
        "mailgate_forbidden_commands_total", {"protocol": protocol}
    ) == 1


@pytest.mark.parametrize("method", ["CONNECT", "GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "TRACE"])
def test_everyHTTPMethodEndsTheSession(users, method):
    s = session(users)
    assert s.send(f"{method} http://mail.example.org/ HTTP/1.1\r\nNOOP\r\n".encode()) == (
        b"421 4.7.0 mailgate.test that line is no SMTP command, closing connection\r\n"
    )
    assert s.disconnected


def test_anHTTPHeaderEndsTheSessionBeforeAnyCommand(users, logEvents):
    """
    A header field line (an HTTP request whose first line was not seen as
    one: another method, a proxy's) ends a session in which no SMTP
    command came yet; after one, it is refused as any unknown command (a
    client that sends its message after a refused DATA), and its field
    name is not logged.
    """
    s = SMTPSession(users)
    assert s.send(b"Host: mail.example.org\r\nEHLO client.test\r\n") == (
        b"421 4.7.0 mailgate.test that line is no SMTP command, closing connection\r\n"
    )
    assert s.disconnected
    assert forbiddenLines(logEvents) == [
        "smtp forbidden command peer=127.0.0.1:40000 why='HTTP header': session closed"
    ]
    s = session(users)
    assert s.command("Subject: hello") == "500 5.5.2 command not recognized\r\n"
    assert not s.disconnected


@pytest.mark.parametrize(
    "line",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\x00\x00\x00",
        b"\x7fELF\x02\x01",
        b"\xff\xfe\xfd\xfc",
        b"220 other.example.net ESMTP ready",
        b".",
        b"<html>",
        b"  -- boundary",
        b"\t1",
    ],
)
@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_aLineThatBeginsWithNoLetterEndsTheSession(users, logEvents, protocol, line):
    """
    As Postfix's smtpd_forbidden_commands default (its Bogus rule): a
    line whose first word begins with no letter is no command of SMTP's
    or LMTP's (a TLS handshake sent to a cleartext port, another server's
    greeting echoed, a message's text sent after a refused DATA), and
    ends the session; nothing of it is logged.  It was refused line by
    line, up to 20.
    """
    s = session(users) if protocol == "smtp" else lmtp(users)
    assert s.send(line + b"\r\nNOOP\r\n") == (
        f"421 4.7.0 mailgate.test that line is no {protocol.upper()} command, closing connection\r\n".encode()
    )
    assert s.disconnected
    assert forbiddenLines(logEvents) == [
        f"{protocol} forbidden command peer=127.0.0.1:40000 why='no command': session closed"
    ]


def test_tooManyErrorsCloseTheSession(users):
    s = session(users)
    for _ in range(SMTPServer.maxBadCommands - 1):
        assert s.send(b"X\xff\r\n") == b"500 5.5.2 command is not valid UTF-8\r\n"
        assert not s.disconnected
    assert lines(s.send(b"X\xff\r\n")) == [
        "500 5.5.2 command is not valid UTF-8",
        "421 4.7.0 mailgate.test too many errors, closing connection",
    ]
    assert s.disconnected
    assert s.command("NOOP") == ""


def test_errorsAreCountedUntilMailIsDelivered(users, dbpath):
    """
    As Postfix's smtpd_hard_error_limit, "errors ... without delivering
    mail": an MTA that keeps one connection for message after message,
    each with a recipient unknown here, is not cut off with 421 after the
    twentieth such refusal, in the middle of a transaction; without a
    delivery in between, twenty still end the session.
    """
    s = session(users)
    for i in range(SMTPServer.maxBadCommands + 5):
        assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert s.command(f"RCPT TO:<nobody{i}@example.org>").startswith("550 5.1.1 ")
        assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")
        assert s.command("DATA").startswith("354 ")
        assert s.send(b"Subject: %d\r\n\r\n.\r\n" % i).startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, ALICE)) == SMTPServer.maxBadCommands + 5
    s.command(f"MAIL FROM:<{SENDER}>")
    for i in range(SMTPServer.maxBadCommands - 1):
        assert s.command(f"RCPT TO:<nobody{i}@example.org>").startswith("550 5.1.1 ")
    assert lines(s.command("RCPT TO:<nobody@example.org>"))[-1].startswith("421 4.7.0 ")
    assert s.disconnected


def test_lmtpRecipientsRefusedAreNotHeldAgainstTheMTA(users, dbpath):
    """
    An LMTP client is the site's own MTA, handing over what it accepted: a
    list's message for fifty members, thirty of whom have left, is
    delivered to the others (it used to end with 421 at the twentieth
    refusal, deferring them all), and so are messages over one cached
    connection after many for unknown users only (each refused at RCPT,
    and at the DATA pipelined behind); a malformed command still counts.
    """
    s = lmtp(users)
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    for i in range(30):
        assert s.command(f"RCPT TO:<gone{i}@example.org>").startswith("550 5.1.1 ")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")
    assert s.command("DATA").startswith("354 ")
    assert s.send(b"Subject: list\r\n\r\n.\r\n").startswith(b"250 2.0.0 <alice@example.org> ")
    for i in range(SMTPServer.maxBadCommands + 5):
        reply = s.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<spam{i}@example.org>\r\nDATA\r\n".encode())
        assert lines(reply)[1:] == [
            f"550 5.1.1 <spam{i}@example.org>: no such user here",
            "503 5.5.1 no valid recipients",
        ], reply
        assert s.command("RSET") == "250 2.0.0 OK\r\n"
    assert len(storedMessages(dbpath, ALICE)) == 1
    for _ in range(SMTPServer.maxBadCommands - 1):
        assert s.command("DATA x").startswith("501 5.5.4 ")
    assert lines(s.command("DATA x"))[-1].startswith("421 4.7.0 ")
    assert s.disconnected


# -- SMTP smuggling ----------------------------------------------------------


SMUGGLED = (
    b"RSET\r\n"
    b"MAIL FROM:<evil@attacker.test>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.org\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"wire the money\r\n"
)


@pytest.mark.parametrize("piece", [None, 1, 512, 1460], ids=["one-packet", "octets", "512", "1460"])
def test_smuggling_overLongLineDoesNotDropIntoCommandMode(users, dbpath, piece):
    """
    Twisted's ESMTP leaves DATA mode at an over-long body line, so the rest
    of the body runs as commands.  Here the smuggled commands stay data:
    one reply, at the real end of the data, and nothing is stored (with a
    line length limit set; without one, see
    test_smuggling_aLongLineIsStoredAndDoesNotDropIntoCommandMode).
    """
    s = session(users, maxLineLength=1000)
    assert envelope(s, [ALICE])[-1].startswith("354 ")
    body = b"Subject: innocent\r\n\r\n" + b"A" * 2000 + b"\r\n" + SMUGGLED
    pieces = [body] if piece is None else [body[i:i + piece] for i in range(0, len(body), piece)]
    out = b"".join(s.send(p) for p in pieces)
    assert out == b""
    assert s.send(b".\r\n") == b"500 5.5.2 line too long (the limit is 1000 octets)\r\n"
    assert nothingStored(dbpath)
    # Back in command mode, with no transaction.
    assert s.command(f"RCPT TO:<{BOB}>") == "503 5.5.1 need MAIL command first\r\n"


@pytest.mark.parametrize("piece", [None, 1, 512, 1460], ids=["one-packet", "octets", "512", "1460"])
def test_smuggling_aLongLineIsStoredAndDoesNotDropIntoCommandMode(users, dbpath, piece):
    """
    Without a line length limit (the default), a 200 KB line is stored,
    stored in pieces as it arrives, and what follows it is still data:
    the smuggled commands are the message's text, one 250 at the real end,
    and POP3 serves the message back as it was sent, dots stuffed again.
    """
    s = session(users)
    assert envelope(s, [ALICE])[-1].startswith("354 ")
    text = b"Subject: innocent\r\n\r\n" + b"A" * 200_000 + b"\r\n" + SMUGGLED + b"." + b"B" * 70_000 + b"\r\n"
    body = text.replace(b"\r\n.", b"\r\n..")
    pieces = [body] if piece is None else [body[i:i + piece] for i in range(0, len(body), piece)]
    out = b"".join(s.send(p) for p in pieces)
    assert out == b""
    assert s.send(b".\r\n").startswith(b"250 ")
    assert s.command(f"RCPT TO:<{BOB}>") == "503 5.5.1 need MAIL command first\r\n"
    raw, message = retr(users, ALICE)
    # The trace fields, then the text as it was sent.
    assert message.endswith(text)
    trace(message)
    assert storedMessages(dbpath, BOB) == []


def test_smuggling_overLongLineAndSmuggledCommandsInOnePacketWithTheEnd(users, dbpath):
    s = session(users, maxLineLength=1000)
    envelope(s, [ALICE])
    body = b"Subject: innocent\r\n\r\n" + b"A" * 2000 + b"\r\n" + SMUGGLED + b".\r\nQUIT\r\n"
    assert lines(s.send(body)) == [
        "500 5.5.2 line too long (the limit is 1000 octets)",
        "221 2.0.0 mailgate.test closing connection",
    ]
    assert nothingStored(dbpath)


def test_overLongLineRightBeforeTheEndSplitBetweenCRAndLF(users, dbpath):
    """
    The over-long line's CR arrives at the end of one packet and its LF at
    the start of the next, right before the terminator (TCP may split a
    stream anywhere).  The client must still get its answer at the end of
    the data, not be left waiting in DATA mode until the idle timeout.
    """
    s = session(users, maxLineLength=1000)
    envelope(s, [ALICE])
    assert s.send(b"Subject: x\r\n\r\n" + b"A" * 2000 + b"\r") == b""
    assert s.send(b"\n.\r\n") == b"500 5.5.2 line too long (the limit is 1000 octets)\r\n"
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert nothingStored(dbpath)


@pytest.mark.parametrize(
    "fake",
    [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n"],
    ids=["LF.CRLF", "CRLF.LF", "LF.LF", "CR.CR", "CR.CRLF"],
)
def test_smuggling_bareLineEndDotIsNotTheEnd(users, dbpath, store, fake):
    """
    SMTP smuggling (CVE-2023-51764/51765/51766): a "." next to a bare LF
    or CR is not the end of the data.  The smuggled transaction is text of
    the one message Alice gets; Bob gets nothing; the client gets exactly
    one reply; and POP3 gives Alice the same message, with the smuggled
    lines inside it.
    """
    s = session(users)
    envelope(s, [ALICE])
    body = b"Subject: innocent\r\n\r\nhello" + fake + SMUGGLED
    assert s.send(body) == b""
    reply = s.send(b".\r\n")
    assert len(lines(reply)) == 1
    assert reply.startswith(b"250 2.0.0 OK: message accepted as ")
    assert storedMessages(dbpath, BOB) == []
    [stored] = storedMessages(dbpath, ALICE)
    assert b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" in stored
    assert stored.endswith(b"\r\nwire the money\r\n")
    assert stored.count(b"\n") == stored.count(b"\r\n")
    raw, message = retr(store, ALICE)
    assert message == stored
    assert raw.count(b"\r\n.\r\n") == 1 and raw.endswith(b"\r\nwire the money\r\n.\r\n")
    assert rowCounts(dbpath)["maildrop"] == 1


# -- pipelining ----------------------------------------------------------------


def test_pipelining(users, dbpath):
    s = session(users)
    reply = s.send(
        f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<nobody@example.org>\r\n"
        f"RCPT TO:<{BOB}>\r\nDATA\r\n".encode()
    )
    assert lines(reply) == [
        f"250 2.1.0 sender <{SENDER}> OK",
        f"250 2.1.5 recipient <{ALICE}> OK",
        "550 5.1.1 <nobody@example.org>: no such user here",
        f"250 2.1.5 recipient <{BOB}> OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    reply = s.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    first, second = lines(reply)
    assert first.startswith("250 2.0.0 OK: message accepted as ")
    assert second == "221 2.0.0 mailgate.test closing connection"
    assert s.disconnected
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert storedMessages(dbpath, ALICE) == storedMessages(dbpath, BOB)


@pytest.mark.parametrize(
    "lmtpMode, opening, refusal",
    [
        (False, f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<nobody@example.org>\r\n", "554 5.5.1 no valid recipients"),
        (False, "MAIL FROM:<not an address>\r\nRCPT TO:<nobody@example.org>\r\n", "503 5.5.1 need MAIL command first"),
        (True, f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<nobody@example.org>\r\n", "503 5.5.1 no valid recipients"),
    ],
    ids=["smtp-no-recipient", "smtp-no-transaction", "lmtp-no-recipient"],
)
def test_textSentBehindARefusedDataIsNotRunAsCommands(users, dbpath, lmtpMode, opening, refusal):
    """
    A client that sends its message right behind DATA, without waiting
    for the 354, whose DATA is refused: the text's lines are never run as
    commands (a RCPT in it would add its author's recipient to the open
    transaction, and its DATA send his message).  The session ends there.
    """
    s = lmtp(users) if lmtpMode else session(users)
    text = f"RCPT TO:<{BOB}>\r\nDATA\r\nSubject: smuggled\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    reply = lines(s.send((opening + "DATA\r\n" + text).encode()))
    assert reply[-2:] == [
        refusal,
        "421 4.5.0 mailgate.test input sent before the reply to a refused DATA (RFC 2920), closing connection",
    ], reply
    assert s.disconnected
    assert nothingStored(dbpath)


def test_aClientWaitingForTheRefusalOfDataGoesOn(users, dbpath):
    """
    The same refusal to a client that waited for it: the session goes on.
    """
    s = session(users)
    s.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n".encode())
    assert not s.disconnected
    assert lines(s.send(f"RCPT TO:<{BOB}>\r\nDATA\r\n".encode()))[-1].startswith("354 ")
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, BOB)) == 1


SESSION = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
    b"Subject: one\r\n\r\n..first\r\n.\r\n"
    b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n"
    b"Subject: two\r\n\r\nsecond\r\n.\r\n"
    b"NOOP\r\nQUIT\r\nNOOP\r\n"
)


def replyCodes(out):
    return [line[:3] for line in lines(out) if not line.startswith("250-")]


@pytest.mark.parametrize("piece", [None, 1, 7], ids=["one-packet", "octets", "7"])
def test_wholeSessionPipelined(store, dbpath, piece):
    for address in (ALICE, BOB, CAROL):
        addUser(store, address, PASSWORD)
    s = SMTPSession(store)
    pieces = [SESSION] if piece is None else [SESSION[i:i + piece] for i in range(0, len(SESSION), piece)]
    out = b"".join(s.send(p) for p in pieces)
    assert replyCodes(out) == [
        "250", "250", "250", "354", "250", "250", "250", "250", "354", "250", "250", "221",
    ]
    assert s.disconnected
    [one] = storedMessages(dbpath, ALICE)
    assert one.endswith(b"\r\nSubject: one\r\n\r\n.first\r\n")
    [two] = storedMessages(dbpath, BOB)
    assert storedMessages(dbpath, CAROL) == [two]
    assert two.startswith(b"Return-Path: <>\r\n")
    assert two.endswith(b"\r\nSubject: two\r\n\r\nsecond\r\n")


# -- RSET, QUIT, timeout ------------------------------------------------------


def test_rsetClearsTheTransaction(users, dbpath):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    s.command(f"RCPT TO:<{ALICE}>")
    assert s.command("RSET") == "250 2.0.0 OK\r\n"
    assert s.command("DATA") == "503 5.5.1 need MAIL command first\r\n"
    assert s.command(f"RCPT TO:<{ALICE}>") == "503 5.5.1 need MAIL command first\r\n"
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 2.1.0")
    assert s.command(f"RCPT TO:<{BOB}>").startswith("250 2.1.5")
    s.command("DATA")
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0")
    assert storedMessages(dbpath, ALICE) == []
    assert len(storedMessages(dbpath, BOB)) == 1
    assert s.command("RSET x") == "501 5.5.4 RSET takes no arguments\r\n"


def test_quit(users, dbpath):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    s.command(f"RCPT TO:<{ALICE}>")
    assert s.command("QUIT") == "221 2.0.0 mailgate.test closing connection\r\n"
    assert s.disconnected
    assert s.command("NOOP") == ""
    assert nothingStored(dbpath)


@pytest.mark.parametrize("overLMTP", [False, True])
def test_quitWithAnArgumentIsRefusedAndTheSessionGoesOn(users, overLMTP):
    """
    RFC 5321 section 4.1.1.10: C{quit = "QUIT" CRLF}.  A line with more
    is a syntax error (501, as RSET's), not a QUIT: the session goes on,
    as with Dovecot's LMTP (tests/test_lmtp_vs_dovecot.py).
    """
    s = lmtp(users) if overLMTP else session(users)
    assert s.command("QUIT now") == "501 5.5.4 QUIT takes no arguments\r\n"
    assert not s.disconnected
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert s.command("QUIT ").startswith("221 2.0.0")
    assert s.disconnected


def test_idleTimeout(users):
    s = session(users)
    assert s.advance(SMTPServer.idleTimeout - 1) == b""
    assert not s.disconnected
    assert s.advance(1) == b"421 4.4.2 mailgate.test timeout exceeded, closing connection\r\n"
    assert s.disconnected


def test_idleTimerCountsFromTheLastInput(users):
    s = session(users)
    s.advance(200)
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert s.advance(299) == b""
    assert not s.disconnected
    assert s.advance(1).startswith(b"421 4.4.2 ")
    assert s.disconnected


def test_idleTimeoutInDataStoresNothing(users, dbpath):
    s = session(users)
    envelope(s, [ALICE])
    s.send(b"Subject: half\r\n\r\nhalf a mess")
    assert s.advance(SMTPServer.idleTimeout) == b"421 4.4.2 mailgate.test timeout exceeded, closing connection\r\n"
    assert s.disconnected
    assert nothingStored(dbpath)


def test_configuredIdleTimeout(users):
    s = session(users, idleTimeout=600)
    assert s.advance(599) == b""
    assert s.advance(1).startswith(b"421 4.4.2 ")


def test_dataTrickledInIsCutOffAtTheMinimumRate(users, dbpath):
    """
    A client that keeps its data alive with a few octets every four
    minutes (which the idle timer alone allows forever) is told 421 once
    its data has taken longer than the idle timeout plus its octets at 500
    octets per second; nothing is stored.
    """
    assert SMTPServer.minDataRate == 500
    s = session(users)
    envelope(s, [ALICE])
    assert s.send(b"Subject: slow\r\n") == b""
    sent = len(b"Subject: slow\r\n")
    elapsed = 0
    while True:
        out = s.advance(240)
        elapsed += 240
        if out or elapsed > 2000:
            break
        s.send(b"x\r\n")
        sent += 3
    # Cut at the first check past 300 s + sent/500 s: at 480 s here.
    assert elapsed == 480
    assert out == (
        b"421 4.4.2 mailgate.test message data too slow (%d octets in 480 s; "
        b"at least 500 octets/s needed), closing connection\r\n" % sent
    )
    assert s.disconnected
    assert nothingStored(dbpath)
    registry = s.factory.metrics.registry
    assert registry.get_sample_value("mailgate_timeouts_total", {"protocol": "smtp", "kind": "data_rate"}) == 1
    assert registry.get_sample_value("mailgate_timeouts_total", {"protocol": "smtp", "kind": "idle"}) == 0


def test_dataAtAnHonestPaceIsNotCutOff(users, dbpath):
    """
    200 KB over eight minutes (about 420 octets per second, below the rate
    but within the allowance it buys: 300 s + 200,000 / 500 s = 700 s) is
    delivered.
    """
    s = session(users)
    envelope(s, [ALICE])
    s.send(b"Subject: steady\r\n\r\n")
    line = b"y" * 998 + b"\r\n"
    for _ in range(8):
        assert s.advance(60) == b""
        assert s.send(line * 25) == b""
    reply = s.send(b".\r\n")
    assert reply.startswith(b"250 2.0.0"), reply
    assert len(storedMessages(dbpath, ALICE)) == 1


def test_theMinimumDataRateIsConfigurableAndZeroTurnsItOff(users, dbpath):
    s = session(users, minDataRate=0)
    envelope(s, [ALICE])
    s.send(b"Subject: patient\r\n\r\n")
    for _ in range(10):
        assert s.advance(240) == b""
        s.send(b"z\r\n")
    assert s.send(b".\r\n").startswith(b"250 2.0.0")
    # A high rate leaves the allowance alone: cut just after it, although
    # the client was not idle.
    strict = session(users, minDataRate=100_000)
    envelope(strict, [ALICE])
    strict.send(b"Subject: small\r\n\r\nbody\r\n")
    assert strict.advance(200) == b""
    strict.send(b"more\r\n")
    assert strict.advance(101).startswith(b"421 4.4.2 mailgate.test message data too slow")


def test_theDataRateClockStopsWithTheData(users, dbpath):
    """
    Once the data has ended, the time the store takes, and the next
    transaction's commands, are not counted against it.
    """
    s = session(users)
    envelope(s, [ALICE])
    assert s.send(b"Subject: quick\r\n\r\nbody\r\n.\r\n").startswith(b"250 2.0.0")
    assert s.advance(299) == b""
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert s.advance(299) == b""
    assert not s.disconnected


# -- what is stored ------------------------------------------------------------


MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Content-Type: text/plain; charset=latin-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"caf\xe9 \xff\xfe \x80\r\n"
    b"bare\rcarriage return\r\n"
    b"tab\there\r\n"
    + b"L" * 998 + b"\r\n"
    b"last line\r\n"
)


def test_messageIsStoredByteForByte(users, dbpath, store):
    s = session(users)
    envelope(s, [ALICE])
    reply = s.send(stuff(MESSAGE)).decode()
    assert reply.startswith("250 2.0.0 OK: message accepted as ")
    transactionId = reply.split()[-1]
    [stored] = storedMessages(dbpath, ALICE)
    match = trace(stored)
    assert match["sender"] == SENDER.encode()
    assert match["helo"] == b"client.test"
    assert match["protocol"] == b"ESMTP"
    assert match["id"].decode() == transactionId
    assert match["for"] == ALICE.encode()
    assert stored[match.end():] == MESSAGE
    # POP3 hands out the same octets, and counts them the same way.
    raw, message = retr(store, ALICE)
    assert message == stored
    assert raw.startswith(b"+OK %d octets\r\n" % len(stored))
    info = resultOf(store.listMessages(ALICE))
    assert [m.size for m in info] == [len(stored)]


def test_forwardersSRSSenderIsAccepted(users, dbpath):
    """
    A forwarder's SRS sender, its local part over 64 octets (RFC 5321
    section 4.5.3.1 asks receivers not to insist): accepted as Postfix
    accepts it, and in the Return-Path as sent, so bounces reach it.
    """
    sender = "SRS0=Ab3d=XY=some-long-domain.example=a.rather.long.user.name+tag@forwarder.example"
    s = session(users)
    envelope(s, [ALICE], sender=sender)
    assert s.send(b"Subject: forwarded\r\n\r\n.\r\n").startswith(b"250 2.0.0 ")
    [stored] = storedMessages(dbpath, ALICE)
    assert trace(stored)["sender"] == sender.encode("ascii")


def test_nullSenderReturnPath(users, dbpath):
    s = session(users)
    envelope(s, [ALICE], sender="")
    assert s.send(b"Subject: bounce\r\n\r\n.\r\n").startswith(b"250 ")
    [stored] = storedMessages(dbpath, ALICE)
    assert stored.startswith(b"Return-Path: <>\r\nReceived: ")
    assert stored.endswith(b"\r\nSubject: bounce\r\n\r\n")


def test_emptyMessage(users, dbpath):
    s = session(users)
    envelope(s, [ALICE])
    assert s.send(b".\r\n").startswith(b"250 2.0.0 ")
    [stored] = storedMessages(dbpath, ALICE)
    match = trace(stored)
    assert stored[match.end():] == b""


def test_dotLinesAreUnstuffed(users, dbpath):
    s = session(users)
    envelope(s, [ALICE])
    assert s.send(b"..first\r\n..\r\n...\r\n.. \r\nend\r\n.\r\n").startswith(b"250 ")
    [stored] = storedMessages(dbpath, ALICE)
    assert stored[trace(stored).end():] == b".first\r\n.\r\n..\r\n. \r\nend\r\n"


def test_bareLineFeedsAreStoredAsCRLF(users, dbpath):
    s = session(users)
    envelope(s, [ALICE])
    assert s.send(b"Subject: lf\n\nline one\nline two\r\n.\r\n").startswith(b"250 ")
    [stored] = storedMessages(dbpath, ALICE)
    assert stored[trace(stored).end():] == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


def test_threeRecipientsOneBody(users, dbpath):
    s = session(users)
    out = envelope(s, [ALICE, BOB, CAROL])
    assert [line[:3] for line in out] == ["250", "250", "250", "250", "354"]
    assert s.send(stuff(b"Subject: all\r\n\r\nhello\r\n")).startswith(b"250 2.0.0 ")
    with sqlite3.connect(dbpath) as db:
        assert db.execute("SELECT count(*), sum(refcount) FROM bodies").fetchone() == (1, 3)
        assert db.execute("SELECT count(*) FROM maildrop").fetchone() == (3,)
        assert db.execute("SELECT count(DISTINCT body_id) FROM maildrop").fetchone() == (1,)
    [a], [b], [c] = (storedMessages(dbpath, x) for x in (ALICE, BOB, CAROL))
    assert a == b == c
    assert trace(a)["for"] is None  # no single recipient to name
    assert a.endswith(b"\r\nSubject: all\r\n\r\nhello\r\n")


def test_duplicateRecipientGetsOneCopy(users, dbpath):
    s = session(users)
    out = envelope(s, [ALICE, "ALICE@example.org", BOB])
    assert [line[:3] for line in out] == ["250", "250", "250", "250", "354"]
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert len(storedMessages(dbpath, BOB)) == 1
    assert rowCounts(dbpath)["bodies"] == 1


def test_unknownRecipientAmongValidOnes(users, dbpath):
    s = session(users)
    out = envelope(s, [ALICE, "nobody@example.org", BOB])
    assert out[2] == "550 5.1.1 <nobody@example.org>: no such user here"
    assert [line[:3] for line in out] == ["250", "250", "550", "250", "354"]
    assert s.send(b"Subject: x\r\n\r\ny\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert storedMessages(dbpath, ALICE) == storedMessages(dbpath, BOB)
    assert rowCounts(dbpath)["maildrop"] == 2


def test_messagesArriveInOrderWithDistinctIds(users, dbpath):
    s = session(users)
    ids = []
    for n in range(3):
        envelope(s, [ALICE])
        ids.append(s.send(b"Subject: %d\r\n\r\n.\r\n" % n).split()[-1])
    assert len(set(ids)) == 3
    stored = storedMessages(dbpath, ALICE)
    assert [trace(m)["id"] for m in stored] == ids
    assert [m.endswith(b"Subject: %d\r\n\r\n" % n) for n, m in enumerate(stored)] == [True] * 3


# -- failures: never a 250 before the commit, never a 5xx for a failure ---------


def test_vanishedRecipientFailsTheWholeSMTPDelivery(users, dbpath, store):
    """
    Bob is deleted between his RCPT and the end of DATA.  SMTP has one reply
    for all recipients, so the delivery is all or nothing: 451, nobody gets
    the message, and the client's retry will not give Alice a second copy.
    """
    s = session(users)
    envelope(s, [ALICE, BOB, CAROL])
    resultOf(store.deleteUser(BOB))
    reply = s.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
    assert reply == b"451 4.3.0 a recipient no longer exists; try again\r\n"
    assert nothingStored(dbpath)
    # The retry: Bob is refused at RCPT now, the others get one copy.
    out = envelope(s, [ALICE, BOB, CAROL])
    assert [line[:3] for line in out] == ["250", "250", "550", "250", "354"]
    assert s.send(b"Subject: x\r\n\r\ny\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert len(storedMessages(dbpath, CAROL)) == 1


def test_vanishedRecipientInLMTPFailsOnlyThatRecipient(users, dbpath, store):
    s = lmtp(users)
    envelope(s, [ALICE, BOB, CAROL])
    resultOf(store.deleteUser(BOB))
    out = lines(s.send(b"Subject: x\r\n\r\ny\r\n.\r\n"))
    assert len(out) == 3
    assert out[0].startswith(f"250 2.0.0 <{ALICE}> delivered as ")
    assert out[1] == f"550 5.1.1 <{BOB}> no such user here"
    assert out[2].startswith(f"250 2.0.0 <{CAROL}> delivered as ")
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert storedMessages(dbpath, ALICE) == storedMessages(dbpath, CAROL)
    assert rowCounts(dbpath)["maildrop"] == 2


# -- recipient limit -----------------------------------------------------------


def test_maxRecipients(users, dbpath):
    addUser(users, DAVE, PASSWORD)
    s = session(users, maxRecipients=3)
    out = envelope(s, [ALICE, BOB, CAROL, DAVE])
    assert out[4] == "452 4.5.3 too many recipients (the limit is 3)"
    assert [line[:3] for line in out] == ["250", "250", "250", "250", "452", "354"]
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert storedMessages(dbpath, DAVE) == []
    assert rowCounts(dbpath)["maildrop"] == 3


def test_defaultRecipientLimitIsAtLeastWhatRFC5321Requires(users):
    s = session(users)
    s.command(f"MAIL FROM:<{SENDER}>")
    for _ in range(100):
        assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5 ")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("452 4.5.3 ")
    # 452 is not an error that counts towards closing the session.
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("452 4.5.3 ")
    assert not s.disconnected


def test_recipientsOverTheLimitRepeatedForEverEndTheSession(users, dbpath):
    """
    A 452 for a recipient over the limit is no error, but a client that
    repeats RCPT in one transaction was answered (and logged) for ever,
    each line resetting the idle timer.  Past C{maxRecipientOvershoot}
    such refusals (Postfix's smtpd_recipient_overshoot_limit) each counts
    as an error: 20 more and the session is closed.  A delivered message
    forgives them, as it forgives errors.
    """
    s = session(users, maxRecipients=1)
    s.protocol.maxRecipientOvershoot = 5
    out = envelope(s, [ALICE] + [BOB] * 5)
    assert [line[:3] for line in out] == ["250", "250"] + ["452"] * 5 + ["354"]
    assert s.send(b"x\r\n.\r\n").startswith(b"250 2.0.0 ")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    replies = [s.command(f"RCPT TO:<{ALICE}>") for _ in range(1 + 5 + 19)]
    assert not s.disconnected
    assert all(reply.startswith("452 4.5.3 ") for reply in replies[1:]), replies[-1]
    last = s.command(f"RCPT TO:<{ALICE}>")
    assert last.startswith("452 4.5.3 ") and "421 4.7.0 " in last
    assert s.disconnected


# -- LMTP ----------------------------------------------------------------------


def test_lmtpNeedsLHLO(users):
    s = SMTPSession(users, lmtp=True)
    assert s.command("EHLO client.test") == "500 5.5.1 this is an LMTP server: use LHLO\r\n"
    assert s.command("HELO client.test") == "500 5.5.1 this is an LMTP server: use LHLO\r\n"
    assert s.command(f"MAIL FROM:<{SENDER}>") == "503 5.5.1 send LHLO first\r\n"
    reply = lines(s.command("LHLO client.test"))
    assert reply[0] == "250-mailgate.test greets client.test"
    assert "250-PIPELINING" in reply and "250-ENHANCEDSTATUSCODES" in reply
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 2.1.0 ")


def test_smtpRefusesLHLO(users):
    s = SMTPSession(users)
    assert s.command("LHLO client.test") == "500 5.5.1 LHLO is for LMTP; this is SMTP\r\n"


def test_lmtpOneReplyPerAcceptedRecipientInOrder(users, dbpath, store):
    addUser(users, DAVE, PASSWORD)
    s = lmtp(users)
    out = envelope(s, [CAROL, "nobody@example.org", ALICE, DAVE, BOB])
    assert [line[:3] for line in out] == ["250", "250", "550", "250", "250", "250", "354"]
    replies = lines(s.send(stuff(b"Subject: lmtp\r\n\r\nhi\r\n")))
    order = [CAROL, ALICE, DAVE, BOB]
    assert len(replies) == len(order)
    for address, reply in zip(order, replies):
        assert reply.startswith(f"250 2.0.0 <{address}> delivered as ")
        [info] = resultOf(store.listMessages(address))
        assert reply.endswith(f" delivered as {info.uniqueId}")
    [stored] = storedMessages(dbpath, ALICE)
    assert trace(stored)["protocol"] == b"LMTP"
    assert rowCounts(dbpath)["bodies"] == 1


def test_lmtpSizeLimitIsReportedPerRecipient(users, dbpath):
    s = lmtp(users, maxMessageSize=100)
    envelope(s, [ALICE, BOB])
    assert s.send(b"x" * 200 + b"\r\n") == b""
    assert lines(s.send(b".\r\n")) == [
        f"552 5.3.4 <{ALICE}> message size exceeds the limit of 100 octets",
        f"552 5.3.4 <{BOB}> message size exceeds the limit of 100 octets",
    ]
    assert nothingStored(dbpath)
    # The session goes on.
    envelope(s, [BOB])
    assert lines(s.send(b"small\r\n.\r\n"))[0].startswith(f"250 2.0.0 <{BOB}> delivered as ")


def test_lmtpDeclaredSizeOverTheLimit(users):
    s = lmtp(users, maxMessageSize=100)
    assert s.command(f"MAIL FROM:<{SENDER}> SIZE=101") == (
        "552 5.3.4 message size exceeds the limit of 100 octets\r\n"
    )


def test_lmtpOverLongLineIsReportedPerRecipient(users, dbpath):
    s = lmtp(users, maxLineLength=1000)
    envelope(s, [ALICE, BOB])
    out = lines(s.send(b"a\r\n" + b"x" * 1200 + b"\r\n" + SMUGGLED + b".\r\n"))
    assert out == [
        f"500 5.5.2 <{ALICE}> line too long (the limit is 1000 octets)",
        f"500 5.5.2 <{BOB}> line too long (the limit is 1000 octets)",
    ]
    assert nothingStored(dbpath)


def test_lmtpPipelined(users, dbpath):
    s = SMTPSession(users, lmtp=True)
    out = s.send(
        b"LHLO client.test\r\n"
        b"MAIL FROM:<sender@remote.test>\r\n"
        b"RCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<nobody@example.org>\r\n"
        b"RCPT TO:<bob@example.org>\r\n"
        b"DATA\r\n"
        b"Subject: p\r\n\r\nbody\r\n.\r\n"
        b"QUIT\r\n"
    )
    assert replyCodes(out) == ["250", "250", "250", "550", "250", "354", "250", "250", "221"]
    assert s.disconnected
    assert len(storedMessages(dbpath, ALICE)) == 1
    assert len(storedMessages(dbpath, BOB)) == 1


def test_lmtpBareLineEndDotIsNotTheEnd(users, dbpath):
    s = lmtp(users)
    envelope(s, [ALICE])
    assert s.send(b"hello\n.\r\n" + SMUGGLED) == b""
    out = lines(s.send(b".\r\n"))
    assert len(out) == 1 and out[0].startswith(f"250 2.0.0 <{ALICE}> delivered as ")
    assert storedMessages(dbpath, BOB) == []


# -- connection loss and large messages ------------------------------------------


def test_connectionLostInDataStoresNothing(users, dbpath):
    s = session(users)
    envelope(s, [ALICE])
    s.send(b"Subject: cut\r\n\r\n" + b"z" * 500 + b"\r\n")
    s.protocol.connectionLost(None)
    assert s.send(b".\r\n") == b""
    assert nothingStored(dbpath)


def test_manyMessagesArrivingAtOnceShareABoundedMemory(users, dbpath, monkeypatch):
    """
    Forty clients each send just under a megabyte of a message (each
    message small enough to be held in memory on its own) and wait: the
    server holds at most its budget in memory for them all (here lowered
    to 8 MiB), the rest waits in temporary files; it held 40 MiB, and
    with the default 5000 connections 5 GiB.  Each message is stored
    whole once ended, and what is held is given back.
    """
    import tracemalloc

    from mailgate import message

    already = message.spooledInMemory() if hasattr(message, "spooledInMemory") else 0
    monkeypatch.setattr(message, "SPOOL_MEMORY_BUDGET", already + 8 * 2**20, raising=False)
    body = b"Subject: slow\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000
    sessions = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(40):
            s = session(users)
            envelope(s, [ALICE])
            # Octets of its own, as each connection delivers them.
            assert s.send(bytes(bytearray(body))) == b""
            sessions.append(s)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 16 * 2**20, held
    for s in sessions:
        assert s.send(b".\r\n").startswith(b"250 2.0.0 ")
    stored = storedMessages(dbpath, ALICE)
    assert len(stored) == 40 and all(m.endswith(b"\r\n" + body) for m in stored)
    assert message.spooledInMemory() == already


def test_largeMessageInManyPackets(users, dbpath, store):
    """
    A 3 MB message (spilled to a temporary file by the spool, stored in
    several 128 KiB chunks) arrives intact, whatever the packet size.
    """
    line = b"0123456789" * 99 + b"\r\n"
    message = b"Subject: big\r\n\r\n" + b"".join(
        (b"." if n % 7 == 0 else b"") + line[: 990 + n % 8] + b"\r\n" for n in range(3000)
    )
    wire = stuff(message)
    s = session(users)
    envelope(s, [ALICE])
    out = b"".join(s.send(wire[i:i + 65536]) for i in range(0, len(wire), 65536))
    assert out.startswith(b"250 2.0.0 ") and len(lines(out)) == 1
    [stored] = storedMessages(dbpath, ALICE)
    assert stored[trace(stored).end():] == message
    with sqlite3.connect(dbpath) as db:
        assert db.execute("SELECT count(*) FROM body_chunks").fetchone()[0] > 1
    _, retrieved = retr(store, ALICE)
    assert retrieved == stored


@pytest.mark.parametrize(
    "message",
    [
        b"Subject: a\r\nFrom: b\r\n\r\nbody\r\n",
        b"Subject: headers only\r\n",
        b"\r\nno headers\r\n",
        b"X-Long: " + b"h" * 900 + b"\r\n\r\n" + b"b" * 900 + b"\r\n",
    ],
)
@pytest.mark.parametrize("piece", [None, 1], ids=["one-packet", "octets"])
def test_headerSizeIsStoredForTOP(users, dbpath, store, message, piece):
    """
    The header length stored at delivery (trace fields included) is where
    the header section really ends, so POP3 TOP n 0 shows exactly it.
    """
    s = session(users)
    envelope(s, [ALICE])
    wire = stuff(message)
    pieces = [wire] if piece is None else [wire[i:i + 1] for i in range(len(wire))]
    assert b"".join(s.send(p) for p in pieces).startswith(b"250 2.0.0 ")
    [stored] = storedMessages(dbpath, ALICE)
    end = stored.find(b"\r\n\r\n")
    expected = len(stored) if end < 0 else end + 4
    with sqlite3.connect(dbpath) as db:
        assert db.execute("SELECT header_size FROM maildrop").fetchone() == (expected,)
    pop = POP3Session(store)
    pop.login(ALICE, PASSWORD)
    top = pop.send(b"TOP 1 0\r\n")
    assert top == b"+OK top of message follows\r\n" + stored[:expected] + b".\r\n"


def test_spoolFailureIsATemporaryRefusal(users, dbpath, monkeypatch, tmp_path):
    """
    A message over the in-memory limit is spooled to a temporary file; when
    that cannot be made for another reason than a lack of room (here: the
    temporary directory does not exist; out of file descriptors is the
    same), the client gets 451 4.3.0 after its data and retries later, not
    "insufficient system storage", which would send the administrator to
    look at free space; nothing is stored and the session goes on.  (A
    full disk, and the file size limit, are 452 4.3.1: below.)
    """
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-directory"))
    s = session(users)
    envelope(s, [ALICE])
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1200
    reply = s.send(body + b".\r\n")
    assert reply == b"451 4.3.0 local error in processing; try again later\r\n"
    assert nothingStored(dbpath)
    monkeypatch.undo()
    envelope(s, [ALICE])
    assert s.send(body + b".\r\n").startswith(b"250 2.0.0 ")


def test_aBugInACommandCostsOneReplyNotTheSession(users, monkeypatch):
    from mailgate.smtp.protocol import SMTPServer

    def broken(self, argument):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(SMTPServer, "smtp_NOOP", broken)
    s = session(users)
    reply = s.command("NOOP")
    assert reply == "451 4.3.0 internal server error; try again later\r\n"
    assert not s.disconnected
    assert s.command("RSET") == "250 2.0.0 OK\r\n"


@pytest.mark.parametrize("kind", ["smtp", "lmtp"])
def test_eachDeliveryIsLoggedOnceWithTheIdsTheClientWasTold(users, kind):
    """
    One log line per delivered message, naming the id(s) in the 250
    replies after DATA, so an MTA's log line can be matched to mailgate's.
    """
    s = session(users) if kind == "smtp" else lmtp(users)
    events = []
    s.protocol.log = Logger(observer=events.append)
    envelope(s, [ALICE, BOB])
    replies = lines(s.send(stuff(b"Subject: logged\r\n\r\nbody\r\n")))
    [event] = events
    text = formatEvent(event)
    told = [reply.split()[-1] for reply in replies]
    if kind == "smtp":
        [transactionId] = told
        # The message's id as the client was told, and each copy's unique
        # id as POP3 will show it.
        uids = [m.uniqueId for m in resultOf(users.listMessages(ALICE)) + resultOf(users.listMessages(BOB))]
        expected = (
            rf"smtp delivered id={transactionId} from=<{re.escape(SENDER)}> "
            rf"to={re.escape(ALICE)},{re.escape(BOB)} uids={uids[0]},{uids[1]} peer=127\.0\.0\.1:40000"
        )
        assert event["uniqueIds"] == [{"recipient": ALICE, "uid": uids[0]}, {"recipient": BOB, "uid": uids[1]}]
    else:
        expected = (
            rf"lmtp delivered id=\S+ from=<{re.escape(SENDER)}> "
            rf"to={re.escape(ALICE)},{re.escape(BOB)} uids={told[0]},{told[1]} peer=127\.0\.0\.1:40000"
        )
        assert event["uniqueIds"] == [{"recipient": ALICE, "uid": told[0]}, {"recipient": BOB, "uid": told[1]}]
    assert re.fullmatch(expected, text), text
    assert event["recipients"] == f"{ALICE},{BOB}" and event["sender"] == SENDER
    assert event["event"] == f"{kind}.delivered"
    assert event["protocol"] == kind and event["peer"] == "127.0.0.1:40000"
    assert event["session"] == s.protocol.sessionId


@pytest.mark.parametrize("kind", ["smtp", "lmtp"])
def test_aDeliveryLineShowsNoUnprintableSenderAndEveryRecipientsId(users, kind):
    """
    The delivered line shows the sender as every other line does, an
    unprintable character (a right-to-left override, which turns the rest
    of a line round on a terminal) as C{?}; and the JSON record names each
    recipient's unique id under stable keys, that of a recipient whose
    address looks like a secret's field name (C{password-reset@}) too.
    """
    resetter = "password-reset@example.org"
    addUser(users, resetter, PASSWORD)
    s = session(users) if kind == "smtp" else lmtp(users)
    events = []
    s.protocol.log = Logger(observer=events.append)
    assert s.command("MAIL FROM:<ev\u202eil@example.com> SMTPUTF8").startswith("250")
    for address in (resetter, ALICE):
        assert s.command(f"RCPT TO:<{address}>").startswith("250")
    assert s.command("DATA").startswith("354")
    replies = lines(s.send(stuff(b"Subject: logged\r\n\r\nbody\r\n")))
    assert all(reply.startswith("250 ") for reply in replies), replies
    [event] = events
    assert f"from=<ev?il@example.com> to={resetter},{ALICE} " in formatEvent(event)
    record = json.loads(eventAsJSONLine(event))
    assert record["sender"] == "ev?il@example.com"
    assert [entry["recipient"] for entry in record["uniqueIds"]] == [resetter, ALICE]
    assert all(re.fullmatch(r"[0-9a-f]{16}", entry["uid"]) for entry in record["uniqueIds"]), record


def test_anLmtpLogLineNamesEachRecipientsIdInItsPlace(users):
    """
    A recipient refused for its quota gets no unique id: the log line's
    uids= holds a C{-} in its place, so each id stands beside its
    recipient in to=.
    """
    resultOf(users.setQuota(ALICE, octets=10))
    s = lmtp(users)
    events = []
    s.protocol.log = Logger(observer=events.append)
    envelope(s, [ALICE, BOB])
    replies = lines(s.send(stuff(b"Subject: logged\r\n\r\nbody\r\n")))
    # Larger than her whole quota: refused for good.
    assert replies[0].startswith("552 5.2.3 ") and replies[1].startswith("250 ")
    [event] = events
    told = replies[1].split()[-1]
    assert formatEvent(event).endswith(f"to={ALICE},{BOB} uids=-,{told} full={ALICE} peer=127.0.0.1:40000")


# -- postmaster (RFC 5321 section 4.5.1) ------------------------------------------


def postmasterSession(store, postmaster, lmtp=False):
    from twisted.internet.task import Clock

    from mailgate.smtp.delivery import LocalDelivery
    from mailgate.smtp.factory import LMTPFactory, SMTPFactory

    clock = Clock()
    factoryClass = LMTPFactory if lmtp else SMTPFactory
    factory = factoryClass(LocalDelivery(store, postmaster=postmaster), hostname="mailgate.test", reactor=clock)
    s = SMTPSession(store, factory=factory, clock=clock)
    assert s.command("LHLO client.test" if lmtp else "EHLO client.test").startswith("250")
    return s


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_postmasterGoesToTheConfiguredUser(users, dbpath, lmtp):
    """
    <Postmaster>, of no domain and in any case, and postmaster@ a domain
    mailgate accepts mail for, are delivered to --postmaster's user.
    """
    s = postmasterSession(users, ALICE, lmtp)
    for recipient in ("Postmaster", "POSTMASTER@example.org"):
        replies = envelope(s, [recipient])
        assert replies[1].startswith("250 2.1.5"), replies
        assert lines(s.send(stuff(b"Subject: to the postmaster\r\n\r\nhello\r\n")))[0].startswith("250 ")
    stored = storedMessages(dbpath, ALICE)
    assert len(stored) == 2
    assert all(m.endswith(b"Subject: to the postmaster\r\n\r\nhello\r\n") for m in stored)


def test_aUserNamedPostmasterGetsItsOwnMail(users, dbpath):
    addUser(users, "postmaster@example.org", PASSWORD)
    s = postmasterSession(users, ALICE)
    envelope(s, ["postmaster@example.org"])
    s.send(stuff(b"Subject: mine\r\n\r\nhello\r\n"))
    assert len(storedMessages(dbpath, "postmaster@example.org")) == 1
    assert storedMessages(dbpath, ALICE) == []


def test_withoutAPostmasterItsMailIsRefusedSayingWhy(users, dbpath):
    s = postmasterSession(users, None)
    s.command(f"MAIL FROM:<{SENDER}>")
    for recipient in ("postmaster", "Postmaster@example.org"):
        assert s.command(f"RCPT TO:<{recipient}>") == (
            f"550 5.1.1 <{recipient}>: no postmaster mailbox here (the server has no --postmaster)\r\n"
        )
    # A domain mailgate does not serve is still not relayed for.
    s = postmasterSession(users, ALICE)
    s.command(f"MAIL FROM:<{SENDER}>")
    assert s.command("RCPT TO:<postmaster@elsewhere.test>").startswith("550 5.7.1 ")
    assert nothingStored(dbpath)


def test_aSpoolThatFillsUpAtItsLastOctetsIsATemporaryRefusal(users, dbpath):
    """
    The disk holding the spool fills up just as the message ends: its
    last octets, held in the file's buffer, fail to be written when the
    spool is completed.  The client gets 452 4.3.1 as for any spool
    failure, nothing is stored, and the session goes on; it got a 451
    "internal server error" and the log a traceback.  The full disk is
    the kernel's file size limit (RLIMIT_FSIZE), set just above what the
    spool holds before the last line.
    """
    import resource
    import signal

    s = session(users)
    envelope(s, [ALICE])
    # Past the in-memory limit: spooled to a file, in one write.
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1500
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        assert s.send(body) == b""
        resource.setrlimit(resource.RLIMIT_FSIZE, (s.protocol.rawReceiver.spool.size + 10, hard))
        reply = s.send(b"the last line, past the room left\r\n.\r\n")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert reply == b"452 4.3.1 insufficient system storage; try again later\r\n"
    assert nothingStored(dbpath)
    envelope(s, [ALICE])
    assert s.send(body + b".\r\n").startswith(b"250 2.0.0 ")
