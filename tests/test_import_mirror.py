"""
C{--mirror} with an address filled from several old accounts: each
imported unique id is remembered with the source it came from (a
maildir's real path, a POP3 server's host, port and user), and a mirror
run from one source takes out only what that source brought in and no
longer lists.  Before, mailgate did not know where an id came from, and a
mirror run from either of two merged accounts took out everything the
other had brought in.

Ids imported before mailgate recorded sources (schema version 13 and
earlier) have none: a run from a source that lists them claims them; one
it does not list may be another source's, and a mirror run leaves it, and
says so, unless told this source alone filled the address (C{soleSource}).
"""

import os

import pytest

from mailgate.importers import maildirSource
from mailgate.importers.maildir import importMaildir
from mailgate.importers.pop3 import importPOP3, pop3Source
from mailgate.store import engineFromURL
from mailgate.store.database import runTransaction
from mailgate.store.schema import MIGRATIONS, _ensureVersionTable, applyMigration
from mailgate.testing import addUser, memoryStore, resultOf
from test_importer_faults import source  # noqa: F401 (fixture)
from test_importers import ALICE, PASSWORD, cli, pop3, store, writeMaildir  # noqa: F401 (fixture)

#: A maildir's messages: (file name, which is the unique id with %f, octets)
FILES = [
    ("1700000000.M1P1.old", b"Subject: from the maildir, 1\r\n\r\nx\r\n"),
    ("1700000100.M1P1.old", b"Subject: from the maildir, 2\r\n\r\nx\r\n"),
]


def maildir(root, files=FILES):
    return writeMaildir(root, [("cur", name + ":2,S", data) for name, data in files])


def pop3Messages(*uidls):
    return {n: (uidl, b"Subject: %s over POP3\r\n\r\ny\r\n" % uidl.encode()) for n, uidl in enumerate(uidls, 1)}


def importedFrom(store, directory, mirror=True, **options):
    return importMaildir(store, directory, ALICE, uidlFormat="%f", mirror=mirror, **options)


def test_aMirrorRunFromAMaildirLeavesWhatAPOP3AccountBroughtIn(store, source, tmp_path):
    """
    Two old accounts merged into one address, a maildir and a POP3
    account: a mirror run from the maildir, which lists all it ever had,
    takes nothing out; once a message is gone from the maildir, it takes
    out that one, and never the POP3 account's.  And the other way round.
    """
    directory = maildir(tmp_path / "Maildir")
    server = source(pop3Messages("P1", "P2"))
    assert importedFrom(store, directory, mirror=False).messages == 2
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 2
    everything = [name for name, _ in FILES] + ["P1", "P2"]
    assert pop3(store)[0] == everything

    report = importedFrom(store, directory)
    # Before: 2 taken out as gone from the source, P1 and P2.
    assert (report.skipped, report.removed, report.unrecorded, report.failures) == (2, 0, 0, [])
    assert report.summary() == "0 messages imported (0 octets), 2 skipped as already present"
    assert pop3(store)[0] == everything

    os.unlink(os.path.join(directory, "cur", FILES[0][0] + ":2,S"))
    report = importedFrom(store, directory)
    assert (report.skipped, report.removed) == (1, 1)
    assert pop3(store)[0] == [FILES[1][0], "P1", "P2"]

    server.messages = pop3Messages("P2")
    report = importPOP3(store, server.url, ALICE, PASSWORD, mirror=True)
    assert (report.skipped, report.removed, report.failures) == (1, 1, [])
    assert pop3(store)[0] == [FILES[1][0], "P2"]
    assert sorted(m.uniqueId for m in resultOf(store.listDeleted(ALICE))) == sorted([FILES[0][0], "P1"])


