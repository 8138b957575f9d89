"""
Importers against broken or hostile sources: what a user sees is that
every message is either imported or reported as a failure with its
reason, and that C{--delete} removes from the source only what mailgate
holds with the very same content.

  - repeated unique ids, renamed to ids no other message has;
  - an id the maildrop already holds for other content: a conflict, not
    "already present";
  - a maildir whose files are links, FIFOs, devices, renamed under the
    import, or named with impossible times; a malformed dovecot-uidlist;
  - a POP3 server with overlong status lines, a refused or oversized
    message, a repeated message number, a connection that breaks.

The POP3 servers here are small scripted ones on 127.0.0.1 (port 0).
"""

import os
import socket
import threading

import pytest

from mailgate.importers import ImportFailed, renameDuplicates
from mailgate.importers import maildir as maildirImporter
from mailgate.importers.maildir import importMaildir
from mailgate.importers.pop3 import importPOP3
from mailgate.message import spoolBytes
from mailgate.testing import resultOf
from test_importers import ALICE, PASSWORD, pop3, store, writeMaildir  # noqa: F401 (fixture)

NOW = 1800000000


# -- unique ids given twice ---------------------------------------------------------------


def test_aRenamedIdIsNoOtherMessagesId():
    assert renameDuplicates(["X-2", "X", "X"]) == ["X-2", "X", "X-2-2"]  # as Dovecot renames
    assert renameDuplicates(["X", "X", "X-2"]) == ["X", "X-2-2", "X-2"]  # X-2 is the third's own
    assert renameDuplicates(["X", "X", "X"]) == ["X", "X-2", "X-3"]
    assert renameDuplicates(["a", "b"]) == ["a", "b"]


def test_maildirDuplicateIdsAreAllImported(store, tmp_path):
    names = [f"170000000{n}.M1P1.h" for n in range(3)]
    directory = writeMaildir(
        tmp_path / "Maildir",
        [("cur", name + ":2,S", b"Subject: %d\n\nx\n" % n) for n, name in enumerate(names)],
        b"3 V1 N4\n" + b"".join(b"%d P%s :%s\n" % (n + 1, uidl, name.encode()) for n, (uidl, name) in enumerate(
            zip([b"X-2", b"X", b"X"], names)
        )),
    )
    lines = []
    report = importMaildir(store, directory, ALICE, progress=lines.append)
    assert (report.messages, report.skipped, report.failures) == (3, 0, [])
    assert lines == [f"{directory}/cur/{names[2]}:2,S: unique id X appears twice; imported as X-2-2"]
    uidl, _, bodies = pop3(store)
    assert uidl == ["X-2", "X", "X-2-2"]
    assert bodies == [b"Subject: %d\r\n\r\nx\r\n" % n for n in range(3)]


def test_theStoreNeverDropsAnIdGivenTwice(store):
    items = [("same", spoolBytes(b"Subject: %d\r\n\r\nx\r\n" % n), NOW) for n in range(2)]
    imported, skipped, conflicts = resultOf(store.importMessages(ALICE, items))
    assert (imported, skipped) == (["same"], [])
    assert conflicts == [("same", "the same unique id is given to two messages")]


# -- an id the maildrop holds for other mail ----------------------------------------------


def test_anIdHeldForOtherContentIsAConflict(store, tmp_path):
    name = "1700000000.M1P1.h"
    first = writeMaildir(tmp_path / "one", [("cur", name + ":2,S", b"Subject: one\n\nmine\n")])
    assert importMaildir(store, first, ALICE).messages == 1
    # The same id: once with the same size and other octets, once with
    # another size.
    for body in (b"Subject: one\n\nYOUR\n", b"Subject: other\n\nlonger\n"):
        other = writeMaildir(tmp_path / "two", [("cur", name + ":2,S", body)])
        report = importMaildir(store, other, ALICE)
        assert (report.messages, report.skipped) == (0, 0)
        assert len(report.failures) == 1
        assert report.failures[0].startswith(f"{other}/cur/{name}:2,S: unique id {name}: the maildrop already has")
        assert report.failures[0].endswith("not imported")
    # The same content again is what a resumed import skips.
    again = importMaildir(store, first, ALICE)
    assert (again.messages, again.skipped, again.failures) == (0, 1, [])
    assert pop3(store)[2] == [b"Subject: one\r\n\r\nmine\r\n"]


# -- maildir files that are not plain messages ---------------------------------------------


