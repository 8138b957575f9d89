"""
CHUNKING (RFC 3030): messages sent in BDAT chunks to the SMTP and LMTP
servers, without sockets (an L{SMTPSession} over a StringTransport, a real
SQLite file).  What the client sees (replies, in order, for pipelined
chunks too) and what is stored (read back from the SQLite file and by POP3
RETR): the same as for the same message sent by DATA.
"""

import pytest

from mailgate.message import _budget
from mailgate.smtp.chunks import BDATSyntaxError, parseBDAT
from mailgate.testing import SMTPSession
from test_smtp_protocol import (  # noqa: F401 (fixture)
    ALICE,
    BOB,
    SENDER,
    lines,
    lmtp,
    nothingStored,
    retr,
    session,
    storedMessages,
    stuff,
    trace,
    users,
)

MESSAGE = (
    b"From: sender@remote.test\r\nTo: alice@example.org\r\nSubject: in chunks\r\n"
    b"Message-ID: <chunks@remote.test>\r\n\r\n"
    b"first line\r\n.a line that starts with a dot\r\n.\r\n..two dots\r\nlast line\r\n"
)


def bdat(data, last=False):
    """
    One BDAT command and its chunk, as a client sends them.
    """
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def chunked(message, *cuts):
    """
    C{message} as BDAT chunks cut at C{cuts}, the last one marked LAST.
    """
    bounds = [0, *cuts, len(message)]
    pieces = [message[a:b] for a, b in zip(bounds, bounds[1:])]
    return b"".join(bdat(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces))


def begin(s, recipients=(ALICE,), sender=SENDER):
    out = s.command(f"MAIL FROM:<{sender}>")
    assert out.startswith("250"), out
    for recipient in recipients:
        s.command(f"RCPT TO:<{recipient}>")


def content(stored):
    """
    A stored message without the trace fields mailgate put first.
    """
    return stored[trace(stored).end():]


def test_chunkingIsAdvertised(store):
    for s, hello in ((SMTPSession(store), "EHLO"), (SMTPSession(store, lmtp=True), "LHLO")):
        assert "CHUNKING" in [line[4:] for line in lines(s.command(f"{hello} client.test"))[1:]]


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("0", (0, False)),
        ("0 LAST", (0, True)),
        ("123 last", (123, True)),
        ("42  LAST ", (42, True)),
        ("99999999999999999999", (99999999999999999999, False)),
    ],
)
def test_theChunkSizeAndItsEndMarker(argument, expected):
    assert parseBDAT(argument) == expected


@pytest.mark.parametrize(
    "argument",
    # "\u017f" (LATIN SMALL LETTER LONG S) and "\u0661" (ARABIC-INDIC DIGIT
    # ONE): a case-blind or Unicode match would take them for "s" and "1",
    # reading a chunk where a stricter parser on the way (a filter, a
    # proxy) sees none.
    ["", "x", "-1", "+5", "5 LASTLY", "5 LAST x", "5\tLAST", "1e3", "1" * 21, "5 LA\u017fT", "\u0661"],
)
def test_anythingElseIsNoBDATArgument(argument):
    with pytest.raises(BDATSyntaxError):
        parseBDAT(argument)


@pytest.mark.parametrize("cuts", [(), (10,), (1, 2, 3), (MESSAGE.index(b"\n") , ), (MESSAGE.index(b"\r\n.") + 1,)])
def test_aMessageInChunksIsStoredAsSent(users, dbpath, cuts):
    """
    Chunks cut anywhere (between a CR and its LF, before a line's dot)
    store the message's octets as they were sent, after the trace fields;
    POP3 serves it dot-stuffed as any other.
    """
    s = session(users)
    begin(s)
    replies = lines(s.send(chunked(MESSAGE, *cuts)))
    assert [r.split(" ")[:2] for r in replies[:-1]] == [["250", "2.0.0"]] * len(cuts)
    assert replies[:-1] == [f"250 2.0.0 {b - a} octets received" for a, b in zip((0, *cuts), cuts)]
    assert replies[-1].startswith("250 2.0.0 OK: message accepted as ")
    [stored] = storedMessages(dbpath, ALICE)
    assert content(stored) == MESSAGE
    assert trace(stored)["protocol"] == b"ESMTP"
    raw, body = retr(users, ALICE)
    assert body == stored
    assert b"\r\n..a line that starts with a dot\r\n..\r\n...two dots\r\n" in raw


