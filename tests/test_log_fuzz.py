"""
What clients send, in the logs, generated: POP3, SMTP and LMTP sessions
whose commands carry octets of every kind (escape sequences, NULs, lone
carriage returns, bytes that are no UTF-8, line separators) in user names,
passwords, hellos, senders and recipients, and (from a relay on
--xclient-network) XFORWARD's and XCLIENT's values, logged in or not,
delivering or not.  No log event field holds a control character: a log line is
one line, and what a client wrote is shown, never obeyed by a terminal
or a log reader.  (The logs' own tests check each line's form; this one
checks that no client text gets through unescaped.)
"""

import base64
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from mailgate.testing import POP3Session, SMTPSession, addUser, deliver, memoryStore
from fuzzing import fuzzSettings

ALICE = "alice@example.org"
PASSWORD = "secret"
FUZZ = fuzzSettings(100)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")

# Text a client puts in a command: anything but the line feed that ends it,
# control octets and UTF-8 line separators most often.
hostile = st.lists(
    st.one_of(
        st.sampled_from([b"\x1b[2J", b"\x00", b"\r", b"\x7f", b"\xe2\x80\xa8", b"\xc2\x85", b"\xff\xfe", b"%", b"+0A"]),
        st.binary(max_size=6).map(lambda b: b.replace(b"\n", b"")),
        st.sampled_from([b"alice", b"alice@example.org", b"example.org", b"bob", b" ", b"IPV6:fe80::1%"]),
    ),
    max_size=6,
).map(b"".join)

# SASL's responses are base64: what they decode to is not the command
# line's, and may hold line breaks (PLAIN's authzid and authcid logged).
saslPlain = st.tuples(hostile, hostile, hostile).map(
    lambda t: (b"AUTH PLAIN", base64.b64encode(b"\0".join(t)))
)
pop3Commands = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([b"USER", b"PASS", b"APOP", b"AUTH PLAIN", b"AUTH LOGIN", b"UIDL", b"RETR", b"XCLIENT",
                             b"QUIT", b"NOOP", b"BOGUS"]),
            hostile,
        ),
        saslPlain,
        hostile.map(lambda h: (b"AUTH LOGIN", base64.b64encode(h))),
    ),
    max_size=8,
)
smtpCommands = st.lists(
    st.tuples(
        st.sampled_from([b"EHLO", b"HELO", b"LHLO", b"MAIL FROM:<", b"RCPT TO:<", b"VRFY", b"XFORWARD ADDR=",
                         b"XCLIENT NAME=", b"BOGUS"]),
        hostile,
        st.sampled_from([b"", b">", b"@example.org>", b"> SIZE=10"]),
    ),
    max_size=8,
)


def _loggedWithoutControlCharacters(store, run):
    """
    Call C{run()} (a session on C{store}, which is closed after it); no
    event it logged holds a control character in a field.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        run()
    finally:
        globalLogPublisher.removeObserver(events.append)
        store.close()
    for event in events:
        for key, value in event.items():
            if isinstance(value, str) and key not in ("log_format", "log_namespace"):
                assert not _CONTROL.search(value), (event.get("event"), key, value)


@FUZZ
@given(pop3Commands, st.booleans())
def test_pop3ClientTextReachesTheLogsEscaped(commands, loggedIn):
    store = memoryStore()
    addUser(store, ALICE, PASSWORD)
    deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")

    def run():
        s = POP3Session(store)
        if loggedIn:
            assert s.login(ALICE, PASSWORD).startswith("+OK")
        for verb, argument in commands:
            if s.disconnected:
                break
            s.send(verb + b" " + argument + b"\r\n")
            s.advance(5)
        if not s.disconnected:
            s.send(b"QUIT\r\n")

    _loggedWithoutControlCharacters(store, run)


@FUZZ
@given(smtpCommands, st.booleans(), st.booleans(), st.booleans(), hostile)
def test_smtpClientTextReachesTheLogsEscaped(commands, lmtp, greets, delivers, sender):
    store = memoryStore()
    addUser(store, ALICE, PASSWORD)

    def run():
        # From a relay on --xclient-network: XFORWARD's and XCLIENT's
        # values are taken too.
        s = SMTPSession(store, lmtp=lmtp, xclientNetworks=["127.0.0.1/32"])
        if greets:
            s.send((b"LHLO" if lmtp else b"EHLO") + b" relay.example\r\n")
        for verb, argument, end in commands:
            if s.disconnected:
                break
            s.send(verb + argument + end + b"\r\n")
            s.advance(5)
        if delivers and not s.disconnected:
            # A message, from the hostile sender if it is taken: the
            # delivery's lines.
            s.send(b"RSET\r\n" + (b"LHLO" if lmtp else b"EHLO") + b" client.example\r\n")
            if not s.send(b"MAIL FROM:<" + sender + b"@example.net>\r\n").startswith(b"250"):
                s.send(b"MAIL FROM:<>\r\n")
            s.send(b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
            s.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
            s.advance(5)
        if not s.disconnected:
            s.send(b"QUIT\r\n")

    _loggedWithoutControlCharacters(store, run)
