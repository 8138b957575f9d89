"""
Importing maildrops from elsewhere, keeping unique ids (mailgate/importers):
the pieces on their own (dovecot-uidlist, pop3_uidl_format, Dovecot's
order of new files, LF to CRLF), the maildir import into a store on both
backends (resumable, batch by batch, ids that never collide with
mailgate's own), and the live POP3 import against a real mailgate server
(STLS with a verified certificate, --insecure, --delete, --users).

The comparison with a real Dovecot is in test_dovecot_migration.py.
"""

import functools
import os
import socket
import random

import pytest

from mailgate.cli import run
from mailgate.importers import FileSource, toCRLF
from mailgate.importers.maildir import (
    dovecotOrder,
    importMaildir,
    readUidList,
    xUidlField,
)
from mailgate.importers.pop3 import parseURL
from mailgate.importers.uidlformat import formatUidl
from mailgate.store.imported import generatedUid
from mailgate.store.rows import formatUniqueId
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
PASSWORD = "wonderland"


# -- the pieces ------------------------------------------------------------------


def test_uidlFormatLikeDovecot():
    values = {"u": "26", "v": "1700000000", "f": "1700000000.M1P2.host,S=20", "g": "abc", "m": None}
    assert formatUidl("%08Xu%08Xv", values) == "0000001a6553f100"
    assert formatUidl("%08Xv%08Xu", values) == "6553f1000000001a"  # UW
    assert formatUidl("%v-%u", values) == "1700000000-26"  # Courier
    assert formatUidl("%v.%u", values) == "1700000000.26"  # Cyrus
    assert formatUidl("%f", values) == "1700000000.M1P2.host,S=20"
    assert formatUidl("%{uidvalidity}%{uid}%%%g", values) == "170000000026%abc"
    assert formatUidl("%Uf", values) == "1700000000.M1P2.HOST,S=20"
    assert formatUidl("%Mu", values) == "4e732ced3463d06de0ca9a15b6153677"
    assert formatUidl("%.4f|%3f|%05u", values) == "1700|170|00026"
    with pytest.raises(ValueError):
        formatUidl("%m", values)
    with pytest.raises(ValueError):
        formatUidl("%q", values)


def test_uidListVersions(tmp_path):
    path = tmp_path / "dovecot-uidlist"
    path.write_bytes(
        b"3 V1234 N9 G0123456789abcdef\n"
        b"1 :1700000000.M1P1.h,S=5,W=6:2,S\n"
        b"4 W120 Pold-server-id-7 GX :1700000005.M2P1.h\n"
    )
    uids = readUidList(str(path))
    assert (uids.uidValidity, uids.nextUid, uids.guid) == (1234, 9, "0123456789abcdef")
    assert uids.records["1700000000.M1P1.h,S=5,W=6"].uid == 1
    assert uids.records["1700000005.M2P1.h"].fields == {"W": "120", "P": "old-server-id-7", "G": "X"}
    path.write_bytes(b"1 77 3\n2 1600000000.123.h\n")
    old = readUidList(str(path))
    assert (old.uidValidity, old.nextUid, old.records["1600000000.123.h"].uid) == (77, 3, 2)
    assert readUidList(str(tmp_path / "missing")) is None


def test_dovecotOrderOfNewFiles():
    names = [
        "1700000001.M500P9.b",
        "999999999.M1P1.a",  # fewer digits, earlier: numeric, not text order
        "1700000001.M40P9.c",
        "1700000001.P9.a",  # no microseconds: the rest of the name decides
        "1700000000.M900P1.z",
        "1700000001.M40P9.b:2,S",
    ]
    random.Random(4).shuffle(names)
    ordered = sorted(names, key=functools.cmp_to_key(dovecotOrder))
    assert ordered[:2] == ["999999999.M1P1.a", "1700000000.M900P1.z"]
    assert ordered.index("1700000001.M40P9.b:2,S") < ordered.index("1700000001.M40P9.c")
    assert ordered.index("1700000001.M40P9.c") < ordered.index("1700000001.M500P9.b")
    # A name that is a prefix of another comes after it: Dovecot compares
    # the flags separator (":", which it adds when it moves the file to
    # cur/) as an octet.
    assert sorted(["1.M1P1.drop", "1.M1P1.drop2"], key=functools.cmp_to_key(dovecotOrder)) == [
        "1.M1P1.drop2", "1.M1P1.drop",
    ]