def test_aWholeTransactionPipelinedInOneWrite(users, dbpath):
    s = session(users, hello=None)
    out = s.send(
        b"EHLO client.test\r\nMAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.org>\r\n" + chunked(MESSAGE, 20, 40) + b"NOOP\r\nQUIT\r\n"
    )
    replies = [r for r in lines(out) if not r.startswith("250-")]
    assert [r[:3] for r in replies] == ["250", "250", "250", "250", "250", "250", "250", "250", "221"]
    assert "OK: message accepted as" in replies[6]
    assert content(storedMessages(dbpath, ALICE)[0]) == MESSAGE
    assert content(storedMessages(dbpath, BOB)[0]) == MESSAGE


def test_chunksThatArriveInPiecesOfAnOctet(users, dbpath):
    s = session(users)
    begin(s)
    wire = chunked(MESSAGE, 7, 50)
    out = b"".join(s.send(wire[i : i + 1]) for i in range(len(wire)))
    assert lines(out)[-1].startswith("250 2.0.0 OK: message accepted")
    assert content(storedMessages(dbpath, ALICE)[0]) == MESSAGE


@pytest.mark.parametrize(
    "sent, stored",
    [
        (b"Subject: x\n\nbare\nline feeds\n", b"Subject: x\r\n\r\nbare\r\nline feeds\r\n"),
        (b"Subject: x\r\n\r\nno line end at the end", b"Subject: x\r\n\r\nno line end at the end\r\n"),
        (b"Subject: x\r\n\r\na lone CR at the end\r", b"Subject: x\r\n\r\na lone CR at the end\r\n"),
        (b"Subject: x\r\n\r\na CR\rinside a line\r\n", b"Subject: x\r\n\r\na CR\rinside a line\r\n"),
        (b"", b""),
    ],
)
def test_lineEndsAreMadeCRLFAndTheLastLineIsEnded(users, dbpath, sent, stored):
    """
    As for DATA: a bare LF is a line end (stored CRLF), and a message whose
    last line was not ended gets its CRLF, so that every stored message
    ends a line (POP3 sends it before its "." line).  A CR alone inside a
    line is kept.
    """
    for cut in range(len(sent) + 1):
        s = session(users)
        begin(s)
        assert lines(s.send(chunked(sent, cut)))[-1].startswith("250 2.0.0 OK")
    assert {content(m) for m in storedMessages(dbpath, ALICE)} == {stored}


def test_anEmptyLastChunkEndsTheMessage(users, dbpath):
    s = session(users)
    begin(s)
    assert s.send(bdat(MESSAGE[:30])) == b"250 2.0.0 30 octets received\r\n"
    assert s.send(bdat(MESSAGE[30:])) == b"250 2.0.0 %d octets received\r\n" % (len(MESSAGE) - 30)
    assert s.command("BDAT 0 LAST").startswith("250 2.0.0 OK: message accepted as ")
    assert content(storedMessages(dbpath, ALICE)[0]) == MESSAGE


def test_aChunkWithoutMailIsReadAndRefused(users, dbpath):
    """
    Its octets are read and dropped, never run as commands, even when they
    look like commands.
    """
    s = session(users)
    smuggled = b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
    out = lines(s.send(bdat(smuggled, last=True) + b"MAIL FROM:<sender@remote.test>\r\n"))
    assert out == ["503 5.5.1 need MAIL command first", "250 2.1.0 sender <sender@remote.test> OK"]
    assert nothingStored(dbpath)


def test_aChunkAfterHeloIsReadAndRefused(users, dbpath):
    """
    CHUNKING is offered after EHLO only: after HELO a chunk is refused (its
    octets read, never run), as MAIL's parameters are.
    """
    s = session(users, hello="HELO client.test")
    begin(s)
    out = lines(s.send(bdat(b"NOOP\r\n", last=True) + b"RSET\r\n"))
    assert out == ["503 5.5.1 BDAT needs EHLO", "250 2.0.0 OK"]
    assert nothingStored(dbpath)