def test_linksFIFOsAndDevicesAreRefusedAndReported(store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root's secret\n")
    directory = writeMaildir(tmp_path / "Maildir", [("cur", "1700000000.M1P1.h:2,S", b"Subject: ok\n\nfine\n")])
    cur = tmp_path / "Maildir" / "cur"
    os.symlink(secret, cur / "1700000001.L.h:2,S")
    os.symlink(tmp_path / "nowhere", cur / "1700000002.D.h:2,S")
    os.symlink("/dev/zero", cur / "1700000003.Z.h:2,S")
    os.mkfifo(cur / "1700000004.F.h:2,S")
    report = importMaildir(store, directory, ALICE)
    assert report.messages == 1
    assert sorted(report.failures) == [
        f"{cur}/1700000001.L.h:2,S: a symbolic link (not followed), not a regular file: not imported",
        f"{cur}/1700000002.D.h:2,S: a symbolic link (not followed), not a regular file: not imported",
        f"{cur}/1700000003.Z.h:2,S: a symbolic link (not followed), not a regular file: not imported",
        f"{cur}/1700000004.F.h:2,S: a FIFO, not a regular file: not imported",
    ]
    assert pop3(store)[2] == [b"Subject: ok\r\n\r\nfine\r\n"]


def test_aFileRenamedWhileQueuedIsStillImported(store, tmp_path):
    """
    Dovecot renames a file to change its flags (C{:2,S} to C{:2,RS}) at
    any time, also between the listing and the batch's write.
    """
    names = [f"170000000{n}.M1P1.h" for n in range(3)]
    directory = writeMaildir(tmp_path / "Maildir", [("cur", n + ":2,S", b"Subject: %s\n\nx\n" % n.encode()) for n in names])
    cur = tmp_path / "Maildir" / "cur"
    importMessages = store.importMessages

    def renamingFirst(address, items, source=None):
        os.rename(cur / (names[0] + ":2,S"), cur / (names[0] + ":2,RS"))
        return importMessages(address, items, source)

    store.importMessages = renamingFirst
    report = importMaildir(store, directory, ALICE)
    assert (report.messages, report.failures) == (3, [])
    assert pop3(store)[0] == names


def test_aFileRenamedBeforeItIsOpenedIsFoundAgain(store, tmp_path, monkeypatch):
    names = [f"170000000{n}.M1P1.h" for n in range(2)]
    directory = writeMaildir(tmp_path / "Maildir", [("new", n, b"Subject: %s\n\nx\n" % n.encode()) for n in names])
    root = tmp_path / "Maildir"
    listMaildir = maildirImporter.listMaildir

    def listThenMove(*args):
        listed = listMaildir(*args)
        # Dovecot moves new mail to cur/ as a client looks, and one
        # message is expunged.
        os.rename(root / "new" / names[0], root / "cur" / (names[0] + ":2,S"))
        os.unlink(root / "new" / names[1])
        return listed

    monkeypatch.setattr(maildirImporter, "listMaildir", listThenMove)
    report = importMaildir(store, directory, ALICE)
    assert report.messages == 1
    assert report.failures == [f"{root}/new/{names[1]}: gone during the import (expunged?): not imported"]
    assert pop3(store)[0] == [names[0]]


@pytest.mark.parametrize("rename", ["new to cur", "flags in cur"])
def test_aFileRenamedWhileTheMaildirIsListedIsNeitherMissedNorDoubled(store, tmp_path, monkeypatch, rename):
    """
    A live Dovecot renames files while the import lists the maildir:
    moving new mail to cur/ as a client looks (between the reads of the
    two directories), or changing flags in cur/ while that directory is
    read (readdir may then give the file under neither name, or under
    both).  Each message is imported once: before, one moved between the
    two reads was in neither listing and left out, silently (exit 0; a
    last run at the switch missed it for good), and one seen under both
    names was imported twice, the second under a renamed id that clients
    downloaded again.
    """
    root = tmp_path / "Maildir"
    names = [f"170000000{n}.M1P1.h" for n in range(3)]
    sub = "new" if rename == "new to cur" else "cur"
    suffix = "" if sub == "new" else ":2,S"
    directory = writeMaildir(root, [(sub, n + suffix, b"Subject: %s\n\nx\n" % n.encode()) for n in names])
    listdir = os.listdir
    renamed = []

    def renamingWhileListed(path):
        listed = listdir(path)
        if renamed:
            return listed
        if rename == "new to cur" and os.path.basename(path) == "cur":
            # cur/ read first, then new/: the move lands in between.
            renamed.append(os.rename(root / "new" / names[1], root / "cur" / (names[1] + ":2,S")))
        elif rename == "flags in cur" and os.path.basename(path) == "cur":
            # The new name read, the old one too (readdir's order is the
            # directory's own).
            renamed.append(os.rename(root / "cur" / (names[1] + ":2,S"), root / "cur" / (names[1] + ":2,RS")))
            listed = listed + [names[1] + ":2,RS"]
        return listed

    monkeypatch.setattr(os, "listdir", renamingWhileListed)
    report = importMaildir(store, directory, ALICE)
    monkeypatch.undo()
    assert renamed
    assert (report.messages, report.failures) == (3, [])
    assert pop3(store)[0] == names


def test_aFileExpungedDuringTheImportIsATemporaryFailure(databaseURL, store, tmp_path, monkeypatch):
    """
    A message the user expunges from a live Dovecot while the import runs
    is named, and the command exits 75 ("run it again to finish"), not 65
    (bad data, which no run again would change): the next run, which no
    longer lists it, completes.
    """
    from test_importers import cli

    names = [f"170000000{n}.M1P1.h" for n in range(2)]
    directory = writeMaildir(tmp_path / "Maildir", [("new", n, b"Subject: %s\n\nx\n" % n.encode()) for n in names])
    root = tmp_path / "Maildir"
    listMaildir = maildirImporter.listMaildir

    def listThenExpunge(*args):
        listed = listMaildir(*args)
        os.unlink(root / "new" / names[1])
        return listed

    monkeypatch.setattr(maildirImporter, "listMaildir", listThenExpunge)
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f")
    assert code == 75, (out, err)
    assert err.endswith("gone during the import (expunged?): not imported\n"
                        "mailgate: the import did not complete; run it again to finish\n")
    monkeypatch.undo()
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f")
    assert (code, err) == (0, ""), (out, err)
    assert out == "0 messages imported (0 octets), 1 skipped as already present\n"


@pytest.mark.parametrize(
    "uidList, why",
    [
        (b"3 V1 N3\n-500000001 :%s\n", "uid '-500000001'"),
        (b"3 V99999999999999999999 N3\n1 :%s\n", "uidvalidity '99999999999999999999'"),
        (b"3 V1 N3\n1 Oabc :%s\n", "POP3 order 'abc'"),
        (b"3 V1 N3\n0 :%s\n", "uid '0'"),
        # What is missing is named, not a Python error ("'N'", "list index
        # out of range", "invalid literal for int()").
        (b"3 V1\n1 :%s\n", "line 1: the header has no next uid (N field)"),
        (b"3 N3\n1 :%s\n", "line 1: the header has no uidvalidity (V field)"),
        (b"1 1234\n1 %s\n", "line 1: a version 1 header is 1 <uidvalidity> <next uid>"),
        (b"\n1 :%s\n", "line 1: no version number"),
        (b"three V1 N3\n1 :%s\n", "line 1: no version number"),
        (b"1 1 3\n1%s\n", "line 2: no file name"),
    ],
)
def test_malformedUidListsAreRefused(store, tmp_path, uidList, why):
    name = "1700000000.M1P1.h"
    directory = writeMaildir(tmp_path / "Maildir", [("cur", name + ":2,S", b"Subject: x\n\nx\n")], uidList % name.encode())
    with pytest.raises(ImportFailed) as failure:
        importMaildir(store, directory, ALICE)
    assert "not a dovecot-uidlist Dovecot wrote" in str(failure.value)
    assert why in str(failure.value)
    assert pop3(store)[0] == []


def test_impossibleTimesInNamesAreNotArrivalTimes(store, tmp_path):
    names = ["99999999999999999999.G.h", "999999999999.F.h", "1700000000.M1P1.h", "1700000001.M1P1.h"]
    directory = writeMaildir(tmp_path / "Maildir", [("cur", n + ":2,S", b"Subject: x\n\nx\n") for n in names])
    cur = tmp_path / "Maildir" / "cur"
    for name, mtime in zip(names, (1600000000, 1600000001, 1600000002, 10**12)):
        os.utime(cur / (name + ":2,S"), (mtime, mtime))
    report = importMaildir(store, directory, ALICE, now=NOW)
    assert (report.messages, report.failures) == (4, [])
    arrived = {m.uniqueId: m.arrived for m in resultOf(store.listMessages(ALICE))}
    # The far-future names: their files' times; the plausible names keep
    # theirs, whatever the file's time.
    assert arrived == dict(zip(names, (1600000000, 1600000001, 1700000000, 1700000001)))


def test_anImpossibleNameAndFileTimeIsNow(store, tmp_path):
    name = "999999999999.F.h"
    directory = writeMaildir(tmp_path / "Maildir", [("cur", name + ":2,S", b"Subject: x\n\nx\n")])
    os.utime(tmp_path / "Maildir" / "cur" / (name + ":2,S"), (10**12, 10**12))
    assert importMaildir(store, directory, ALICE, now=NOW).messages == 1
    assert [m.arrived for m in resultOf(store.listMessages(ALICE))] == [NOW]


# -- a POP3 source that misbehaves ---------------------------------------------------------


def message(n):
    return b"Subject: m%d\r\n\r\nbody of message %d\r\n.leading dot\r\n" % (n, n)


def stuffed(data):
    return b"".join((b"." + line if line.startswith(b".") else line) for line in data.splitlines(keepends=True))


class ScriptedPOP3:
    """
    A POP3 server on 127.0.0.1 for one connection at a time, serving
    C{messages} (number to C{(unique id, octets)}); what it does wrong is
    set in its attributes.  It records the numbers DELEted by a session
    that QUIT.
    """

    def __init__(self, messages):
        self.messages = messages
        self.greeting = b"+OK ready"
        self.uidlLines = None
        self.listLines = None
        self.listSizes = {}
        self.retrStatus = b"+OK"
        self.refused = set()
        self.breakAt = None
        self.deleted = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self):
        return f"pop3://alice@127.0.0.1:{self.port}"

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            with connection:
                connection.settimeout(10)
                try:
                    self._session(connection, connection.makefile("rb"))
                except OSError:
                    pass

    def _session(self, connection, reader):
        connection.sendall(self.greeting + b"\r\n")
        marked = []
        while True:
            line = reader.readline(1000)
            if not line:
                return
            verb, _, argument = line.strip().decode().partition(" ")
            reply = self._answer(verb.upper(), argument, marked)
            if reply is None:
                return
            if verb.upper() == "QUIT":
                # Before the answer: the client may look at once.
                self.deleted.extend(marked)
                connection.sendall(reply)
                return
            connection.sendall(reply)

    def _answer(self, verb, argument, marked):
        if verb in ("USER", "PASS", "QUIT"):
            return b"+OK\r\n"
        if verb == "UIDL":
            lines = self.uidlLines or [b"%d %s" % (n, uidl.encode()) for n, (uidl, _) in self.messages.items()]
            return b"+OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"
        if verb == "LIST":
            sizes = {n: len(data) for n, (_, data) in self.messages.items()} | self.listSizes
            lines = self.listLines or [b"%d %d" % item for item in sizes.items()]
            return b"+OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"
        if verb == "RETR":
            number = int(argument)
            if number == self.breakAt:
                return None
            if number in self.refused:
                return b"-ERR cannot read that message\r\n"
            return self.retrStatus + b"\r\n" + stuffed(self.messages[number][1]) + b".\r\n"
        if verb == "DELE":
            marked.append(int(argument))
            return b"+OK\r\n"
        return b"-ERR unknown command\r\n"


