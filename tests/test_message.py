"""
L{mailgate.message.MessageSpool}: line-end normalisation, measurement and
chunked reading of messages on their way into the store.
"""

import io
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailgate.interfaces import IMessageSource
from mailgate.message import MAX_DOT_OFFSETS, DotLineFinder, MessageSpool, dotLineOffsets, spoolBytes, spoolFile


def spooled(*pieces, memoryLimit=None):
    spool = MessageSpool() if memoryLimit is None else MessageSpool(memoryLimit=memoryLimit)
    for piece in pieces:
        spool.writeData(piece)
    return spool.finish()


def test_providesIMessageSource():
    assert verifyObject(IMessageSource, spoolBytes(b"Subject: x\n\nbody\n"))


def test_lfLineEndsBecomeCRLF():
    spool = spoolBytes(b"Subject: hi\nFrom: a@example.org\n\nline one\nline two\n")
    assert spool.getvalue() == b"Subject: hi\r\nFrom: a@example.org\r\n\r\nline one\r\nline two\r\n"
    assert spool.size == len(spool.getvalue())


def test_crlfLineEndsStayAsTheyAre():
    data = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"
    spool = spoolBytes(data)
    assert spool.getvalue() == data
    assert spool.size == len(data)


def test_mixedLineEnds():
    spool = spoolBytes(b"A: 1\r\nB: 2\n\r\nx\ny\r\n")
    assert spool.getvalue() == b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n"


def test_crNotBeforeLFIsKept():
    # Only a CR that ends a line is part of the line end.
    spool = spoolBytes(b"Subject: a\rb\n\nx\r\ry\n")
    assert spool.getvalue() == b"Subject: a\rb\r\n\r\nx\r\ry\r\n"


def test_finalLineWithoutLineEndGetsCRLF():
    spool = spoolBytes(b"Subject: hi\n\nno newline at the end")
    assert spool.getvalue() == b"Subject: hi\r\n\r\nno newline at the end\r\n"
    assert spool.size == len(spool.getvalue())


def test_finalLineEndingInBareCR():
    spool = spoolBytes(b"Subject: hi\r\n\r\nlast\r")
    assert spool.getvalue() == b"Subject: hi\r\n\r\nlast\r\n"


def test_headerSizeIncludesTheBlankLine():
    spool = spoolBytes(b"Subject: hi\nFrom: a@example.org\n\nbody\n")
    header = b"Subject: hi\r\nFrom: a@example.org\r\n\r\n"
    assert spool.headerSize == len(header)
    assert spool.getvalue()[: spool.headerSize] == header


def test_headerSizeIsTheFirstBlankLineOnly():
    spool = spoolBytes(b"A: 1\n\nbody\n\nmore\n")
    assert spool.headerSize == len(b"A: 1\r\n\r\n")


def test_headerSizeWithoutBlankLineIsTheWholeMessage():
    spool = spoolBytes(b"Subject: only a header\nX-Other: too\n")
    assert spool.headerSize == spool.size == len(b"Subject: only a header\r\nX-Other: too\r\n")


def test_headerSizeWhenMessageStartsWithBlankLine():
    spool = spoolBytes(b"\nbody only\n")
    assert spool.getvalue() == b"\r\nbody only\r\n"
    assert spool.headerSize == 2


def test_emptyMessage():
    spool = spoolBytes(b"")
    assert spool.size == 0
    assert spool.headerSize == 0
    assert spool.getvalue() == b""
    assert list(spool.chunks(10)) == []


def test_writeLineAndWriteLines():
    spool = MessageSpool()
    spool.writeLine(b"Subject: x")
    assert spool.headerSize == spool.size == 12
    spool.writeLines([b"", b"body", b".dot"])
    spool.finish()
    assert spool.getvalue() == b"Subject: x\r\n\r\nbody\r\n.dot\r\n"
    assert spool.headerSize == 14


MESSAGE = (
    b"Received: from somewhere\r\n"
    b"Subject: splitting\n"
    b"\r\n"
    b"first body line\n"
    b".starts with a dot\r\n"
    b"\n"
    b"a\rb\r\n"
    b"last line without end"
)

EXPECTED = (
    b"Received: from somewhere\r\n"
    b"Subject: splitting\r\n"
    b"\r\n"
    b"first body line\r\n"
    b".starts with a dot\r\n"
    b"\r\n"
    b"a\rb\r\n"
    b"last line without end\r\n"
)


def _splitAt(data, points):
    pieces = []
    previous = 0
    for point in sorted(points):
        pieces.append(data[previous:point])
        previous = point
    pieces.append(data[previous:])
    return pieces


_CR_POSITIONS = [i + 1 for i, octet in enumerate(MESSAGE) if octet == 0x0D]

