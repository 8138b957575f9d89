"""
Dovecot's C{pop3_client_workarounds} in mailgate (C{--pop3-client-workarounds},
L{mailgate.pop3.workarounds}), without sockets: a L{POP3Session} over a
StringTransport against a real SQLite store, and the response blocks fed
a message in chunks of every size.

What Dovecot 2.3.19 sends with them (measured: tests/test_pop3_workarounds_vs_dovecot.py
compares the two octet for octet):

    - C{outlook-no-nuls}: every NUL of the message, header and body, goes
      out as 0x80, in RETR and TOP alike; one octet for one, so LIST,
      STAT and C{+OK n octets} are unchanged, and dot-stuffing is as
      without it (C{".\\0"} at a line start goes out as C{"..\\x80"}).
    - C{oe-ns-eoh}: a message whose header has no end (no empty line)
      gets C{CRLF} after its last line, in RETR and in every TOP (its
      whole text is header).  LIST, STAT and C{+OK n octets} still count
      the message as stored: RETR sends two octets more than they say.
      A message of C{CRLF} alone, or one whose body begins at once
      (C{"\\r\\nbody"}), has its header's end, and is sent as it is.

mailgate's choices where it differs from Dovecot are those of its default
(tests/test_pop3_vs_dovecot.py): it stuffs the message's first line too,
and sends the empty message as no line at all, so with C{oe-ns-eoh} the
empty message is the one empty line (Dovecot: two, its own line end for a
message without one and the header's end).
"""

import pytest
from twisted.internet import defer

from mailgate.pop3.dotstuff import stuffed
from mailgate.pop3.factory import POP3Factory
from mailgate.pop3.responses import END
from mailgate.pop3.workarounds import KNOWN, WorkedAroundBlocks, parseWorkarounds
from mailgate.store.sql import CHUNK_SIZE
from mailgate.testing import POP3Session, addUser, deliver

ALICE = "alice@example.org"
BOTH = ("outlook-no-nuls", "oe-ns-eoh")


@pytest.fixture
def alice(store):
    addUser(store, ALICE, "wonderland")
    return ALICE


def loggedIn(store, workarounds=()):
    s = POP3Session(store, apop=False, clientWorkarounds=workarounds)
    assert s.login(ALICE, "wonderland").startswith("+OK ")
    return s


def response(s, command):
    """
    The status line and the rest of a multi-line response, as octets.
    """
    status, _, rest = s.send(command.encode("ascii") + b"\r\n").partition(b"\r\n")
    return status, rest


# -- outlook-no-nuls ---------------------------------------------------------

NULS = b"Subject: a\0b\r\nX: \0\r\n\r\nbody\0here\r\n\0\r\n\0.x\r\n.\0\r\n"


def test_nulsGoOutAs0x80InRetrAndTop(store, alice):
    """
    With outlook-no-nuls, RETR and TOP send every NUL of header and body
    as 0x80 (Dovecot's bytes); the octet count is the stored size, which
    is what is sent (one octet for one), and a "." at a line start is
    stuffed as without the workaround.
    """
    deliver(store, [ALICE], NULS)
    s = loggedIn(store, ("outlook-no-nuls",))
    assert s.command("LIST 1") == f"+OK 1 {len(NULS)}\r\n"
    assert response(s, "RETR 1") == (
        b"+OK %d octets" % len(NULS),
        b"Subject: a\x80b\r\nX: \x80\r\n\r\nbody\x80here\r\n\x80\r\n\x80.x\r\n..\x80\r\n.\r\n",
    )
    assert response(s, "TOP 1 0")[1] == b"Subject: a\x80b\r\nX: \x80\r\n\r\n.\r\n"
    assert response(s, "TOP 1 2")[1] == b"Subject: a\x80b\r\nX: \x80\r\n\r\nbody\x80here\r\n\x80\r\n.\r\n"


def test_withoutWorkaroundsNulsGoOutAsStored(store, alice):
    """
    The default: the message as stored, NULs and all.
    """
    deliver(store, [ALICE], NULS)
    s = loggedIn(store)
    assert response(s, "RETR 1")[1] == stuffed(NULS)
    assert b"\x80" not in response(s, "TOP 1 5")[1]


