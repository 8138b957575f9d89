"""
The POP3 protocol without sockets: a L{POP3Session} drives
L{mailgate.pop3.POP3Server} over a StringTransport, with a clock for timers,
against a real SQLite store run synchronously.

Each defect of Twisted's own POP3 server that mailgate set out to avoid has
a test here named after it (C{test_twistedDefect_*}).
"""

import hashlib
import weakref

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from mailgate import __version__
from mailgate.logs import eventAsRecord
from mailgate.pop3.protocol import POP3Server
from mailgate.pop3.responses import numberedLines
from mailgate.store.sql import CHUNK_SIZE
from mailgate.testing import POP3Session, addUser, deliver, resultOf
from refcounting import withoutCycleCollector
from test_sasl import withoutImplementation

ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture
def alice(store):
    addUser(store, ALICE, "wonderland", apop=True)
    return ALICE


@pytest.fixture
def session(store, alice):
    return POP3Session(store)


def logged_in(store, address=ALICE, password="wonderland", **options):
    s = POP3Session(store, **options)
    reply = s.login(address, password)
    assert reply.startswith("+OK "), reply
    return s


def multiline(reply):
    """
    Split a multi-line response into its status line and body lines,
    checking the terminator.
    """
    assert reply.endswith("\r\n.\r\n") or reply.endswith(".\r\n"), reply
    lines = reply.split("\r\n")
    assert lines[-1] == "" and lines[-2] == "."
    return lines[0], lines[1:-2]


# -- greeting, CAPA ------------------------------------------------------


def test_greetingCarriesUniqueAPOPTimestamp(store, alice):
    first = POP3Session(store, hostname="pop.example.org")
    second = POP3Session(store, hostname="pop.example.org")
    assert first.greeting.startswith("+OK ")
    assert first.challenge in first.greeting
    assert first.challenge.startswith("<") and first.challenge.endswith("@pop.example.org>")
    assert first.challenge != second.challenge


def test_noTimestampWhenAPOPIsOff(store, alice):
    s = POP3Session(store, apop=False)
    assert "<" not in s.greeting
    assert s.challenge is None
    digest = hashlib.md5(b"<1.2@x>wonderland").hexdigest()
    assert s.command(f"APOP {ALICE} {digest}").startswith("-ERR APOP is not available")


def test_twistedDefect_capaAdvertisesPipeliningNotPipeline(session):
    status, lines = multiline(session.command("CAPA"))
    assert status.startswith("+OK")
    assert "PIPELINING" in lines
    assert "PIPELINE" not in lines
    for joke in ("CELERITY", "AUSPEX", "POTENCE"):
        assert joke not in lines
    for capability in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "USER", "EXPIRE NEVER"):
        assert capability in lines


def test_capaNamesTheImplementationOnlyAfterLogin(session):
    """
    mailgate's name and version are for logged-in users (as GNU pop3d
    shows them; Dovecot shows none): before login, anyone who connects
    read them, whatever --greeting keeps out of the greeting.
    """
    _, before = multiline(session.command("CAPA"))
    assert not any(line.startswith("IMPLEMENTATION") for line in before)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    _, after = multiline(session.command("CAPA"))
    assert f"IMPLEMENTATION mailgate-{__version__}" in after


def test_capaAfterLoginStillAnnouncesTheAuthorizationCapabilities(store, alice):
    """
    RFC 2449 section 5: capabilities of the AUTHORIZATION state are
    announced in both states; USER and AUTH themselves stay refused.
    """
    s = POP3Session(store)
    _, before = multiline(s.command("CAPA"))
    assert s.login(ALICE, "wonderland").startswith("+OK")
    status, lines = multiline(s.command("CAPA"))
    assert status.startswith("+OK")
    assert withoutImplementation(lines) == before
    assert "USER" in lines and "PIPELINING" in lines and "TOP" in lines
    assert any(line.startswith("SASL ") for line in lines)
    assert s.command(f"USER {ALICE}") == "-ERR USER is not valid in the TRANSACTION state\r\n"
    assert s.command("AUTH PLAIN").startswith("-ERR AUTH is not valid in the TRANSACTION state")


def test_capaAdvertisesLoginDelayWhenConfigured(store, alice):
    s = POP3Session(store, loginDelay=300)
    _, lines = multiline(s.command("CAPA"))
    assert "LOGIN-DELAY 300" in lines


# -- authentication --------------------------------------------------------


def test_userPassLogin(store, alice):
    deliver(store, [ALICE], b"Subject: one\r\n\r\nbody\r\n")
    s = POP3Session(store)
    assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n"
    assert s.command("PASS wonderland") == f"+OK {ALICE} has 1 messages (22 octets)\r\n"


def test_usernameIsCaseInsensitive(store, alice):
    s = POP3Session(store)
    assert s.login("Alice@Example.ORG", "wonderland").startswith("+OK")


def test_passwordWithSpaces(store):
    addUser(store, BOB, "two words  here")
    s = POP3Session(store)
    assert s.login(BOB, "two words  here").startswith("+OK")


def test_twistedDefect_apopSucceeds(store, alice):
    s = POP3Session(store)
    digest = hashlib.md5(s.challenge.encode() + b"wonderland").hexdigest()
    assert s.command(f"APOP {ALICE} {digest}").startswith(f"+OK {ALICE} has 0 messages")


def test_apopDigestIsCaseInsensitiveHex(store, alice):
    s = POP3Session(store)
    digest = hashlib.md5(s.challenge.encode() + b"wonderland").hexdigest().upper()
    assert s.command(f"APOP {ALICE} {digest}").startswith("+OK")


def test_apopFailsForUserWithoutAPOPSecret(store):
    addUser(store, BOB, "builder")  # no --apop
    s = POP3Session(store)
    digest = hashlib.md5(s.challenge.encode() + b"builder").hexdigest()
    assert s.command(f"APOP {BOB} {digest}") == "-ERR [AUTH] invalid user name or password\r\n"


def test_apopWrongDigest(session):
    assert session.command(f"APOP {ALICE} {'0' * 32}") == "-ERR [AUTH] invalid user name or password\r\n"


def test_apopMalformed(session):
    assert session.command(f"APOP {ALICE} xyz").startswith("-ERR expected: APOP name digest")
    assert session.command("APOP").startswith("-ERR expected")
    # The session goes on.
    assert session.login(ALICE, "wonderland").startswith("+OK")


def test_apopDigestIsBoundToThisConnectionsTimestamp(store, alice):
    first = POP3Session(store)
    second = POP3Session(store)
    digest = hashlib.md5(first.challenge.encode() + b"wonderland").hexdigest()
    assert second.command(f"APOP {ALICE} {digest}").startswith("-ERR [AUTH]")


def test_unknownUserAndWrongPasswordLookTheSame(store, alice):
    unknown = POP3Session(store, authFailureDelay=1.0)
    wrong = POP3Session(store, authFailureDelay=1.0)
    unknown.command("USER nobody@example.org")
    wrong.command(f"USER {ALICE}")
    # Nothing is answered before the delay...
    assert unknown.command("PASS whatever") == ""
    assert wrong.command("PASS whatever") == ""
    assert unknown.advance(0.99) == b""
    assert wrong.advance(0.99) == b""
    # ...then both get the same answer.
    a = unknown.advance(0.01)
    b = wrong.advance(0.01)
    assert a == b == b"-ERR [AUTH] invalid user name or password\r\n"


