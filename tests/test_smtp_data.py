"""
L{mailgate.smtp.data.DataReader}: the DATA section of an SMTP or LMTP
transaction, decoded into a L{mailgate.message.MessageSpool}.

The reader is fed what the connection delivers, in pieces of any size; it
must give the same result however the octets are split, end the data only
at CRLF "." CRLF (the SMTP smuggling variants with bare CR or LF must not),
and refuse an over-long line without ever buffering it.
"""

import tracemalloc

import pytest

from mailgate.message import MessageSpool
from mailgate.smtp.data import DataReader

LIMIT = 10 * 1024 * 1024


def reader(maxSize=LIMIT, maxLineLength=1000):
    return DataReader(MessageSpool(), maxSize, maxLineLength)


def feedAll(r, pieces):
    """
    Feed C{pieces} one after another as the protocol does: once the end of
    the data is seen, everything not consumed (the rest of that piece and
    all later pieces) is the leftover.

    @return: the leftover, or C{None} if the data has not ended.
    """
    for i, piece in enumerate(pieces):
        rest = r.feed(piece)
        if rest is not None:
            return rest + b"".join(pieces[i + 1:])
    return None


def stored(r):
    """
    The octets the reader stored, as the protocol hands them to the store.
    """
    return r.spool.finish().getvalue()


def outcome(r, leftover):
    """
    Everything observable about a finished reader, for comparing runs.
    """
    result = {
        "leftover": leftover,
        "tooLarge": r.tooLarge,
        "lineTooLong": r.lineTooLong,
    }
    if not r.failed:
        result.update(
            stored=stored(r),
            headerSize=r.spool.headerSize,
            received=r.received,
            bareLineFeeds=r.bareLineFeeds,
        )
    return result


def run(pieces, **kw):
    r = reader(**kw)
    return outcome(r, feedAll(r, pieces))


def splitsOf(data):
    """
    C{data} split in two at every position, including the empty ends.
    """
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


# -- the terminator ----------------------------------------------------------


def test_crlfDotCrlfEndsTheData():
    r = reader()
    assert r.feed(b"Subject: x\r\n\r\nbody\r\n.\r\n") == b""
    assert stored(r) == b"Subject: x\r\n\r\nbody\r\n"
    assert not r.failed


def test_emptyData():
    """
    The very first line may be the terminator (DATA's own CRLF precedes it).
    """
    r = reader()
    assert r.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert stored(r) == b""


def test_nothingEndsTheDataButTheTerminator():
    r = reader()
    for piece in (b"Subject: x\r\n\r\n", b"body\r\n", b".", b".", b"\r", b"\n", b" .\r\n", b""):
        assert r.feed(piece) is None
    assert r.feed(b".\r\n") == b""
    assert stored(r) == b"Subject: x\r\n\r\nbody\r\n.\r\n .\r\n"


