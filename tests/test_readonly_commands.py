"""
The commands that only read (user list, user test, the mailbox listings,
show and export, who, nodes, ban list) open an SQLite file read-only when
its schema is this mailgate's, as db check does: a backup (rollback
journal, as db backup writes it) keeps its checksum, and a file its user
may only read (chmod 0400, a snapshot) is read.  A database that needs a
migration is opened to write and migrated, as before.  Through the real
command (in this process, and as the user nobody in a child) on real
SQLite files.
"""

import os
import pwd
import shutil
import sqlite3

import pytest

from databasefiles import backupOf, digest, directoryForOthers, fill, olderSchema, onlyReadableByNobody, runAs
from e2e import mailgateHere as mailgate
from mailgate.store import engineFromURL, openSynchronousStore
from mailgate.store.schema import LATEST

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"

#: every command that only reads, and what it is given on standard input
READING = [
    (("user", "list"), ""),
    (("user", "list", "--json"), ""),
    (("user", "test", ALICE, "--password-stdin"), "pw\n"),
    (("mailbox", "list", ALICE), ""),
    (("mailbox", "deleted", ALICE), ""),
    (("mailbox", "show", ALICE, "1"), ""),
    (("who",), ""),
    (("nodes",), ""),
    (("ban", "list"), ""),
]

rootOnly = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")


@pytest.fixture
def liveURL(tmp_path):
    """
    A database (WAL, as mailgate keeps it) where Alice has a message.
    """
    url = f"sqlite:///{tmp_path / 'live' / 'mail.sqlite3'}"
    (tmp_path / "live").mkdir()
    return fill(url, {ALICE: ["Subject: hi\n\nhello\n"]})