def test_aMirrorRunFromOnePOP3AccountLeavesAnothersMail(store, source):
    """
    Two POP3 accounts (two servers) into one address: each one's mirror
    run takes out only what it brought in and no longer lists.
    """
    first, second = source(pop3Messages("A1", "A2")), source(pop3Messages("B1"))
    for server in (first, second):
        importPOP3(store, server.url, ALICE, PASSWORD)
    first.messages = pop3Messages("A2")
    report = importPOP3(store, second.url, ALICE, PASSWORD, mirror=True)
    assert (report.skipped, report.removed) == (1, 0)
    assert pop3(store)[0] == ["A1", "A2", "B1"]
    report = importPOP3(store, first.url, ALICE, PASSWORD, mirror=True)
    assert (report.skipped, report.removed) == (1, 1)
    assert pop3(store)[0] == ["A2", "B1"]


def test_theSameMaildirNamedAnotherWayIsTheSameSource(store, tmp_path, monkeypatch):
    """
    A maildir's identity is its real path: imported through one name and
    mirrored through another (relative, through a symbolic link, with a
    trailing slash), it is the same maildir.
    """
    directory = maildir(tmp_path / "Maildir")
    assert importedFrom(store, directory, mirror=False).messages == 2
    os.unlink(os.path.join(directory, "cur", FILES[0][0] + ":2,S"))
    (tmp_path / "link").symlink_to(directory)
    monkeypatch.chdir(tmp_path)
    names = ["Maildir", "link/", str(tmp_path / "link" / ".." / "Maildir")]
    assert {maildirSource(name) for name in names} == {maildirSource(directory)} == {f"maildir:{directory}"}
    report = importedFrom(store, "link/")
    assert (report.skipped, report.removed) == (1, 1)
    assert pop3(store)[0] == [FILES[1][0]]


def test_aMaildirWhosePathIsNotUTF8IsImportedAndMirrored(databaseURL, store, tmp_path):
    """
    A maildir under a directory whose name is not UTF-8 (a user name in
    Latin-1 on an old server) is imported, and mirrored, as any other.
    Before, its path as the source's identity was text the database could
    not store: exit 70, "internal error: UnicodeEncodeError", nothing
    imported.
    """
    parent = tmp_path / os.fsdecode(b"caf\xe9")
    parent.mkdir()
    directory = maildir(parent / "Maildir")
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f")
    assert (code, err) == (0, "") and out.startswith("2 messages imported")
    assert set(sources(store).values()) == {f"maildir:{os.path.realpath(tmp_path)}/caf\\xe9/Maildir"}
    os.unlink(os.path.join(directory, "cur", FILES[0][0] + ":2,S"))
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f", "--mirror")
    assert (code, err) == (0, "") and out.endswith(", 1 taken out as gone from the source\n")
    assert held(store) == [FILES[1][0]]


def test_aMaildirImportedFromACopyThenMirroredFromItsLivePath(databaseURL, store, tmp_path):
    """
    Imported from a copy of the maildir, then mirrored from the live one
    at the switch, after a client deleted a message there: two sources by
    their paths.  The mirror run says that it left what the copy brought
    in and it does not list, naming the copy, as the copy brought in what
    it lists; with --sole-source it takes that out.  Before, the run said
    nothing ("0 messages imported (0 octets), 1 skipped as already
    present"), took nothing out, and --sole-source did not either: the
    message the client deleted stayed, for a leave-on-server client to
    download again after the switch.
    """
    copy = maildir(tmp_path / "copy" / "Maildir")
    live = maildir(tmp_path / "Maildir", FILES[1:])
    code, out, err = cli(databaseURL, "import", "maildir", copy, ALICE, "--uidl-format", "%f")
    assert (code, err) == (0, "") and out.startswith("2 messages imported")
    mirror = ["import", "maildir", live, ALICE, "--uidl-format", "%f", "--mirror"]
    code, out, err = cli(databaseURL, *mirror)
    assert (code, err) == (0, "")
    assert out == (
        f"0 messages imported (0 octets), 1 skipped as already present, 1 not listed left in the maildrop as "
        f"brought in from {maildirSource(copy)}, which also brought in some of what this source lists (if it is "
        f"this source by another name, --sole-source takes them out)\n"
    )
    assert held(store) == [name for name, _ in FILES]
    code, out, err = cli(databaseURL, *mirror, "--sole-source")
    assert (code, err) == (0, "")
    assert out == "0 messages imported (0 octets), 1 skipped as already present, 1 taken out as gone from the source\n"
    assert held(store) == [FILES[1][0]]
    assert set(sources(store).values()) == {maildirSource(copy), maildirSource(live)}
    assert sources(store)[FILES[1][0]] == maildirSource(live)
    code, out, err = cli(databaseURL, *mirror)
    assert (code, err) == (0, "")
    assert out == "0 messages imported (0 octets), 1 skipped as already present\n"