@pytest.mark.parametrize("useLMTP, code", [(False, "554"), (True, "503")])
def test_aChunkWithoutAcceptedRecipientsIsReadAndRefused(users, dbpath, useLMTP, code):
    s = lmtp(users) if useLMTP else session(users)
    begin(s, ["nobody@example.org"])
    out = lines(s.send(bdat(b"RSET\r\n", last=True) + b"NOOP\r\n"))
    assert out == [f"{code} 5.5.1 no valid recipients", "250 2.0.0 OK"]
    assert nothingStored(dbpath)


@pytest.mark.parametrize("useLMTP, code", [(False, "554"), (True, "503")])
def test_aRecipientAcceptedAfterARefusedChunkDoesNotGetTheRest(users, dbpath, useLMTP, code):
    """
    RFC 3030 section 2: a chunk refused fails the transaction.  A RCPT
    accepted after it (the envelope stays, as after a refused DATA) must
    not make the later chunks a message without the first: they are
    refused until RSET (Dovecot's LMTP answers so too).
    """
    s = lmtp(users) if useLMTP else session(users)
    begin(s, ["nobody@example.org"])
    assert s.send(bdat(b"Subject: first part\r\n")) == f"{code} 5.5.1 no valid recipients\r\n".encode()
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")
    failed = "503 5.5.1 the message failed at an earlier chunk; send RSET\r\n"
    assert s.send(bdat(b"\r\nsecond part\r\n", last=True)).decode() == failed
    assert s.command("DATA") == "503 5.5.1 DATA after BDAT in the same transaction; send RSET\r\n"
    assert nothingStored(dbpath)
    assert s.command("RSET") == "250 2.0.0 OK\r\n"
    begin(s)
    assert s.send(chunked(MESSAGE)).startswith(b"250 2.0.0 ")
    assert [content(m) for m in storedMessages(dbpath, ALICE)] == [MESSAGE]


def test_dataAfterBdatIsRefusedAndTheTransactionDropped(users, dbpath):
    s = session(users)
    begin(s)
    s.send(bdat(b"Subject: half\r\n"))
    assert s.command("DATA") == "503 5.5.1 DATA after BDAT in the same transaction; send RSET\r\n"
    assert s.command("BDAT 0 LAST") == "503 5.5.1 need MAIL command first\r\n"
    assert s.command("RSET") == "250 2.0.0 OK\r\n"
    begin(s)
    assert s.send(chunked(MESSAGE)).startswith(b"250 2.0.0 OK: message accepted")
    assert [content(m) for m in storedMessages(dbpath, ALICE)] == [MESSAGE]


def test_rsetDropsTheChunksReceived(users, dbpath):
    s = session(users)
    begin(s)
    s.send(bdat(b"Subject: dropped\r\n\r\n"))
    assert s.command("RSET") == "250 2.0.0 OK\r\n"
    begin(s)
    s.send(chunked(MESSAGE, 5))
    assert [content(m) for m in storedMessages(dbpath, ALICE)] == [MESSAGE]
    assert _budget.held == 0


def test_aNewMailTransactionNeedsTheLastChunkFirst(users, dbpath):
    s = session(users)
    begin(s)
    s.send(bdat(b"Subject: open\r\n"))
    assert s.command("MAIL FROM:<other@remote.test>") == "503 5.5.1 nested MAIL command\r\n"
    assert s.send(bdat(b"\r\nbody\r\n", last=True)).startswith(b"250 2.0.0 OK")
    assert [content(m) for m in storedMessages(dbpath, ALICE)] == [b"Subject: open\r\n\r\nbody\r\n"]