@pytest.mark.parametrize(
    "fake",
    [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n .\r\n"],
    ids=["LF.CRLF", "CRLF.LF", "LF.LF", "CR.CR", "CR.CRLF", "CRLF.CR", "CRLF-space.CRLF"],
)
def test_smugglingVariantsDoNotEndTheData(fake):
    """
    SMTP smuggling (CVE-2023-51764/51765/51766): a "." line next to a bare
    CR or LF is not the end of the data, so whatever follows it is message
    text, never a command, and the reader goes on to the real CRLF.CRLF.
    """
    smuggled = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    wire = b"Subject: innocent\r\n\r\nhello" + fake + smuggled + b"evil body\r\n.\r\nQUIT\r\n"
    for pieces in ([wire], [bytes([b]) for b in wire]):
        r = reader()
        leftover = feedAll(r, pieces)
        assert leftover == b"QUIT\r\n"
        message = stored(r)
        # The smuggled commands are text of the one message...
        assert b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\n" in message
        assert message.endswith(b"\r\nDATA\r\nevil body\r\n")
        assert message.startswith(b"Subject: innocent\r\n\r\nhello")
        # ...and every line end in it is CRLF.
        assert message.count(b"\n") == message.count(b"\r\n")


def test_smugglingTerminatorInOnePieceWithTheRest():
    """
    The fake terminator and the smuggled commands in the same packet as the
    start of the data: still nothing ends before the real terminator.
    """
    r = reader()
    assert r.feed(b"hello\n.\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n") is None
    assert r.feed(b"more\r\n.\r\n") == b""
    message = stored(r)
    assert b"RSET\r\nMAIL FROM:<evil@x.test>\r\nmore\r\n" in message


def test_leftoverAfterTheTerminatorIsReturned():
    """
    Pipelined commands after the data (RFC 2920) come back to the protocol,
    untouched, including a partial line.
    """
    r = reader()
    rest = r.feed(b"body\r\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDA")
    assert rest == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDA"
    assert stored(r) == b"body\r\n"


def test_terminatorLookalikesInTheLeftoverAreNotRead():
    r = reader()
    assert r.feed(b"a\r\n.\r\nb\r\n.\r\n") == b"b\r\n.\r\n"
    assert stored(r) == b"a\r\n"


# -- transparency and line ends ----------------------------------------------


def test_dotUnstuffing():
    r = reader()
    wire = b"..first line\r\n..\r\n...\r\nmiddle\r\n..dotted\r\n. space\r\n.\r\n"
    assert r.feed(wire) == b""
    assert stored(r) == b".first line\r\n.\r\n..\r\nmiddle\r\n.dotted\r\n space\r\n"


def test_dotUnstuffingOfTheFirstLineInItsOwnPiece():
    r = reader()
    assert feedAll(r, [b".", b".x\r\n", b"..y\r\n", b".\r\n"]) == b""
    assert stored(r) == b".x\r\n.y\r\n"


def test_bareLineFeedsBecomeCRLF():
    r = reader()
    assert r.feed(b"Subject: x\n\nline one\nline two\r\nline three\n") is None
    # A "." line after a bare LF is not the end...
    assert r.feed(b"four\n") is None
    # ...only after CRLF.
    assert r.feed(b"five\r\n.\r\n") == b""
    assert stored(r) == b"Subject: x\r\n\r\nline one\r\nline two\r\nline three\r\nfour\r\nfive\r\n"
    assert r.bareLineFeeds


def test_crlfInputIsNotMarkedAsBareLineFeeds():
    r = reader()
    r.feed(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert not r.bareLineFeeds


def test_bareCarriageReturnIsContent():
    r = reader()
    assert r.feed(b"a\rb\r\n.\r\n") == b""
    assert stored(r) == b"a\rb\r\n"


def test_eightBitAndNulArePreserved():
    body = bytes(range(256)).replace(b"\n", b"").replace(b"\r", b"")
    r = reader()
    assert r.feed(b"Subject: bin\r\n\r\n" + body + b"\r\n.\r\n") == b""
    assert stored(r) == b"Subject: bin\r\n\r\n" + body + b"\r\n"


# -- every split gives the same result ---------------------------------------


WIRE = (
    b"From: sender@example.org\r\n"
    b"Subject: split\n"
    b"X-Eight-Bit: caf\xc3\xa9 \xff\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"..\r\n"
    b"a\rb\r\n"
    b"bare lf\n"
    b"ends\r\n"
    b"mid\n.\r\nsmuggle1\r\n"
    b"mid\r\n.\nsmuggle2\r\n"
    b"mid\n.\nsmuggle3\r\n"
    b"mid\r.\rsmuggle4\r\n"
    + b"y" * 998 + b"\r\n"
    b"last\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


def test_splitReference():
    """
    The reference result the split tests compare against, spelled out.
    """
    result = run([WIRE])
    assert result["leftover"] == b"QUIT\r\n"
    assert not result["tooLarge"] and not result["lineTooLong"]
    message = result["stored"]
    assert message.startswith(
        b"From: sender@example.org\r\nSubject: split\r\nX-Eight-Bit: caf\xc3\xa9 \xff\r\n\r\n"
        b".leading dot\r\n.\r\na\rb\r\nbare lf\r\nends\r\n"
    )
    assert message.endswith(b"mid\r.\rsmuggle4\r\n" + b"y" * 998 + b"\r\nlast\r\n")
    for word in (b"smuggle1", b"smuggle2", b"smuggle3"):
        assert word + b"\r\n" in message
    assert message.count(b"\n") == message.count(b"\r\n")
    assert result["headerSize"] == message.index(b"\r\n\r\n") + 4
    assert result["received"] == len(message)
    assert result["bareLineFeeds"]


def test_everySplitInTwoGivesTheSameResult():
    expected = run([WIRE])
    for pieces in splitsOf(WIRE):
        assert run(pieces) == expected, len(pieces[0])


def test_singleBytesGiveTheSameResult():
    assert run([bytes([b]) for b in WIRE]) == run([WIRE])


def test_everySplitOfTheTerminatorAndLeftover():
    wire = b"x\r\n.\r\nMAIL FROM:<a@example.org>\r\n"
    for pieces in splitsOf(wire):
        result = run(pieces)
        assert result["leftover"] == b"MAIL FROM:<a@example.org>\r\n", pieces
        assert result["stored"] == b"x\r\n"


@pytest.mark.parametrize("size", [2, 3, 7, 64, 999, 1000, 1001])
def test_fixedSizePiecesGiveTheSameResult(size):
    pieces = [WIRE[i:i + size] for i in range(0, len(WIRE), size)]
    assert run(pieces) == run([WIRE])


# -- line length -------------------------------------------------------------


def test_lineOf998OctetsPlusCRLFIsAccepted():
    line = b"x" * 998
    for pieces in ([line + b"\r\n.\r\n"], [bytes([b]) for b in line + b"\r\n.\r\n"]):
        result = run(pieces)
        assert not result["lineTooLong"]
        assert result["stored"] == line + b"\r\n"


def test_lineOf999OctetsPlusCRLFIsTooLong():
    """
    1001 octets with the CRLF: refused, and the terminator after it still
    ends the data, also when it all arrives one octet at a time (then the
    CR of the long line's CRLF comes in a piece of its own).
    """
    line = b"x" * 999
    for pieces in ([line + b"\r\n.\r\n"], [bytes([b]) for b in line + b"\r\n.\r\n"]):
        result = run(pieces)
        assert result["lineTooLong"]
        assert result["leftover"] == b""


def test_stuffedLineOf998OctetsIsAccepted():
    """
    The dot a client doubles for transparency does not count towards the
    1000 octets (RFC 5321 section 4.5.3.1.6): a stuffed line of 998
    octets is 1001 on the wire and accepted, whole or in pieces.
    """
    line = b"." + b"a" * 997
    wire = b"Subject: t\r\n\r\n." + line + b"\r\nnext\r\n.\r\n"
    for pieces in ([wire], [wire[:20], wire[20:]], [bytes([b]) for b in wire]):
        result = run(pieces)
        assert not result["lineTooLong"]
        assert result["stored"] == b"Subject: t\r\n\r\n" + line + b"\r\nnext\r\n"


def test_stuffedLineOf999OctetsIsTooLong():
    wire = b"." + b"." + b"a" * 998 + b"\r\n.\r\n"
    for pieces in ([wire], [bytes([b]) for b in wire]):
        result = run(pieces)
        assert result["lineTooLong"]
        assert result["leftover"] == b""


def test_longLineInTheMiddleOfABlock():
    r = reader()
    assert r.feed(b"a\r\n" + b"x" * 1500 + b"\r\nb\r\n.\r\nNOOP\r\n") == b"NOOP\r\n"
    assert r.lineTooLong and r.failed


def test_longLineArrivingInSmallPiecesIsNeverBuffered():
    """
    A 1 MB line streamed in 100-octet pieces: refused, and the reader never
    holds more than a line's worth of it.  The data still ends at the real
    terminator, with the pipelined command after it returned.
    """
    r = reader()
    assert r.feed(b"Subject: long\r\n\r\n") is None
    piece = b"z" * 100
    for _ in range(10_000):
        assert r.feed(piece) is None
        assert len(r._carry) < 1000
    assert r.lineTooLong
    assert r.feed(b"\r\nafter\r\n") is None
    assert r.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert r.lineTooLong


def test_longLineFollowedByTheTerminatorAtEverySplit():
    """
    However the over-long line, its line end and the terminator are split,
    the reader ends the data at the terminator with the line refused: it
    must not stay in DATA mode (the client would hang) or leave it early.
    """
    wire = b"a\r\n" + b"x" * 2000 + b"\r\n.\r\nQUIT\r\n"
    for pieces in splitsOf(wire):
        result = run(pieces)
        assert result == {"leftover": b"QUIT\r\n", "tooLarge": False, "lineTooLong": True}, len(pieces[0])


def test_theEndOfDataIsNeverALongLine():
    """
    However small the limit, the "." line that ends the data is the end,
    also when its CR and LF come apart: it was refused as a long line and
    skipped, and the reader went on reading commands as message text.  A
    limit of 0 (which means "none" for most of mailgate's limits) made
    every line after the first an IndexError.
    """
    for limit in (0, 1, 2):
        r = reader(maxLineLength=limit)
        assert feedAll(r, [b".\r", b"\nQUIT\r\n"]) == b"QUIT\r\n"
        assert (r.lineTooLong, stored(r)) == (False, b"")
        r = reader(maxLineLength=limit)
        assert feedAll(r, [b".", b"\r\nQUIT\r\n"]) == b"QUIT\r\n"
        # Lines (each too long) before it: refused, not an IndexError.
        r = reader(maxLineLength=limit)
        assert feedAll(r, [b"a\r\n", b"b\r\n.\r", b"\nQUIT\r\n"]) == b"QUIT\r\n"
        assert r.lineTooLong


def test_longLineDoesNotDropIntoCommandMode():
    """
    Smuggling through an over-long line: what follows it is still data up to
    the real terminator, however it arrives.
    """
    wire = (
        b"Subject: x\r\n\r\n" + b"A" * 2000 + b"\r\n"
        b"RSET\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        b"evil\r\n.\r\nQUIT\r\n"
    )
    for pieces in ([wire], [wire[i:i + 512] for i in range(0, len(wire), 512)]):
        result = run(pieces)
        assert result == {"leftover": b"QUIT\r\n", "tooLarge": False, "lineTooLong": True}


# -- size --------------------------------------------------------------------


def test_contentUpToTheLimitIsAccepted():
    content = b"x" * 98 + b"\r\n"
    assert len(content) == 100
    result = run([content + b".\r\n"], maxSize=100)
    assert not result["tooLarge"]
    assert result["stored"] == content


def test_contentOverTheLimitIsRefusedAndNotStored():
    r = reader(maxSize=100)
    assert r.feed(b"x" * 48 + b"\r\n") is None
    assert r.spool.size == 50
    assert r.feed(b"y" * 48 + b"\r\n") is None
    assert r.spool.size == 100
    assert not r.tooLarge
    assert r.feed(b"z\r\n") is None
    assert r.tooLarge
    assert r.spool.size == 100
    for _ in range(100):
        assert r.feed(b"more and more\r\n") is None
    assert r.spool.size == 100
    assert r.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert r.tooLarge and r.failed


def test_sizeIsCountedAfterUnstuffing():
    # 50 stuffed lines of ".." + 96 x: 99 octets each on the wire, 98 stored.
    content = (b"." + b"x" * 95 + b"\r\n") * 50
    wire = content.replace(b"\r\n.", b"\r\n..")
    wire = b"." + wire
    result = run([wire + b".\r\n"], maxSize=len(content))
    assert not result["tooLarge"]
    assert result["stored"] == content


# -- header size ---------------------------------------------------------------


@pytest.mark.parametrize(
    "wire, headerSize",
    [
        (b"Subject: a\r\nFrom: b\r\n\r\nbody\r\n.\r\n", 23),
        (b"Subject: a\nFrom: b\n\nbody\r\n.\r\n", 23),
        (b"\r\nno headers\r\n.\r\n", 2),
        (b"Subject: only headers\r\n.\r\n", 23),
        (b"Subject: a\r\n\r\n\r\nbody\r\n.\r\n", 14),
    ],
)
def test_headerSize(wire, headerSize):
    for pieces in ([wire], [bytes([b]) for b in wire]):
        r = reader()
        assert feedAll(r, pieces) == b""
        assert r.spool.headerSize == headerSize
        assert stored(r)[:headerSize].endswith(b"\r\n")


def test_headerSizeAcrossPieces():
    wire = b"Subject: a\r\nX: " + b"h" * 500 + b"\r\n\r\n" + b"b" * 900 + b"\r\n.\r\n"
    for pieces in splitsOf(wire):
        r = reader()
        feedAll(r, pieces)
        assert r.spool.headerSize == 12 + 3 + 500 + 2 + 2, len(pieces[0])


# -- lines of any length (no maxLineLength: the protocols' default) ----------


def unlimited(**kw):
    return DataReader(MessageSpool(), kw.pop("maxSize", LIMIT), None)


def runUnlimited(pieces, **kw):
    r = unlimited(**kw)
    result = outcome(r, feedAll(r, pieces))
    if not r.failed:
        result.update(dotLines=r.spool.dotLines, dotOffsets=r.spool.dotOffsets)
    return result


# Long lines around everything the reader must recognise at a line's start
# or across a piece's edge: stuffed dots, a lone dot next to a bare LF, a
# CR at the end of a piece, bare LFs, the end of the header section, and
# the terminator right after a long line.
LONG_LINES = (
    b"Subject: " + b"s" * 40 + b"\r\nX-Long: " + b"h" * 30 + b"\r\n\r\n"
    + b"." + b"." + b"d" * 25 + b"\r\n"
    + b"b" * 23 + b"\r" + b"c" * 9 + b"\r\n"
    + b".." + b"\r\n"
    + b"e" * 19 + b"\n." + b"f" * 21 + b"\n"
    + b"." * 30 + b"\r\n"
    + b"g" * 50 + b"\r\n"
)


def test_aLongLineIsStoredWholeWithoutALimit():
    """
    A 3 MB line (HTML from a bulk mailer, a long To: field) is stored as
    it was sent, and the reader never holds more than a piece of it.
    """
    from mailgate.smtp.data import FLUSH_PARTIAL_LINE

    line = bytes(range(33, 127)) * 32_000
    r = unlimited()
    assert r.feed(b"Subject: long\r\n\r\n") is None
    for at in range(0, len(line), 1460):
        assert r.feed(line[at:at + 1460]) is None
        assert len(r._carry) <= FLUSH_PARTIAL_LINE + 1460
    assert r.feed(b"\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"
    assert not r.failed and not r.lineTooLong
    assert stored(r) == b"Subject: long\r\n\r\n" + line + b"\r\n"


def test_aLongLineInOneOctetReadsIsNotCopiedAtEachOctet():
    """
    A line arriving an octet a read grows in place until it is stored:
    joined to each read, it was copied whole at every octet, and two
    copies were held at once (a read 64 KiB into the line cost three
    times one at its start).  What is stored is the same.
    """
    line = [b"%c" % (33 + i % 94) for i in range(60_000)]
    first, rest = line[0], line[1:]
    r = unlimited()
    assert r.feed(b"Subject: long\r\n\r\n") is None
    assert r.feed(first) is None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for octet in rest:
            assert r.feed(octet) is None
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * len(line), peak
    assert r.feed(b"\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"
    assert stored(r) == b"Subject: long\r\n\r\n" + b"".join(line) + b"\r\n"


def test_longLinesInPiecesAreStoredAsWholeOnes(monkeypatch):
    """
    However a message with long lines is split on the wire, and however
    small the pieces a long line is stored in, what is stored (and what the
    spool learns of it: the header section's size, the lines that begin
    with a dot) is what the same data gives read at once.
    """
    import mailgate.smtp.data

    wire = LONG_LINES + b".\r\nQUIT\r\n"
    expected = runUnlimited([wire])
    assert expected["leftover"] == b"QUIT\r\n" and not expected["lineTooLong"]
    assert expected["dotLines"]
    for flush in (1, 2, 3, 7, 16):
        monkeypatch.setattr(mailgate.smtp.data, "FLUSH_PARTIAL_LINE", flush)
        assert runUnlimited([wire]) == expected, flush
        for pieces in splitsOf(wire):
            assert runUnlimited(pieces) == expected, (flush, len(pieces[0]))
        octets = [bytes([b]) for b in wire]
        assert runUnlimited(octets) == expected, flush


def test_theTerminatorRightAfterALongLineEndsTheData(monkeypatch):
    """
    Smuggling through a long line: what follows it is data up to the real
    terminator, however it arrives, and a "." after a bare LF is not the
    end.
    """
    import mailgate.smtp.data

    monkeypatch.setattr(mailgate.smtp.data, "FLUSH_PARTIAL_LINE", 4)
    body = b"x" * 40 + b"\n.\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n" + b"y" * 40 + b"\r\n"
    wire = b"Subject: x\r\n\r\n" + body + b".\r\nQUIT\r\n"
    for pieces in splitsOf(wire):
        result = runUnlimited(pieces)
        assert result["leftover"] == b"QUIT\r\n", len(pieces[0])
        assert result["stored"] == b"Subject: x\r\n\r\n" + body.replace(b"x\n", b"x\r\n"), len(pieces[0])


def test_aLongLineStillCountsTowardsTheSizeLimit():
    r = unlimited(maxSize=100_000)
    assert r.feed(b"Subject: long\r\n\r\n") is None
    for _ in range(100):
        assert r.feed(b"z" * 10_000) is None
        assert len(r._carry) <= 80_000
    assert r.tooLarge
    assert r.feed(b"\r\n.\r\n") == b""
