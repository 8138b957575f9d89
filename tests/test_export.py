"""
C{mailgate mailbox export ADDRESS DIR}: a user's maildrop written out as a
Maildir with a C{dovecot-uidlist}, so that the mailbox can move on (to
Dovecot, or to another mailgate) with every POP3 unique id kept.

What a user must see after the move: the same UIDL and LIST answers and
the same octets, from mailgate importing the export again (both
backends) and from a real Dovecot serving it.
"""

import os
import shutil
import signal
import stat
import threading

import pytest
from twisted.internet.defer import succeed

from dovecotserver import PrivateDovecot, answers, requireDovecot
from mailgate.importers import ImportFailed, export
from mailgate.importers.export import exportMaildir
from mailgate.importers.maildir import importMaildir, readUidList
from mailgate.message import spoolBytes
from mailgate.records import ExportedMessage
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf
from test_lifecycle_cli import cli  # noqa: F401 (the command on each backend's database: a fixture)

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonder land"
ARRIVED = 1_700_000_000

MESSAGES = [
    b"Subject: plain\r\n\r\nhello\r\n",
    b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nend\r\n",
    b"Subject: 8-bit\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n\xe9t\xe9 \xff\r\n",
    # Over one 128 KiB chunk of the store.
    b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a big message\r\n" % n for n in range(12000)),
]


@pytest.fixture
def store(cli):
    s = memoryStore(cli.url)
    addUser(s, ALICE, PASSWORD)
    addUser(s, BOB, PASSWORD)
    # Unique ids of another server's, kept by an earlier import: odd
    # characters, and not in the order of their arrival.
    items = [
        ("Zz:9/odd+id", spoolBytes(MESSAGES[0]), ARRIVED),
        ("00000001a0b1c2d3", spoolBytes(MESSAGES[1]), ARRIVED + 60),
    ]
    imported, _, _ = resultOf(s.importMessages(ALICE, items))
    assert len(imported) == 2
    for message in MESSAGES[2:]:
        deliver(s, [ALICE], message)
    yield s
    s.close()