def test_idsForgottenAreRememberedAgainByTheNextRunThatFindsThemHeld(databaseURL, store, source, tmp_path):
    """
    After C{import forget}, a run that finds the messages still held
    (skipped as already present) remembers their ids again, from its
    source, so that a later --mirror run takes out what the source no
    longer lists.  Before, they stayed forgotten: the mirror run at the
    switch left the message a client had deleted on the old server
    ("0 messages imported (0 octets), 1 skipped as already present"), for
    a leave-on-server client to download again.  From a maildir, and from
    a POP3 account (which skips by id and size, without fetching).
    """
    directory = maildir(tmp_path / "Maildir")
    server = source(pop3Messages("P1", "P2"))
    assert importedFrom(store, directory, mirror=False).messages == 2
    assert importPOP3(store, server.url, ALICE, PASSWORD).messages == 2
    code, out, err = cli(databaseURL, "import", "forget", ALICE)
    assert (code, err) == (0, "") and out.startswith("forgot 4 imported unique ids")
    assert sources(store) == {}
    assert importedFrom(store, directory, mirror=False).skipped == 2
    assert importPOP3(store, server.url, ALICE, PASSWORD).skipped == 2
    assert sources(store) == {
        **{name: maildirSource(directory) for name, _ in FILES},
        "P1": pop3Source(server.url, ALICE), "P2": pop3Source(server.url, ALICE),
    }

    os.unlink(os.path.join(directory, "cur", FILES[0][0] + ":2,S"))
    code, out, err = cli(databaseURL, "import", "maildir", directory, ALICE, "--uidl-format", "%f", "--mirror")
    assert (code, err) == (0, "")
    assert out == "0 messages imported (0 octets), 1 skipped as already present, 1 taken out as gone from the source\n"
    server.messages = pop3Messages("P2")
    report = importPOP3(store, server.url, ALICE, PASSWORD, mirror=True)
    assert (report.skipped, report.removed, report.failures) == (1, 1, [])
    assert held(store) == [FILES[1][0], "P2"]


def test_aPOP3SourcesIdentityIsItsHostPortAndUser():
    """
    The host in one form, the scheme's default port filled in, the user
    of the URL (or the one given); never a password.
    """
    same = [
        pop3Source("pop3://alice@mail.example.org", "ignored"),
        pop3Source("pop3://alice@MAIL.Example.org.:110/", "ignored"),
        pop3Source("pop3://mail.example.org:110", "alice"),
    ]
    assert set(same) == {"pop3:alice@mail.example.org:110"}
    assert pop3Source("pop3s://alice@mail.example.org", "x") == "pop3:alice@mail.example.org:995"
    assert pop3Source("pop3://bob@mail.example.org", "x") != same[0]
    shown = pop3Source("pop3://alice%40example.org:secret@[0:0::1]:1100", "x")
    assert shown == "pop3:alice%40example.org@[::1]:1100"
    assert pop3Source("pop3://127.0.0.1", "a@b") == "pop3:a%40b@127.0.0.1:110"


# -- ids imported before mailgate recorded sources ------------------------------

#: (unique id, octets) of what version 13 imported for alice: two messages
#: from the maildir of FILES, one from a POP3 account.
BEFORE = [(name, data) for name, data in FILES] + [("P1", pop3Messages("P1")[1][1])]


