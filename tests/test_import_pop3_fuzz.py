"""
C{mailgate import pop3} against POP3 servers that get things wrong,
generated: UIDL listings with repeated, spaced, overlong or unprintable
ids, numbers that are no numbers or list nothing; LIST listings that
disagree; messages of any octets; RETRs refused; a connection that breaks
at any message; with and without C{--delete}.

What the administrator and the user see: the import ends with a report or
an C{ImportFailed} saying why (never another exception); every message in
the maildrop has an id POP3 can carry and the octets the server sent for
it; and C{--delete} removes from the server only messages whose very
octets the maildrop holds.
"""

import socket

from hypothesis import given
from hypothesis import strategies as st

from mailgate.importers import ImportFailed, validUidl
from mailgate.importers.pop3 import importPOP3
from mailgate.testing import addUser, memoryStore

from fuzzing import fuzzSettings
from test_importer_faults import ScriptedPOP3, stuffed
from test_importers import ALICE, PASSWORD, pop3

FUZZ = fuzzSettings(60)

uniqueIds = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
    st.sampled_from(["U1", "U1", "dup", "with space", "x" * 71, "tab\tid", "é", "-", "\x7f", "a.b"]),
)
contents = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
    st.sampled_from([b"Subject: s\r\n\r\nbody\r\n", b".\r\n..\r\n", b"", b"no final line end", b"\x00\r\n"]),
)
servers = st.fixed_dictionaries(
    {
        "messages": st.lists(st.tuples(uniqueIds, contents), min_size=1, max_size=5),
        "uidlJunk": st.lists(st.sampled_from([b"x y", b"0 zero", b"99 far", b"1", b"", b"\xff\xfe odd", b"-1 neg"]),
                             max_size=2),
        "listJunk": st.lists(st.sampled_from([b"1 x", b"2 -5", b"7 10", b"nonsense"]), max_size=1),
        "refused": st.sets(st.integers(1, 5), max_size=2),
        "breakAt": st.one_of(st.none(), st.integers(1, 5)),
        "delete": st.booleans(),
    }
)


class LenientPOP3(ScriptedPOP3):
    """
    L{ScriptedPOP3} answering C{-ERR} for a message number it does not
    have (its listings may name numbers it has not), as a server does.
    """

    def stop(self):
        # Woken by a connection rather than at its accept's next timeout
        # (a fifth of a second an example).
        self._stop.set()
        socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        super().stop()

    def _answer(self, verb, argument, marked):
        if verb in ("RETR", "DELE") and not (argument.isdigit() and int(argument) in self.messages):
            return b"-ERR no such message\r\n"
        return super()._answer(verb, argument, marked)


def _unfinished(data):
    """
    What RETR's multi-line response carries of a message whose octets do
    not end with a line end: POP3 needs one before its terminating dot.
    """
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


@FUZZ
@given(servers)
def test_whatIsImportedIsWhatTheServerSentAndOnlyThatIsDeleted(server):
    messages = {n: (uid, _unfinished(data)) for n, (uid, data) in enumerate(server["messages"], 1)}
    source = LenientPOP3(messages)
    store = memoryStore()
    try:
        addUser(store, ALICE, PASSWORD)
        if server["uidlJunk"]:
            source.uidlLines = [b"%d %s" % (n, uid.encode("utf-8")) for n, (uid, _) in messages.items()]
            source.uidlLines += server["uidlJunk"]
        if server["listJunk"]:
            source.listLines = [b"%d %d" % (n, len(data)) for n, (_, data) in messages.items()]
            source.listLines += server["listJunk"]
        source.refused = server["refused"]
        source.breakAt = server["breakAt"]
        try:
            report = importPOP3(store, source.url, ALICE, PASSWORD, delete=server["delete"])
        except ImportFailed as e:
            assert str(e).strip()
            report = None
        uidls, sizes, bodies = pop3(store)
        sent = [data for _, data in messages.values()]
        for uidl, size, body in zip(uidls, sizes, bodies):
            assert validUidl(uidl), uidl
            assert body in sent and size == len(body), (uidl, body)
        if report is not None:
            assert report.messages == len(uidls)
        # Deleted from the server: only what the maildrop holds, octet
        # for octet.
        for number in source.deleted:
            assert messages[number][1] in bodies, (number, source.deleted)
    finally:
        source.stop()
        store.close()