def test_aMessageOverTheLimitIsRefusedAtTheChunkThatCrossesIt(users, dbpath):
    """
    552 5.3.4 once the chunks add up to more than the limit, and the chunks
    the client pipelined after that one are read and refused (not counted
    as its errors); nothing is stored, and the session goes on.
    """
    s = session(users, maxMessageSize=1000)
    begin(s)
    line = b"x" * 398 + b"\r\n"
    out = lines(s.send(bdat(line) + bdat(line) + bdat(line) + bdat(line) + bdat(line, last=True)))
    assert out == [
        "250 2.0.0 400 octets received",
        "250 2.0.0 400 octets received",
        "552 5.3.4 message size exceeds the limit of 1000 octets",
        "503 5.5.1 the message failed at an earlier chunk; send RSET",
        "503 5.5.1 the message failed at an earlier chunk; send RSET",
    ]
    assert nothingStored(dbpath)
    registry = s.factory.metrics.registry
    assert registry.get_sample_value("mailgate_deliveries_total", {"protocol": "smtp", "result": "rejected"}) == 1
    begin(s)
    assert s.send(chunked(MESSAGE)).startswith(b"250 2.0.0 OK: message accepted")
    assert _budget.held == 0


def test_aChunkLargerThanTheLimitClosesTheConnection(users, dbpath):
    """
    Its octets would be read only to be dropped: refused at once, and the
    connection closed (what follows cannot be told from the chunk).
    """
    s = session(users, maxMessageSize=1000)
    begin(s)
    out = s.send(b"BDAT 1001 LAST\r\nQUIT\r\n")
    assert out == b"552 5.3.4 message size exceeds the limit of 1000 octets; closing connection\r\n"
    assert s.disconnected
    assert nothingStored(dbpath)


@pytest.mark.parametrize("state", ["no transaction", "no recipient", "a failed chunk"])
def test_aChunkLargerThanTheLimitClosesTheConnectionInAnyState(users, dbpath, state):
    """
    A chunk that would be refused anyway is read to be dropped, unless it
    is larger than a whole message may be: a client cannot keep the
    server reading (and dropping) for ever by declaring an endless chunk.
    """
    s = session(users, maxMessageSize=1000)
    if state == "no recipient":
        begin(s, ["nobody@example.org"])
    elif state == "a failed chunk":
        begin(s)
        refused = s.send(bdat(b"x" * 600) + bdat(b"x" * 600))
        assert refused.endswith(b"552 5.3.4 message size exceeds the limit of 1000 octets\r\n")
    out = s.send(b"BDAT 10000000000000000000\r\nQUIT\r\n")
    assert out == b"552 5.3.4 message size exceeds the limit of 1000 octets; closing connection\r\n"
    assert s.disconnected
    assert nothingStored(dbpath)


@pytest.mark.parametrize(
    "command",
    [
        b"BDAT", b"BDAT x", b"BDAT -5", b"BDAT 5 LASTLY", b"BDAT 5 NOW",
        # Lines that begin as BDAT does: a front end on the way may take
        # them for one and send the chunk after them.
        b"BDAT\t27", b" BDAT 27", b"bdat\t27 last", b"BDAT 27\x0b", b"BDAT 27 L\xc5\xbfT", b"BDATX 27",
    ],
)
def test_aMalformedBdatClosesTheConnection(users, dbpath, command):
    """
    How many octets follow it is unknown, so nothing after it can be read
    as a command: 501, and the connection closed.
    """
    s = session(users)
    begin(s)
    out = s.send(command + b"\r\nRCPT TO:<bob@example.org>\r\n")
    assert out == b"501 5.5.4 syntax: BDAT chunk-size [LAST]; closing connection\r\n"
    assert s.disconnected
    assert nothingStored(dbpath)


@pytest.mark.parametrize("useLMTP", [False, True], ids=["smtp", "lmtp"])
@pytest.mark.parametrize(
    "command",
    [b"BDAT " + b"0" * 600 + b"%d LAST", b"BDAT %d LAST" + b" " * 600, b"\tbdat %d" + b" " * 600],
    ids=["leading zeros", "spaces after LAST", "tab and lower case"],
)
@pytest.mark.parametrize("inPieces", [False, True], ids=["whole", "in pieces"])
def test_aBdatLineTooLongClosesTheConnection(users, dbpath, useLMTP, command, inPieces):
    """
    A BDAT line over the command line limit is a malformed BDAT too, not
    a line too long after which the session goes on: its chunk follows it,
    and a front end on the way that takes longer lines (a size with leading
    zeros, spaces after LAST: mailgate's own BDAT takes both) sends that
    chunk as a message, where here its octets ran as commands (a RSET and
    a MAIL of the client's choosing).  The same when the line is refused
    as soon as the limit is passed (in pieces: before its end arrives).
    """
    s = lmtp(users) if useLMTP else session(users)
    begin(s)
    chunk = b"RSET\r\nMAIL FROM:<smuggled@remote.test>\r\n"
    line = command.replace(b"%d", b"%d" % len(chunk)) + b"\r\n"
    if inPieces:
        out = s.send(line[:520]) + s.send(line[520:] + chunk)
    else:
        out = s.send(line + chunk)
    assert out == b"501 5.5.4 syntax: BDAT chunk-size [LAST]; closing connection\r\n"
    assert s.disconnected
    assert nothingStored(dbpath)