def _atVersion13(cursor, engine):
    """
    Migrations 1 to 13, and alice's maildrop as version 13's import left
    it: three imported messages, their ids remembered without a source.
    """
    import hashlib

    _ensureVersionTable(cursor)
    for migration in MIGRATIONS[:13]:
        applyMigration(cursor, engine, migration)
    cursor.execute(
        "INSERT INTO users (address, domain, password_hash, created_at) VALUES (?, 'example.org', 'x', 1)",
        (ALICE,),
    )
    cursor.execute("SELECT user_id FROM users")
    (userId,) = cursor.fetchone()
    octets = sum(len(data) for _, data in BEFORE)
    cursor.execute(
        "INSERT INTO mailboxes (user_id, uid_validity, next_uid, used_octets, used_messages, oldest_arrival) "
        "VALUES (?, 1234, ?, ?, ?, 1700000000)",
        (userId, len(BEFORE) + 1, octets, len(BEFORE)),
    )
    for uid, (uidl, data) in enumerate(BEFORE, 1):
        headerSize = data.index(b"\r\n\r\n") + 4
        cursor.execute(
            "INSERT INTO bodies (owner_id, body_id, size, header_size, refcount, created_at) "
            "VALUES (?, ?, ?, ?, 1, 1700000000)",
            (userId, f"b{uid}", len(data), headerSize),
        )
        cursor.execute(
            "INSERT INTO body_chunks (owner_id, body_id, seq, data) VALUES (?, ?, 0, ?)", (userId, f"b{uid}", data)
        )
        cursor.execute(
            "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at, "
            "dot_lines) VALUES (?, ?, ?, ?, ?, ?, ?, 1700000000, 0)",
            (userId, uid, uidl, userId, f"b{uid}", len(data), headerSize),
        )
        cursor.execute(
            "INSERT INTO imported_ids (user_id, uidl, size, digest, imported_at) VALUES (?, ?, ?, ?, 1700000000)",
            (userId, uidl, len(data), hashlib.sha256(data).digest()),
        )


@pytest.fixture
def upgraded(databaseURL):
    """
    C{(url, store)}: a store on a database version 13 made, upgraded as it
    opens.
    """
    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    try:
        runTransaction(engine, conn, _atVersion13, (engine,), {}, True)
    finally:
        conn.close()
    s = memoryStore(databaseURL)
    yield databaseURL, s
    s.close()


def held(store):
    return [m.uniqueId for m in resultOf(store.listMessages(ALICE))]


def sources(store):
    def read(cursor):
        cursor.execute("SELECT uidl, source FROM imported_ids ORDER BY uidl")
        return dict(cursor.fetchall())

    return store.database.run(read)


def test_idsImportedBeforeSourcesWereRecordedAreLeftUntilASourceClaimsThem(upgraded, source, tmp_path):
    """
    After the upgrade, the ids imported before have no source.  A mirror
    run from the maildir (which no longer has its first message) claims
    the one it lists, and leaves the two it does not list, saying so: the
    POP3 account's message is among them, and mailgate cannot tell which
    is which.  Once the POP3 account's run has claimed its own, a mirror
    run from the maildir told it alone is left (soleSource) takes out
    the maildir's first message, and still not the POP3 account's.
    """
    url, store = upgraded
    [first, second], pop = [name for name, _ in FILES], "P1"
    assert sources(store) == {first: None, second: None, pop: None}
    directory = maildir(tmp_path / "Maildir", FILES[1:])
    code, out, err = cli(url, "import", "maildir", directory, ALICE, "--uidl-format", "%f", "--mirror")
    assert (code, err) == (0, "")
    assert out == (
        "0 messages imported (0 octets), 1 skipped as already present, 2 not listed left in the maildrop "
        "(imported before mailgate recorded which source an id came from)\n"
    )
    assert held(store) == [first, second, pop]
    assert sources(store) == {first: None, second: maildirSource(directory), pop: None}

    server = source(pop3Messages(pop))
    report = importPOP3(store, server.url, ALICE, PASSWORD)
    assert (report.messages, report.skipped) == (0, 1)
    assert sources(store)[pop] == pop3Source(server.url, ALICE)
    report = importedFrom(store, directory)
    assert (report.removed, report.unrecorded) == (0, 1)

    code, out, err = cli(url, "import", "maildir", directory, ALICE, "--uidl-format", "%f", "--mirror", "--sole-source")
    assert (code, err) == (0, "")
    assert out == "0 messages imported (0 octets), 1 skipped as already present, 1 taken out as gone from the source\n"
    assert held(store) == [second, pop]
    assert [m.uniqueId for m in resultOf(store.listDeleted(ALICE))] == [first]