def test_failureDelayDoesNotHoldUpOtherSessions(store, alice):
    clockShared = POP3Session(store, authFailureDelay=5.0)
    failing = clockShared
    failing.command(f"USER {ALICE}")
    assert failing.command("PASS nope") == ""
    other = POP3Session(store, clock=failing.clock, authFailureDelay=5.0)
    assert other.login(ALICE, "wonderland").startswith("+OK")
    assert failing.advance(5) == b"-ERR [AUTH] invalid user name or password\r\n"


def test_malformedAddressIsJustAFailedLogin(session):
    assert session.login("not an address", "x") == "-ERR [AUTH] invalid user name or password\r\n"


def test_passWithoutUser(session):
    assert session.command("PASS wonderland") == "-ERR send USER first\r\n"


def test_userMustStartOverAfterFailedPass(session):
    assert session.login(ALICE, "wrong").startswith("-ERR [AUTH]")
    assert session.command("PASS wonderland") == "-ERR send USER first\r\n"


def test_tooManyFailedLoginsCloseTheSession(session):
    for _ in range(POP3Server.maxAuthFailures - 1):
        assert session.login(ALICE, "wrong").startswith("-ERR [AUTH]")
        assert not session.disconnected
    reply = session.login(ALICE, "wrong")
    assert reply.startswith("-ERR [AUTH]")
    assert "closing" in reply
    assert session.disconnected


def test_twistedDefect_noSecondLoginInsideASession(store, alice):
    addUser(store, BOB, "builder")
    s = logged_in(store)
    assert s.command(f"USER {BOB}") == "-ERR USER is not valid in the TRANSACTION state\r\n"
    assert s.command("PASS builder") == "-ERR PASS is not valid in the TRANSACTION state\r\n"
    assert s.command(f"APOP {BOB} {'0' * 32}") == "-ERR APOP is not valid in the TRANSACTION state\r\n"
    assert s.protocol._maildrop.address == ALICE


def test_loginDelayRefusesTooFrequentLogins(store, alice):
    first = POP3Session(store, loginDelay=3600)
    assert first.login(ALICE, "wonderland").startswith("+OK")
    first.command("QUIT")
    second = POP3Session(store, loginDelay=3600)
    reply = second.login(ALICE, "wonderland")
    assert reply.startswith("-ERR [LOGIN-DELAY]")
    # A refused login does not keep the maildrop locked.
    third = POP3Session(store)
    assert third.login(ALICE, "wonderland").startswith("+OK")


def test_loginDelayStillChecksThePasswordFirst(store, alice):
    s = POP3Session(store, loginDelay=3600)
    assert s.login(ALICE, "wrong").startswith("-ERR [AUTH]")


# -- exclusive access ------------------------------------------------------


def test_secondSessionGetsInUse(store, alice):
    first = logged_in(store)
    second = POP3Session(store)
    assert second.login(ALICE, "wonderland") == "-ERR [IN-USE] maildrop is locked by another POP3 session\r\n"
    assert first.command("STAT").startswith("+OK")


def test_lockFreedOnQuit(store, alice):
    first = logged_in(store)
    first.command("QUIT")
    assert POP3Session(store).login(ALICE, "wonderland").startswith("+OK")


def test_lockFreedOnDisconnect(store, alice):
    first = logged_in(store)
    first.transport.loseConnection()
    first.protocol.connectionLost(None)
    assert POP3Session(store).login(ALICE, "wonderland").startswith("+OK")


def test_lockFreedOnTimeout(store, alice):
    first = logged_in(store)
    first.advance(POP3Server.idleTimeout)
    assert first.disconnected
    assert POP3Session(store).login(ALICE, "wonderland").startswith("+OK")


# -- TRANSACTION commands --------------------------------------------------


THREE = [
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two\r\n\r\nsecond message\r\n",
    b"Subject: three\r\n\r\nthird\r\n",
]
SIZES = [len(m) for m in THREE]


@pytest.fixture
def three(store, alice):
    for message in THREE:
        deliver(store, [ALICE], message)
    return logged_in(store)


def test_stat(three):
    assert three.command("STAT") == f"+OK 3 {sum(SIZES)}\r\n"


def test_list(three):
    status, lines = multiline(three.command("LIST"))
    assert status == f"+OK 3 messages ({sum(SIZES)} octets)"
    assert lines == [f"{n} {size}" for n, size in enumerate(SIZES, 1)]


def test_listOne(three):
    assert three.command("LIST 2") == f"+OK 2 {SIZES[1]}\r\n"


def test_sizesAreTheOctetsAClientCounts(three):
    for n, size in enumerate(SIZES, 1):
        status, lines = multiline(three.command(f"RETR {n}"))
        assert status == f"+OK {size} octets"
        assert len("\r\n".join(lines) + "\r\n") == size


def test_commandsAreCaseInsensitive(three):
    assert three.command("stat") == three.command("STAT")
    assert three.command("list 1") == three.command("LIST 1")
    assert three.command("Noop") == "+OK\r\n"


def test_uidl(store, three):
    status, lines = multiline(three.command("UIDL"))
    assert status.startswith("+OK")
    ids = [line.split(" ", 1) for line in lines]
    assert [n for n, _ in ids] == ["1", "2", "3"]
    expected = [m.uniqueId for m in resultOf(store.listMessages(ALICE))]
    assert [u for _, u in ids] == expected
    for _, uid in ids:
        assert 1 <= len(uid) <= 70
        assert all(0x21 <= ord(c) <= 0x7E for c in uid)
    assert len(set(expected)) == 3
    assert three.command("UIDL 2") == f"+OK 2 {expected[1]}\r\n"


def test_aUIDLListingThatCannotBeWrittenIsATemporaryFailure(store, three, logEvents):
    """
    A small maildrop's unique ids come with the login, and UIDL answers
    from them at once; one that cannot go on the wire (not ASCII, which
    RFC 1939 requires of it) is refused as a store failure, the listing
    not begun, and the session goes on.
    """
    three.protocol._maildrop._uniqueIds[1] = "caf\u00e9"
    assert three.command("UIDL") == "-ERR [SYS/TEMP] internal server error\r\n"
    [event] = [e for e in logEvents if e.get("event") == "pop3.read_failed"]
    assert event["line"].startswith(f"pop3 reading unique ids failed user={ALICE} peer=")
    assert event["log_failure"].check(UnicodeEncodeError)
    assert three.command("NOOP") == "+OK\r\n"


def test_retr(three):
    reply = three.command("RETR 2")
    assert reply == f"+OK {SIZES[1]} octets\r\nSubject: two\r\n\r\nsecond message\r\n.\r\n"


def test_top(store, alice):
    deliver(store, [ALICE], b"From: a\r\nSubject: s\r\n\r\nl1\r\nl2\r\nl3\r\n")
    s = logged_in(store)
    assert s.command("TOP 1 0") == "+OK top of message follows\r\nFrom: a\r\nSubject: s\r\n\r\n.\r\n"
    assert s.command("TOP 1 2") == "+OK top of message follows\r\nFrom: a\r\nSubject: s\r\n\r\nl1\r\nl2\r\n.\r\n"
    full = "From: a\r\nSubject: s\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert s.command("TOP 1 99") == f"+OK top of message follows\r\n{full}.\r\n"
    # However many lines are asked for: the whole message (RFC 1939).
    assert s.command("TOP 1 " + "9" * 40) == f"+OK top of message follows\r\n{full}.\r\n"


def test_topOfMessageWithoutBody(store, alice):
    deliver(store, [ALICE], b"Subject: only headers\r\n")
    s = logged_in(store)
    assert s.command("TOP 1 0") == "+OK top of message follows\r\nSubject: only headers\r\n.\r\n"