@pytest.fixture
def source():
    servers = []

    def start(messages):
        server = ScriptedPOP3(messages)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def threeMessages(uidls=("U1", "U2", "U3"), make=message):
    return {n: (uidl, make(n)) for n, uidl in enumerate(uidls, 1)}


def test_pop3DuplicateIdsAreImportedAndOnlyTheyDeleted(store, source):
    server = source(threeMessages(("X-2", "X", "X")))
    warnings = []
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True, warn=warnings.append)
    assert (report.messages, report.skipped, report.failures) == (3, 0, [])
    assert warnings == ["message 3: unique id X appears twice; imported as X-2-2"]
    uidl, _, bodies = pop3(store)
    assert uidl == ["X-2", "X", "X-2-2"]
    assert bodies == [message(n) for n in (1, 2, 3)]
    assert sorted(server.deleted) == [1, 2, 3]


def test_pop3OtherMailUnderTheSameIdsIsNeitherSkippedNorDeleted(store, source):
    first = source(threeMessages())
    assert importPOP3(store, first.url, ALICE, PASSWORD).messages == 3
    # Another server, the same ids, other octets of the same sizes.
    other = source(threeMessages(make=lambda n: message(n).replace(b"body", b"BODY")))
    report = importPOP3(store, other.url, ALICE, PASSWORD, delete=True)
    assert (report.messages, report.skipped) == (0, 0)
    assert report.failures == [
        f"message {n}: unique id U{n}: the maildrop already has another message of the same size "
        f"({len(message(n))} octets) under this unique id; not imported"
        for n in (1, 2, 3)
    ]
    assert other.deleted == []
    assert pop3(store)[2] == [message(n) for n in (1, 2, 3)]
    # The first server's own mail is skipped, and may then be deleted.
    again = importPOP3(store, first.url, ALICE, PASSWORD, delete=True)
    assert (again.messages, again.skipped, again.failures) == (0, 3, [])
    assert sorted(first.deleted) == [1, 2, 3]


