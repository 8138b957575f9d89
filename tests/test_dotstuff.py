"""
Byte-stuffing of multi-line responses, chunk by chunk, against a reference
that stuffs a whole message line by line (RFC 1939 section 3).
"""

from hypothesis import given
from hypothesis import strategies as st

from mailgate.pop3.dotstuff import DotStuffer, stuffed


def reference(message):
    """
    Every line that starts with "." gets one more; then the terminator.
    """
    lines = message.split(b"\r\n")
    out = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if message and not message.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def inChunks(message, cuts, offsets=None):
    """
    C{message} stuffed in pieces cut at C{cuts}, then terminated; with
    C{offsets}, the stuffer is told where its dot lines begin.
    """
    stuffer = DotStuffer(offsets)
    out = []
    start = 0
    for cut in sorted(set(cuts)) + [len(message)]:
        out.append(stuffer.stuff(message[start:cut]))
        start = cut
    return b"".join(out) + stuffer.terminator()


# Lines made of the octets that matter (".", CR, LF) and a few others.
lines = st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=12)
dotty = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a", b"QUJD", b". ."]), max_size=12)


@given(st.one_of(lines, dotty), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_anySplitStuffsLikeTheWholeMessage(messageLines, cuts):
    message = b"".join(line + b"\r\n" for line in messageLines)
    cuts = [c for c in cuts if c <= len(message)]
    assert inChunks(message, cuts) == reference(message)
    assert stuffed(message) == reference(message)


def test_linesStartingWithADotAtEveryPosition():
    message = b".first\r\nmiddle\r\n.\r\n..two\r\nend.\r\n"
    expected = b"..first\r\nmiddle\r\n..\r\n...two\r\nend.\r\n.\r\n"
    for cut in range(len(message) + 1):
        assert inChunks(message, [cut]) == expected, cut


def test_chunksWithoutADotPassThroughUnchanged():
    chunk = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldY\r\n" * 100
    stuffer = DotStuffer()
    assert stuffer.stuff(chunk) is chunk
    # The line state still follows the chunk: the next chunk's "." is at
    # a line start.
    assert stuffer.stuff(b".next\r\n") == b"..next\r\n"
    assert stuffer.terminator() == b".\r\n"


def test_unterminatedLastLineGetsItsLineEndBeforeTheTerminator():
    stuffer = DotStuffer()
    assert stuffer.stuff(b"no line end") == b"no line end"
    assert stuffer.terminator() == b"\r\n.\r\n"


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").lstrip(b".")), max_size=20),
       st.booleans())
def test_aMessageKnownToHaveNoDotLinesGoesOutAsStuffingWouldSendIt(lines, unterminated):
    """
    Sent without the stuffing pass (the store knows no line starts with
    "."), a message is octet for octet what stuffing would have sent.
    """
    data = b"".join(line + b"\r\n" for line in lines)
    if unterminated and lines:
        data = data[:-2]
    assert stuffed(data, needsStuffing=False) == stuffed(data)


def offsetsOf(message):
    return [i for i in range(len(message)) if message[i : i + 1] == b"." and (i == 0 or message[i - 1 : i] == b"\n")]


@given(st.one_of(lines, dotty), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_stuffingAtKnownOffsetsIsStuffingBySearch(messageLines, cuts):
    """
    Given where its dot lines begin (as the store learns at delivery), a
    message chunked anywhere is stuffed octet for octet as the search
    would, without searching.
    """
    message = b"".join(line + b"\r\n" for line in messageLines)
    cuts = [c for c in cuts if c <= len(message)]
    offsets = offsetsOf(message)
    assert inChunks(message, cuts, offsets) == reference(message)
    assert stuffed(message, True, offsets) == reference(message)
    # The start of a message (what TOP sends) likewise.
    for end in cuts:
        assert inChunks(message[:end], [c for c in cuts if c <= end], offsets) == inChunks(message[:end], [])


def test_knownOffsetsAreCopiedNotSearched():
    """
    The offsets are what is used: a chunk without a known position goes
    out as it is, even with a "." in it (the store knows better).
    """
    chunk = b"a.b\r\nc.d\r\n" * 10
    stuffer = DotStuffer(())
    assert stuffer.stuff(chunk) is chunk
    assert DotStuffer([5]).stuff(b"a.b\r\n.d\r\n") == b"a.b\r\n..d\r\n"


@given(st.one_of(lines, dotty), st.lists(st.integers(min_value=0, max_value=200), max_size=8), st.integers(0, 60))
def test_offsetsThatDoNotMatchTheMessageAreGivenUp(messageLines, cuts, wrong):
    """
    A position that does not hold a "." (a store out of step with its
    bodies) stops their use: the rest of the message is searched, and the
    response is still right.
    """
    message = b"".join(line + b"\r\n" for line in messageLines)
    cuts = [c for c in cuts if c <= len(message)]
    offsets = offsetsOf(message)
    if wrong < len(message) and message[wrong : wrong + 1] != b".":
        offsets = sorted(set(offsets) | {wrong})
    assert inChunks(message, cuts, offsets) == reference(message)
