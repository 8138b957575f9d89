"""
import maildir on the maildirs a real Dovecot install has besides the
textbook kind: message files its zlib plugin stored compressed (read
decompressed, as Dovecot serves them; formats Python cannot read refused
by name; a decompression bomb stopped at the size limit), Maildir++
folders beside INBOX (left, and said so), and mail in Dovecot's other
formats given by mistake (refused, saying what it is and what to do).

In-process, on tmp maildirs and a real SQLite file; the comparison with
what a real Dovecot serves for compressed files is in
test_dovecot_migration.py (test_compressedMessagesAsDovecotServesThem).
"""

import bz2
import gzip
import io
import lzma
import os
import tracemalloc
import zlib

import pytest

from mailgate.cli import run
from mailgate.importers import FileSource
from mailgate.importers.maildir import importMaildir
from mailgate.testing import POP3Session, addUser, memoryStore, readWhole, resultOf

ALICE = "alice@example.org"
PASSWORD = "wonderland"

#: The first octets of files Debian's Dovecot 2.3.19 wrote with zlib_save
#: = lz4 and zstd (seen on the real thing): formats Python's standard
#: library does not read.
LZ4_HEAD = b"Dovecot-LZ4\x0d\x2a\x9b\xc5\x00\x00\x01\x1b"
ZSTD_HEAD = b"\x28\xb5\x2f\xfd\x00\x58\xac\x06\x00\x22\x4e\x30"


@pytest.fixture
def store(tmp_path):
    s = memoryStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    addUser(s, ALICE, PASSWORD)
    yield s
    s.close()


def newMaildir(path, files=(), sub="new"):
    for part in ("cur", "new", "tmp"):
        (path / part).mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (path / sub / name).write_bytes(data)
    return str(path)


def served(store):
    """
    UIDL and LIST lines mailgate serves ALICE, and each message's octets.
    """
    user = resultOf(store.findUser(ALICE))
    maildrop = resultOf(store.openMaildrop(user))
    try:
        messages = [readWhole(resultOf(maildrop.openMessage(i))) for i in range(len(maildrop.sizes))]
    finally:
        maildrop.release()
    session = POP3Session(store)
    session.login(ALICE, PASSWORD)
    uidl = session.command("UIDL").split("\r\n")[1:-2]
    listing = session.command("LIST").split("\r\n")[1:-2]
    session.command("QUIT")
    return uidl, listing, messages


def message(subject, lines=1):
    return b"Subject: %s\n\n" % subject + b"".join(b"line %06d\n" % n for n in range(lines))


def crlf(data):
    return data.replace(b"\n", b"\r\n")


def gzipMembers(*parts):
    return b"".join(gzip.compress(part) for part in parts)


def test_compressedFilesAreImportedDecompressed(store, tmp_path, monkeypatch):
    """
    Files Dovecot's zlib plugin wrote (gz, bz2; xz, which Dovecot still
    reads) are imported as Dovecot serves them: decompressed, CRLF, their
    sizes the decompressed ones; a file spanning several blocks, and one
    of two gzip members, whole.  The names give no hint (Dovecot tells
    them by their first octets).  Before, the compressed octets were
    imported as the message.
    """
    monkeypatch.setattr(FileSource, "blockSize", 4096)
    plain = {
        "1700000001.M1P1.h,S=1,W=1": message(b"gz", 3),
        "1700000002.M1P1.h": message(b"bz2", 2),
        "1700000003.M1P1.h": message(b"xz", 1),
        "1700000004.M1P1.h": message(b"gz over several blocks", 5000),
        "1700000005.M1P1.h": message(b"two gzip members", 4) + b"second member\n",
        "1700000006.M1P1.h": message(b"as it is", 2),
    }
    names = sorted(plain)
    stored = [
        gzip.compress(plain[names[0]]),
        bz2.compress(plain[names[1]]),
        lzma.compress(plain[names[2]]),
        gzip.compress(plain[names[3]]),
        gzipMembers(message(b"two gzip members", 4), b"second member\n"),
        plain[names[5]],
    ]
    maildir = newMaildir(tmp_path / "Maildir", zip(names, stored))
    report = importMaildir(store, maildir, ALICE)
    assert (report.messages, report.failures) == (6, [])
    uidl, listing, messages = served(store)
    expected = [crlf(plain[name]) for name in names]
    assert messages == expected
    assert listing == [f"{n} {len(m)}" for n, m in enumerate(expected, 1)]
    assert uidl == [f"{n} {name}" for n, name in enumerate(names, 1)]
    assert report.octets == sum(map(len, expected))