def test_lineEndsAsPOP3ServesThem(tmp_path):
    assert toCRLF(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n"
    # A CRLF split across two reads stays one CRLF.
    path = tmp_path / "m"
    data = b"Subject: x\n\n" + b"".join(b"line %d\r\n" % n for n in range(500)) + b"last\n" + b"z" * 3
    path.write_bytes(data)
    for blockSize in (1, 2, 3, 7, 64, 1 << 20):
        FileSource.blockSize = blockSize
        try:
            source = FileSource(str(path))
            whole = b"".join(source.chunks(5))
        finally:
            FileSource.blockSize = 1 << 20
        assert whole == toCRLF(data), blockSize
        assert source.size == len(whole)
        assert source.headerSize == len(b"Subject: x\r\n\r\n")


@pytest.mark.parametrize(
    "message, value",
    [
        (b"X-UIDL: a1\r\n\r\n", b"a1"),
        # A header line far longer than what is held of it, before the field.
        (b"Subject: " + b"x" * (3 << 20) + b"\nX-UIDL: after-a-long-line\n\nbody\n", b"after-a-long-line"),
        (b"X-UIDL: " + b"y" * (1 << 20) + b"\n\n", b"y" * ((1 << 16) - len(b"X-UIDL: "))),
        # No empty line: the whole message is its header.
        (b"Subject: s\nX-UIDL: last", b"last"),
        (b"\nX-UIDL: in the body\n", None),
        (b"\r\nX-UIDL: in the body\n", None),
        (b"X-UIDLS: other\n\n", None),
        (b"", None),
    ],
)
def test_theXUIDLFieldOfAMessageFile(tmp_path, message, value):
    """
    Where Dovecot serves a message's X-UIDL field (pop3_reuse_xuidl): the
    field's value is found in the header alone, reading a line at a time
    and holding at most 64 KiB of one.
    """
    path = tmp_path / "message"
    path.write_bytes(message)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert xUidlField(fd) == value
    finally:
        os.close(fd)


def test_theDeletedFlagIsReadFromTheKeywordsBesideTheUidList(store, tmp_path):
    """
    With --deleted-flag (Dovecot's pop3_deleted_flag), the keyword's
    letter comes from the dovecot-keywords beside the dovecot-uidlist
    (outside the maildir with CONTROL=); only the flags after a name's
    last ":2," count.
    """
    control = tmp_path / "control"
    control.mkdir()
    (control / "dovecot-keywords").write_bytes(b"0 Junk\n1 $POP3Deleted\n")
    directory = writeMaildir(tmp_path / "Maildir", [
        ("cur", "1700000000.M1P1.host:2,Sb", b"Subject: deleted\n\n"),
        ("cur", "1700000001.M1P1.host:2,a", b"Subject: junk\n\n"),
        ("new", "1700000002.M1P1.host:2,b", b"Subject: deleted, still in new\n\n"),
        ("cur", "1700000003.M1P1.b:2,S", b"Subject: a b in the name\n\n"),
        ("cur", "1700000004.M1P1.host:2,S,b", b"Subject: b past the flags\n\n"),
    ])
    (control / "dovecot-uidlist").write_bytes(b"3 V1 N1\n")
    report = importMaildir(store, directory, ALICE, uidListPath=str(control / "dovecot-uidlist"),
                           deletedFlag="$pop3deleted")
    assert (report.messages, report.failures) == (3, [])
    assert [body.split(b"\r\n")[0] for body in pop3(store)[2]] == [
        b"Subject: junk", b"Subject: a b in the name", b"Subject: b past the flags",
    ]


def test_anEmptyDeletedFlagIsRefused(tmp_path):
    """
    --deleted-flag '' (an unset shell variable) is a usage error before
    anything is opened: no message carries it, and the messages POP3
    clients had deleted were imported again without a word.
    """
    from e2e import mailgateHere

    directory = writeMaildir(tmp_path / "Maildir", [("cur", "1700000000.M1P1.host:2,Sa", b"Subject: x\n\n")])
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    code, out, err = mailgateHere(url, "import", "maildir", directory, ALICE, "--deleted-flag", " ")
    assert (code, out) == (64, "")
    assert err == (
        "mailgate: --deleted-flag is empty: give Dovecot's pop3_deleted_flag keyword (in single quotes where it "
        "begins with $, as in '$POP3Deleted', which a shell otherwise takes for a variable), or leave it out\n"
    )
    assert not (tmp_path / "mail.sqlite3").exists()


def test_aDeletedFlagTheFileNamesCannotCarry(tmp_path):
    """
    A maildir file name carries 26 keywords at most (a to z): Dovecot
    keeps any further keyword, its pop3_deleted_flag among them, in its
    index alone (seen with Debian's Dovecot 2.3: the 27th keyword of a
    mailbox, which Dovecot's POP3 then hid, was in neither the names nor
    dovecot-keywords).  Such an import is refused, naming the way that
    works; one whose keyword dovecot-keywords does not list (misspelt, or
    without its $) says that no message was left out.  Before, both
    imported every message without a word, bringing back to the
    leave-on-server clients what they had deleted.
    """
    from e2e import mailgateHere

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert mailgateHere(url, "user", "add", ALICE, "--password-stdin", stdin="x\n")[0] == 0
    tags = "".join(f"{n} tag{n}\n" for n in range(26))
    directory = writeMaildir(tmp_path / "full", [
        ("cur", "1700000000.M1P1.host:2,Sabcdefghijklmnopqrstuvwxyz", b"Subject: tagged\n\n"),
        ("cur", "1700000001.M1P1.host:2,S", b"Subject: deleted by POP3, in the index only\n\n"),
    ], uidList=b"3 V1 N3\n1 :1700000000.M1P1.host\n2 :1700000001.M1P1.host\n")
    (tmp_path / "full" / "dovecot-keywords").write_text(tags)
    code, out, err = mailgateHere(url, "import", "maildir", directory, ALICE, "--deleted-flag", "$POP3Deleted")
    assert (code, out) == (66, "")
    assert err == (
        f"mailgate: {directory}/dovecot-keywords lists 26 keywords, the most a maildir file name can carry, and "
        f"not $POP3Deleted (--deleted-flag): Dovecot keeps any further keyword in its index only, which mailgate "
        f"does not read, so the messages POP3 clients deleted cannot be told from the others; move this maildrop "
        f"with import pop3, through Dovecot's POP3, which leaves them out\n"
    )
    # The keyword among the 26 (z, which the first message has): left
    # out as before.
    (tmp_path / "full" / "dovecot-keywords").write_text(tags.replace("25 tag25", "25 $POP3Deleted"))
    code, out, err = mailgateHere(url, "import", "maildir", directory, ALICE, "--deleted-flag", "$POP3Deleted")
    assert (code, out) == (0, "1 message imported (47 octets), 0 skipped as already present\n"), err

    directory = writeMaildir(tmp_path / "listed", [
        ("cur", "1700000002.M1P1.host:2,Sa", b"Subject: deleted by POP3\n\n"),
    ])
    (tmp_path / "listed" / "dovecot-keywords").write_text("0 $POP3Deleted\n")
    code, out, err = mailgateHere(url, "import", "maildir", directory, ALICE, "--deleted-flag", "POP3Deleted")
    assert code == 0 and out.startswith("1 message imported"), (out, err)
    assert err.endswith(
        f"mailgate: no message has the keyword POP3Deleted (--deleted-flag), which {directory}/dovecot-keywords "
        f"does not list (it lists $POP3Deleted): none left out as deleted by POP3 clients\n"
    )


@pytest.mark.parametrize("dropped, said", [
    (["1700000300.M1P1.mda"], "1 file that Dovecot has not numbered yet (dropped in by another program than Dovecot) "
     "got uid 2, the one Dovecot gives it next unless it first saves a message of its own (by its LMTP, LDA or "
     "IMAP), which takes that uid"),
    (["1700000300.M1P1.mda", "1700000301.M1P1.mda"], "2 files that Dovecot has not numbered yet (dropped in by "
     "another program than Dovecot) got uids 2 to 3, the ones Dovecot gives them next unless it first saves a "
     "message of its own (by its LMTP, LDA or IMAP), which takes the first of them"),
])
def test_filesDovecotHasNotNumberedYetAreSaidToBeAtRisk(tmp_path, dropped, said):
    """
    A file another program (Postfix's virtual, procmail) dropped in new/
    has no uid yet: the import gives it the one Dovecot gives it next.
    Seen with Debian's Dovecot 2.3, a message Dovecot's LMTP saved before
    Dovecot numbered such a file took that uid (Dovecot numbered the file
    after it at the next POP3 login): the next run found Dovecot's message
    under the id mailgate had given the file, a conflict, and served the
    file under both ids, where Dovecot's clients knew the id as the other
    message's.  Before, the import gave the uid without a word; now it
    says so, with what makes the uids hold.  Nothing is said for a format
    without the uid.
    """
    from e2e import mailgateHere

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert mailgateHere(url, "user", "add", ALICE, "--password-stdin", stdin="x\n")[0] == 0
    directory = writeMaildir(
        tmp_path / "Maildir",
        [("cur", "1700000000.M1P1.host:2,S", b"Subject: numbered\n\n")]
        + [("new", name, b"Subject: dropped\n\n") for name in dropped],
        uidList=b"3 V1700000000 N2\n1 :1700000000.M1P1.host\n",
    )
    code, out, err = mailgateHere(url, "import", "maildir", directory, ALICE)
    assert code == 0, err
    assert err == (
        f"mailgate: {said}: where mail also comes in through Dovecot, have it number them just before the "
        f"import (doveadm mailbox status -u USER messages INBOX), or import with Dovecot stopped\n"
    )
    # File names as ids: no uid is given to any.
    code, out, err = mailgateHere(url, "import", "maildir", directory, ALICE, "--uidl-format", "%f")
    assert (code, err) == (0, ""), out


def test_importedMessagesSayWhereTheirDotLinesBegin(tmp_path):
    """
    A maildir file is measured for POP3's dot-stuffing as it is read, in
    blocks cut anywhere; so is a message retrieved from another server.
    """
    from mailgate.importers.pop3 import SpoolSource
    from mailgate.message import dotLineOffsets

    path = tmp_path / "m"
    data = b"Subject: x\n\n.one\nplain\n..two\n" + b"".join(b"%s%d\n" % (b"." * (n % 3 == 0), n) for n in range(200))
    path.write_bytes(data)
    expected = dotLineOffsets(toCRLF(data))
    assert len(expected) > 60
    for blockSize in (1, 2, 3, 7, 64, 1 << 20):
        FileSource.blockSize = blockSize
        try:
            source = FileSource(str(path))
        finally:
            FileSource.blockSize = 1 << 20
        assert (source.dotLines, source.dotOffsets) == (True, expected), blockSize
    spool = SpoolSource()
    for line in toCRLF(data).splitlines(keepends=True):
        spool.write(line)
    spool.finish(None)
    assert (spool.dotLines, spool.dotOffsets) == (True, expected)


def test_importSourcesProvideIMessageSource(tmp_path):
    """
    What the importers hand the store is a whole L{IMessageSource}, as
    SMTP's spool is: the store reads nothing else of it.
    """
    from zope.interface.verify import verifyObject

    from mailgate.importers.pop3 import SpoolSource
    from mailgate.interfaces import IMessageSource

    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\n\nbody\n")
    source = FileSource(str(path))
    try:
        assert verifyObject(IMessageSource, source)
    finally:
        source.close()
    spool = SpoolSource()
    spool.write(b"Subject: x\r\n")
    assert verifyObject(IMessageSource, spool.finish(None))
    spool.close()


def test_popURLs():
    assert parseURL("pop3://alice%40example.org@mail.example.net") == (
        False, "mail.example.net", 110, "alice@example.org", None,
    )
    assert parseURL("pop3s://bob:s%3Acret@10.0.0.1:1995") == (True, "10.0.0.1", 1995, "bob", "s:cret")
    assert parseURL("pop3://mail.example.net")[3] is None
    from mailgate.importers import ImportFailed

    for bad in ("imap://x", "pop3://", "pop3://host:notaport"):
        with pytest.raises(ImportFailed):
            parseURL(bad)


def test_generatedIdsAreRecognised():
    assert generatedUid(formatUniqueId(26, 0x1234), 0x1234) == 26
    assert generatedUid(formatUniqueId(2**33, 7), 7) == 2**33
    assert generatedUid(formatUniqueId(26, 0x1234), 0x1235) is None
    assert generatedUid("000000001a00001234", 0x1234) is None  # not how mailgate writes 26
    assert generatedUid("xyz", 1) is None


# -- maildir into a store ------------------------------------------------------------


def writeMaildir(root, messages, uidList=None):
    """
    A maildir: C{messages} is a list of C{(subdir, file name, octets)}.
    """
    for sub in ("cur", "new", "tmp"):
        os.makedirs(root / sub, exist_ok=True)
    for sub, name, data in messages:
        (root / sub / name).write_bytes(data)
    if uidList is not None:
        (root / "dovecot-uidlist").write_bytes(uidList)
    return str(root)


MESSAGES = [
    ("cur", "1700000000.M1P1.host,S=34:2,S", b"Subject: first\n\n.leading dot\nbody\n"),
    ("cur", "1700000100.M1P1.host:2,", b"Subject: second\r\n\r\nalready CRLF\r\n"),
    ("new", "1700000200.M5P1.host", b"Subject: third\n\nno final line end"),
    ("new", "1700000150.M9P1.host", b"Subject: unlisted, earlier\n\n\xe9t\xe9 8-bit\n"),
]
UIDLIST = (
    b"3 V1700000000 N7 Gffff\n"
    b"3 :1700000000.M1P1.host,S=34:2,S\n"
    b"5 Pkept-from-before :1700000100.M1P1.host\n"
    b"6 :1700000200.M5P1.host\n"
)


@pytest.fixture
def store(databaseURL):
    s = memoryStore(databaseURL)
    addUser(s, ALICE, PASSWORD)
    yield s
    s.close()


def pop3(store):
    session = POP3Session(store)
    assert session.login(ALICE, PASSWORD).startswith("+OK")
    uidl = [line.split()[1] for line in session.command("UIDL").split("\r\n")[1:-2]]
    sizes = [int(line.split()[1]) for line in session.command("LIST").split("\r\n")[1:-2]]
    bodies = []
    for n in range(1, len(sizes) + 1):
        reply = session.send(b"RETR %d\r\n" % n)
        status, _, rest = reply.partition(b"\r\n")
        assert status.startswith(b"+OK")
        body = rest[: -len(b".\r\n")]
        body = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))
        bodies.append(body)
    session.command("QUIT")
    return uidl, sizes, bodies


