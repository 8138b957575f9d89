"""
A POP3 session's deletion marks (L{mailgate.pop3.deletions.DeletionMarks}):
what DELE marks, RSET unmarks, LIST and UIDL skip and QUIT removes, held in
an octet per message rather than a set of indexes.
"""

import tracemalloc

from mailgate.pop3.deletions import DeletionMarks
from mailgate.pop3.responses import numberedLines
from mailgate.testing import POP3Session, addUser, deliver, memoryStore

ALICE = "alice@example.org"


def test_marksAreASetOfIndexes():
    marks = DeletionMarks(5)
    assert not marks and len(marks) == 0 and list(marks) == []
    assert 0 not in marks and 4 not in marks
    marks.add(3)
    marks.add(0)
    marks.add(3)
    assert len(marks) == 2
    assert list(marks) == [0, 3]
    assert 3 in marks and 0 in marks and 1 not in marks
    # Outside the maildrop, as in a set: not marked (no wrap-around).
    assert -1 not in marks and -2 not in marks and 5 not in marks
    assert bytes(marks.among(2, 3)) == b"\x00\x01\x00"
    marks.clear()
    assert not marks and list(marks) == [] and 3 not in marks
    assert bytes(marks.among(0, 5)) == bytes(5)


def test_listingsSkipMarkedMessagesAsWithASet():
    marks = DeletionMarks(1003)
    marks.add(1000)
    marks.add(1002)
    values = ["a1", "b2", "c3"]
    assert numberedLines(1001, values, marks) == numberedLines(1001, values, {1000, 1002}) == b"1002 b2\r\n"
    assert numberedLines(1, [7, 8], marks) == b"1 7\r\n2 8\r\n"


def test_deleListQuitAndRsetOnAMaildrop(store):
    addUser(store, ALICE, "pw")
    for i in range(5):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % i)
    session = POP3Session(store)
    session.login(ALICE, "pw")
    assert session.command("DELE 2").startswith("+OK")
    assert session.command("DELE 2").startswith("-ERR")
    assert session.command("RETR 2").startswith("-ERR")
    assert session.command("RSET").startswith("+OK maildrop has 5 messages")
    assert session.command("DELE 1").startswith("+OK")
    assert session.command("DELE 4").startswith("+OK")
    assert session.command("STAT").startswith("+OK 3 ")
    listing = session.command("LIST")
    assert [line.split()[0] for line in listing.splitlines()[1:-1]] == ["2", "3", "5"]
    uidl = session.command("UIDL")
    assert [line.split()[0] for line in uidl.splitlines()[1:-1]] == ["2", "3", "5"]
    assert "3 messages left" in session.command("QUIT")
    after = POP3Session(store)
    after.login(ALICE, "pw")
    assert after.command("STAT").startswith("+OK 3 ")
    subjects = [after.command(f"TOP {n} 0").splitlines()[1] for n in (1, 2, 3)]
    assert subjects == ["Subject: 1", "Subject: 2", "Subject: 4"]


def test_markingEveryMessageHoldsAboutAnOctetEach():
    """
    A client may DELE every message of a large maildrop: the marks cost an
    octet per message, not the 84 octets a set of indexes held per mark
    (some eight times what the client sent: 840 KB for 10,000 DELE).
    An in-memory database: 5,000 deliveries to a file synced at each
    commit would be the test's whole time.
    """
    store = memoryStore()
    count = 5000
    addUser(store, ALICE, "pw")
    for i in range(count):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % i)
    session = POP3Session(store)
    session.login(ALICE, "pw")
    commands = [b"DELE %d\r\n" % (i + 1) for i in range(count)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, command in enumerate(commands):
            session.protocol.dataReceived(command)
            if n % 100 == 0:
                # The replies, kept by the test's transport, are not the
                # session's.
                session.transport.clear()
        session.transport.clear()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert session.command("STAT") == "+OK 0 0\r\n"
    assert held < 4 * count, held