def test_aCompressedMessagesXUidlAndHeaderAreReadDecompressed(store, tmp_path):
    """
    --reuse-xuidl and %m read the header: of a compressed file, the
    decompressed one.
    """
    name = "1700000001.M1P1.h"
    data = b"X-UIDL: kept-from-qpopper\nSubject: x\n\nbody\n"
    maildir = newMaildir(tmp_path / "Maildir", [(name, gzip.compress(data))])
    report = importMaildir(store, maildir, ALICE, reuseXUidl=True)
    assert (report.messages, report.failures) == (1, [])
    assert served(store)[0] == ["1 kept-from-qpopper"]


@pytest.mark.parametrize("head, name", [(LZ4_HEAD, "lz4"), (ZSTD_HEAD, "zstd")], ids=["lz4", "zstd"])
def test_aFormatMailgateCannotReadIsRefusedByName(tmp_path, head, name):
    """
    Dovecot's LZ4 and Zstandard files: the file named, the format said
    and what to do; not imported (never as the compressed octets), the
    others are, and the exit status says the import is not complete.
    """
    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    s = memoryStore(database)
    addUser(s, ALICE, PASSWORD)
    s.close()
    maildir = newMaildir(
        tmp_path / "Maildir",
        [("1700000001.M1P1.h", head + b"\x00" * 40), ("1700000002.M1P1.h", message(b"plain"))],
    )
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", database, "import", "maildir", maildir, ALICE], stdout=out, stderr=err, environ={})
    assert code == 65, (out.getvalue(), err.getvalue())
    assert (
        f"mailgate: {maildir}/new/1700000001.M1P1.h: compressed with {name} (Dovecot's zlib plugin: "
        f"zlib_save = {name}), which mailgate cannot read: not imported; move this maildir through "
        f"Dovecot's POP3 (mailgate import pop3)"
    ) in err.getvalue()
    assert out.getvalue().startswith("1 message imported")
    s = memoryStore(database)
    try:
        assert served(s)[2] == [crlf(message(b"plain"))]
    finally:
        s.close()


#: What the refusal of a file that begins like compressed data but does
#: not decompress says after its reason.
NOT_DECOMPRESSED = (
    ": not imported, as Dovecot's zlib plugin cannot read it either; if Dovecot served this maildir without that "
    "plugin (each file as it is stored), import it with --decompress=never"
)


@pytest.mark.parametrize(
    "data, reason",
    [
        (
            gzip.compress(message(b"x", 200))[:-30],
            "starts like gz data but is not valid gz data (the file ends before the compressed data does)",
        ),
        (
            bz2.compress(message(b"x", 200))[:-10],
            "starts like bz2 data but is not valid bz2 data (the file ends before the compressed data does)",
        ),
        (gzip.compress(message(b"x", 200))[:-8] + b"\x00" * 8, "starts like gz data but is not valid gz data ("),
        (b"\x1f\x8b" + b"not gzip at all\n", "starts like gz data but is not valid gz data ("),
    ],
    ids=["gz cut short", "bz2 cut short", "gz trailer damaged", "gz magic only"],
)
def test_damagedCompressedDataIsAFailureOfItsOwn(store, tmp_path, data, reason):
    """
    A compressed file cut short (a crash while Dovecot wrote it) or
    damaged: reported with the reason and the way to import it as it is
    stored, nothing of it imported by default.
    """
    maildir = newMaildir(tmp_path / "Maildir", [("1700000001.M1P1.h", data), ("1700000002.M1P1.h", message(b"ok"))])
    report = importMaildir(store, maildir, ALICE)
    assert report.messages == 1
    assert len(report.failures) == 1 and report.failures[0].startswith(f"{maildir}/new/1700000001.M1P1.h: {reason}")
    assert report.failures[0].endswith(NOT_DECOMPRESSED)
    assert not report.temporary
    assert served(store)[2] == [crlf(message(b"ok"))]


#: Message files that begin with the octets Dovecot tells compressed data
#: by, and are none: binary junk behind gzip's two, and a header-less
#: message beginning with bzip2's ten.
GZIP_LOOKALIKE = b"\x1f\x8bnot gzip at all\nSubject: x\n\nbody\n"
BZIP2_LOOKALIKE = b"BZh91AY&SY is how this header-less message begins\n\nbody\n"


def importCommand(tmp_path, maildir, *options):
    """
    C{mailgate import maildir} of C{maildir} for ALICE into a new SQLite
    database: its exit status, standard output and standard error, and
    what mailgate then serves (L{served}).
    """
    database = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    s = memoryStore(database)
    try:
        addUser(s, ALICE, PASSWORD)
    finally:
        s.close()
    out, err = io.StringIO(), io.StringIO()
    argv = ["--database", database, "import", "maildir", *options, maildir, ALICE]
    code = run(argv, stdout=out, stderr=err, environ={})
    s = memoryStore(database)
    try:
        return code, out.getvalue(), err.getvalue(), served(s)
    finally:
        s.close()