def test_maildirWithUidList(store, tmp_path):
    directory = writeMaildir(tmp_path / "Maildir", MESSAGES, UIDLIST)
    report = importMaildir(store, directory, ALICE)
    assert report.failures == []
    assert (report.messages, report.skipped) == (4, 0)
    uidl, sizes, bodies = pop3(store)
    # Listed first, by uid (an explicit P id wins); the unlisted file
    # after them, with the next uid (7).
    assert uidl == [
        formatUidl("%08Xu%08Xv", {"u": "3", "v": "1700000000"}),
        "kept-from-before",
        formatUidl("%08Xu%08Xv", {"u": "6", "v": "1700000000"}),
        formatUidl("%08Xu%08Xv", {"u": "7", "v": "1700000000"}),
    ]
    expected = [toCRLF(MESSAGES[i][2]) for i in (0, 1, 2, 3)]
    assert sizes == [len(e) for e in expected]
    # RETR gives a message without a final line end one, as Dovecot does.
    assert bodies == [e if e.endswith(b"\r\n") else e + b"\r\n" for e in expected]
    assert report.octets == sum(sizes)
    status = resultOf(store.quotaOf(ALICE))
    assert (status.usedMessages, status.usedOctets) == (4, sum(sizes))
    # Arrival: the delivery time in the name.
    assert [m.arrived for m in resultOf(store.listMessages(ALICE))] == [1700000000, 1700000100, 1700000200, 1700000150]


