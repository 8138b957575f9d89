"""
C{pop3_client_workarounds = outlook-no-nuls oe-ns-eoh} on a private Debian
Dovecot 2.3.19 (tests/dovecotserver.py) and C{--pop3-client-workarounds
"outlook-no-nuls oe-ns-eoh"} on a real C{twistd mailgate}, serving the same
awkward messages (dropped into Dovecot's maildir as files, delivered to
mailgate's SQLite database): C{RETR}, C{TOP n 0}, C{TOP n 1} and C{TOP n 2}
compared octet for octet, still dot-stuffed, and the sizes C{LIST} and
C{RETR} give.

What Dovecot was measured to send with them (each alone too, and each the
same as here for what it touches):

    - C{outlook-no-nuls}: every NUL, in header and body, at mailgate's
      128 KiB chunk boundaries too, as 0x80; C{".\\0"} at a line start as
      C{"..\\x80"}; sizes unchanged (one octet for one).
    - C{oe-ns-eoh}: C{CRLF} before the terminating C{"."} of a message
      without an empty line (header fields only, with or without a final
      line end, one past a chunk too), in RETR and every TOP; none for a
      message of C{CRLF} alone, or whose body begins at once. LIST, STAT
      and C{+OK n octets} give the message's size as stored: RETR sends
      two octets more than they say (mailgate does the same: see the
      README's POP3 section for why).
    - Messages with a header's end and no NUL (dot lines at the start of
      the body, a plain message) go out as without workarounds.

The differences are those of the servers without workarounds
(tests/test_pop3_vs_dovecot.py): Dovecot leaves the line end it adds to a
message without one out of its size, and sends the empty message as one
empty line (so with C{oe-ns-eoh} two: that one and the header's end),
where mailgate sends none (so with C{oe-ns-eoh} one, the header's end).
Messages whose first line starts with "." are left out: Dovecot 2.3 does
not stuff that line, and its response cannot be framed.
"""

import pytest

from dovecotserver import PrivateDovecot, requireDovecot
from e2e import _LOGGED_ERROR, ServerProcess, databaseURL
from mailgate.store.sql import CHUNK_SIZE
from mailgate.testing import addUser, deliver, memoryStore
from test_pop3_vs_dovecot import Client, dropIntoMaildir, loggedInSizes, unstuffed

pytestmark = requireDovecot

ALICE = "alice@example.org"
PASSWORD = "wonder land"
WORKAROUNDS = "outlook-no-nuls oe-ns-eoh"


def _nulsAtChunkBoundaries():
    """
    Three of mailgate's chunks: a NUL the last octet of the first, NULs
    and a dot line the first octets of the second, a NUL and a dot line
    at the start of the third.
    """
    message = b"Subject: big\r\n\r\n"
    while len(message) + 80 <= CHUNK_SIZE - 3:
        message += b"x" * 78 + b"\r\n"
    message += b"y" * (CHUNK_SIZE - 3 - len(message)) + b"\r\n\0"
    message += b"\0\0.\r\n.\0\r\n"
    while len(message) + 80 <= 2 * CHUNK_SIZE:
        message += b"z" * 78 + b"\r\n"
    message += b"w" * (2 * CHUNK_SIZE - len(message) - 2) + b"\r\n"
    return message + b".\0dotted\r\n\0last\0\r\n"