def test_aSoleSourceTakesOutWhatWasImportedBeforeAndItNoLongerLists(upgraded, source):
    """
    Where the administrator says the POP3 account alone filled the address,
    its mirror run takes out every message imported before that it does
    not list, as mirror runs did before sources were recorded.
    """
    url, store = upgraded
    server = source(pop3Messages("P1"))
    report = importPOP3(store, server.url, ALICE, PASSWORD, mirror=True, soleSource=True)
    assert (report.skipped, report.removed, report.unrecorded) == (1, 2, 0)
    assert held(store) == ["P1"]


def test_soleSourceGoesWithMirror(databaseURL, store, tmp_path):
    """
    Alone, --sole-source would change nothing: a usage error, before the
    source is read.
    """
    directory = maildir(tmp_path / "Maildir")
    for argv in (["maildir", directory, ALICE], ["pop3", "pop3://127.0.0.1:9", ALICE, "--password-stdin"]):
        code, out, err = cli(databaseURL, "import", *argv, "--sole-source", stdin=PASSWORD + "\n")
        assert (code, out, err) == (64, "", "mailgate: --sole-source goes with --mirror\n")
    assert held(store) == []


def test_aMaildropImportedThroughAMasterUserIsTheUsersOwnSource(databaseURL, store, source):
    """
    Imported through a master user (alice*migrator), mirrored with alice's
    own password: the same maildrop, the same source.
    """
    server = source(pop3Messages("M1", "M2"))
    url = f"pop3://127.0.0.1:{server.port}"
    code, out, err = cli(
        databaseURL, "import", "pop3", url, ALICE, "--master-user", "migrator", "--password-stdin", stdin="key\n"
    )
    assert (code, err) == (0, "") and out.startswith("2 messages imported")
    assert set(sources(store).values()) == {pop3Source(url, ALICE)}
    server.messages = pop3Messages("M2")
    code, out, err = cli(databaseURL, "import", "pop3", url, ALICE, "--password-stdin", "--mirror", stdin="pw\n")
    assert (code, err) == (0, "") and out.endswith(", 1 taken out as gone from the source\n")
    assert held(store) == ["M2"]


def test_theSourcesAreCopiedWithTheIds(tmp_path, postgresURL, source):
    """
    C{mailgate db copy} takes each id's source along: on the copy, a
    maildir's mirror run still leaves the POP3 account's mail.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    original = memoryStore(url)
    try:
        addUser(original, ALICE, PASSWORD)
        directory = maildir(tmp_path / "Maildir")
        importedFrom(original, directory, mirror=False)
        importPOP3(original, source(pop3Messages("P1")).url, ALICE, PASSWORD)
        recorded = sources(original)
    finally:
        original.close()
    code, out, err = cli(url, "db", "copy", "--from", url, "--to", postgresURL)
    assert (code, err) == (0, ""), out
    copy = memoryStore(postgresURL)
    try:
        assert sources(copy) == recorded and None not in recorded.values()
        os.unlink(os.path.join(directory, "cur", FILES[0][0] + ":2,S"))
        report = importedFrom(copy, directory)
        assert (report.removed, report.unrecorded) == (1, 0)
        assert held(copy) == [FILES[1][0], "P1"]
    finally:
        copy.close()