def test_aPlainFileThatBeginsLikeCompressedDataIsRefusedNamingTheOptionThatImportsIt(tmp_path):
    """
    A message file that begins with gzip's or bzip2's first octets and is
    no compressed data: by default refused by name (exit 65), saying it
    starts like compressed data without being any, and naming the option
    that imports it as stored; the other files are imported.  (Before:
    "damaged gz data", with no way to import it.)
    """
    maildir = newMaildir(
        tmp_path / "Maildir",
        [
            ("1700000001.M1P1.h", GZIP_LOOKALIKE),
            ("1700000002.M1P1.h", BZIP2_LOOKALIKE),
            ("1700000003.M1P1.h", message(b"plain")),
        ],
    )
    code, out, err, (uidl, _, messages) = importCommand(tmp_path, maildir)
    assert code == 65, (out, err)
    refusals = [line for line in err.splitlines() if "starts like" in line]
    assert refusals == [
        f"mailgate: {maildir}/new/1700000001.M1P1.h: starts like gz data but is not valid gz data (Error -3 while "
        f"decompressing data: unknown compression method){NOT_DECOMPRESSED}",
        f"mailgate: {maildir}/new/1700000002.M1P1.h: starts like bz2 data but is not valid bz2 data (Invalid data "
        f"stream){NOT_DECOMPRESSED}",
    ]
    assert "damaged" not in err
    assert out.startswith("1 message imported")
    assert (uidl, messages) == (["1 1700000003.M1P1.h"], [crlf(message(b"plain"))])


def test_decompressNeverImportsEveryFileAsItIsStored(tmp_path):
    """
    --decompress=never, for a maildir a Dovecot without its zlib plugin
    served: every file imported as it is stored, as that Dovecot served
    it (exit 0), a real gzip file too, and X-UIDL read from the stored
    octets; the files that begin like compressed data are said in one
    line, should the maildir be a zlib one after all.
    """
    gzipped = gzip.compress(message(b"really gzip"))
    files = [
        ("1700000001.M1P1.h", GZIP_LOOKALIKE),
        ("1700000002.M1P1.h", BZIP2_LOOKALIKE),
        ("1700000003.M1P1.h", gzipped),
        ("1700000004.M1P1.h", b"X-UIDL: from-qpopper\n" + message(b"plain")),
    ]
    maildir = newMaildir(tmp_path / "Maildir", files)
    code, out, err, (uidl, listing, messages) = importCommand(
        tmp_path, maildir, "--decompress=never", "--reuse-xuidl"
    )
    assert code == 0, (out, err)
    assert out.startswith("4 messages imported")
    assert messages == [crlf(data) for _, data in files]
    assert listing == [f"{n} {len(crlf(data))}" for n, (_, data) in enumerate(files, 1)]
    assert uidl == [f"{n} {name}" for n, (name, _) in enumerate(files[:3], 1)] + ["4 from-qpopper"]
    assert [line for line in err.splitlines() if "compressed" in line] == [
        f"mailgate: 3 files beginning like compressed data (bz2, gz; the first {maildir}/new/1700000001.M1P1.h) "
        f"read as stored (--decompress=never): what a Dovecot without its zlib plugin served, not what one with "
        f"it served"
    ]


def test_decompressAutoIsTheDefaultAndNothingElseIsTaken(tmp_path):
    """
    --decompress=auto is what an import does without the option; another
    value is a usage error (exit 64) before anything is imported.
    """
    maildir = newMaildir(tmp_path / "Maildir", [("1700000001.M1P1.h", gzip.compress(message(b"gz")))])
    code, out, err, (_, _, messages) = importCommand(tmp_path, maildir, "--decompress=auto")
    assert (code, messages) == (0, [crlf(message(b"gz"))]), (out, err)
    (tmp_path / "again").mkdir()
    code, out, err, (_, _, messages) = importCommand(tmp_path / "again", maildir, "--decompress=sometimes")
    assert (code, messages) == (64, []), (out, err)
    assert "argument --decompress: invalid choice: 'sometimes'" in err