def test_maildirWithoutUidListUsesFileNames(store, tmp_path):
    directory = writeMaildir(tmp_path / "Maildir", MESSAGES)
    report = importMaildir(store, directory, ALICE)
    assert report.failures == []
    uidl, sizes, _ = pop3(store)
    assert uidl == [
        "1700000000.M1P1.host,S=34",
        "1700000100.M1P1.host",
        "1700000150.M9P1.host",
        "1700000200.M5P1.host",
    ]
    from mailgate.importers import ImportFailed

    with pytest.raises(ImportFailed):
        importMaildir(store, directory, ALICE, uidlFormat="%u")


def test_importIsResumableAndBatched(store, tmp_path, monkeypatch):
    from mailgate.importers import BatchWriter

    messages = [("new", f"17000{n:05d}.M1P1.h", b"Subject: %d\n\nbody\n" % n) for n in range(25)]
    directory = writeMaildir(tmp_path / "Maildir", messages)
    monkeypatch.setattr(BatchWriter, "maxMessages", 10)
    calls = []
    importMessages = store.importMessages

    def failingThird(address, items, source=None):
        calls.append(len(items))
        if len(calls) == 3:
            from mailgate.errors import TemporaryFailure
            from twisted.internet import defer

            return defer.fail(TemporaryFailure("disk full"))
        return importMessages(address, items, source)

    store.importMessages = failingThird
    report = importMaildir(store, directory, ALICE)
    assert calls == [10, 10, 5]
    assert (report.messages, len(report.failures)) == (20, 1)
    assert "disk full" in report.failures[0]
    # The failed batch left nothing behind; the first two are complete.
    assert len(resultOf(store.listMessages(ALICE))) == 20
    del store.importMessages
    again = importMaildir(store, directory, ALICE)
    assert (again.messages, again.skipped, again.failures) == (5, 20, [])
    uidl, _, _ = pop3(store)
    assert uidl == [name for _, name, _ in messages]


