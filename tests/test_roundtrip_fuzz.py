"""
A maildrop moved out and back in, generated: messages of every shape
(dot lines, "From " lines, bare CRs, NULs, 8-bit octets, long lines, no
final line break, empty bodies) delivered or imported with another
server's unique ids (any that POP3 can carry), then C{mailbox export}'s
Maildir and dovecot-uidlist imported into another user.  What a POP3
client sees of the second user is what it saw of the first: the same
UIDL and LIST answers, and every message octet for octet.
"""

import tempfile

from hypothesis import given
from hypothesis import strategies as st

from mailgate.importers.export import exportMaildir
from mailgate.importers.maildir import importMaildir
from mailgate.message import spoolBytes
from mailgate.testing import addUser, deliver, memoryStore, resultOf

from fuzzing import fuzzSettings
from test_export import PASSWORD, served

FUZZ = fuzzSettings(100)
ALICE = "alice@example.org"
BOB = "bob@example.org"

lines = st.one_of(
    st.sampled_from([b"", b".", b"..", b".leading dot", b"From me", b">From you", b"x" * 1200, b"\x00", b"\xe9t\xe9",
                     b"a\rb", b"a\nb", b"cr at end\r", b"tab\there", b" folded"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)
messages = st.tuples(
    st.lists(st.sampled_from([b"Subject: s", b"X-Odd: \x01", b"From: a@b.example", b"X-UIDL: other"]), max_size=3),
    st.lists(lines, max_size=8),
    st.booleans(),
).map(lambda t: b"\r\n".join(t[0]) + b"\r\n\r\n" + b"\r\n".join(t[1]) + (b"\r\n" if t[2] else b""))
# What POP3 can carry (RFC 1939: 1 to 70 octets of 0x21 to 0x7E).
uniqueIds = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70)
maildrops = st.lists(st.tuples(messages, st.one_of(st.none(), uniqueIds)), min_size=1, max_size=6)


@FUZZ
@given(maildrops)
def test_aMaildropMovedOutAndBackInLooksTheSameToPOP3(maildrop):
    store = memoryStore()
    try:
        addUser(store, ALICE, PASSWORD)
        addUser(store, BOB, PASSWORD)
        seen = set()
        for number, (message, uid) in enumerate(maildrop):
            if uid is None or uid in seen:
                # Delivered: an id of mailgate's own.
                deliver(store, [ALICE], message)
            else:
                seen.add(uid)
                imported, _, _ = resultOf(store.importMessages(ALICE, [(uid, spoolBytes(message), 1_700_000_000 + number)]))
                assert len(imported) == 1
        before = served(store, ALICE)
        with tempfile.TemporaryDirectory() as directory:
            target = f"{directory}/Maildir"
            report = exportMaildir(resultOf(store.exportMessages(ALICE)), target)
            assert report.failures == [] and report.messages == len(maildrop)
            imported = importMaildir(store, target, BOB)
            assert (imported.messages, imported.failures) == (len(maildrop), [])
        assert served(store, BOB) == before
    finally:
        store.close()