def test_pop3OverlongStatusLinesAreNotContent(store, source):
    server = source(threeMessages())
    server.greeting = b"+OK " + b"G" * 5000
    server.retrStatus = b"+OK " + b"J" * 5000
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.failures) == (3, [])
    assert pop3(store) == (["U1", "U2", "U3"], [len(message(n)) for n in (1, 2, 3)], [message(n) for n in (1, 2, 3)])


def test_pop3ARefusedMessageIsOneFailure(store, source):
    server = source(threeMessages())
    server.refused = {2}
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert report.messages == 2
    assert report.failures == [
        "message 2 (U2): 127.0.0.1 refused RETR 2: -ERR cannot read that message; not imported"
    ]
    assert pop3(store)[0] == ["U1", "U3"]
    assert sorted(server.deleted) == [1, 3]


def test_pop3MessagesFetchedBeforeTheConnectionBrokeAreKept(store, source):
    server = source(threeMessages())
    server.breakAt = 3
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert report.messages == 2
    assert report.failures == ["127.0.0.1 closed the connection"]
    assert pop3(store)[0] == ["U1", "U2"]


def test_pop3MessageSizesAreWhatRETRSendsUpToALimit(store, source):
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    messages = threeMessages()
    messages[2] = ("U2", big)
    messages[3] = ("U3", big[:900] + b"\r\n")
    server = source(messages)
    # LIST understates both: neither matters.
    server.listSizes = {2: 48, 3: 48}
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True, maxSize=1000)
    assert report.messages == 2
    assert report.failures == ["message 2 (U2): over 1000 octets, the largest message imported; not imported"]
    assert pop3(store)[2] == [message(1), big[:900] + b"\r\n"]
    assert sorted(server.deleted) == [1, 3]