SPLITS = [
    [],
    [1],
    [len(MESSAGE) - 1],
    # between every CR and the LF after it
    _CR_POSITIONS,
    # just before every LF and just after it
    [i for i, octet in enumerate(MESSAGE) if octet == 0x0A],
    [i + 1 for i, octet in enumerate(MESSAGE) if octet == 0x0A],
    # every 3rd and every 7th octet
    list(range(3, len(MESSAGE), 3)),
    list(range(7, len(MESSAGE), 7)),
    # one octet at a time
    list(range(1, len(MESSAGE))),
]


@pytest.mark.parametrize("points", SPLITS, ids=[f"split{i}" for i in range(len(SPLITS))])
def test_splitPointsDoNotChangeTheResult(points):
    pieces = _splitAt(MESSAGE, points)
    assert b"".join(pieces) == MESSAGE
    spool = spooled(*pieces)
    assert spool.getvalue() == EXPECTED
    assert spool.size == len(EXPECTED)
    assert spool.headerSize == len(b"Received: from somewhere\r\nSubject: splitting\r\n\r\n")


@pytest.mark.parametrize("points", SPLITS[:4])
def test_emptyWritesBetweenPiecesChangeNothing(points):
    pieces = []
    for piece in _splitAt(MESSAGE, points):
        pieces.extend([b"", piece, b""])
    assert spooled(*pieces).getvalue() == EXPECTED


def test_chunksAreBoundedAndRepeatable():
    spool = spooled(MESSAGE)
    chunks = list(spool.chunks(10))
    assert all(0 < len(chunk) <= 10 for chunk in chunks)
    assert b"".join(chunks) == EXPECTED
    # A second pass reads the same octets again.
    assert b"".join(spool.chunks(7)) == EXPECTED


def test_spillToDiskKeepsTheOctets():
    line = b"0123456789" * 7 + b"\n"
    data = b"Subject: big\n\n" + line * 200
    spool = spooled(data, memoryLimit=256)
    expected = data.replace(b"\n", b"\r\n")
    assert spool.size == len(expected)
    assert spool.getvalue() == expected
    assert b"".join(spool.chunks(1000)) == expected
    spool.close()


def test_spoolsShareABudgetOfMemoryAndGiveItBack(monkeypatch):
    """
    Past the process's budget a spool spills however small its message,
    keeping its octets; what a spool holds is given back when it is
    closed, when it spills, and when it is dropped without being closed.
    """
    from mailgate import message

    # Whatever other spools of the process hold, 10,000 octets more.
    before = message.spooledInMemory()
    monkeypatch.setattr(message, "SPOOL_MEMORY_BUDGET", before + 10_000)
    data = b"Subject: small\r\n\r\n" + b"x" * 3000 + b"\r\n"
    spools = [spooled(data) for _ in range(5)]
    assert message.spooledInMemory() - before <= 10_000
    assert [s.getvalue() for s in spools] == [data] * 5
    spools[0].close()
    del spools[1]
    assert message.spooledInMemory() - before <= 10_000 - 2 * len(data)
    del spools
    assert message.spooledInMemory() == before


def test_aMessageInTinyPiecesHoldsAboutItsOctets():
    """
    A client may send its message an octet or two at a time (BDAT chunks
    of one octet, DATA in three-octet reads): the spool holds the octets,
    not an object for every piece (which cost twenty times the message
    before: 8.7 MB for 400 KB).
    """
    pieces = [b"%02d" % (i % 100) for i in range(200_000)]
    spool = MessageSpool()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for piece in pieces:
            spool.writeBlock(piece, atLineStart=False)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert spool.size == 400_000
    assert held < 2 * spool.size, held
    assert spool.finish().getvalue() == b"".join(pieces)
    spool.close()


@pytest.mark.parametrize("points", SPLITS, ids=[f"split{i}" for i in range(len(SPLITS))])
def test_longLinesWrittenInPiecesChangeNothing(points, monkeypatch):
    """
    A line longer than WRITE_PARTIAL_LINE is written in pieces as it
    arrives (here every line is one, the bound made tiny): the octets
    stored, the size and the header section's are those of the message
    written whole, wherever its pieces are cut, CRs and LFs included.
    """
    from mailgate import message

    monkeypatch.setattr(message, "WRITE_PARTIAL_LINE", 2)
    spool = spooled(*_splitAt(MESSAGE, points))
    assert spool.getvalue() == EXPECTED
    assert spool.size == len(EXPECTED)
    assert spool.headerSize == len(b"Received: from somewhere\r\nSubject: splitting\r\n\r\n")
    assert list(spool.dotOffsets) == [EXPECTED.index(b".starts")]