def test_topStuffsDots(store, alice):
    deliver(store, [ALICE], b".Header-ish: x\r\n\r\n.body\r\n")
    s = logged_in(store)
    assert s.command("TOP 1 1") == "+OK top of message follows\r\n..Header-ish: x\r\n\r\n..body\r\n.\r\n"


def test_topMalformed(three):
    assert three.command("TOP 1").startswith("-ERR expected: TOP message-number lines")
    assert three.command("TOP 1 -1").startswith("-ERR invalid line count")
    assert three.command("TOP 1 \u0661").startswith("-ERR invalid line count")
    assert three.command("TOP x 1").startswith("-ERR invalid message number")
    assert three.command("TOP 9 1") == "-ERR no such message: 9\r\n"


def test_noop(three):
    assert three.command("NOOP") == "+OK\r\n"


def test_deleMarksAndHides(three):
    assert three.command("DELE 2") == "+OK message 2 deleted\r\n"
    assert three.command("STAT") == f"+OK 2 {SIZES[0] + SIZES[2]}\r\n"
    status, lines = multiline(three.command("LIST"))
    assert lines == [f"1 {SIZES[0]}", f"3 {SIZES[2]}"]
    assert three.command("RETR 2") == "-ERR message 2 is deleted\r\n"
    assert three.command("TOP 2 0") == "-ERR message 2 is deleted\r\n"
    assert three.command("LIST 2") == "-ERR message 2 is deleted\r\n"
    assert three.command("UIDL 2") == "-ERR message 2 is deleted\r\n"
    status, lines = multiline(three.command("UIDL"))
    assert [line.split()[0] for line in lines] == ["1", "3"]


def test_twistedDefect_deleTwiceIsAnError(three):
    three.command("DELE 1")
    assert three.command("DELE 1") == "-ERR message 1 is deleted\r\n"


def test_twistedDefect_statListUidlSkipDeleted(three):
    """
    Twisted #9094: deleted messages were still counted and listed.
    """
    three.command("DELE 1")
    three.command("DELE 3")
    assert three.command("STAT") == f"+OK 1 {SIZES[1]}\r\n"
    assert multiline(three.command("LIST"))[1] == [f"2 {SIZES[1]}"]
    assert [l.split()[0] for l in multiline(three.command("UIDL"))[1]] == ["2"]


def test_rsetUnmarks(three):
    three.command("DELE 1")
    three.command("DELE 2")
    assert three.command("RSET") == f"+OK maildrop has 3 messages ({sum(SIZES)} octets)\r\n"
    assert three.command("STAT") == f"+OK 3 {sum(SIZES)}\r\n"
    assert three.command("RETR 1").startswith("+OK")


def test_twistedDefect_malformedDeleKeepsTheSession(three):
    assert three.command("DELE abc") == "-ERR invalid message number: 'abc'\r\n"
    assert three.command("DELE 99") == "-ERR no such message: 99\r\n"
    assert three.command("DELE 0") == "-ERR no such message: 0\r\n"
    assert three.command("DELE") == "-ERR missing message number\r\n"
    assert three.command("DELE -1") == "-ERR invalid message number: '-1'\r\n"
    assert three.command("DELE 99999999999999999999") == "-ERR no such message: 99999999999999999999\r\n"
    assert not three.disconnected
    assert three.command("STAT") == f"+OK 3 {sum(SIZES)}\r\n"


def test_onlyASCIISpacesAroundAMessageNumber(three):
    """
    Spaces around a message number are forgiven, for LIST and UIDL
    without one too; other white space (a tab, a no-break space) is not
    part of a number.
    """
    assert three.command("LIST  2 ") == f"+OK 2 {SIZES[1]}\r\n"
    assert three.command("LIST   ").startswith("+OK 3 messages")
    assert three.command("UIDL   ").startswith("+OK")
    assert three.command("LIST \u00a01") == "-ERR invalid message number: '\\xa01'\r\n"
    assert three.command("RETR 1\t").startswith("-ERR invalid message number")
    assert three.command("STAT") == f"+OK 3 {sum(SIZES)}\r\n"


def test_topForgivesSpacesAsTheOtherCommandsDo(three):
    """
    TOP's two numbers may have more than one space around them, as LIST's
    and RETR's number may (and as Dovecot allows): a client's
    C{TOP 1  0} got -ERR while C{LIST  1} worked.  A tab is still no
    separator.
    """
    top = "+OK top of message follows\r\nSubject: one\r\n\r\n.\r\n"
    for command in ("TOP 1  0", "TOP  1 0", "TOP 1 0 ", "TOP   1   0   "):
        assert three.command(command) == top, command
    assert three.command("TOP 1\t0") == "-ERR expected: TOP message-number lines\r\n"
    assert three.command("TOP 1 0 0") == "-ERR expected: TOP message-number lines\r\n"
    assert three.command("TOP 1 \u00a00").startswith("-ERR invalid line count")


def test_argumentsEchoedInRepliesAreASCII(store, three):
    """
    A refused argument is named in the reply with its non-ASCII characters
    escaped: no UTF-8 reaches a client that has not asked for it (POP3
    has no UTF8 here, RFC 6856).
    """
    for command, reply in [
        ("LIST \u00fc", "-ERR invalid message number: '\\xfc'\r\n"),
        ("TOP 1 \u0661", "-ERR invalid line count: '\\u0661'\r\n"),
    ]:
        out = three.send(command.encode("utf-8") + b"\r\n")
        assert out == reply.encode("ascii"), (command, out)
    out = POP3Session(store).send("AUTH \u00fc\r\n".encode("utf-8"))
    # (Named as sent: a name that is not ASCII is not upper-cased.)
    assert out == b"-ERR unsupported authentication mechanism '\\xfc'\r\n"


def test_outOfRangeAndMalformedArguments(three):
    for command in ("RETR 4", "LIST 4", "UIDL 4", "RETR 0"):
        assert three.command(command).startswith("-ERR no such message"), command
    for command in ("RETR", "RETR x", "LIST 1x", "UIDL 1.5"):
        assert three.command(command).startswith("-ERR"), command
    assert three.command("STAT 1") == "-ERR this command takes no arguments\r\n"
    assert three.command("NOOP x") == "-ERR this command takes no arguments\r\n"


def test_leadingZerosOfAMessageNumberAreForgivenHoweverMany(three):
    """
    RFC 1939 does not forbid leading zeros in a message number, and
    Dovecot reads any number of them: C{LIST 0000000001} was message 1
    but C{LIST 00000000001} (eleven digits) was refused as no number;
    and a number past the maildrop is no such message however many digits
    it has (past ten digits it was "invalid").
    """
    for zeros in (1, 10, 200):
        assert three.command("LIST " + "0" * zeros + "2") == f"+OK 2 {SIZES[1]}\r\n", zeros
    assert three.command("RETR " + "0" * 30) == "-ERR no such message: 0\r\n"
    assert three.command("LIST 9223372036854775808") == "-ERR no such message: 9223372036854775808\r\n"
    assert three.command("UIDL " + "9" * 240) == "-ERR no such message: " + "9" * 20 + "...\r\n"
    assert three.command("LIST 00000000004") == "-ERR no such message: 4\r\n"


def test_onlySpacesAreForgivenAfterACommandThatTakesNone(three):
    """
    A tab or other white space after a command that takes no argument is
    an argument, refused as C{QUIT\\t} is (and as a tab is no space around
    a message number): C{QUIT \\t} ended the session applying its
    deletions.
    """
    assert three.command("DELE 1") == "+OK message 1 deleted\r\n"
    for command in ("STAT \t", "NOOP \u00a0", "RSET \u0085", "CAPA \u3000", "QUIT \t"):
        assert three.command(command) == "-ERR this command takes no arguments\r\n", ascii(command)
    assert three.command("STAT  ") == f"+OK 2 {sum(SIZES) - SIZES[0]}\r\n"
    assert not three.disconnected