def test_pop3AMessageListedOverTheLimitIsNotDownloaded(store, source):
    """
    A message LIST says is over the largest size imported is a failure
    without its RETR: read to its end to be dropped, a message of
    gigabytes would cross the network for nothing, on every run.  (The
    server drops the connection at RETR 2: had it been sent, message 3
    would not be imported.)
    """
    messages = threeMessages()
    messages[2] = ("U2", b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n")
    server = source(messages)
    server.breakAt = 2
    report = importPOP3(store, server.url, ALICE, PASSWORD, maxSize=1000)
    assert report.failures == [
        "message 2 (U2): over 1000 octets, the largest message imported (LIST gives 2018); not imported"
    ]
    assert not report.temporary
    assert pop3(store)[0] == ["U1", "U3"]


def test_pop3AListingThatRepeatsANumberIsRefused(store, source):
    server = source(threeMessages())
    server.uidlLines = [b"1 U1", b"1 U1b", b"2 U2"]
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert report.messages == 0
    assert report.failures == ["127.0.0.1 sent a malformed UIDL listing: message 1 twice"]
    assert (pop3(store)[0], server.deleted) == ([], [])


def test_pop3AListingNumberOfOtherDigitsIsMalformed(store, source):
    """
    A message number in digits Python's C{str.isdigit} takes but C{int}
    does not ("²") is a malformed line: the import used to end in a
    ValueError traceback, in UIDL's listing and in LIST's.
    """
    server = source(threeMessages())
    server.uidlLines = ["\u00b2 U1".encode(), b"2 U2", b"3 U3"]
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert report.messages == 0
    assert report.failures == ["127.0.0.1 sent a malformed UIDL line: b'\\xc2\\xb2 U1\\r\\n'"]
    assert (pop3(store)[0], server.deleted) == ([], [])
    server = source(threeMessages())
    server.listLines = [b"1 77", "\u00b2 5".encode(), b"3 \xd9\xa1", b"2 77", b"3 77"]
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert (report.messages, report.failures) == (3, [])
    assert sorted(server.deleted) == [1, 2, 3]


def test_importCommandTakesTheLargestMessageSize(source, tmp_path):
    """
    C{mailgate import pop3 --max-message-size}: a message above it is
    reported and left out (exit 65, not "run it again": that would leave
    it out again); with a
    larger limit, the next run imports it; a limit that is no size is a
    usage error.
    """
    from test_importers import cli, target

    big = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
    server = source({1: ("U1", message(1)), 2: ("U2", big)})
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    command = ["import", "pop3", server.url, ALICE, "--password-stdin", "--max-message-size"]
    code, out, err = cli(url, *command, "1000", stdin=PASSWORD + "\n")
    # Bad data (65): another run with the same limit leaves it out again.
    assert code == 65, (out, err)
    assert "message 2 (U2): over 1000 octets, the largest message imported (LIST gives 2018); not imported" in err
    assert out.startswith("1 message imported")
    code, out, err = cli(url, *command, "1M", stdin=PASSWORD + "\n")
    assert (code, err) == (0, ""), (out, err)
    assert out.startswith("1 message imported") and "1 skipped as already present" in out
    code, out, err = cli(url, *command, "0", stdin=PASSWORD + "\n")
    assert code == 64 and "bad --max-message-size" in err, (out, err)


def test_importCommandSaysWhetherRunningItAgainHelps(source, tmp_path):
    """
    C{mailgate import pop3}'s exit status tells a script that retries on
    75 whether another run can finish the import: a message whose unique
    id POP3 cannot carry is left out by every run (65, as the README
    documents for messages an import cannot take); a message the server
    would not give this time is a temporary failure (75), and the next run
    brings it in.
    """
    from test_importers import cli, target

    server = source(threeMessages(("U1", "bad\x01id", "U3")))
    url, store = target(tmp_path, (ALICE, PASSWORD))
    store.close()
    command = ["import", "pop3", server.url, ALICE, "--password-stdin"]
    code, out, err = cli(url, *command, stdin=PASSWORD + "\n")
    assert code == 65, (out, err)
    assert "message 2: unique id 'bad\\x01id' is not one POP3 can carry" in err
    assert err.splitlines()[-1].endswith("for reasons that running it again does not change")
    server.messages = threeMessages(("U1", "U2", "U3"))
    server.refused = {2}
    code, out, err = cli(url, *command, stdin=PASSWORD + "\n")
    assert code == 75, (out, err)
    assert "message 2 (U2): 127.0.0.1 refused RETR 2: -ERR cannot read that message; not imported" in err
    assert err.endswith("did not complete; run it again to finish\n")
    server.refused = set()
    code, out, err = cli(url, *command, stdin=PASSWORD + "\n")
    assert (code, err) == (0, ""), (out, err)
    assert out.startswith("1 message imported") and "2 skipped as already present" in out


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_pop3DeleteRemovesFromTheSourceOnlyWhatWasCommitted(store, source, monkeypatch):
    """
    import pop3 --delete whose second batch cannot be written (another
    process holds the database's write lock from the moment message 3 is
    fetched, longer than the store waits for it): the first batch,
    committed, is deleted from the source; the refused batch and what
    follows stay there, and the failure is reported.  Run again,
    it imports and deletes the rest.
    """
    import sqlite3

    from mailgate.importers import BatchWriter

    monkeypatch.setattr(BatchWriter, "maxMessages", 2)
    server = source({n: (f"U{n}", message(n)) for n in range(1, 6)})
    store.database.connection.execute("PRAGMA busy_timeout = 200")
    holder = sqlite3.connect(store.engine.path, isolation_level=None, check_same_thread=False)
    answer = server._answer

    def lockingAtThree(verb, argument, marked):
        if verb == "RETR" and argument == "3":
            holder.execute("BEGIN IMMEDIATE")
        return answer(verb, argument, marked)

    server._answer = lockingAtThree
    try:
        report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    finally:
        holder.rollback()
        holder.close()
    assert report.messages == 2
    assert len(report.failures) == 1 and "locked" in report.failures[0], report.failures
    assert pop3(store)[0] == ["U1", "U2"]
    assert sorted(server.deleted) == [1, 2]
    server._answer = answer
    server.messages = {n: server.messages[n] for n in (3, 4, 5)}
    server.deleted = []
    report = importPOP3(store, server.url, ALICE, PASSWORD, delete=True)
    assert (report.messages, report.failures) == (3, [])
    assert pop3(store)[0] == ["U1", "U2", "U3", "U4", "U5"]
    assert sorted(server.deleted) == [3, 4, 5]