@pytest.mark.parametrize("ending, expected", [(b"", b"\r\n"), (b"\r", b"\r\n"), (b"\r\r", b"\r\r\n"), (b"\n", b"\r\n")])
def test_aLongLineIsWrittenAsItArrives(ending, expected):
    """
    A message of one long line without a line end (a binary file piped to
    mailgate deliver) is written as it arrives, not held whole until its
    end: it held the whole line in memory and copied it at every read
    (134 MB of memory and 13 s for 40 MB).
    """
    piece = b"x" * (64 * 1024)
    spool = MessageSpool(memoryLimit=64 * 1024)
    tracemalloc.start()
    try:
        for _ in range(32):
            spool.writeData(piece)
        # Nearly all of it written already (to the spool's file).
        assert spool.size >= 31 * len(piece)
        spool.writeData(ending)
        spool.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(piece), peak
    assert spool.size == 32 * len(piece) + len(expected)
    assert spool.getvalue() == piece * 32 + expected
    spool.close()


def test_spoolFileMatchesSpoolBytes():
    for blockSize in (1, 2, 5, 64, 1 << 16):
        spool = spoolFile(io.BytesIO(MESSAGE), blockSize=blockSize)
        assert spool.getvalue() == EXPECTED, blockSize
        assert spool.headerSize == spoolBytes(MESSAGE).headerSize


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda s: s.writeData(b"Subject: a.b\n\nno dots at line starts. here\n"), False),
        (lambda s: s.writeData(b"Subject: x\n\n.a dot line\n"), True),
        (lambda s: s.writeData(b".first line\n"), True),
        (lambda s: s.writeLine(b".line"), True),
        (lambda s: s.writeLine(b"a.line"), False),
        (lambda s: s.writeBlock(b"Subject: x\r\n\r\nbody\r\n..stuffed by SMTP, unstuffed here\r\n"), True),
        (lambda s: s.writeBlock(b".at the block's start\r\n"), True),
        (lambda s: s.writeBlock(b"Subject: x\r\n\r\nplain.\r\n"), False),
        # Split across writes: the line start is in the second piece.
        (lambda s: (s.writeData(b"Subject: x\n\nab"), s.writeData(b"c\n.dot\n")), True),
    ],
)
def test_dotLinesAreNoticedOnceAtIntake(write, expected):
    """
    The spool says whether some line starts with "." (POP3 then
    dot-stuffs the message; without such a line it is sent as stored).
    """
    spool = MessageSpool()
    write(spool)
    spool.finish()
    assert spool.dotLines is expected
    data = spool.getvalue()
    assert (data.startswith(b".") or b"\n." in data) is expected


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.writeData(b"Subject: x\n\n.a dot line\nplain\n..two\n.\n"),
        lambda s: s.writeLines([b".one", b"two", b".three"]),
        lambda s: (s.writeBlock(b".at the start\r\nmid\r\n.x\r\n"), s.writeBlock(b".next block\r\n")),
        lambda s: (s.writeData(b"Subject: x\n\nab"), s.writeData(b"c\n.dot\n.")),
        lambda s: s.writeData(b"no dot lines. at all\n"),
    ],
)
def test_whereDotLinesBeginIsNotedAtIntake(write):
    """
    The spool notes where each line that starts with "." begins, so that
    POP3 can stuff the message without searching it.
    """
    spool = MessageSpool()
    write(spool)
    spool.finish()
    data = spool.getvalue()
    expected = [i for i in range(len(data)) if data[i : i + 1] == b"." and (i == 0 or data[i - 1 : i] == b"\n")]
    assert list(spool.dotOffsets) == expected
    assert dotLineOffsets(data) == expected


def test_dotLinePositionsHoldEightOctetsEach():
    """
    A message may be all dot lines ("..", four octets each on the wire,
    three stored): their positions are eight octets each, not a list of
    ints (some forty each: ten times what the client sent, 430 KB for
    40 KB).
    """
    count = MAX_DOT_OFFSETS - 1
    spool = MessageSpool()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            spool.writeBlock(b".\r\n")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert list(spool.dotOffsets) == list(range(0, 3 * count, 3))
    assert held < 5 * spool.size, held
    spool.close()


def test_tooManyDotLinesAreNotNoted():
    spool = MessageSpool()
    spool.writeBlock(b".\r\n" * (MAX_DOT_OFFSETS + 1))
    spool.finish()
    assert spool.dotLines is True
    assert spool.dotOffsets is None


@given(
    st.lists(st.sampled_from([b"", b".", b"..x", b"a.b", b"\r\n", b"x"]), max_size=30).map(lambda p: b"\r\n".join(p)),
    st.lists(st.integers(min_value=0, max_value=120), max_size=6),
)
def test_dotLineFinderOverPiecesCutAnywhere(data, cuts):
    finder = DotLineFinder()
    start = 0
    for cut in sorted(set(c for c in cuts if c <= len(data))) + [len(data)]:
        finder.feed(data[start:cut])
        start = cut
    assert finder.dotOffsets == dotLineOffsets(data)
    assert finder.dotLines is bool(dotLineOffsets(data))