def test_nulsAtChunkBoundariesOfAStoredMessage(store, alice):
    """
    A message of three of the store's chunks, a NUL as the last octet of
    one chunk and as the first of the next, dot lines at the chunk starts
    (stuffed at the offsets the store learnt at delivery): RETR sends the
    message with 0x80 for each NUL, stuffed and terminated exactly.
    """
    head = b"Subject: big\r\n\r\n"
    filler = b"x" * 78 + b"\r\n"
    message = head
    while len(message) + len(filler) <= CHUNK_SIZE - 3:
        message += filler
    message += b"y" * (CHUNK_SIZE - 3 - len(message)) + b"\r\n\0"
    assert len(message) == CHUNK_SIZE
    message += b"\0\0.\r\n.\0\r\n"
    while len(message) + len(filler) <= 2 * CHUNK_SIZE:
        message += filler
    message += b"z" * (2 * CHUNK_SIZE - len(message) - 2) + b"\r\n"
    assert len(message) == 2 * CHUNK_SIZE
    message += b".\0dotted\r\n\0last\0\r\n"
    deliver(store, [ALICE], message)
    s = loggedIn(store, ("outlook-no-nuls",))
    status, rest = response(s, "RETR 1")
    assert status == b"+OK %d octets" % len(message)
    assert rest == stuffed(message.replace(b"\0", b"\x80"))
    assert rest.count(b"\r\n.\r\n") == 1 and b"\0" not in rest


# -- oe-ns-eoh ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message, sent",
    [
        # No empty line: the header's end is added after the last line.
        (b"Subject: no separator\r\nFrom: a@example.net\r\n",
         b"Subject: no separator\r\nFrom: a@example.net\r\n\r\n.\r\n"),
        (b".Subject: a dot first\r\nA: b\r\n", b"..Subject: a dot first\r\nA: b\r\n\r\n.\r\n"),
        # The empty message: one empty line, its header's end.
        (b"", b"\r\n.\r\n"),
        # Messages with their header's end: as they are.
        (b"\r\n", b"\r\n.\r\n"),
        (b"\r\nno header at all\r\n", b"\r\nno header at all\r\n.\r\n"),
        (b"Subject: x\r\n\r\n", b"Subject: x\r\n\r\n.\r\n"),
        (b"Subject: d\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n",
         b"Subject: d\r\n\r\n..one\r\n...two\r\n..\r\nend\r\n.\r\n"),
        (b"Subject: normal\r\n\r\nhello\r\n", b"Subject: normal\r\n\r\nhello\r\n.\r\n"),
    ],
)
def test_theMissingEndOfHeadersIsAdded(store, alice, message, sent):
    """
    With oe-ns-eoh, RETR sends a message whose header has no end with the
    empty line after it, and messages that have one as they are.  LIST
    and RETR's octet count stay the stored size (as Dovecot's do).
    """
    deliver(store, [ALICE], message)
    s = loggedIn(store, ("oe-ns-eoh",))
    assert s.command("LIST 1") == f"+OK 1 {len(message)}\r\n"
    assert response(s, "RETR 1") == (b"+OK %d octets" % len(message), sent)
    s.command("QUIT")
    assert response(loggedIn(store), "RETR 1")[1] == stuffed(message)


def test_topSendsTheMissingEndOfHeadersToo(store, alice):
    """
    TOP n 0 and TOP n k of a message without a header's end: all of it
    is header, and the empty line follows, as Dovecot sends it; a
    message with its header's end is cut after it as always.
    """
    deliver(store, [ALICE], b"Subject: no separator\r\nFrom: a@example.net\r\n")
    deliver(store, [ALICE], b"Subject: d\r\n\r\n.one\r\n..two\r\n")
    s = loggedIn(store, BOTH)
    for lines in (0, 1, 2, 100):
        assert response(s, f"TOP 1 {lines}")[1] == b"Subject: no separator\r\nFrom: a@example.net\r\n\r\n.\r\n"
    assert response(s, "TOP 2 0")[1] == b"Subject: d\r\n\r\n.\r\n"
    assert response(s, "TOP 2 1")[1] == b"Subject: d\r\n\r\n..one\r\n.\r\n"


def test_aMessageWithWorkaroundsIsCountedAsRetrieved(store, alice):
    """
    A RETR sent whole in one write under workarounds is counted as one
    retrieved, of the stored size, as without them.
    """
    deliver(store, [ALICE], b"Subject: x\r\n")
    s = loggedIn(store, BOTH)
    response(s, "RETR 1")
    assert (s.protocol._stats["retr"], s.protocol._stats["retrBytes"]) == (1, len(b"Subject: x\r\n"))


# -- the blocks, whatever the chunking ---------------------------------------


class ChunkedBody:
    """
    An L{mailgate.interfaces.IMessageBody} read C{size} octets at a time
    (C{whole} given when one piece holds it all), with the header's size
    as a store records it, and the dot offsets known or not.
    """

    def __init__(self, message, size, offsets, headerOnly=False):
        if message.startswith(b"\r\n"):
            header = 2
        else:
            end = message.find(b"\n\r\n")
            header = len(message) if end < 0 else end + 3
        if headerOnly:
            message = message[:header]
        self.size = len(message)
        self.headerSize = header
        self.needsStuffing = True
        self.dotOffsets = None
        if offsets:
            self.dotOffsets = [i for i in range(len(message)) if message[i : i + 1] == b"." and
                               (i == 0 or message[i - 1 : i] == b"\n")]
        self.whole = message if size >= len(message) else None
        self._pieces = [message[i : i + size] for i in range(0, len(message), size)]

    def read(self):
        return defer.succeed(self._pieces.pop(0) if self._pieces else b"")