@pytest.mark.parametrize("useLMTP", [False, True], ids=["smtp", "lmtp"])
@pytest.mark.parametrize("inPieces", [False, True], ids=["whole", "in pieces"])
def test_aDataLineTooLongClosesTheConnection(users, dbpath, useLMTP, inPieces):
    """
    A DATA line over the command line limit (DATA and hundreds of spaces,
    which a front end that takes longer lines and trims what follows the
    verb answers 354) ends the session: the text that follows it ran here
    as commands (a RSET and a MAIL of the client's choosing, answered 250),
    as the octets after a long BDAT line did.  The same when the line is
    refused as soon as the limit is passed, before its end (and whether
    text follows it) has arrived.
    """
    s = lmtp(users) if useLMTP else session(users)
    begin(s)
    text = b"RSET\r\nMAIL FROM:<smuggled@remote.test>\r\n"
    line = b"DATA" + b" " * 600 + b"\r\n"
    if inPieces:
        out = s.send(line[:520]) + s.send(line[520:] + text)
    else:
        out = s.send(line + text)
    assert out == b"501 5.5.4 DATA takes no arguments; closing connection\r\n"
    assert s.disconnected
    assert nothingStored(dbpath)


def test_aLineTooLongThatIsNoBdatIsRefusedAndTheSessionGoesOn(users):
    s = session(users)
    out = s.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert out == b"500 5.5.2 line too long (the limit is 512 octets)\r\n250 2.0.0 OK\r\n"
    assert not s.disconnected


def test_lmtpAnswersEachRecipientAfterTheLastChunk(users, dbpath):
    s = lmtp(users)
    begin(s, [ALICE, "nobody@example.org", BOB])
    assert s.send(bdat(MESSAGE[:10])) == b"250 2.0.0 10 octets received\r\n"
    out = lines(s.send(bdat(MESSAGE[10:], last=True)))
    assert len(out) == 2
    assert out[0].startswith("250 2.0.0 <alice@example.org> delivered as ")
    assert out[1].startswith("250 2.0.0 <bob@example.org> delivered as ")
    assert trace(storedMessages(dbpath, ALICE)[0])["protocol"] == b"LMTP"
    assert content(storedMessages(dbpath, BOB)[0]) == MESSAGE


def test_lmtpAnswersEachRecipientWhenTheLastChunkFails(users, dbpath):
    s = lmtp(users, maxLineLength=100)
    begin(s, [ALICE, BOB])
    out = lines(s.send(bdat(b"Subject: long\r\n\r\n" + b"y" * 200 + b"\r\n", last=True)))
    assert out == [
        "500 5.5.2 <alice@example.org> line too long (the limit is 100 octets)",
        "500 5.5.2 <bob@example.org> line too long (the limit is 100 octets)",
    ]
    assert nothingStored(dbpath)


def test_theLineLimitCountsALineAcrossChunks(users, dbpath):
    s = session(users, maxLineLength=100)
    begin(s)
    out = lines(s.send(bdat(b"Subject: x\r\n\r\n" + b"a" * 60) + bdat(b"b" * 60) + bdat(b"\r\n", last=True)))
    assert out == [
        "250 2.0.0 74 octets received",
        "500 5.5.2 line too long (the limit is 100 octets)",
        "503 5.5.1 the message failed at an earlier chunk; send RSET",
    ]
    begin(s)
    # 98 octets and the CRLF (with the CR and LF in two chunks) are within it.
    assert s.send(bdat(b"a" * 98 + b"\r") + bdat(b"\n", last=True)).startswith(b"250 2.0.0 99")
    assert [content(m) for m in storedMessages(dbpath, ALICE)] == [b"a" * 98 + b"\r\n"]