def test_unknownAndWrongStateCommands(session):
    assert session.command("STAT") == "-ERR STAT is not valid in the AUTHORIZATION state\r\n"
    assert session.command("RETR 1") == "-ERR RETR is not valid in the AUTHORIZATION state\r\n"
    assert session.command("XYZZY") == "-ERR unknown command\r\n"
    assert session.command("") == "-ERR empty command line\r\n"
    assert session.login(ALICE, "wonderland").startswith("+OK")


# -- streaming and dot-stuffing --------------------------------------------


def test_twistedDefect_firstLineDotIsStuffed(store, alice):
    message = b".first line starts with a dot\r\n.\r\n..\r\nend\r\n"
    deliver(store, [ALICE], message)
    s = logged_in(store)
    reply = s.send(b"RETR 1\r\n")
    assert reply == (
        b"+OK %d octets\r\n" % len(message)
        + b"..first line starts with a dot\r\n"
        b"..\r\n"
        b"...\r\n"
        b"end\r\n"
        b".\r\n"
    )


def test_twistedDefect_dotsAtChunkBoundariesAreStuffed(store, alice):
    # Put a line that is a lone "." right at the first chunk boundary, and a
    # dotted line right after the second: Twisted's per-chunk stuffing let
    # the first end the response early.
    filler = b"x" * 78 + b"\r\n"
    head = b"Subject: boundary\r\n\r\n"
    body = head
    while len(body) + len(filler) <= CHUNK_SIZE:
        body += filler
    body += b"y" * (CHUNK_SIZE - len(body) - 2) + b"\r\n"
    assert len(body) == CHUNK_SIZE
    body += b".\r\n"
    while len(body) + len(filler) <= 2 * CHUNK_SIZE:
        body += filler
    body += b"z" * (2 * CHUNK_SIZE - len(body) - 2) + b"\r\n"
    assert len(body) == 2 * CHUNK_SIZE
    body += b".dotted\r\nlast\r\n"
    deliver(store, [ALICE], body)
    s = logged_in(store)
    reply = s.send(b"RETR 1\r\n")
    status, _, rest = reply.partition(b"\r\n")
    assert status == b"+OK %d octets" % len(body)
    expected = body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert rest == expected
    assert rest.count(b"\r\n.\r\n") == 1 and rest.endswith(b"\r\n.\r\n")


def test_twistedDefect_storedCRLFIsNotDoubled(store, alice):
    deliver(store, [ALICE], b"Subject: crlf\r\n\r\nline one\r\nline two\r\n")
    s = logged_in(store)
    reply = s.send(b"RETR 1\r\n")
    assert b"\r\r\n" not in reply
    assert reply.endswith(b"line two\r\n.\r\n")


def test_eightBitAndLongLinesAreByteExact(store, alice):
    message = (
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n"
        + bytes(range(0x80, 0x100)).replace(b"\x85", b"")
        + b"\r\n"
        + b"L" * 5000
        + b"\r\n"
    )
    deliver(store, [ALICE], message)
    s = logged_in(store)
    reply = s.send(b"RETR 1\r\n")
    assert reply == b"+OK %d octets\r\n" % len(message) + message + b".\r\n"


def test_emptyMessageIsAMessage(store, alice):
    deliver(store, [ALICE], b"")
    s = logged_in(store)
    assert s.command("STAT") == "+OK 1 0\r\n"
    assert s.command("LIST") == "+OK 1 messages (0 octets)\r\n1 0\r\n.\r\n"
    assert s.command("RETR 1") == "+OK 0 octets\r\n.\r\n"
    assert s.command("TOP 1 0") == "+OK top of message follows\r\n.\r\n"
    assert s.command("DELE 1") == "+OK message 1 deleted\r\n"


def test_largeListingIsComplete(store, alice, monkeypatch):
    # Listings longer than a batch go out batch by batch, UIDL reading each
    # batch from the store.
    monkeypatch.setattr(POP3Server, "uidlBatch", POP3Server.listBatch)
    for i in range(POP3Server.listBatch * 2 + 7):
        deliver(store, [ALICE], b"S: %d\r\n" % i)
    s = logged_in(store)
    s.command("DELE 5")
    status, lines = multiline(s.command("LIST"))
    total = POP3Server.listBatch * 2 + 7
    numbers = [n for n in range(1, total + 1) if n != 5]
    # Every message of every batch under its own number, with its size.
    assert lines == [f"{n} {len(b'S: %d' % (n - 1)) + 2}" for n in numbers]
    status, lines = multiline(s.command("UIDL"))
    assert [int(line.split()[0]) for line in lines] == numbers
    assert len({line.split()[1] for line in lines}) == total - 1
    for n in (1, POP3Server.listBatch + 1, total):
        assert s.command(f"UIDL {n}") == f"+OK {lines[numbers.index(n)]}\r\n"


def test_numberedLinesOfAListing():
    assert numberedLines(1, [120, 7]) == b"1 120\r\n2 7\r\n"
    # Numbered from where the batch starts; deleted messages (0-based
    # indexes) left out.
    assert numberedLines(1001, ["a1", "b2", "c3"], {1001}) == b"1001 a1\r\n1003 c3\r\n"
    assert numberedLines(5, [], {1}) == b""
    with pytest.raises(UnicodeEncodeError):
        numberedLines(1, ["caf\u00e9"])


# -- the UPDATE state ------------------------------------------------------


def test_quitRemovesMarkedMessages(store, three):
    three.command("DELE 1")
    three.command("DELE 3")
    reply = three.command("QUIT")
    assert reply == "+OK mailgate POP3 server signing off (1 message left)\r\n"
    assert three.disconnected
    messages = resultOf(store.listMessages(ALICE))
    assert [m.size for m in messages] == [SIZES[1]]


def test_droppedConnectionRemovesNothing(store, three):
    three.command("DELE 1")
    three.command("DELE 2")
    three.protocol.connectionLost(None)
    assert len(resultOf(store.listMessages(ALICE))) == 3


def test_aConnectionLostDuringUpdateHoldsTheLockUntilTheRemovalIsDone(store, three):
    """
    The client goes away while QUIT's removal is being written (a slow
    database): the maildrop stays locked until that write has finished, so
    the next session cannot snapshot messages the removal is taking away
    (it would list them, then fail to read them); once it is done, the
    lock is free and the messages are gone.
    """
    maildrop = three.protocol._maildrop
    expunge = maildrop.expunge
    slow = defer.Deferred()
    maildrop.expunge = lambda indexes, peer=None: slow.addCallback(lambda _: expunge(indexes, peer))
    three.command("DELE 1")
    assert three.command("QUIT") == ""
    three.protocol.connectionLost(Failure(ConnectionDone()))
    assert POP3Session(store).login(ALICE, "wonderland") == (
        "-ERR [IN-USE] maildrop is locked by another POP3 session\r\n"
    )
    slow.callback(None)
    after = POP3Session(store)
    assert after.login(ALICE, "wonderland").startswith("+OK ")
    assert after.command("STAT") == f"+OK 2 {sum(SIZES[1:])}\r\n"


def test_timeoutRemovesNothing(store, three):
    three.command("DELE 1")
    three.advance(POP3Server.idleTimeout)
    assert three.disconnected
    assert len(resultOf(store.listMessages(ALICE))) == 3