def _olderSchema(path):
    """
    Take the database at C{path} back to the schema before this mailgate's
    last migration, in rollback-journal mode (a backup an older mailgate
    made).
    """
    path.unlink()
    olderSchema(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()


@pytest.mark.parametrize("argv, stdin", READING, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_aBackupIsReadAsItIsAndKeepsItsChecksum(liveURL, tmp_path, argv, stdin):
    """
    A command that only reads leaves a backup's octets as they were, and
    nothing beside it: it opened it to write, putting it in WAL mode,
    which changed its header (and so its checksum) and left a -wal and
    -shm.
    """
    (tmp_path / "backups").mkdir()
    backup = backupOf(liveURL, tmp_path / "backups")
    before = digest(backup)
    code, out, err = mailgate(f"sqlite:///{backup}", *argv, stdin=stdin)
    assert (code, err) == (0, ""), out
    assert digest(backup) == before
    assert sorted(p.name for p in backup.parent.iterdir()) == ["backup.sqlite3"]


def test_anExportOfABackupKeepsItsChecksum(liveURL, tmp_path):
    """
    mailbox export (one user, and --all) reads a backup as it is.
    """
    (tmp_path / "backups").mkdir()
    backup = backupOf(liveURL, tmp_path / "backups")
    before = digest(backup)
    url = f"sqlite:///{backup}"
    code, out, err = mailgate(url, "mailbox", "export", ALICE, str(tmp_path / "one"))
    assert (code, err, out) == (0, "", f"exported 1 message (22 octets) of {ALICE} to {tmp_path / 'one'}\n")
    code, out, err = mailgate(url, "mailbox", "export", "--all", str(tmp_path / "all"))
    assert (code, err) == (0, ""), out
    assert digest(backup) == before
    assert sorted(p.name for p in backup.parent.iterdir()) == ["backup.sqlite3"]


@rootOnly
@pytest.mark.parametrize("owner", ["its owner", "another user"])
def test_aFileThatMayOnlyBeReadIsRead(liveURL, request, owner):
    """
    A backup its reader may not write (chmod 0400 and the reader's; 0444
    and another user's), read by a user who is not root, in a directory
    he may not write: listed, tested, shown, where every such command was
    refused (exit 78, "cannot open SQLite database ... to write to it").
    The file is as it was.
    """
    directory = directoryForOthers(request)
    backup = backupOf(liveURL, directory)
    onlyReadableByNobody(backup, owner == "its owner")
    before = digest(backup)
    for argv, stdin in READING:
        done = runAs("nobody", backup, argv, stdin)
        assert (done.returncode, done.stderr) == (0, ""), (argv, done.stdout)
        if argv[:2] == ("user", "list"):
            assert ALICE in done.stdout
    assert digest(backup) == before
    assert sorted(p.name for p in directory.iterdir()) == ["backup.sqlite3"]


def test_aDatabaseThatNeedsAMigrationIsStillMigrated(liveURL, tmp_path):
    """
    A file whose schema is older than this mailgate's is opened to write
    and migrated by a command that only reads, as before (the command's
    upgrade is logged: test_cli_audit); one that is up to date is opened
    read-only, nothing applied.
    """
    path = tmp_path / "old.sqlite3"
    shutil.copy(engineFromURL(liveURL).path, path)
    _olderSchema(path)
    url = f"sqlite:///{path}"
    store = openSynchronousStore(url, create=False, readsOnly=True)
    try:
        assert ([m.version for m in store.migrationsApplied], store.database.engine.readOnly) == ([LATEST], False)
    finally:
        store.close()
    assert mailgate(url, "db", "version") == (0, f"schema version {LATEST} (this mailgate: {LATEST})\n", "")
    store = openSynchronousStore(url, create=False, readsOnly=True)
    try:
        assert (store.migrationsApplied, store.database.engine.readOnly) == ([], True)
    finally:
        store.close()


@rootOnly
def test_aFileThatNeedsAMigrationAndMayOnlyBeReadIsRefusedAsBefore(liveURL, request):
    """
    An older schema in a file its user may only read: the migration the
    command would make needs writing, refused as before (exit 78, one
    line), and the file is left as it was.
    """
    directory = directoryForOthers(request)
    path = directory / "old.sqlite3"
    shutil.copy(engineFromURL(liveURL).path, path)
    _olderSchema(path)
    onlyReadableByNobody(path, True)
    before = digest(path)
    done = runAs("nobody", path, ("user", "list"))
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == (
        f"mailgate: cannot open SQLite database {path} to write to it (nobody may not read and write {path}: "
        f"it is nobody's, mode 0400)\n"
    )
    assert digest(path) == before


@rootOnly
def test_aReaderLeavesNoSideFilesTheOwnerCannotWrite(liveURL, request):
    """
    A WAL database no server has open (no -wal, no -shm), readable by
    others, in a directory they may write: read by a user who is neither
    its owner nor root, SQLite would make its -wal and -shm as his, and
    the owner's next write failed (attempt to write a readonly database).
    The read is refused as before, naming whom to run it as, and the owner
    writes it afterwards.
    """
    owner = pwd.getpwnam("daemon")
    directory = directoryForOthers(request, 0o1777)
    path = directory / "mail.sqlite3"
    shutil.copy(engineFromURL(liveURL).path, path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert sorted(p.name for p in directory.iterdir()) == ["mail.sqlite3"]
    os.chown(path, owner.pw_uid, owner.pw_gid)
    path.chmod(0o644)
    # user list says why it may not read it, as db check does (it said
    # the opening to write's line: "... to write to it").
    for argv in (("user", "list"), ("db", "check")):
        done = runAs("nobody", path, argv)
        assert (done.returncode, done.stdout) == (78, "")
        assert done.stderr == (
            f"mailgate: cannot open SQLite database {path} to read it: it is in WAL mode, and nobody would leave "
            f"it a -wal and -shm its owner daemon may not write: run this as daemon\n"
        ), argv
    assert sorted(p.name for p in directory.iterdir()) == ["mail.sqlite3"]
    written = runAs("daemon", path, ("user", "quota", ALICE, "1M"))
    assert (written.returncode, written.stderr) == (0, "")


#: every command that only reads, mailbox export included
READING_AND_EXPORT = READING + [(("mailbox", "export", ALICE, "/nonexistent/export"), "")]


@rootOnly
@pytest.mark.parametrize(
    "case", ["the server's, mode 0600", "root's, WAL, where no -shm can be made"], ids=["unreadable", "no -shm"]
)
def test_aDatabaseThatCannotBeReadSaysWhyItCannotBeRead(liveURL, request, case):
    """
    A database of the current schema a command that only reads may not
    open read-only (run as nobody on the server's database, mode 0600; a
    WAL file of root's, 0444, in a directory of root's, where its -shm
    cannot be made): said as db check says it, naming the file, whose it
    is and what to do.  They said the opening to write's line ("...  to
    write to it (nobody may not read and write ...)"), though they only
    wanted to read it.  The file is as it was.
    """
    directory = directoryForOthers(request)
    path = directory / "mail.sqlite3"
    shutil.copy(engineFromURL(liveURL).path, path)
    if case.startswith("the server's"):
        daemon = pwd.getpwnam("daemon")
        os.chown(path, daemon.pw_uid, daemon.pw_gid)
        path.chmod(0o600)
        why = (
            f"unable to open database file (nobody may not read {path}: it is daemon's, mode 0600: run this as "
            f"daemon)"
        )
    else:
        path.chmod(0o444)
        why = (
            f"attempt to write a readonly database (it is in WAL mode, and nobody may not create its -shm in "
            f"{directory}: run this as root, its owner, or copy the file where nobody may write)"
        )
    before = digest(path)
    expected = f"mailgate: cannot open SQLite database {path} to read it: {why}\n"
    done = runAs("nobody", path, ("db", "check"))
    assert (done.returncode, done.stdout, done.stderr) == (78, "", expected)
    for argv, stdin in READING_AND_EXPORT:
        done = runAs("nobody", path, argv, stdin)
        assert (done.returncode, done.stdout, done.stderr) == (78, "", expected), argv
    assert digest(path) == before
    assert sorted(p.name for p in directory.iterdir()) == ["mail.sqlite3"]


def test_restoringABackupLeavesTheBackupAsItWas(liveURL, tmp_path):
    """
    Restoring as README's Backups says (C{--database} the backup, C{db
    backup} into the database's place) reads the backup and changes
    nothing in it: it opened it to write, which put it in WAL mode (its
    checksum changed), and every later look into it (C{user list}) left a
    -wal and -shm beside it.  The restored copy serves Alice's mail.
    """
    (tmp_path / "backups").mkdir()
    backup = backupOf(liveURL, tmp_path / "backups")
    before = digest(backup)
    restored = tmp_path / "restored.sqlite3"
    code, out, err = mailgate(f"sqlite:///{backup}", "db", "backup", str(restored))
    assert (code, err) == (0, ""), out
    assert digest(backup) == before
    code, out, err = mailgate(f"sqlite:///{backup}", "user", "list", "--json")
    assert (code, err) == (0, ""), out
    assert sorted(p.name for p in backup.parent.iterdir()) == ["backup.sqlite3"]
    code, out, err = mailgate(f"sqlite:///{restored}", "mailbox", "list", ALICE, "--json")
    assert (code, err) == (0, "") and len(out.splitlines()) == 1, out