def test_importedIdsNeverCollideWithGeneratedOnes(store, tmp_path):
    """
    An imported id that has the shape of mailgate's own ids for this
    maildrop (same validity stamp) moves the uid counter past it.
    """
    from test_store import query

    validity = query(store, "SELECT uid_validity FROM mailboxes")[0][0]
    taken = [formatUniqueId(n, validity) for n in (2, 40)]
    messages = [("new", f"17000000{n}.M1P1.h", b"Subject: %d\n\nx\n" % n) for n in range(2)]
    directory = writeMaildir(tmp_path / "Maildir", messages)
    uidList = b"3 V%d N3\n1 P%s :%s\n2 P%s :%s\n" % (
        validity, taken[0].encode(), messages[0][1].encode(), taken[1].encode(), messages[1][1].encode(),
    )
    (tmp_path / "Maildir" / "dovecot-uidlist").write_bytes(uidList)
    assert importMaildir(store, directory, ALICE).messages == 2
    later = [deliver(store, [ALICE], b"Subject: new\r\n\r\nx\r\n")[ALICE] for _ in range(3)]
    assert not set(later) & set(taken)
    assert [generatedUid(u, validity) for u in later] == [41, 42, 43]
    uidl, _, _ = pop3(store)
    assert uidl == taken + later


def test_invalidIdsAreFailuresAndTheRestIsImported(store, tmp_path):
    messages = [("new", f"170000000{n}.M1P1.h", b"Subject: %d\n\nx\n" % n) for n in range(2)]
    directory = writeMaildir(
        tmp_path / "Maildir", messages, b"3 V1 N3\n1 Pbad\x01id :%s\n2 :%s\n" % (
            messages[0][1].encode(), messages[1][1].encode()
        ),
    )
    report = importMaildir(store, directory, ALICE)
    assert report.messages == 1 and len(report.failures) == 1
    assert "is not one POP3 can carry" in report.failures[0]


# -- the command -----------------------------------------------------------------------


def cli(url, *argv, stdin=""):
    import io

    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", url, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={})
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def test_importMaildirCommand(databaseURL, store, tmp_path):
    directory = writeMaildir(tmp_path / "Maildir", MESSAGES, UIDLIST)
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE)
    # The file dovecot-uidlist does not list: test_filesDovecotHasNotNumberedYetAreSaidToBeAtRisk.
    assert (code, err.count("\n")) == (0, 1) and err.startswith("mailgate: 1 file that Dovecot has not numbered yet")
    octets = sum(len(toCRLF(data)) for _, _, data in MESSAGES)
    assert out == f"4 messages imported ({octets} octets), 0 skipped as already present\n"
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE)
    assert out == "0 messages imported (0 octets), 4 skipped as already present\n"
    code, out, err = cli(databaseURL, "import", "maildir", directory, "nobody@example.org")
    assert code == 67
    code, out, err = cli(databaseURL, "import", "maildir", str(tmp_path / "nothing"), ALICE)
    # One line: not also a warning that its ids will be its file names.
    assert (code, err) == (66, f"mailgate: {tmp_path / 'nothing'} is not a maildir (no cur/ or new/)\n")
    # A usage error: the option is wrong, not the maildir.
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%{nope}")
    assert code == 64 and "bad --uidl-format" in err