def test_quitInAuthorizationState(session):
    assert session.command("QUIT") == "+OK mailgate POP3 server signing off\r\n"
    assert session.disconnected


def test_deletionOfSharedBodyKeepsOtherCopies(store, alice):
    addUser(store, BOB, "builder")
    deliver(store, [ALICE, BOB], b"Subject: shared\r\n\r\nfor both\r\n")
    s = logged_in(store)
    s.command("DELE 1")
    s.command("QUIT")
    b = logged_in(store, BOB, "builder")
    assert b.command("RETR 1").endswith("for both\r\n.\r\n")


# -- snapshot semantics ----------------------------------------------------


def test_mailArrivingDuringSessionAppearsAtNextLogin(store, three):
    deliver(store, [ALICE], b"Subject: late\r\n\r\nlate\r\n")
    assert three.command("STAT") == f"+OK 3 {sum(SIZES)}\r\n"
    assert three.command("RETR 4") == "-ERR no such message: 4\r\n"
    three.command("DELE 1")
    three.command("QUIT")
    s = logged_in(store)
    assert s.command("STAT").startswith("+OK 3 ")
    assert s.command("RETR 3").endswith("late\r\n.\r\n")


def test_uniqueIdsSurviveDeletionOfOthers(store, three):
    before = [l.split()[1] for l in multiline(three.command("UIDL"))[1]]
    three.command("DELE 1")
    three.command("QUIT")
    s = logged_in(store)
    after = [l.split()[1] for l in multiline(s.command("UIDL"))[1]]
    assert after == before[1:]


def test_uniqueIdsAreNeverReused(store, alice):
    deliver(store, [ALICE], b"a\r\n")
    s = logged_in(store)
    [first] = [l.split()[1] for l in multiline(s.command("UIDL"))[1]]
    s.command("DELE 1")
    s.command("QUIT")
    deliver(store, [ALICE], b"a\r\n")
    s = logged_in(store)
    [second] = [l.split()[1] for l in multiline(s.command("UIDL"))[1]]
    assert first != second


# -- pipelining and bad input ----------------------------------------------


def test_pipelinedCommandsAnswerInOrder(store, alice):
    deliver(store, [ALICE], b"Subject: p\r\n\r\nbody\r\n")
    s = POP3Session(store)
    reply = s.send(
        f"CAPA\r\nUSER {ALICE}\r\nPASS wonderland\r\nSTAT\r\nLIST\r\nUIDL 1\r\n"
        f"RETR 1\r\nDELE 1\r\nSTAT\r\nNOOP\r\nQUIT\r\n".encode()
    ).decode()
    markers = [
        "+OK capability list follows",
        "+OK send PASS",
        f"+OK {ALICE} has 1 messages",
        "+OK 1 20",
        "+OK 1 messages (20 octets)\r\n1 20\r\n.\r\n",
        "+OK 1 ",
        "+OK 20 octets\r\nSubject: p\r\n\r\nbody\r\n.\r\n",
        "+OK message 1 deleted",
        "+OK 0 0",
        "+OK\r\n",
        "+OK mailgate POP3 server signing off (0 messages left)",
    ]
    position = 0
    for marker in markers:
        found = reply.find(marker, position)
        assert found >= 0, (marker, reply[position:])
        position = found + len(marker)
    assert resultOf(store.listMessages(ALICE)) == []


def test_pipelinedCommandsWaitForTheFailureDelay(store, alice):
    s = POP3Session(store, authFailureDelay=2)
    assert s.send(f"USER {ALICE}\r\nPASS bad\r\nUSER {ALICE}\r\nPASS wonderland\r\nSTAT\r\n".encode()) == b"+OK send PASS\r\n"
    out = s.advance(2)
    assert out.startswith(b"-ERR [AUTH]")
    assert out.endswith(b"+OK 0 0\r\n")


def test_commandLineSplitAcrossPackets(store, alice):
    s = POP3Session(store)
    assert s.send(b"US") == b""
    assert s.send(b"ER " + ALICE.encode()) == b""
    assert s.send(b"\r") == b""
    assert s.send(b"\n") == b"+OK send PASS\r\n"


def test_bareLFLineEndsAreAccepted(session):
    assert session.send(b"CAPA\n").startswith(b"+OK capability list follows\r\n")


def test_commandOver255OctetsIsRefused(session):
    reply = session.command("USER " + "a" * 300)
    assert reply == "-ERR command line too long (the limit is 255 octets)\r\n"
    # 253 octets plus CRLF is allowed.
    ok = session.command("USER " + "a" * 248)
    assert ok == "+OK send PASS\r\n"
    assert session.login(ALICE, "wonderland").startswith("+OK")


def test_megabyteLineWithoutCRLFIsNotBuffered(session):
    for _ in range(16):
        assert session.send(b"A" * 65536) == b""
        assert len(session.protocol._buffer) < POP3Server.maxCommandLength
    assert session.send(b"\r\n") == b"-ERR command line too long (the limit is 255 octets)\r\n"
    assert session.login(ALICE, "wonderland").startswith("+OK")


def test_binaryGarbageAndNULsGetErrors(session):
    assert session.send(b"\x00\x01\x02\xff\r\n") == b"-ERR invalid characters in command line\r\n"
    assert session.send(b"USER al\x00ice\r\n") == b"-ERR invalid characters in command line\r\n"
    assert session.send(b"\xff\xfe\xfd\r\n") == b"-ERR command line is not valid UTF-8\r\n"
    assert not session.disconnected
    assert session.login(ALICE, "wonderland").startswith("+OK")


def test_aPasswordThatIsNotUTF8IsAPassword(store):
    """
    PASS takes its password's octets as they come, as AUTH PLAIN does and
    Dovecot does: a client in Latin-1 sends an accented password so, and a
    hash imported from Dovecot may be of those octets.  It was refused as
    a command line that is not UTF-8, and no failed login was logged.
    Other commands, USER too, must still be UTF-8; control characters are
    still refused.
    """
    addUser(store, "erin@example.org", b"p\xe4ss")
    s = POP3Session(store)
    assert s.command("USER erin@example.org") == "+OK send PASS\r\n"
    assert s.send(b"PASS p\xe4ss\r\n") == b"+OK erin@example.org has 0 messages (0 octets)\r\n"
    assert s.command("QUIT").startswith("+OK")
    s = POP3Session(store)
    assert s.command("USER erin@example.org") == "+OK send PASS\r\n"
    # The same password in UTF-8 is another password, refused as any.
    assert s.command("PASS p\u00e4ss") + s.advance(60).decode() == "-ERR [AUTH] invalid user name or password\r\n"
    assert s.send(b"pass \xff\r\n") == b"-ERR send USER first\r\n"
    assert s.send(b"USER erin\xe4@example.org\r\n") == b"-ERR command line is not valid UTF-8\r\n"
    assert s.send(b"PASS p\xe4ss\x01\r\n") == b"-ERR invalid characters in command line\r\n"
    assert s.command("USER erin@example.org") == "+OK send PASS\r\n"
    assert s.send(b"pass p\xe4ss\r\n").startswith(b"+OK erin@example.org has 0 ")


FOREIGN = b"-ERR this is a POP3 server, and that line is no POP3 command; closing the connection\r\n"


def forbiddenLines(logEvents):
    return [formatEvent(e) for e in logEvents if e.get("event") == "session.forbidden_command"]


