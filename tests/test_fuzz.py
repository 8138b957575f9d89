"""
Hostile input, generated: whatever octets a client sends, in whatever
pieces, the servers answer with well-formed replies, never raise, and never
lose track of where commands begin.  (Hypothesis, seeded by its database;
the number of examples is bounded so the suite stays fast.)
"""

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
