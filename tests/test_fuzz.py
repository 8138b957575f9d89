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
from mailgate.smtp.chunks import ChunkedMessage, ChunkReader
from mailgate.smtp.data import DataReader
from mailgate.message import DeliveryKey, MessageSpool, spoolBytes
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
smtpWords = st.sampled_from(
    [b"EHLO x", b"LHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<alice@example.org>", b"DATA", b"BDAT",
     b"BDAT 0", b"BDAT 3", b"BDAT 5 LAST", b"BDAT 0 LAST", b"RSET", b"NOOP", b"QUIT", b"XYZ", b""]
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


smtpLines = st.lists(
    st.one_of(st.tuples(smtpWords, junk).map(lambda t: t[0] + b" " + t[1]), smtpWords, junk), max_size=12
)


@FUZZ
@given(lines=smtpLines, cuts=splits, useLMTP=st.booleans())
def test_smtpWithChunksAnswersEveryCommandWithACode(lines, cuts, useLMTP):
    """
    The same with BDAT among the commands: its chunk (the octets after its
    line, as many as it says) is read, whatever they look like, and every
    reply is well formed; a session still open is in step.
    """
    store = _store()
    s = SMTPSession(store, lmtp=useLMTP)
    data = b"".join(line.replace(b"\n", b" ") + b"\r\n" for line in lines)
    output = b"".join(s.send(piece) for piece in _pieces(data, cuts))
    for reply in output.split(b"\r\n")[:-1]:
        assert _SMTP_REPLY.match(reply), reply
    if not s.disconnected and s.protocol.rawReceiver is None:
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
    assert list(reader.spool.dotOffsets) == [i for i in lineStarts if content[i : i + 1] == b"."]


def _canonical(content):
    """
    What a message sent in chunks is stored as: a bare LF made CRLF, and
    the last line ended (a lone CR at the very end taken for its end).
    """
    content = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    if content.endswith(b"\r"):
        return content[:-1] + b"\r\n"
    if content and not content.endswith(b"\n"):
        return content + b"\r\n"
    return content


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(body=dataWire, chunkCuts=smallSplits, wireCuts=smallSplits)
@example(body=b"a\r\n\r", chunkCuts=[3], wireCuts=[])
@example(body=b"H: x\r\n\r\n.b", chunkCuts=[5, 1, 1], wireCuts=[1])
def test_chunksCutAnywhereStoreTheCanonicalMessage(body, chunkCuts, wireCuts):
    """
    However a message is cut into chunks, and the chunks into reads, it is
    stored as one canonical message: the octets, the header size and "."
    line positions POP3 relies on, the same as the spool of the whole
    message at once; and for a message DATA could carry as it is (CRLF
    lines), the same delivery key as DATA gives it, so a retry sent the
    other way is still a retry.
    """
    message = b"Message-ID: <fuzz@example>\r\n" + body
    chunks = list(_pieces(message, chunkCuts))
    content = ChunkedMessage(MessageSpool(), maxSize=10**6, digest=DeliveryKey("smtp", "a@b.example"))
    wire = b"".join(b"%d\n" % len(c) + c for c in chunks) + b"TAIL"
    # Each chunk's octets through its reader, the wire cut into reads
    # anywhere (a read may hold the end of one chunk and the next's start).
    rest = wire
    for chunk in chunks:
        header, _, rest = rest.partition(b"\n")
        reader = ChunkReader(content, int(header), last=False)
        left = None
        for piece in _pieces(rest, wireCuts):
            if left is None:
                left = reader.feed(piece)
            else:
                left += piece
        assert left is not None
        rest = left
    assert rest == b"TAIL"
    spool = content.finish()
    expected = _canonical(message)
    reference = spoolBytes(expected)
    assert spool.getvalue() == expected == reference.getvalue()
    assert content.received == spool.size == len(expected)
    assert spool.headerSize == reference.headerSize
    assert (spool.dotLines, spool.dotOffsets) == (reference.dotLines, reference.dotOffsets)
    if b"\n" not in message.replace(b"\r\n", b"") and message.endswith(b"\r\n"):
        byData = DataReader(MessageSpool(), maxSize=10**6, digest=DeliveryKey("smtp", "a@b.example"))
        stuffed = message.replace(b"\r\n.", b"\r\n..")
        assert byData.feed(stuffed + b".\r\n") == b""
        assert byData.digest.key() == content.digest.key() is not None