def test_anHTTPRequestEndsTheSessionBeforeItsBodyRuns(session, logEvents):
    """
    The ALPACA attack's request: a browser made to POST to a POP3 port
    (over TLS, with a certificate that names the web site too) whose body
    holds POP3 commands.  Its request line ends the session at once with
    one -ERR that names nothing of it; the body's USER and PASS never run
    (no login attempt is logged or counted); one line is logged, with the
    client's address and the method alone, and the session is counted.
    It was: four -ERR for the HTTP lines, then the body's commands run.
    """
    body = f"USER {ALICE}\r\nPASS wonderland\r\nLIST\r\nQUIT\r\n".encode()
    request = (
        b"POST / HTTP/1.1\r\nHost: pop.example.org:995\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    assert session.send(request) == FOREIGN
    assert session.disconnected
    assert forbiddenLines(logEvents) == [
        "pop3 forbidden command peer=127.0.0.1:40000 why='HTTP request' verb=POST: session closed"
    ]
    assert not [e for e in logEvents if str(e.get("event")).startswith(("pop3.login", "auth."))]
    assert ALICE not in repr(logEvents) and "wonderland" not in repr(logEvents)
    registry = session.factory.metrics.registry
    assert registry.get_sample_value("mailgate_forbidden_commands_total", {"protocol": "pop3"}) == 1
    assert registry.get_sample_value("mailgate_pop3_commands_total", {"command": "OTHER"}) == 1
    assert registry.get_sample_value("mailgate_pop3_commands_total", {"command": "USER"}) == 0
    assert not any(
        sample.value for metric in registry.collect() if metric.name == "mailgate_logins"
        for sample in metric.samples if sample.name == "mailgate_logins_total"
    )


@pytest.mark.parametrize("method", ["CONNECT", "GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "TRACE"])
def test_everyHTTPMethodEndsTheSession(session, method):
    assert session.send(f"{method} / HTTP/1.1\r\nCAPA\r\n".encode()) == FOREIGN
    assert session.disconnected


@pytest.mark.parametrize("line", ["get / HTTP/1.1", "GET", "GETX / HTTP/1.1", "POST\t/ HTTP/1.1"])
def test_whatIsNoHTTPRequestLineIsAnUnknownCommand(session, line):
    """
    HTTP sends its methods in upper case, a space after: anything else is
    a command of no name, refused as before, and the session goes on.
    """
    assert session.command(line) == "-ERR unknown command\r\n"
    assert not session.disconnected


def test_anHTTPHeaderEndsTheSessionBeforeAnyCommand(session, logEvents):
    """
    A header field line ends a session in which no POP3 command came yet
    (an HTTP request whose first line was not seen as one), its field
    name not logged; after a command, it is an unknown command.
    """
    assert session.command("PROPFIND / HTTP/1.1") == "-ERR unknown command\r\n"
    assert session.send(b"User-Agent: Mozilla/5.0\r\nCAPA\r\n") == FOREIGN
    assert session.disconnected
    assert forbiddenLines(logEvents) == [
        "pop3 forbidden command peer=127.0.0.1:40000 why='HTTP header': session closed"
    ]


def test_anHTTPHeaderAfterACommandIsAnUnknownCommand(session):
    assert session.command("CAPA").startswith("+OK")
    assert session.command("Host: pop.example.org") == "-ERR unknown command\r\n"
    assert not session.disconnected


def test_anHTTPRequestAfterLoginEndsTheSessionAndReleasesTheMaildrop(store, alice, logEvents):
    """
    Logged in, the same: the session ends without the UPDATE state (the
    message marked deleted stays), its logout line says why, and the
    maildrop is free for the next session at once.
    """
    deliver(store, [ALICE], b"Subject: one\r\n\r\nbody\r\n")
    s = logged_in(store)
    assert s.command("DELE 1").startswith("+OK")
    assert s.send(b"GET / HTTP/1.1\r\nQUIT\r\n") == FOREIGN
    assert s.disconnected
    [logout] = [formatEvent(e) for e in logEvents if e.get("event") == "pop3.logout"]
    assert f"pop3 logout user={ALICE} peer=127.0.0.1:40000 reason='forbidden command' " in logout, logout
    again = logged_in(store)
    assert again.command("STAT").startswith("+OK 1 ")


def test_tooManyBadCommandsCloseTheSession(session):
    for _ in range(POP3Server.maxBadCommands - 1):
        session.command("BOGUS")
    assert not session.disconnected
    reply = session.command("BOGUS")
    assert reply.endswith("-ERR too many bad commands; closing the connection\r\n")
    assert session.disconnected


def test_onlyBadCommandsInARowCloseTheSession(session):
    """
    As Dovecot counts them: a command that succeeds starts the count of
    bad ones again, so a long session with an occasional unknown command
    is not cut off.
    """
    session.login(ALICE, "wonderland")
    for _ in range(3):
        for _ in range(POP3Server.maxBadCommands - 1):
            assert session.command("XTND XMIT").startswith("-ERR")
        assert session.command("NOOP") == "+OK\r\n"
    assert not session.disconnected
    for _ in range(POP3Server.maxBadCommands - 1):
        session.command("LAST")
    assert session.command("LAST").endswith("-ERR too many bad commands; closing the connection\r\n")
    assert session.disconnected


@pytest.mark.parametrize("loggedIn, success", [
    (False, "CAPA"), (False, "AUTH"), (True, "CAPA"), (True, "LIST"), (True, "UIDL"), (True, "RETR 1"),
    (True, "TOP 1 0"), (True, "TOP 1 1"),
])
def test_aMultiLineReplyForgivesTheRefusalsBeforeIt(store, alice, loggedIn, success):
    """
    Whatever writes the +OK: a listing, a message or a capability list
    starts the count again as a one-line +OK does (a client that asks for
    a message deleted meanwhile before each one it downloads is not cut
    off at its twentieth download).  Before, only one-line replies did.
    """
    deliver(store, [ALICE], b"Subject: one\r\n\r\n.body\r\n")
    session = logged_in(store) if loggedIn else POP3Session(store)
    refused = "RETR 9" if loggedIn else "XTND XMIT"
    for _ in range(3):
        for _ in range(POP3Server.maxBadCommands - 1):
            assert session.command(refused).startswith("-ERR ")
        assert session.command(success).startswith("+OK")
    assert not session.disconnected
    assert session.command("CAPA").startswith("+OK capability list follows\r\n")


def test_floodOfPipelinedCommandsPausesReading(session):
    session.command(f"USER {ALICE}")
    session.protocol.authFailureDelay = 1
    # A PASS that waits, then far more queued commands than allowed.
    data = b"PASS bad\r\n" + b"CAPA\r\n" * (POP3Server.maxQueuedCommands + 10)
    session.send(data)
    assert session.transport.producerState == "paused"
    session.advance(1)
    assert session.transport.producerState == "producing"


# -- timeouts --------------------------------------------------------------


def test_twistedDefect_idleTimeoutIsTenMinutes(store, alice):
    # RFC 1939's autologout: a logged-in session idle for ten minutes.
    session = logged_in(store)
    assert POP3Server.idleTimeout >= 600
    assert session.advance(599) == b""
    assert not session.disconnected
    assert session.command("NOOP") == "+OK\r\n"
    assert session.advance(599) == b""
    out = session.advance(1)
    assert out == b"-ERR autologout: idle for too long\r\n"
    assert session.disconnected
    registry = session.factory.metrics.registry
    assert registry.get_sample_value("mailgate_timeouts_total", {"protocol": "pop3", "kind": "idle"}) == 1


def test_idleTimeoutIsConfigurable(store, alice):
    s = POP3Session(store, idleTimeout=30)
    assert s.advance(29) == b""
    assert s.advance(1).startswith(b"-ERR autologout")


def test_theGreetingIsTheAdministrators(store, alice):
    """
    --greeting replaces the text after +OK; the APOP timestamp still
    follows it, and APOP works with it.
    """
    s = POP3Session(store, greeting="Mail service ready.")
    assert s.greeting.startswith("+OK Mail service ready. <")
    assert s.challenge is not None and s.greeting == f"+OK Mail service ready. {s.challenge}\r\n"
    digest = hashlib.md5(s.challenge.encode() + b"wonderland").hexdigest()
    assert s.command(f"APOP {ALICE} {digest}").startswith("+OK ")
    plain = POP3Session(store, greeting="Ready", apop=False)
    assert plain.greeting == "+OK Ready\r\n"


def test_aClientThatDoesNotLogInIsDisconnectedAfterThreeMinutes(session):
    """
    Three minutes from the greeting, as Dovecot's login processes allow,
    and commands meanwhile do not buy more time: a client cannot hold a
    connection it never logs in on by sending CAPA now and then.
    """
    assert POP3Server.loginTimeout == 180
    session.advance(100)
    assert session.command("CAPA").startswith("+OK")
    session.command(f"USER {ALICE}")
    assert session.advance(79) == b""
    assert not session.disconnected
    out = session.advance(1)
    assert out == b"-ERR no login within 180 seconds; closing the connection\r\n"
    assert session.disconnected
    registry = session.factory.metrics.registry
    assert registry.get_sample_value("mailgate_timeouts_total", {"protocol": "pop3", "kind": "login"}) == 1
    assert registry.get_sample_value("mailgate_timeouts_total", {"protocol": "pop3", "kind": "idle"}) == 0


def test_aLoginInTimeIsNotCutOff(store, alice):
    session = POP3Session(store)
    session.advance(179)
    assert session.login(ALICE, "wonderland").startswith("+OK ")
    # Logged in: the idle timer alone applies from here.
    assert session.advance(300) == b""
    assert not session.disconnected
    assert session.command("STAT").startswith("+OK 0 ")


def test_aLoginAnswerDueAfterTheDeadlineIsNotSent(store, alice):
    """
    A login whose answer comes after the deadline (it waits on the failure
    delay here) finds the session closed and says nothing more; the user
    can log in on the next connection.
    """
    session = POP3Session(store, loginTimeout=10, authFailureDelay=20)
    session.command(f"USER {ALICE}")
    assert session.command("PASS wrong") == ""
    out = session.advance(10)
    assert out == b"-ERR no login within 10 seconds; closing the connection\r\n"
    assert session.disconnected
    assert session.advance(20) == b""
    assert logged_in(store).command("STAT").startswith("+OK")


def test_theLoginTimeoutIsConfigurableAndZeroTurnsItOff(store, alice):
    short = POP3Session(store, loginTimeout=5)
    assert short.advance(5) == b"-ERR no login within 5 seconds; closing the connection\r\n"
    one = POP3Session(store, loginTimeout=1)
    assert one.advance(1) == b"-ERR no login within 1 second; closing the connection\r\n"
    unlimited = POP3Session(store, loginTimeout=0)
    assert unlimited.advance(599) == b""
    assert not unlimited.disconnected
    assert unlimited.login(ALICE, "wonderland").startswith("+OK ")


# -- APOP offered only where it can work -----------------------------------


def test_autoAPOPOffersTimestampOnlyWhileSomeUserHasAPOP(store):
    from mailgate.pop3.factory import APOPAdvertiser
    from mailgate.testing import pop3Factory

    advertiser = APOPAdvertiser(store)
    factory = pop3Factory(store, apop=advertiser)
    addUser(store, BOB, "builder")
    resultOf(advertiser.refresh())
    assert POP3Session(store, factory=factory).challenge is None
    addUser(store, ALICE, "wonderland", apop=True)
    resultOf(advertiser.refresh())
    session = POP3Session(store, factory=factory)
    assert session.challenge is not None
    digest = hashlib.md5(session.challenge.encode() + b"wonderland").hexdigest()
    assert session.command(f"APOP {ALICE} {digest}").startswith("+OK")


class SlowAPOPStore:
    """
    A store that answers whether some user has APOP only when the test
    says (a database still starting).
    """

    def __init__(self):
        self.asked = []

    def digestLoginUsers(self):
        d = defer.Deferred()
        self.asked.append(d)
        return d.addCallback(lambda hasAPOP: (hasAPOP, hasAPOP))


@pytest.mark.parametrize("hasAPOP", [False, True])
def test_atStartTheGreetingWaitsForTheStoreToSayWhetherAPOPIsOffered(store, hasAPOP):
    """
    Clients waiting when the server starts (queued by socket activation)
    are greeted once the store has said whether any user has APOP, not
    with a guess: a timestamp offered in vain makes curl try APOP for a
    user without it, and fail.  Commands sent meanwhile wait their turn.
    """
    from mailgate.pop3.factory import APOPAdvertiser
    from mailgate.testing import pop3Factory

    slow = SlowAPOPStore()
    advertiser = APOPAdvertiser(slow)
    clock = Clock()
    factory = pop3Factory(store, clock, apop=advertiser)
    advertiser.refresh()
    waiting = [POP3Session(store, clock=clock, factory=factory) for _ in range(2)]
    gone = POP3Session(store, clock=clock, factory=factory)
    assert [s.greeting for s in waiting + [gone]] == ["", "", ""]
    assert waiting[0].send(b"CAPA\r\n") == b""
    gone.protocol.transport.loseConnection()
    gone.protocol.connectionLost(None)
    slow.asked[0].callback(hasAPOP)
    out = waiting[0].advance(0).decode()
    greeting, _, capa = out.partition("\r\n")
    assert greeting.startswith("+OK mailgate POP3 server ready")
    assert ("<" in greeting) is hasAPOP
    assert capa.startswith("+OK") and "\r\nUIDL\r\n" in capa
    assert (waiting[0].protocol.challenge is not None) is hasAPOP
    assert waiting[1].advance(0).decode().startswith("+OK mailgate POP3 server ready")
    assert gone.advance(0) == b""
    # From then on, greetings go at once.
    assert POP3Session(store, clock=clock, factory=factory).greeting.startswith("+OK")


def test_aStoreThatDoesNotAnswerAtStartHoldsTheGreetingOnlyAWhile(store):
    from mailgate.pop3.factory import APOP_DECISION_WAIT, APOPAdvertiser
    from mailgate.testing import pop3Factory

    slow = SlowAPOPStore()
    advertiser = APOPAdvertiser(slow)
    clock = Clock()
    factory = pop3Factory(store, clock, apop=advertiser)
    advertiser.refresh()
    s = POP3Session(store, clock=clock, factory=factory)
    assert s.greeting == ""
    assert s.advance(APOP_DECISION_WAIT - 0.1) == b""
    # As assumed until the store answers: with a timestamp.
    assert s.advance(0.1).startswith(b"+OK mailgate POP3 server ready <")
    assert s.command("CAPA").startswith("+OK")
    # A store that fails at start does not hold greetings either.
    failing = SlowAPOPStore()
    advertiser = APOPAdvertiser(failing)
    factory = pop3Factory(store, clock, apop=advertiser)
    advertiser.refresh()
    s = POP3Session(store, clock=clock, factory=factory)
    failing.asked[0].errback(RuntimeError("database starting"))
    assert s.advance(0).startswith(b"+OK mailgate POP3 server ready <")


def test_aBugInACommandCostsOneErrorNotTheSession(three, monkeypatch):
    """
    An unexpected exception inside a command handler is answered with
    -ERR [SYS/TEMP] (its text stays in the log) and the session goes on.
    """

    def broken(self, argument):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(POP3Server, "pop3_NOOP", broken)
    reply = three.command("NOOP")
    assert reply == "-ERR [SYS/TEMP] service temporarily unavailable: internal server error; try again later\r\n"
    assert "secret" not in reply
    assert not three.disconnected
    assert three.command("STAT").startswith("+OK 3 ")


def test_aSessionEndsWithOneLogLine(three):
    """
    One line per session, at its end: what an administrator greps for,
    with the same facts as fields for structured log observers.
    """
    events = []
    three.protocol.log = Logger(observer=events.append)
    three.command("RETR 1")
    three.command("TOP 2 0")
    three.command("DELE 3")
    assert three.command("QUIT").startswith("+OK")
    [event] = events
    text = formatEvent(event)
    assert text.startswith(f"pop3 logout user={ALICE} peer=")
    assert f"reason='quit' messages=3 retr=1/{SIZES[0]} top=1 deleted=1" in text
    assert (event["user"], event["reason"], event["deleted"], event["retr"]) == (ALICE, "quit", 1, 1)
    # The JSON record's field is the text's reason= (README, Logs), as
    # smtp.disconnect's is: it was "why", so a filter on .reason found no
    # pop3.logout.
    record = eventAsRecord(event)
    assert {k: record[k] for k in ("reason", "messages", "retr", "retrBytes", "top", "deleted")} == {
        "reason": "quit", "messages": 3, "retr": 1, "retrBytes": SIZES[0], "top": 1, "deleted": 1,
    }
    assert "why" not in record


# -- what an ended session leaves --------------------------------------------


@pytest.mark.parametrize("ending", ["quit", "disconnect"])
def test_anEndedSessionIsFreedWithoutTheCycleCollector(store, alice, ending, monkeypatch):
    """
    A POP3 session that read mail and ended (QUIT, or the client gone) is
    freed as soon as its connection lets go, by reference counting alone:
    nothing it leaves behind (the maildrop, its lock, the store's registry
    of sessions, the timers) refers back to it.
    """
    # A log event names the session it came from.  This test process has
    # not begun logging, so Twisted keeps its events in memory (its
    # start-up buffer), and with them the session; under twistd they are
    # written out and dropped.  The session's events go nowhere here.
    monkeypatch.setattr(POP3Server, "log", Logger(observer=lambda event: None))
    deliver(store, [ALICE], b"Subject: one\r\n\r\nbody\r\n")
    with withoutCycleCollector():
        s = logged_in(store)
        assert s.command("RETR 1").startswith("+OK")
        assert s.command("TOP 1 0").startswith("+OK")
        if ending == "quit":
            assert s.command("QUIT").startswith("+OK")
        s.transport.loseConnection()
        s.protocol.connectionLost(Failure(ConnectionDone()))
        ended = weakref.ref(s.protocol)
        del s
        assert ended() is None


def test_quitCountsTheMessagesLeftInPlural(store, three):
    """
    QUIT's free-form text says "2 messages left" (and "1 message left",
    test_quitRemovesMarkedMessages): the noun follows the count.
    """
    three.command("DELE 1")
    assert three.command("QUIT") == "+OK mailgate POP3 server signing off (2 messages left)\r\n"


def _releasesAnsweredByHand(store):
    """
    Make each maildrop C{store} opens answer its release (the lock's, a
    database round trip where locks are shared) only when the test fires
    the L{defer.Deferred} it appends to the list returned.  Undone by
    C{del store.openMaildrop}.
    """
    pending = []
    openMaildrop = store.openMaildrop

    def answeredByHand(maildrop):
        release = maildrop.release

        def releaseAnsweredByHand():
            release()
            pending.append(defer.Deferred())
            return pending[-1]

        maildrop.release = releaseAnsweredByHand
        return maildrop

    store.openMaildrop = lambda identity, peer=None: openMaildrop(identity, peer).addCallback(answeredByHand)
    return pending


@pytest.mark.parametrize("delete", [False, True])
def test_aQuitWhoseLockReleaseDoesNotAnswerIsAnsweredAfterAFewSeconds(store, alice, delete):
    """
    QUIT's reply waits for the maildrop's lock to be released, so that a
    client logging in again at once finds it free; but a release the
    database does not answer (silent: its connection is given up only
    after 75 s) held the reply longer than clients wait (60 s for some),
    which then said QUIT failed, though nothing was to be removed or the
    removal had committed.  The reply goes out after QUIT_RELEASE_WAIT
    seconds, once; the release goes on and ends the session later.
    """
    from mailgate.pop3.transaction import QUIT_RELEASE_WAIT

    for message in THREE:
        deliver(store, [ALICE], message)
    pending = _releasesAnsweredByHand(store)
    try:
        s = POP3Session(store)
        assert s.login(ALICE, "wonderland").startswith("+OK")
        if delete:
            assert s.command("DELE 2").startswith("+OK")
        assert s.command("QUIT") == ""
        assert len(pending) == 1
        assert s.advance(QUIT_RELEASE_WAIT - 0.1) == b""
        left = 2 if delete else 3
        assert s.advance(0.1) == b"+OK mailgate POP3 server signing off (%d messages left)\r\n" % left
        assert s.disconnected
        pending[0].callback(None)
        assert s.send(b"") == b"" and s.clock.getDelayedCalls() == []
    finally:
        del store.openMaildrop
    assert len(resultOf(store.listMessages(ALICE))) == left


def test_aQuitIsAnsweredAsSoonAsTheLockIsReleased(store, alice):
    """
    A release that takes a moment (a database round trip): the reply goes
    out as soon as it is done, not at QUIT_RELEASE_WAIT, and no timer is
    left behind.
    """
    pending = _releasesAnsweredByHand(store)
    try:
        s = POP3Session(store)
        assert s.login(ALICE, "wonderland").startswith("+OK")
        assert s.command("QUIT") == ""
        assert s.advance(0.5) == b""
        pending[0].callback(None)
        assert s.send(b"").startswith(b"+OK mailgate POP3 server signing off")
        assert s.disconnected and s.clock.getDelayedCalls() == []
    finally:
        del store.openMaildrop


def test_aLoginRefusedForItsLoginDelayIsRefusedOnceTheMaildropIsReleased(store, alice):
    """
    RFC 1939 section 4: the lock a refused login took is released before
    the refusal.  A login refused for LOGIN-DELAY had opened (locked) the
    maildrop; the -ERR went out while its release (a database round trip
    where locks are shared between nodes) was still under way, and a
    client logging in again at once could get [IN-USE].
    """
    first = POP3Session(store, loginDelay=3600)
    assert first.login(ALICE, "wonderland").startswith("+OK")
    first.command("QUIT")
    opened = []
    openMaildrop = store.openMaildrop

    def openSlowlyReleased(identity, peer=None):
        def slow(maildrop):
            release, pending = maildrop.release, defer.Deferred()

            def slowRelease():
                release()
                return pending

            maildrop.release = slowRelease
            opened.append(pending)
            return maildrop

        return openMaildrop(identity, peer).addCallback(slow)

    store.openMaildrop = openSlowlyReleased
    try:
        second = POP3Session(store, loginDelay=3600)
        assert second.command("USER " + ALICE).startswith("+OK")
        assert second.command("PASS wonderland") == ""
        assert len(opened) == 1
        opened[0].callback(None)
        assert second.send(b"").decode().startswith("-ERR [LOGIN-DELAY]")
    finally:
        del store.openMaildrop
