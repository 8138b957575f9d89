"""
Hostile input, generated: whatever octets a client sends, in whatever
pieces, the servers answer with well-formed replies, never raise, and never
lose track of where commands begin.  (Hypothesis, seeded by its database;
the number of examples is bounded so the suite stays fast.)
"""

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailgate.smtp import data
from mailgate.smtp.data import DataReader
from mailgate.message import MessageSpool
from mailgate.testing import POP3Session, SMTPSession, addUser, deliver, memoryStore

ALICE = "alice@example.org"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_POP3_REPLY = re.compile(rb"^(\+OK|-ERR)( |\r\n)")
_SMTP_REPLY = re.compile(rb"^[2-5][0-9][0-9][ -]")

commandWords = st.sampled_from(
    [b"USER", b"PASS", b"APOP", b"AUTH", b"STLS", b"CAPA", b"QUIT", b"STAT", b"LIST",
     b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"XYZ", b""]
)
junk = st.binary(max_size=300)
lines = st.lists(
    st.one_of(
        st.tuples(commandWords, junk).map(lambda t: t[0] + b" " + t[1]),
        junk,
    ),
    max_size=12,
)
splits = st.lists(st.integers(min_value=1, max_value=50), max_size=20)


def _pieces(data, cuts):
    position = 0
    for cut in cuts:
        if position >= len(data):
            break
        yield data[position : position + cut]
        position += cut
    if position < len(data):
        yield data[position:]


def _store():
    store = memoryStore()
    addUser(store, ALICE, "secret")
    deliver(store, [ALICE], b"Subject: hi\r\n\r\n.dot\r\nbody\r\n")
    return store


@FUZZ
@given(lines=lines, cuts=splits)
def test_pop3AnswersEveryLineWithAStatus(lines, cuts):
    store = _store()
    s = POP3Session(store)
    # Logged in half the time, so both states are exercised.
    if len(lines) % 2:
        assert s.login(ALICE, "secret").startswith("+OK")
    data = b"".join(line.replace(b"\n", b" ") + b"\r\n" for line in lines)
    output = b"".join(s.send(piece) for piece in _pieces(data, cuts))
    output += s.advance(2)
    if not s.disconnected:
        # The session is still in step: a NOOP/CAPA gets its own answer.
        assert s.send(b"CAPA\r\n").startswith(b"+OK capability list follows\r\n")
    for line in output.split(b"\r\n"):
        assert b"Traceback" not in line


@FUZZ
@given(lines=lines, cuts=splits)
def test_smtpAnswersEveryCommandWithACode(lines, cuts):
    store = _store()
    s = SMTPSession(store)
    data = b"".join(line.replace(b"\n", b" ") + b"\r\n" for line in lines)
    output = b"".join(s.send(piece) for piece in _pieces(data, cuts))
    for reply in output.split(b"\r\n")[:-1]:
        assert _SMTP_REPLY.match(reply), reply
    if not s.disconnected:
        assert s.command("NOOP") == "250 2.0.0 OK\r\n"


@FUZZ
@given(body=st.binary(max_size=3000), cuts=splits)
def test_dataEndsOnlyAtCRLFDotCRLF(body, cuts):
    """
    Whatever the body and however it is split, the reader stops exactly at
    the first CRLF "." CRLF (or the start of data followed by "." CRLF), and
    returns what came after it untouched.
    """
    wire = body + b"\r\n.\r\nTAIL"
    expectedEnd = (b"\r\n" + wire).find(b"\r\n.\r\n")
    reader = DataReader(MessageSpool(), maxSize=10**6, maxLineLength=10**6)
    rest = None
    for piece in _pieces(wire, cuts):
        if rest is not None:
            rest += piece
            continue
        rest = reader.feed(piece)
    assert rest is not None
    assert rest == wire[expectedEnd + 3 :]