def bomb(octets):
    """
    gzip data of C{octets} zeros, made without holding them.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    parts = [compressor.compress(b"Subject: bomb\n\n")]
    for _ in range(octets >> 20):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    return b"".join(parts)


def test_aDecompressionBombStopsAtTheSizeLimit(store, tmp_path):
    """
    64 KiB of gzip that would decompress to 64 MiB, with a limit of
    1 MiB: refused with the limit said, once a little more than the limit
    was decompressed, in bounded memory (a block or two, not the message);
    a plain file over the limit too, from its size alone.
    """
    data = bomb(64 << 20)
    assert len(data) < 100 << 10
    maildir = newMaildir(
        tmp_path / "Maildir",
        [("1700000001.M1P1.h", data), ("1700000002.M1P1.h", message(b"plain and large", 100000))],
    )
    tracemalloc.start()
    try:
        report = importMaildir(store, maildir, ALICE, maxSize=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.messages == 0
    assert report.failures == [
        f"{maildir}/new/{name}: over 1048576 octets, the largest message imported (--max-message-size raises "
        f"that limit): not imported"
        for name in ("1700000001.M1P1.h", "1700000002.M1P1.h")
    ]
    assert peak < 8 << 20, peak


def test_theSizeLimitIsTheServedSize(store, tmp_path):
    """
    The limit counts what POP3 serves (CRLF line ends), as import pop3's
    and the server's: a message of exactly the limit is imported.
    """
    data = message(b"x", 10)
    size = len(crlf(data))
    maildir = newMaildir(tmp_path / "Maildir", [("1700000001.M1P1.h", gzip.compress(data))])
    assert importMaildir(store, maildir, ALICE, maxSize=size - 1).messages == 0
    assert importMaildir(store, maildir, ALICE, maxSize=size).messages == 1


def test_foldersBesideInboxAreLeftAndSaidSo(store, tmp_path):
    """
    Maildir++ folders (.Sent, .Trash, nested .a.b) and LAYOUT=fs ones: POP3
    serves INBOX only, as Dovecot's does; the import says which folders it
    left and how many messages they hold.  tmp/ (deliveries not finished)
    is no folder and not imported.
    """
    maildir = tmp_path / "Maildir"
    newMaildir(maildir, [("1700000001.M1P1.h", message(b"inbox"))])
    (maildir / "tmp" / "1700000009.M1P1.h").write_bytes(message(b"half delivered"))
    newMaildir(maildir / ".Sent", [("1700000002.M1P1.h", message(b"sent")), ("1700000003.M1P1.h", message(b"s"))])
    (maildir / ".Sent" / "maildirfolder").write_bytes(b"")
    newMaildir(maildir / ".Trash")
    newMaildir(maildir / ".a.b", [("1700000004.M1P1.h", message(b"nested"))], sub="cur")
    newMaildir(maildir / "Archive", [("1700000005.M1P1.h", message(b"fs layout"))])
    (maildir / "not-a-folder").mkdir()
    lines = []
    report = importMaildir(store, str(maildir), ALICE, progress=lines.append)
    assert (report.messages, report.failures) == (1, [])
    assert served(store)[2] == [crlf(message(b"inbox"))]
    assert [line for line in lines if "beside INBOX" in line] == [
        f"{maildir}: 4 folders beside INBOX left as they are, 4 messages in them: .Sent (2), .Trash (0), .a.b (1), "
        f"Archive (1); POP3 serves INBOX only, as Dovecot's does"
    ]


def sdbox(root):
    box = root / "mailboxes" / "INBOX" / "dbox-Mails"
    box.mkdir(parents=True)
    (box / "u.1").write_bytes(b"2 M1e C6b15\nN 0000000000000123\n")
    (root / "dovecot.list.index.log").write_bytes(b"")
    return root


def mdbox(root):
    sdbox(root)
    os.remove(root / "mailboxes" / "INBOX" / "dbox-Mails" / "u.1")
    (root / "storage").mkdir()
    (root / "storage" / "m.1").write_bytes(b"2 M1e C6b15\n")
    return root


def mboxFile(root):
    root.write_bytes(b"From sender@example.net Sun Dec  6 11:30:14 2026\nSubject: x\n\nbody\n")
    return root


def mboxDirectory(root):
    root.mkdir()
    mboxFile(root / "Sent")
    return root


@pytest.mark.parametrize(
    "make, what",
    [
        (sdbox, "an sdbox (Dovecot's single-dbox format"),
        (mdbox, "an mdbox (Dovecot's multi-dbox format"),
        (lambda root: sdbox(root) / "mailboxes" / "INBOX" / "dbox-Mails", "a dbox mailbox (Dovecot's sdbox or mdbox"),
        (mboxFile, "an mbox file (Dovecot's mbox format)"),
        (mboxDirectory, "a directory of mbox files (Dovecot's mbox format)"),
    ],
)
def test_mailInAnotherFormatIsRefusedSayingWhatItIs(tmp_path, make, what):
    """
    An sdbox, an mdbox, an mbox given to import maildir by mistake: exit
    65 (bad input), saying what it is and what to do; before, "not a
    maildir" (66), the same as a mistyped path.
    """
    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    s = memoryStore(database)
    addUser(s, ALICE, PASSWORD)
    s.close()
    path = make(tmp_path / "mail")
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", database, "import", "maildir", str(path), ALICE], stdout=out, stderr=err, environ={})
    assert (code, out.getvalue()) == (65, ""), err.getvalue()
    assert err.getvalue().startswith(f"mailgate: {path} is {what}"), err.getvalue()
    assert "not a maildir: import it through Dovecot's POP3 (mailgate import pop3)" in err.getvalue()
    assert "doveadm backup -u USER maildir:" in err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_aDirectoryOfNoMailIsStillNoMaildir(tmp_path):
    """
    What holds no mail of a known format stays "not a maildir", exit 66.
    """
    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    s = memoryStore(database)
    addUser(s, ALICE, PASSWORD)
    s.close()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_bytes(b"hello\n")
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", database, "import", "maildir", str(tmp_path / "empty"), ALICE], stdout=out, stderr=err,
               environ={})
    assert code == 66
    assert err.getvalue() == f"mailgate: {tmp_path / 'empty'} is not a maildir (no cur/ or new/)\n"


def test_sizesInANameThatAreNotTheFilesAreSaid(store, tmp_path):
    """
    S= and W= in a file name that are not the file's: Dovecot believes
    the name (LIST shows W=, RETR stops at S=, seen on Dovecot 2.3.19,
    which logs "Cached message size smaller than expected"); the import
    imports the file whole and says that what it serves differs.  Right
    sizes, those of a compressed file's content among them, say nothing.
    """
    data = b"Subject: sizes\n\nbody line\n"
    maildir = newMaildir(
        tmp_path / "Maildir",
        [
            ("1700000001.M1P1.h,S=5,W=5", data),
            ("1700000002.M1P1.h,S=26,W=500", data),
            ("1700000003.M1P1.h,S=26,W=29", data),
            ("1700000004.M1P1.h,S=26,W=29", gzip.compress(data)),
            ("1700000005.M1P1.h,W=29,XS=1", data),
        ],
    )
    lines = []
    report = importMaildir(store, maildir, ALICE, progress=lines.append)
    assert (report.messages, report.failures) == (5, [])
    assert [line for line in lines if "sizes in its name" in line] == [
        f"{maildir}/new/1700000001.M1P1.h,S=5,W=5: the sizes in its name (S=5,W=5) are not the file's (S=26,W=29), "
        f"which Dovecot served by its name (LIST; RETR cut at S=): imported whole, as the file is (29 octets)",
        f"{maildir}/new/1700000002.M1P1.h,S=26,W=500: the sizes in its name (W=500) are not the file's (W=29), "
        f"which Dovecot served by its name (LIST; RETR cut at S=): imported whole, as the file is (29 octets)",
    ]
    assert served(store)[1] == [f"{n} 29" for n in range(1, 6)]


def test_aHomeDirectoryGivenForItsMaildirSaysWhereTheMaildirIs(store, tmp_path):
    """
    The user's home given instead of its Maildir/: still no maildir, and
    the error names the one below it.
    """
    from mailgate.importers import ImportFailed

    home = tmp_path / "alice"
    newMaildir(home / "Maildir", [("1700000001.M1P1.h", message(b"x"))])
    with pytest.raises(ImportFailed) as caught:
        importMaildir(store, str(home), ALICE)
    assert str(caught.value) == f"{home} is not a maildir (no cur/ or new/); {home / 'Maildir'} is one"


def test_aFolderGivenAsTheMaildirIsImportedAndSaidToBeOne(store, tmp_path):
    """
    Maildir/.Sent given as DIR (a script going through every directory):
    imported, as asked, but said to be a folder, which Dovecot's POP3
    never served.
    """
    maildir = tmp_path / "Maildir"
    newMaildir(maildir, [("1700000001.M1P1.h", message(b"inbox"))])
    newMaildir(maildir / ".Sent", [("1700000002.M1P1.h", message(b"sent"))])
    (maildir / ".Sent" / "maildirfolder").write_bytes(b"")
    lines = []
    assert importMaildir(store, str(maildir / ".Sent"), ALICE, progress=lines.append).messages == 1
    assert (
        f"{maildir / '.Sent'} is a folder of a maildir (it has maildirfolder), not an INBOX, which is all POP3 "
        f"serves: imported as asked"
    ) in lines