#: name: the message both serve
MESSAGES = {
    "NULs in header and body": b"Subject: a\0b\r\nX: \0\r\n\r\nbody\0here\r\n\0\r\n\0.x\r\n.\0\r\n",
    "NULs at chunk boundaries": _nulsAtChunkBoundaries(),
    "no header's end": b"Subject: no separator\r\nFrom: a@example.net\r\n",
    "no header's end, no final line end": b"Subject: no separator\r\nFrom: a@example.net",
    "a header without a line end": b"Subject: a header, no line end",
    "no header's end, a NUL": b"Subject: \0\r\n",
    "no header's end, past a chunk": b"".join(b"X-Field-%05d: " % n + b"h" * 60 + b"\r\n" for n in range(3000)),
    "a header past a chunk, then its end": b"".join(b"X-Field-%05d: " % n + b"h" * 60 + b"\r\n" for n in range(3000))
    + b"\r\n.body\0line\r\nsecond\r\n",
    "the empty message": b"",
    "CRLF alone": b"\r\n",
    "the body at once": b"\r\nbody\r\n",
    "a header and its end only": b"Subject: x\r\n\r\n",
    "dot lines at the body's start": b"Subject: d\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n",
    "a plain message": b"Subject: normal\r\nFrom: x@example.net\r\n\r\nhello\r\nworld\r\n",
}
NUMBERS = {name: n for n, name in enumerate(MESSAGES, 1)}
#: stored without a final line end: Dovecot sends one it does not count
UNTERMINATED = {name for name, m in MESSAGES.items() if m and not m.endswith(b"\n")}
#: without an empty line: both send one, neither counts it
NO_HEADER_END = {
    "no header's end", "no header's end, no final line end", "a header without a line end",
    "no header's end, a NUL", "no header's end, past a chunk", "the empty message",
}
COMMANDS = ("RETR %d", "TOP %d 0", "TOP %d 1", "TOP %d 2")


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """
    Each server's replies: C{{side: (LIST's sizes, {command: Reply})}}.
    """
    directory = tmp_path_factory.mktemp("workarounds-vs-dovecot")
    dovecot = PrivateDovecot(extra=f"pop3_client_workarounds = {WORKAROUNDS}")
    mailgate = None
    try:
        dovecot.addUsers([ALICE], PASSWORD)
        dropIntoMaildir(dovecot, ALICE, MESSAGES.values())
        dovecot.start()
        url = databaseURL(directory / "mail.sqlite3")
        store = memoryStore(url)
        try:
            addUser(store, ALICE, PASSWORD)
            for message in MESSAGES.values():
                deliver(store, [ALICE], message)
        finally:
            store.close()
        options = ["--auth-failure-delay", "0", "--pop3-client-workarounds", WORKAROUNDS]
        mailgate = ServerProcess(url, options, cwd=directory)
        mailgate.start()
        yield {"dovecot": session(dovecot.pop3Port), "mailgate": session(mailgate.port)}
    finally:
        if mailgate is not None:
            mailgate.stop()
        dovecot.cleanup()
    assert not _LOGGED_ERROR.search(mailgate.stdout + mailgate.stderr), mailgate.log()


def session(port):
    client = Client(port)
    try:
        sizes = loggedInSizes(client, ALICE, PASSWORD)
        replies = {}
        for n in range(1, len(MESSAGES) + 1):
            for command in COMMANDS:
                command = (command % n).encode("ascii") + b"\r\n"
                client.send(command)
                replies[command.rstrip()] = client.reply(command)
        return sizes, replies
    finally:
        client.close()


@pytest.mark.parametrize("name", [name for name in MESSAGES if name != "the empty message"])
def test_retrAndTopSendWhatDovecotSends(answers, name):
    """
    RETR and TOP n 0, 1, 2: the same octets from both, still stuffed.
    """
    n = NUMBERS[name]
    _, dovecot = answers["dovecot"]
    _, mailgate = answers["mailgate"]
    for command in COMMANDS:
        command = (command % n).encode("ascii")
        assert mailgate[command].status == dovecot[command].status == "+OK", command
        assert mailgate[command].body == dovecot[command].body, command
    assert b"\0" not in mailgate[b"RETR %d" % n].body
    if name in NO_HEADER_END:
        assert mailgate[b"RETR %d" % n].body.endswith(b"\r\n\r\n.\r\n")


def test_theEmptyMessage(answers):
    """
    The difference both have without workarounds, and the header's end
    added to it by both: mailgate's one empty line, Dovecot's two.
    """
    n = NUMBERS["the empty message"]
    for command in COMMANDS:
        command = (command % n).encode("ascii")
        assert answers["mailgate"][1][command].body == b"\r\n.\r\n"
        assert answers["dovecot"][1][command].body == b"\r\n\r\n.\r\n"


def test_theSizesAreTheStoredOnes(answers):
    """
    LIST and RETR's +OK n octets: the message as stored, on both (but for
    the line end Dovecot adds and leaves out); RETR sends the NULs' 0x80 in
    their place, and the header's end two octets beyond the size.
    """
    dovecotSizes, dovecot = answers["dovecot"]
    mailgateSizes, mailgate = answers["mailgate"]
    for name, message in MESSAGES.items():
        n = NUMBERS[name]
        stored = len(message) + (2 if name in UNTERMINATED else 0)
        assert mailgateSizes[n] == stored, name
        assert dovecotSizes[n] == len(message), name
        assert mailgate[b"RETR %d" % n].line == b"+OK %d octets" % stored, name
        assert dovecot[b"RETR %d" % n].line == b"+OK %d octets" % len(message), name
        sent = len(unstuffed(mailgate[b"RETR %d" % n].body))
        if name == "the empty message":
            assert sent == 2
        else:
            assert sent == stored + (2 if name in NO_HEADER_END else 0), name