def _rfc5321Data(wire):
    """
    RFC 5321 section 4.5.2, one line at a time: the content DATA stores
    for C{wire} (CRLF line ends; a bare LF made CRLF, a leading dot taken
    away unless the line is a lone "."), the octets after the end, and
    whether a bare LF was seen; or C{None} if C{wire} never ends the data.
    """
    position, previousCRLF, lines, bare = 0, True, [], False
    while True:
        newline = wire.find(b"\n", position)
        if newline < 0:
            return None
        line, position = wire[position : newline + 1], newline + 1
        if previousCRLF and line == b".\r\n":
            return b"".join(lines), wire[position:], bare
        previousCRLF = line.endswith(b"\r\n")
        if line[:1] == b"." and line not in (b".\n", b".\r\n"):
            line = line[1:]
        if not line.endswith(b"\r\n"):
            bare, line = True, line[:-1] + b"\r\n"
        lines.append(line)


def _readData(pieces, flushAt):
    saved = data.FLUSH_PARTIAL_LINE
    data.FLUSH_PARTIAL_LINE = flushAt
    try:
        reader = DataReader(MessageSpool(), maxSize=10**6)
        rest = None
        for piece in pieces:
            if rest is not None:
                rest += piece
                continue
            rest = reader.feed(piece)
            # A long line is stored as it comes, not held.
            assert len(reader._carry) <= max(flushAt, 2)
        return reader, rest
    finally:
        data.FLUSH_PARTIAL_LINE = saved


dataWire = st.lists(
    st.one_of(
        # Mostly the octets that matter (a dense mix makes every pairing of
        # them, at every piece boundary, likely), some other text.
        st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"a", b"\r\n.\r\n", b"\xff"]),
        st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"a", b"\r\n.\r\n", b"\xff"]),
        st.sampled_from([b"\n.\n", b"\n.\r\n", b"Subject: x", b"x" * 20, b"\r\r\n", b"\x00"]),
        st.binary(max_size=8),
    ),
    max_size=40,
).map(b"".join)
# Pieces of a few octets end pieces of a long line at every kind of octet:
# after a ".", between CR and LF.
smallSplits = st.lists(st.integers(min_value=1, max_value=4), max_size=60)


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(body=dataWire, cuts=smallSplits, flushAt=st.integers(min_value=1, max_value=6), ended=st.booleans())
# A piece of a long line that ends in "." (not the start of a line, nor
# of ".\r\n"), and one whose next piece holds lines that do start so.
@example(body=b"abc.\r\n", cuts=[4], flushAt=1, ended=True)
@example(body=b"ab.x\r\n..y\r\n", cuts=[3], flushAt=1, ended=True)
def test_dataStoredInPiecesIsRFC5321sContent(body, cuts, flushAt, ended):
    """
    Long lines stored in pieces (any L{data.FLUSH_PARTIAL_LINE}, any split
    of the wire) come out as RFC 5321 reads the data line by line, and as
    the reader reads it in one piece: the same content, the same octets
    after the end, the same header size and "." line positions.
    """
    wire = body + (b"\r\n.\r\nQUIT\r\n" if ended else b"")
    expected = _rfc5321Data(wire)
    whole, wholeRest = _readData([wire], data.FLUSH_PARTIAL_LINE)
    reader, rest = _readData(list(_pieces(wire, cuts)), flushAt)
    if expected is None:
        assert rest is None and wholeRest is None
        return
    content, after, bareLineFeeds = expected
    for r, tail in ((whole, wholeRest), (reader, rest)):
        assert tail == after
        assert r.spool.getvalue() == content
        assert r.received == r.spool.size == len(content)
        assert r.bareLineFeeds == bareLineFeeds
    blank = content.find(b"\r\n\r\n")
    headerSize = 2 if content.startswith(b"\r\n") else blank + 4 if blank >= 0 else len(content)
    assert reader.spool.headerSize == whole.spool.headerSize == headerSize
    assert (reader.spool.dotLines, reader.spool.dotOffsets) == (whole.spool.dotLines, whole.spool.dotOffsets)
    lineStarts = [0] + [i + 2 for i in range(len(content)) if content.startswith(b"\r\n", i)][:-1]
    assert reader.spool.dotOffsets == [i for i in lineStarts if content[i : i + 1] == b"."]