# -- live POP3, from a real mailgate server --------------------------------------------

# The source server's own backend does not matter here (the import's
# store work is tested on both above): these run on SQLite only.
from e2e import mailgate_cli, mailgate_server, sqliteOnly  # noqa: E402,F401 (fixtures)

BOB = "bob@example.org"
BOB_PASSWORD = "builder"


def sourceServer(mailgate_server, mailgate_cli, tmp_path, count=3):
    """
    A mailgate server whose POP3 needs TLS (loopback is not a trusted
    network here), holding C{count} messages for Alice and one for Bob;
    it refuses a login after 0.1 s, not the default second.
    """
    from certs import makeCertificate

    (tmp_path / "certs").mkdir(exist_ok=True)
    certificate, key = makeCertificate(tmp_path / "certs", "localhost", name="server")
    s = memoryStore(mailgate_server.database)
    try:
        addUser(s, ALICE, PASSWORD)
        addUser(s, BOB, BOB_PASSWORD)
        for n in range(count):
            deliver(s, [ALICE], b"Subject: %d\n\n.dot line %d\n" % (n, n) + b"x" * (100 * n) + b"\n")
        deliver(s, [BOB], b"Subject: for bob\n\nhi\n")
    finally:
        s.close()
    server = mailgate_server(
        "--tls-cert", str(certificate), "--tls-key", str(key), "--trusted-network", "192.0.2.0/24",
        "--pop3s", "tcp:0:interface=127.0.0.1", "--auth-failure-delay", "0.1",
    )
    return server, certificate


def target(tmp_path, *users):
    url = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    s = memoryStore(url)
    for address, password in users:
        addUser(s, address, password)
    return url, s


def served(url, address, password):
    s = memoryStore(url)
    try:
        session = POP3Session(s)
        assert session.login(address, password).startswith("+OK")
        uidl = session.command("UIDL").split("\r\n")[1:-2]
        listing = session.command("LIST").split("\r\n")[1:-2]
        session.command("QUIT")
        return uidl, listing
    finally:
        s.close()


@sqliteOnly
def test_importPOP3WithVerifiedSTLS(mailgate_server, mailgate_cli, tmp_path, monkeypatch):
    server, certificate = sourceServer(mailgate_server, mailgate_cli, tmp_path)
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    source = f"pop3://alice%40example.org@localhost:{server.port}"

    # Not trusted: refused, nothing imported.
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 69, (out, err)
    assert "certificate of localhost cannot be verified" in err
    assert served(url, ALICE, PASSWORD) == ([], [])

    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert (code, err) == (0, ""), (out, err)
    assert out.startswith("3 messages imported (")
    # Exactly what the source serves (and its login only works over TLS:
    # STLS was used).
    assert served(url, ALICE, PASSWORD) == served(server.database, ALICE, PASSWORD)
    assert len(served(server.database, ALICE, PASSWORD)[0]) == 3

    # Wrong password: a clear failure.
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--password-stdin", stdin="wrong\n")
    assert code == 69 and "refused the login" in err


@sqliteOnly
def test_importPOP3S(mailgate_server, mailgate_cli, tmp_path, monkeypatch):
    server, certificate = sourceServer(mailgate_server, mailgate_cli, tmp_path, count=2)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    source = f"pop3s://alice%40example.org@localhost:{server.portOf('POP3S')}"
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert (code, err) == (0, ""), out
    assert served(url, ALICE, PASSWORD) == served(server.database, ALICE, PASSWORD)


@sqliteOnly
def test_importPOP3Insecure(mailgate_server, mailgate_cli, tmp_path):
    server, _ = sourceServer(mailgate_server, mailgate_cli, tmp_path, count=1)
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    source = f"pop3://alice%40example.org@127.0.0.1:{server.port}"
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--insecure", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 0, (out, err)
    assert served(url, ALICE, PASSWORD) == served(server.database, ALICE, PASSWORD)