def sentBy(blocks):
    out = []
    whole = blocks.whole()
    if whole is not None:
        return whole
    while True:
        block = blocks.nextBlock()
        if block is END:
            return b"".join(out)
        out.append(block.result if isinstance(block, defer.Deferred) else block)


def expected(message, bodyLines, workarounds):
    """
    What RETR (C{bodyLines} C{None}) or TOP sends, from the whole message:
    the reference the chunked response must equal.
    """
    if message.startswith(b"\r\n"):
        header = 2
    else:
        end = message.find(b"\n\r\n")
        header = len(message) if end < 0 else end + 3
    text = message
    if bodyLines is not None:
        body = message[header:]
        cut = 0
        for _ in range(bodyLines):
            end = body.find(b"\n", cut)
            if end < 0:
                cut = len(body)
                break
            cut = end + 1
        text = message[:header] + body[:cut]
    if "outlook-no-nuls" in workarounds:
        text = text.replace(b"\0", b"\x80")
    out = stuffed(text)
    if "oe-ns-eoh" in workarounds and not (message[:header].endswith(b"\n\r\n") or message[:header] == b"\r\n"):
        out = out[: -len(b".\r\n")] + b"\r\n.\r\n"
    return out


AWKWARD = [
    b"",
    b"\0",
    b"\r\n",
    b".\r\n",
    b"\0.\r\n.\0\r\n",
    b"Subject: \0\r\n",
    b".Subject: x\r\nA: b\r\n",
    b"Subject: x\r\n\r\n",
    b"Subject: x\r\n\r\n.\r\n.\r\n",
    b"Subject: a\0b\r\nX: \0\r\n\r\nbody\0here\r\n\0\r\n\0.x\r\n.\0\r\n..\r\n",
    b"\r\n.body first\r\n\0\r\n",
    b"A: b\r\n\r\n\r\n.\r\n\r\n..\0\r\n",
]


@pytest.mark.parametrize("workarounds", [("outlook-no-nuls",), ("oe-ns-eoh",), BOTH])
@pytest.mark.parametrize("message", AWKWARD)
def test_theBlocksAreExactWhateverTheChunking(message, workarounds):
    """
    Every awkward message, read in pieces of every size from one octet to
    all of it, with the dot offsets known and not, as RETR and as TOP of
    0 to 3 lines: the same octets as the message treated whole (NULs
    replaced, stuffed, terminated, the header's end added where it is
    missing).
    """
    for size in range(1, max(len(message), 1) + 1):
        for offsets in (True, False):
            for bodyLines in (None, 0, 1, 2, 3):
                body = ChunkedBody(message, size, offsets, headerOnly=bodyLines == 0)
                got = sentBy(WorkedAroundBlocks(body, bodyLines, workarounds))
                assert got == expected(message, bodyLines, workarounds), (size, offsets, bodyLines)


# -- the setting -------------------------------------------------------------


def test_namesAreDovecotsSpacedOrCommaSeparated():
    assert KNOWN == ("outlook-no-nuls", "oe-ns-eoh")
    assert parseWorkarounds("oe-ns-eoh outlook-no-nuls") == BOTH
    assert parseWorkarounds("oe-ns-eoh,outlook-no-nuls, oe-ns-eoh") == BOTH
    assert parseWorkarounds(["oe-ns-eoh"]) == ("oe-ns-eoh",)
    assert parseWorkarounds("") == parseWorkarounds([]) == ()


def test_anUnknownNameIsRefusedNamingTheKnownOnes():
    with pytest.raises(ValueError) as e:
        parseWorkarounds("outlook-no-nuls outlook-idle")
    assert str(e.value) == "unknown POP3 client workaround 'outlook-idle' (known: outlook-no-nuls, oe-ns-eoh)"
    with pytest.raises(ValueError):
        POP3Factory(portal=None, reactor=None, clientWorkarounds="oe-ns-eoh delay-newmail")


def test_aSessionKeepsTheWorkaroundsItBeganWith(store, alice):
    """
    The factory's workarounds are each session's as it is built: changed
    (as a reload changes them), the sessions under way keep theirs.
    """
    deliver(store, [ALICE], b"Subject: \0\r\n")
    before = POP3Session(store, apop=False)
    factory = before.factory
    factory.clientWorkarounds = ("outlook-no-nuls",)
    after = POP3Session(store, factory=factory)
    assert after.login(ALICE, "wonderland").startswith("+OK ")
    assert response(after, "RETR 1")[1] == b"Subject: \x80\r\n.\r\n"
    after.command("QUIT")
    assert before.login(ALICE, "wonderland").startswith("+OK ")
    assert response(before, "RETR 1")[1] == b"Subject: \0\r\n.\r\n"