def trickle(s):
    """
    Keep a chunk alive with three octets every four minutes (which the
    idle timer alone allows) until the server says something, for at most
    20 rounds; what it said, and the octets sent.
    """
    sent = 0
    for _ in range(20):
        out = s.advance(240)
        if out:
            return out, sent
        s.send(b"x\r\n")
        sent += 3
    return b"", sent


def test_aChunkTrickledInIsCutOffAtTheMinimumRate(users, dbpath):
    s = session(users)
    begin(s)
    assert s.send(b"BDAT 100000 LAST\r\nSubject: slow\r\n") == b""
    out, _ = trickle(s)
    assert out.startswith(b"421 4.4.2 mailgate.test message data too slow")
    assert s.disconnected
    assert nothingStored(dbpath)


def test_aRefusedChunkTrickledInIsCutOffToo(users, dbpath, logEvents):
    """
    The octets of a chunk refused (no MAIL) are read at the same minimum
    rate, and the line logged for it names no transaction.
    """
    s = session(users)
    assert s.send(b"BDAT 100000 LAST\r\nx") == b""
    out, sent = trickle(s)
    assert out.startswith(b"421 4.4.2 mailgate.test message data too slow")
    assert s.disconnected
    [slow] = [e for e in logEvents if e.get("event") == "smtp.data_too_slow"]
    assert (slow["code"], slow["octets"], "id" in slow) == (421, 1 + sent, False)


def test_aRetryInChunksOfAMessageSentByDataIsNotStoredTwice(users, dbpath):
    """
    The same message from the same sender is a retry however it is sent.
    """
    s = session(users)
    begin(s)
    s.command("DATA")
    assert s.send(stuff(MESSAGE)).startswith(b"250 2.0.0 OK: message accepted")
    begin(s)
    out = s.send(chunked(MESSAGE, 33))
    assert lines(out)[-1] == "250 2.0.0 OK: already delivered, not stored again (a retry of the same message)"
    assert len(storedMessages(dbpath, ALICE)) == 1


def test_theConnectionLostInTheMiddleOfAChunkStoresNothing(users, dbpath):
    s = session(users)
    begin(s)
    s.send(bdat(b"Subject: first\r\n") + b"BDAT 1000 LAST\r\nSubject: cut")
    s.protocol.connectionLost(None)
    assert nothingStored(dbpath)
    assert _budget.held == 0


def test_emptyChunksThatDeliverNothingCountAsJunk(users):
    """
    BDAT 0 again and again keeps the connection busy and delivers nothing:
    counted as NOOPs are, and the client is cut off in the end.
    """
    s = session(users)
    begin(s)
    out = lines(s.send(b"BDAT 0\r\n" * 200))
    assert out[-1] == "421 4.7.0 mailgate.test too many errors, closing connection"
    assert len(out) < 200
    assert s.disconnected


@pytest.mark.parametrize("useLMTP", [False, True])
def test_aRecipientAfterTheFirstChunkIsRefused(users, dbpath, useLMTP):
    """
    The message's trace fields were written at its first chunk, naming its
    one recipient then (C{for <alice@...>}): a recipient accepted after
    that would get a copy naming someone else (a Bcc recipient, say).  Once
    the message is arriving, its recipients are the ones it has: 503, and
    the message goes on to them.
    """
    s = lmtp(users) if useLMTP else session(users)
    begin(s)
    assert s.send(bdat(MESSAGE[:20])) == b"250 2.0.0 20 octets received\r\n"
    assert s.command(f"RCPT TO:<{BOB}>") == "503 5.5.1 no RCPT once the message's chunks are arriving\r\n"
    assert lines(s.send(bdat(MESSAGE[20:], last=True)))[-1].startswith("250 2.0.0 ")
    [stored] = storedMessages(dbpath, ALICE)
    assert trace(stored)["for"] == ALICE.encode()
    assert content(stored) == MESSAGE
    assert storedMessages(dbpath, BOB) == []