@sqliteOnly
def test_importPOP3ResumesAndDeletesOnlyWhenAsked(mailgate_server, mailgate_cli, tmp_path, monkeypatch):
    server, certificate = sourceServer(mailgate_server, mailgate_cli, tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    source = f"pop3://alice%40example.org@localhost:{server.port}"
    before = served(server.database, ALICE, PASSWORD)
    assert cli(url, "import", "pop3", source, ALICE, "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    # The source is untouched.
    assert served(server.database, ALICE, PASSWORD) == before

    s = memoryStore(server.database)
    deliver(s, [ALICE], b"Subject: later\n\nlate\n")
    s.close()
    after = served(server.database, ALICE, PASSWORD)
    code, out, err = cli(url, "import", "pop3", source, ALICE, "--delete", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 0, (out, err)
    assert out.startswith("1 message imported (") and out.endswith(", 3 skipped as already present\n")
    assert served(url, ALICE, PASSWORD) == after
    # Everything now safely in mailgate is gone from the source.
    assert served(server.database, ALICE, PASSWORD) == ([], [])


@sqliteOnly
def test_importPOP3ManyUsers(mailgate_server, mailgate_cli, tmp_path, monkeypatch):
    server, certificate = sourceServer(mailgate_server, mailgate_cli, tmp_path, count=2)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    carol = "carol@example.org"
    url, store = target(tmp_path, (ALICE, PASSWORD), (BOB, BOB_PASSWORD), (carol, "c"))
    store.close()
    users = tmp_path / "users.txt"
    users.write_text(f"# address password\n{ALICE} {PASSWORD}\n\n{carol} not-at-the-source\n{BOB} {BOB_PASSWORD}\n")
    code, out, err = cli(url, "import", "pop3", f"pop3://localhost:{server.port}", "--users", str(users))
    lines = out.splitlines()
    assert lines[0].startswith(f"{ALICE}: 2 messages imported (")
    assert lines[1] == f"{carol}: failed"
    assert lines[2].startswith(f"{BOB}: 1 message imported (")
    assert lines[3].startswith("3 users: 3 messages imported (")
    assert lines[3].endswith("; 1 of the users not complete")
    # A refused password: another run would be refused again.
    assert code == 65
    assert f"{carol}: localhost refused the login" in err
    assert served(url, BOB, BOB_PASSWORD) == served(server.database, BOB, BOB_PASSWORD)


def test_anEmptySavedIdIsTheFileName(store, tmp_path):
    name = "1700000000.M1P1.host,S=20,W=21"
    directory = writeMaildir(
        tmp_path / "Maildir", [("cur", name + ":2,S", b"Subject: x\n\nbody\n")], b"3 V9 N2\n1 P :%s\n" % name.encode()
    )
    assert importMaildir(store, directory, ALICE).messages == 1
    assert pop3(store)[0] == [name]


def test_importPOP3CommandUsage(databaseURL, store, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text(f"{ALICE} pw\n")
    for argv in (
        ["import", "pop3", "imap://host", ALICE],
        ["import", "pop3", "pop3://host"],
        ["import", "pop3", "pop3://host", ALICE, "--users", str(users)],
        ["import", "pop3", "pop3://someone@host", "--users", str(users)],
        ["import", "pop3", "pop3://host", ALICE, "--mirror", "--delete"],
    ):
        code, out, err = cli(databaseURL, *argv)
        assert code == 64, (argv, out, err)
        assert err.startswith("mailgate: ") and err.count("\n") == 1, err
    users.write_text("no-password-here@example.org\n")
    assert cli(databaseURL, "import", "pop3", "pop3://host", "--users", str(users))[0] == 65


def test_mirrorTakesOutOnlyImportedMessagesTheSourceNoLongerHas(store, tmp_path):
    """
    --mirror takes out of the maildrop what an earlier run imported and
    the maildir no longer has, kept for recovery: not mail delivered to
    mailgate, not what is still there, and not while the user is in a
    POP3 session (then a failure that passes: run it again).
    """
    directory = tmp_path / "Maildir"
    writeMaildir(directory, MESSAGES, UIDLIST)
    assert importMaildir(store, str(directory), ALICE).messages == 4
    delivered = deliver(store, [ALICE], b"Subject: delivered here\r\n\r\nx\r\n")[ALICE]
    uidl, _, _ = pop3(store)
    (directory / "cur" / MESSAGES[0][1]).unlink()
    (directory / "new" / MESSAGES[3][1]).unlink()
    session = POP3Session(store)
    assert session.login(ALICE, PASSWORD).startswith("+OK")
    report = importMaildir(store, str(directory), ALICE, mirror=True)
    assert (report.removed, report.temporary) == (0, True)
    assert report.failures == [
        f"{ALICE} is in a POP3 session here: what the source no longer has was not taken out"
    ]
    session.command("QUIT")
    report = importMaildir(store, str(directory), ALICE, mirror=True)
    assert (report.messages, report.skipped, report.removed, report.failures) == (0, 2, 2, [])
    assert pop3(store)[0] == [uidl[1], uidl[2], delivered]
    assert sorted(m.uniqueId for m in resultOf(store.listDeleted(ALICE))) == sorted([uidl[0], uidl[3]])
    # Nothing more to take out; and what was taken out is not brought back.
    (directory / "cur" / MESSAGES[0][1]).write_bytes(MESSAGES[0][2])
    report = importMaildir(store, str(directory), ALICE, mirror=True)
    assert (report.messages, report.skipped, report.removed, report.failures) == (0, 3, 0, [])
    assert pop3(store)[0] == [uidl[1], uidl[2], delivered]


def test_mirrorTakesNothingOutWhileAMessagesIdCannotBeRead(store, tmp_path):
    """
    Where the files give the unique ids (--reuse-xuidl, %m), one that
    cannot be read has an unknown id: what an earlier run imported under
    it would look gone, so --mirror takes nothing out, and says why.
    """
    directory = tmp_path / "Maildir"
    names = [f"170000000{n}.M1P1.h" for n in range(3)]
    writeMaildir(directory, [("new", n, b"X-UIDL: id%d\n\nx\n" % i) for i, n in enumerate(names)])
    assert importMaildir(store, str(directory), ALICE, reuseXUidl=True).messages == 3
    (directory / "new" / names[0]).unlink()
    # Not read: a link is never followed.
    (directory / "new" / names[1]).rename(tmp_path / "elsewhere")
    (directory / "new" / names[1]).symlink_to(tmp_path / "elsewhere")
    report = importMaildir(store, str(directory), ALICE, reuseXUidl=True, mirror=True)
    assert (report.skipped, report.removed) == (1, 0)
    assert report.failures[-1] == (
        "1 message of the maildir could not be read for its unique id: what the maildir no longer has "
        "was not taken out"
    )
    assert pop3(store)[0] == ["id0", "id1", "id2"]


def test_retrievedMessagesSpillToDiskAndLoseOnlyTheAddedLineEnd():
    from mailgate.importers.pop3 import SpoolSource

    spool = SpoolSource()
    spool._file._max_size = 64  # spill to a file at once
    lines = [b"Subject: big\r\n", b"\r\n"] + [b"line %03d\r\n" % n for n in range(50)] + [b"no end\r\n"]
    for line in lines:
        spool.write(line)
    data = b"".join(lines)
    # LIST said two octets less: the server added the final line end.
    spool.finish(len(data) - 2)
    assert spool._file._rolled
    assert b"".join(spool.chunks(100)) == data[:-2]
    assert (spool.size, spool.headerSize) == (len(data) - 2, len(b"Subject: big\r\n\r\n"))
    spool.close()
    whole = SpoolSource()
    for line in lines:
        whole.write(line)
    whole.finish(len(data))
    assert b"".join(whole.chunks(7)) == data


def test_aPasswordGoesInTheClearOnlyToThisMachineOrWhenTheAdministratorSaysSo():
    """
    A source server that offers no STLS gets the password in the clear:
    only on this machine (it never crosses a network), unless --insecure.
    (Decided on the address the client connected to; a test may not reach
    another machine, so the decision is checked on its own here, and its
    loopback side end to end by the other imports in this file.)
    """
    from mailgate.importers.pop3 import cleartextAllowed

    for address in ("127.0.0.1", "127.0.0.2", "::1"):
        assert cleartextAllowed(address, insecure=False), address
    for address in ("192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1%eth0"):
        assert not cleartextAllowed(address, insecure=False), address
        assert cleartextAllowed(address, insecure=True), address


def test_aUserNameWithALineBreakIsRefusedBeforeConnecting(databaseURL, tmp_path):
    """
    A line break in the user name (or the password: the same check) would
    end the USER (PASS) command early and send the rest to the source as
    commands of its own.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        assert cli(databaseURL, "user", "add", ALICE, "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
        url = f"pop3://alice%0D%0ADELE%201@127.0.0.1:{port}"
        code, out, err = cli(databaseURL, "import", "pop3", url, ALICE, "--password-stdin", stdin=PASSWORD + "\n")
        assert code != 0 and "the user name holds a line break" in err, (code, out, err)
        # Nothing connected.
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize(
    "argv, error",
    [
        (["pop3://migrator@127.0.0.1:1", ALICE, "--master-user", "m"], "no user in the URL"),
        (["pop3://127.0.0.1:1", ALICE, "--master-separator", "+"], "--master-separator goes with --master-user"),
        (["pop3://127.0.0.1:1", ALICE, "--master-user", "two words"], "must be words"),
        (["pop3://127.0.0.1:1", ALICE, "--master-user", "m", "--master-separator", ""], "must be words"),
        (["pop3://127.0.0.1:1", ALICE, "--master-user", "m", "--master-separator", "**"], "one character"),
    ],
)
def test_masterUserUsageErrors(tmp_path, argv, error):
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    code, out, err = cli(url, "import", "pop3", *argv, "--password-stdin", stdin="key\n")
    assert (code, out) == (64, "") and error in err, (code, out, err)


def test_anAddressHoldingTheMasterSeparatorIsNotLoggedInThroughIt(tmp_path):
    """
    Dovecot splits a login at the first master separator: through the
    master user, bob+lists@example.org would log in (with separator +) as
    bob, and be refused.  That user is reported, without a connection, and
    the others go on.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    odd = "bob+lists@example.org"
    try:
        url, store = target(tmp_path, (odd, PASSWORD))
        store.close()
        users = tmp_path / "users"
        users.write_text(odd + "\n")
        code, out, err = cli(
            url, "import", "pop3", f"pop3://127.0.0.1:{port}", "--users", str(users),
            "--master-user", "migrator", "--master-separator", "+", "--password-stdin", stdin="key\n",
        )
        assert code != 0 and out.splitlines()[0] == f"{odd}: failed", (code, out, err)
        assert f"{odd}: the address has the master separator '+' in it" in err
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_theImportSummarySaysTheSingularForOne():
    """
    An import's summary line agrees with its counts: "1 message imported
    (1 octet)", "2 messages imported (2 octets)".
    """
    from mailgate.importers import ImportReport

    assert ImportReport(messages=1, octets=1).summary() == "1 message imported (1 octet), 0 skipped as already present"
    assert ImportReport(messages=2, octets=2).summary() == "2 messages imported (2 octets), 0 skipped as already present"