def served(store, address=ALICE):
    """
    UIDL, LIST and every message as mailgate's POP3 serves them.
    """
    session = POP3Session(store)
    assert session.login(address, PASSWORD).startswith("+OK")
    uidl = session.command("UIDL").split("\r\n")[1:-2]
    listing = session.command("LIST").split("\r\n")[1:-2]
    bodies = []
    for n in range(1, len(listing) + 1):
        reply = session.send(b"RETR %d\r\n" % n)
        _, _, stuffed = reply.partition(b"\r\n")
        bodies.append(stuffed[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n."))
    session.command("QUIT")
    return uidl, listing, bodies


def test_exportThenImportGivesTheSameMailbox(cli, store, tmp_path):
    before = served(store)
    target = tmp_path / "export" / "Maildir"
    result = cli("mailbox", "export", ALICE, str(target))
    assert result.code == 0, result
    octets = sum(len(m) for m in MESSAGES)
    assert result.out == f"exported 4 messages ({octets} octets) of {ALICE} to {target}\n"
    # A Maildir, readable by its owner only.
    for path in (target, target / "cur", target / "new", target / "tmp"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    files = sorted(os.listdir(target / "cur"))
    assert len(files) == 4 and os.listdir(target / "new") == [] and os.listdir(target / "tmp") == []
    for name in files + ["../dovecot-uidlist"]:
        assert stat.S_IMODE(os.stat(target / "cur" / name).st_mode) == 0o600
    uidList = readUidList(target / "dovecot-uidlist")
    assert uidList.nextUid == 5
    records = sorted(uidList.records.values(), key=lambda r: r.uid)
    assert [r.fields["P"] for r in records] == [line.split(" ", 1)[1] for line in before[0]]
    for record, message in zip(records, MESSAGES):
        name = record.filename
        assert name.endswith(f",S={len(message)},W={len(message)}:2,")
        assert (target / "cur" / name).read_bytes() == message
    # The first message arrived when its first server had it.
    assert int(os.stat(target / "cur" / records[0].filename).st_mtime) == ARRIVED

    # Into another user (another mailgate), from the files alone.
    report = importMaildir(store, str(target), BOB)
    assert (report.messages, report.failures) == (4, [])
    assert served(store, BOB) == before


def test_exportWhileTheUserIsInASession(cli, store, tmp_path):
    """
    The export reads without the POP3 lock: a user logged in (a phone left
    connected) does not stop it, and the session goes on.
    """
    session = POP3Session(store)
    assert session.login(ALICE, PASSWORD).startswith("+OK")
    result = cli("mailbox", "export", ALICE, str(tmp_path / "out"))
    assert result.code == 0, result
    assert len(os.listdir(tmp_path / "out" / "cur")) == 4
    assert session.command("STAT").startswith("+OK 4 ")


def test_aMessageDeletedWhileExportedIsReportedAndTheRestWritten(store, tmp_path):
    messages = resultOf(store.exportMessages(ALICE))
    session = POP3Session(store)
    session.login(ALICE, PASSWORD)
    session.command("DELE 4")
    assert session.command("QUIT").startswith("+OK")
    lines = []
    report = exportMaildir(messages, str(tmp_path / "out"), progress=lines.append)
    assert report.messages == 3
    assert len(report.failures) == 1 and lines == report.failures
    assert report.failures[0].startswith("message 4 (unique id ")
    assert "not exported" in report.failures[0]
    assert len(os.listdir(tmp_path / "out" / "cur")) == 3
    assert os.listdir(tmp_path / "out" / "tmp") == []
    assert readUidList(tmp_path / "out" / "dovecot-uidlist").nextUid == 4


def test_aDirectoryHoldingAMailboxIsRefused(cli, store, tmp_path):
    target = tmp_path / "out"
    assert cli("mailbox", "export", ALICE, str(target)).code == 0
    again = cli("mailbox", "export", ALICE, str(target))
    assert again.code == 73
    assert again.err == (
        f"mailgate: {target} already holds a mailbox (dovecot-uidlist); export into a new directory\n"
    )
    other = tmp_path / "maildir"
    (other / "new").mkdir(parents=True)
    (other / "new" / "1.M1P1.host").write_bytes(b"Subject: x\r\n\r\nx\r\n")
    refused = cli("mailbox", "export", ALICE, str(other))
    assert refused.code == 73 and "is not empty" in refused.err
    assert len(os.listdir(other / "new")) == 1


def test_anExportThatCannotEndLeavesNothingBehind(cli, store, tmp_path):
    """
    An export that fails part way (a full disk; here its dovecot-uidlist
    cannot be written) takes away the messages it had written: without
    their list, whatever served them would give them new unique ids, and
    every leave-on-server client would download them again.  It says so;
    once the cause is gone, an export into the same directory works.
    """
    target = tmp_path / "out"
    (target / "dovecot-uidlist.tmp").mkdir(parents=True)
    result = cli("mailbox", "export", ALICE, str(target))
    assert result.code == 73, result
    assert result.err.startswith(f"mailgate: cannot write {target}/dovecot-uidlist: ")
    assert result.err.endswith(f"; nothing of the export is left in {target}\n")
    assert [os.listdir(target / sub) for sub in ("cur", "new", "tmp")] == [[], [], []]
    assert not (target / "dovecot-uidlist").exists()
    (target / "dovecot-uidlist.tmp").rmdir()
    assert cli("mailbox", "export", ALICE, str(target)).code == 0
    assert len(os.listdir(target / "cur")) == len(MESSAGES)


class _Body:
    """
    A message's octets to export, read in two pieces, the second read
    calling C{onSecondRead} first (to interrupt or kill the export in the
    middle of this message).
    """

    def __init__(self, data, onSecondRead=None):
        self._pieces = [data[: len(data) // 2], data[len(data) // 2 :]]
        self._onSecondRead = onSecondRead

    def read(self):
        if len(self._pieces) == 1 and self._onSecondRead is not None:
            self._onSecondRead()
        return succeed(self._pieces.pop(0) if self._pieces else b"")


def _numbered(count, stopAt, stop):
    """
    C{count} messages to export, as a store lists them, message C{stopAt}
    calling C{stop} half way through its octets; and their octets.
    """
    octets = [b"Subject: %d\r\n\r\n" % n + b"line of message %d\r\n" % n * n for n in range(1, count + 1)]
    messages = [
        ExportedMessage(n, len(data), f"id{n}", ARRIVED + n, _Body(data, stop if n == stopAt else None))
        for n, data in enumerate(octets, 1)
    ]
    return messages, octets


def _wholeMessagesIn(cur, octets):
    """
    The numbers of the messages in C{cur}, each checked to hold all of
    its message's octets.
    """
    numbers = []
    for name in os.listdir(cur):
        number = int(name.split(".M", 1)[1].split("P", 1)[0])
        assert (cur / name).read_bytes() == octets[number - 1], name
        numbers.append(number)
    return sorted(numbers)


def test_anExportKilledMidwayLeavesOnlyWholeMessagesInPlace(tmp_path, monkeypatch):
    """
    Files are written a batch at a time and synced together: an export
    killed (a crash, kill -9) in the middle of a batch has only whole
    messages, each synced before it was moved there, under names in
    C{cur/}; what was still being written is in C{tmp/}.  The directory
    then holds part of a mailbox without its C{dovecot-uidlist}: a new
    export into it is refused, saying why, and one into a new directory
    is complete.
    """
    monkeypatch.setattr(export, "BATCH_MESSAGES", 4)
    monkeypatch.setattr(export, "SYNC_GROUP", 2)
    messages, octets = _numbered(10, 7, lambda: os.kill(os.getpid(), signal.SIGKILL))
    target = tmp_path / "out"
    child = os.fork()
    if child == 0:
        try:
            exportMaildir(messages, str(target))
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert _wholeMessagesIn(target / "cur", octets) == [1, 2, 3, 4]
    # 5 and 6 written (their syncs perhaps done), 7 half written: none in place.
    assert len(os.listdir(target / "tmp")) == 3
    assert not (target / "dovecot-uidlist").exists()
    with pytest.raises(ImportFailed, match="cur is not empty; export into a new directory"):
        exportMaildir(_numbered(10, None, None)[0], str(target))
    report = exportMaildir(_numbered(10, None, None)[0], str(tmp_path / "again"))
    assert (report.messages, report.failures) == (10, [])
    assert _wholeMessagesIn(tmp_path / "again" / "cur", octets) == list(range(1, 11))


def test_anExportInterruptedMidwayTakesAwayWhatItWrote(tmp_path, monkeypatch):
    """
    An export interrupted (Ctrl-C) in the middle of a batch takes away the
    messages already in place and those of the batch under way, whose
    syncs may still be running (7 and 8 here) or not handed over yet (9),
    and leaves no file open: an export into the same directory then
    works.
    """
    monkeypatch.setattr(export, "BATCH_MESSAGES", 6)
    monkeypatch.setattr(export, "SYNC_GROUP", 2)

    def interrupt():
        raise KeyboardInterrupt()

    target = tmp_path / "out"
    opened = set(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        exportMaildir(_numbered(12, 10, interrupt)[0], str(target))
    assert set(os.listdir("/proc/self/fd")) == opened
    assert [os.listdir(target / sub) for sub in ("cur", "new", "tmp")] == [[], [], []]
    assert not (target / "dovecot-uidlist").exists()
    messages, octets = _numbered(10, None, None)
    report = exportMaildir(messages, str(target))
    assert (report.messages, report.failures) == (10, [])
    assert _wholeMessagesIn(target / "cur", octets) == list(range(1, 11))
    assert os.listdir(target / "tmp") == []
    records = sorted(readUidList(target / "dovecot-uidlist").records.values(), key=lambda r: r.uid)
    assert [(r.uid, r.fields["P"]) for r in records] == [(n, f"id{n}") for n in range(1, 11)]


def test_anUnknownUserOrAnUnwritableDirectory(cli, store, tmp_path):
    assert cli("mailbox", "export", "nobody@example.org", str(tmp_path / "x")).code == 67
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("mailbox", "export", ALICE, str(blocker / "sub"))
    assert result.code == 73 and result.err.startswith("mailgate: cannot make ")


def test_linksInTheDirectoryAreNeverWrittenThrough(cli, store, tmp_path):
    """
    An export into a directory someone else may write to (run as root):
    a link in place of the list's staging file, or of cur/ or tmp/, does
    not have mail or the list written where it points; the file it points
    to is left as it was.
    """
    precious = tmp_path / "precious.conf"
    precious.write_text("precious = yes\n")
    target = tmp_path / "out"
    target.mkdir()
    os.symlink(precious, target / "dovecot-uidlist.tmp")
    assert cli("mailbox", "export", ALICE, str(target)).code == 0
    assert precious.read_text() == "precious = yes\n"
    assert not os.path.islink(target / "dovecot-uidlist")
    assert readUidList(target / "dovecot-uidlist").nextUid == len(MESSAGES) + 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for sub in ("cur", "tmp"):
        linked = tmp_path / f"linked-{sub}"
        linked.mkdir()
        os.symlink(elsewhere, linked / sub)
        result = cli("mailbox", "export", ALICE, str(linked))
        assert result.code == 73, result
        assert result.err == f"mailgate: {linked / sub} is a symbolic link; export into a new directory\n"
    assert os.listdir(elsewhere) == []


@requireDovecot
@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_dovecotServesTheExportWithTheSameUniqueIds(cli, store, tmp_path):
    """
    Moving a user to Dovecot: its POP3 answers UIDL, LIST and RETR as
    mailgate did (with its default pop3_uidl_format, which the list's
    saved ids take precedence over).
    """
    before = served(store)
    exported = tmp_path / "export"
    assert cli("mailbox", "export", ALICE, str(exported)).code == 0
    dovecot = PrivateDovecot()
    try:
        dovecot.addUsers([ALICE], PASSWORD)
        maildir = dovecot.maildir(ALICE)
        for sub in ("cur", "new", "tmp"):
            os.rmdir(os.path.join(maildir, sub))
        os.rmdir(maildir)
        shutil.move(str(exported), maildir)
        dovecot.own(maildir)
        dovecot.start()
        client = dovecot.pop3(ALICE, PASSWORD)
        try:
            uidl, listing, bodies = answers(client)
        finally:
            client.quit()
        assert dovecot.errorsLogged() == []
    finally:
        dovecot.cleanup()
    assert uidl == before[0]
    assert listing == before[1]
    assert [body + b"\r\n" for body in bodies] == before[2] == MESSAGES


def test_exportAllPutsEachUserInADirectoryOfItsAddress(cli, store, tmp_path):
    """
    C{--all DIR}: every user, each into DIR/ADDRESS (for Dovecot,
    C{mail_location = maildir:DIR/%u}); a user whose address could not be
    a directory name (a slash in its local part) is named and left out,
    the others are written.  DIR, made by the export, is readable by its
    owner only, as each user's directory is.
    """
    addUser(store, "a/../../escape@example.org", PASSWORD)
    deliver(store, [BOB], MESSAGES[0])
    target = tmp_path / "all"
    umask = os.umask(0o022)
    try:
        result = cli("mailbox", "export", "--all", str(target))
    finally:
        os.umask(umask)
    # DIR itself too is its owner's only: it lists the addresses.
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    assert result.code == 73, result
    assert result.err == (
        "mailgate: a/../../escape@example.org: not exported: its address cannot be a directory name\n"
        "mailgate: 1 user could not be exported (named above)\n"
    )
    assert sorted(os.listdir(target)) == [ALICE, BOB]
    assert len(os.listdir(target / ALICE / "cur")) == 4
    assert [r.fields["P"] for r in readUidList(target / BOB / "dovecot-uidlist").records.values()] == [
        resultOf(store.listMessages(BOB))[0].uniqueId
    ]
    assert not (tmp_path / "escape@example.org").exists()
    assert result.out.splitlines()[0].startswith("exported 4 messages (")
    assert cli("mailbox", "export", "--all", str(target), "extra").code == 64
    assert cli("mailbox", "export", ALICE).code == 64


def test_mailboxShowWritesOneMessageAsPOP3ServesIt(cli, store):
    """
    C{mailbox show ADDRESS MESSAGE} (as C{doveadm fetch text}): the
    octets RETR gives, by number or unique id; an unknown one is 65.
    """
    import subprocess

    from e2e import MAILGATE, childEnvironment

    uidls = [m.uniqueId for m in resultOf(store.listMessages(ALICE))]
    for wanted, expected in (("2", MESSAGES[1]), (uidls[3], MESSAGES[3]), (uidls[0], MESSAGES[0])):
        done = subprocess.run(
            [MAILGATE, "--database", cli.url, "mailbox", "show", ALICE, wanted],
            capture_output=True, timeout=60, env=childEnvironment(),
        )
        assert (done.returncode, done.stderr) == (0, b"")
        assert done.stdout == expected
    missing = cli("mailbox", "show", ALICE, "9")
    assert (missing.code, missing.err) == (
        65, f"mailgate: {ALICE} has no message '9' (a number or a unique id of mailbox list)\n"
    )
    assert cli("mailbox", "show", "nobody@example.org", "1").code == 67


def test_anExportWhoseSyncThreadCannotStartLeavesNoFileOpen(tmp_path, monkeypatch):
    """
    The files handed to a sync thread are the thread's to close; where
    the thread cannot be started (RuntimeError: can't start new thread,
    under a limit on processes) they are still the export's, and its undo
    closes them: they were taken from it before the hand-over, and stayed
    open.
    """

    class NoThreads(export.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(export, "ThreadPoolExecutor", NoThreads)
    messages, octets = _numbered(10, None, None)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="can't start new thread"):
        exportMaildir(messages, str(tmp_path / "out"))
    assert set(os.listdir("/proc/self/fd")) - before == set()
    assert os.listdir(tmp_path / "out" / "tmp") == []
    assert os.listdir(tmp_path / "out" / "cur") == []


def test_filesOfAHandOverThatFailedAreClosedOnceWhateverTakesThem(tmp_path, monkeypatch):
    """
    ThreadPoolExecutor queues a group's sync before it starts a thread for
    it: where that start fails (RuntimeError: can't start new thread) with
    a thread of the pool already running, that thread still takes the
    group, after the undo closed its files and their numbers went to other
    files, and closed those.  Whichever takes the files first closes them:
    here the undo, and the thread leaves them.
    """

    class OneThread(export.ThreadPoolExecutor):
        def _adjust_thread_count(self):
            # The work is queued already, as for the real limit.
            if self._threads:
                raise RuntimeError("can't start new thread")
            super()._adjust_thread_count()

    undone = threading.Event()
    others = []
    realSync, realUndo = export._syncAndClose, export._undo

    def heldSync(*args):
        # The first group's thread goes on only once the undo has run.
        assert undone.wait(10)
        return realSync(*args)

    def undoThenOpen(*args):
        realUndo(*args)
        # The numbers the undo freed, taken by other files (as another
        # thread of the process would).
        others.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(export.SYNC_GROUP))
        undone.set()

    monkeypatch.setattr(export, "ThreadPoolExecutor", OneThread)
    monkeypatch.setattr(export, "_syncAndClose", heldSync)
    monkeypatch.setattr(export, "_undo", undoThenOpen)
    messages, _ = _numbered(2 * export.SYNC_GROUP + 1, None, None)
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            exportMaildir(messages, str(tmp_path / "out"))
        closed = []
        for fd in others:
            try:
                os.fstat(fd)
            except OSError:
                closed.append(fd)
        assert closed == []
    finally:
        export._close(others)
    assert os.listdir(tmp_path / "out" / "tmp") == []


def test_anExportHoldsAPageOfItsListingNotAllOfIt(store):
    """
    The export lists a maildrop a page at a time as it goes: listed whole
    first, 100,000 messages took 140 MB of the command's memory before
    the first was written (1.4 KB each: a million, 1.4 GB).  Every
    message is listed once, in order; what is delivered after the export
    began is not the export's.
    """
    import tracemalloc

    items = [(f"many-{n:05d}", spoolBytes(b"Subject: %d\r\n\r\nhi\r\n" % n), ARRIVED + n) for n in range(1500)]
    assert len(resultOf(store.importMessages(BOB, items))[0]) == 1500
    tracemalloc.start()
    try:
        listing = resultOf(store.exportMessages(BOB, page=50))
        deliver(store, [BOB], MESSAGES[0])
        listed = 0
        for message in listing:
            assert (message.number, message.uniqueId) == (listed + 1, items[listed][0])
            listed += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listed == 1500
    assert peak < 400_000, peak