def test_aMessageTrickledInChunksIsCutOffAtTheMinimumRate(users, dbpath):
    """
    The minimum rate bounds a message sent in chunks as it bounds one sent
    by DATA, from its first chunk to its last: three octets in a chunk of
    their own every four minutes (each chunk quick, the idle timer never
    due) would otherwise hold the connection for as long as the message
    may grow.
    """
    s = session(users)
    begin(s)
    out = b""
    for _ in range(20):
        out = s.send(bdat(b"x\r\n"))
        if not out.startswith(b"250 "):
            break
        out = s.advance(240)
        if out:
            break
    assert out.startswith(b"421 4.4.2 mailgate.test message data too slow")
    assert s.disconnected
    assert nothingStored(dbpath)
    assert _budget.held == 0


@pytest.mark.parametrize("useLMTP", [False, True])
def test_aLongLineInTheLastChunkOfASpilledMessageIsRefused(users, dbpath, useLMTP):
    """
    A message past the spool's memory (in its temporary file) whose last
    chunk holds a line over the limit, not ended: refused as the line
    too long it is, one reply per recipient in LMTP, not an internal
    error (ending the line wrote to the file the refusal had closed).
    """
    s = lmtp(users, maxLineLength=1000) if useLMTP else session(users, maxLineLength=1000)
    begin(s, [ALICE, BOB])
    big = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 12000 + b"the last line goes on"
    assert s.send(bdat(big)) == b"250 2.0.0 %d octets received\r\n" % len(big)
    out = lines(s.send(bdat(b"z" * 2000, last=True)))
    refusal = "500 5.5.2 {}line too long (the limit is 1000 octets)"
    if useLMTP:
        assert out == [refusal.format(f"<{ALICE}> "), refusal.format(f"<{BOB}> ")]
    else:
        assert out == [refusal.format("")]
    assert nothingStored(dbpath)
    assert _budget.held == 0
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


def test_lmtpAnswersEachRecipientForALastChunkOverTheLimit(users, dbpath):
    """
    RFC 2033: the end of the message (BDAT LAST) is answered once per
    accepted recipient, so a last chunk refused for its size is too,
    before the connection closes: with one reply the client takes it for
    its first recipient and the others' for lost with the connection (a
    temporary failure, tried again, refused again).
    """
    s = lmtp(users, maxMessageSize=1000)
    begin(s, [ALICE, BOB])
    out = lines(s.send(b"BDAT 1001 LAST\r\n"))
    limit = "message size exceeds the limit of 1000 octets; closing connection"
    assert out == [f"552 5.3.4 <{ALICE}> {limit}", f"552 5.3.4 <{BOB}> {limit}"]
    assert s.disconnected
    assert nothingStored(dbpath)


def test_lmtpAnswersEachRecipientForALastChunkAfterTheMessageFailed(users, dbpath):
    """
    A client pipelines its chunks (Dovecot's LMTP proxy does): those after
    the one that failed the message are read and refused, and the last of
    them, the message's end, is answered once per recipient (RFC 2033) as
    every last chunk is.  Dovecot's client counts them ("Got reply (1/2)"
    in its debug log): with one, it waited for the next, and would have
    taken the reply to its next command for it.
    """
    s = lmtp(users, maxMessageSize=1000)
    begin(s, [ALICE, BOB])
    out = lines(s.send(bdat(b"x" * 600) + bdat(b"x" * 600) + bdat(b"x" * 10) + bdat(b"end\r\n", last=True)))
    failed = "503 5.5.1 {}the message failed at an earlier chunk; send RSET"
    assert out == [
        "250 2.0.0 600 octets received",
        "552 5.3.4 message size exceeds the limit of 1000 octets",
        failed.format(""),
        failed.format(f"<{ALICE}> "),
        failed.format(f"<{BOB}> "),
    ]
    assert nothingStored(dbpath)
    begin(s, [BOB])
    assert lines(s.send(chunked(MESSAGE)))[0].startswith(f"250 2.0.0 <{BOB}> delivered as ")
