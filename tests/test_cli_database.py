"""
C{mailgate} on databases in the states an administrator meets them in: one
whose write lock a server holds (SQLite), one that is empty or not
mailgate's, through L{mailgate.cli.run} on real SQLite files and, where
the state exists there, PostgreSQL.
"""

import json
import os
import sqlite3
import time

import pytest

from e2e import mailgate_server, waitFor  # noqa: F401 (mailgate_server is a fixture)
from e2e import mailgateHere as mailgate
from mailgate.cli import EX_TEMPFAIL
from mailgate.store import engineFromURL
from mailgate.store.database import runTransaction
from mailgate.store.schema import LATEST

# The command's new passwords are hashed cheaply here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"


@pytest.fixture
def sqliteURL(tmp_path):
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    assert mailgate(url, "deliver", ALICE, stdin="Subject: hi\n\nhello\n")[0] == 0
    return url


@pytest.fixture
def writeLockHeld(sqliteURL):
    """
    Another connection holding the SQLite database's write lock, as a
    server does during a long write (an expunge of a large maildrop, a
    large import, a migration).
    """
    conn = sqlite3.connect(sqliteURL[len("sqlite:///"):], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield sqliteURL
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize(
    "argv",
    [["user", "list", "--json"], ["mailbox", "list", ALICE, "--json"], ["who", "--json"], ["ban", "list"]],
)
def test_listingsAnswerWhileAServerHoldsTheWriteLock(writeLockHeld, argv):
    """
    Reading needs no write lock (SQLite's WAL lets readers go on beside a
    writer): a listing answers at once, rather than waiting for the lock
    to check the schema, and failing when the writer takes longer than
    the busy timeout.
    """
    code, out, err = mailgate(writeLockHeld, *argv)
    assert (code, err) == (0, "")
    if argv[0] != "ban":
        for line in out.splitlines():
            json.loads(line)
    if argv[:2] == ["user", "list"]:
        assert json.loads(out)["address"] == ALICE


def test_aChangeWhileTheWriteLockIsHeldIsATemporaryFailure(writeLockHeld, monkeypatch):
    """
    A change waits for the lock (the busy timeout), then says to try
    again, and changes nothing.  The busy timeout is cut to half a second
    here: waiting out the real ten seconds showed nothing more.
    """
    from mailgate.store import sqlite

    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 500)
    code, out, err = mailgate(writeLockHeld, "user", "quota", ALICE, "1M")
    assert code == EX_TEMPFAIL
    assert err.startswith("mailgate: temporary failure, try again: ") and err.count("\n") == 1, err
    assert out == ""
    code, out, err = mailgate(writeLockHeld, "user", "list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["quota_octets"] == "default", out


def _tables(url):
    engine = engineFromURL(url)
    conn = engine.connect()

    def tables(cursor):
        if engine.name == "sqlite":
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return sorted(name for (name,) in cursor.fetchall())

    try:
        return runTransaction(engine, conn, tables, (), {}, False)
    finally:
        conn.close()


def test_dbVersionOfADatabaseThatIsNotMailgatesChangesNothing(databaseURL):
    """
    C{db version} on an empty database (a new PostgreSQL database, or one
    --database names by mistake) says it has no schema and leaves it as it
    was: it does not create mailgate's version table there.
    """
    if databaseURL.startswith("sqlite"):
        open(databaseURL[len("sqlite:///"):], "wb").close()
    code, out, err = mailgate(databaseURL, "db", "version")
    assert (code, out, err) == (0, f"schema version 0 (this mailgate: {LATEST})\n", "")
    assert _tables(databaseURL) == []


def test_dbVersionSaysADatabaseIsNewerThanThisMailgate(sqliteURL):
    """
    After a newer node migrated the database, C{db version} on an older
    one says why every other command refuses it.
    """
    conn = sqlite3.connect(sqliteURL[len("sqlite:///"):])
    with conn:
        conn.execute("INSERT INTO mailgate_schema (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)", (LATEST + 1,))
    conn.close()
    code, out, err = mailgate(sqliteURL, "db", "version")
    assert (code, err) == (0, "")
    assert out == f"schema version {LATEST + 1} (this mailgate: {LATEST}); newer than this mailgate: upgrade mailgate\n"
    code, out, err = mailgate(sqliteURL, "user", "list")
    assert code == 78 and f"database schema version {LATEST + 1} is newer" in err


def test_dbUpgradeSaysWhichMigrationsChangeNothingOnThisDatabase(databaseURL):
    """
    Migration 4 rewrites SQLite's chunks, 7 changes how PostgreSQL stores
    them, 13 indexes PostgreSQL's addresses in code point order; on the
    other engine each only records the version.  db upgrade of a
    PostgreSQL database printed "applied migration 4: SQLite: message
    chunks in a rowid table", as if done to it.
    """
    code, out, err = mailgate(databaseURL, "db", "upgrade")
    assert (code, err) == (0, "")
    if databaseURL.startswith("sqlite"):
        said = [
            "applied migration 7: PostgreSQL: message chunks stored without compression",
            "applied migration 13: PostgreSQL: the users' addresses indexed in code point order, "
            "for listings a page at a time",
        ]
        other, engine = 4, "SQLite"
    else:
        said, other = ["applied migration 4: SQLite: message chunks in a rowid table"], 7
        engine = "PostgreSQL"
    lines = out.splitlines()
    expected = [f"{line} (nothing to change on {engine})" for line in said]
    assert [line for line in lines if "nothing to change" in line] == expected
    assert any(line.startswith(f"applied migration {other}: ") for line in lines)


def test_dbVersionSaysADatabaseIsOlderAndThatTheNextCommandUpgradesIt(tmp_path):
    """
    On a database an older mailgate made (the version-3 database of
    tests/fixtures, made by b473258), asked after installing this one and
    before its first start: db version said only "schema version 3 (this
    mailgate: 12)", not that the next start or command, the MTA's
    mailgate deliver included, upgrades it past what the older mailgate
    opens (the moment to take the backup).  It says so, and upgrades
    nothing itself.
    """
    import gzip
    import shutil
    from pathlib import Path

    path = tmp_path / "old.sqlite3"
    with gzip.open(Path(__file__).parent / "fixtures" / "schema-v3.sqlite3.gz") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    url = f"sqlite:///{path}"
    expected = (
        f"schema version 3 (this mailgate: {LATEST}); older: this mailgate's next start or command "
        "(db backup and db version aside; on SQLite, none while a server runs on it) upgrades it, after which an "
        "older mailgate refuses it\n"
    )
    for _ in range(2):
        assert mailgate(url, "db", "version") == (0, expected, "")


@pytest.mark.parametrize(
    "side, url, code, reason",
    [
        ("--to", "sqlite:////nonexistent/directory/copy.sqlite3", 78, "cannot open SQLite database"),
        ("--to", "postgresql://mailgate@127.0.0.1:1/mailgate", EX_TEMPFAIL, "temporary failure, try again: "),
        ("--from", "postgresql://mailgate@127.0.0.1:1/mailgate", EX_TEMPFAIL, "temporary failure, try again: "),
        ("--from", "mysql://localhost/mail", 78, "unsupported database URL"),
    ],
)
def test_dbCopySaysWhichDatabaseItCannotOpen(sqliteURL, side, url, code, reason):
    """
    C{db copy} opens two databases: its error names the one that failed.
    """
    urls = {"--from": sqliteURL, "--to": f"{sqliteURL}.copy"}
    urls[side] = url
    code_, out, err = mailgate(sqliteURL, "db", "copy", "--from", urls["--from"], "--to", urls["--to"])
    assert (code_, out) == (code, "")
    assert err.startswith(f"mailgate: {side}: {reason}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "url, reason",
    [
        ("postgressql://mailgate:s3cret-pw@db.example.org/mail", "unsupported database URL "
         "'postgressql://mailgate:***@db.example.org/mail'"),
        ("mysql://db.example.org/mail?password=s3cret-pw", "unsupported database URL "
         "'mysql://db.example.org/mail?password=***'"),
        ("postgresql://mailgate:s3cret-pw@[::1/mail", "bad database URL 'postgresql://mailgate:***@[::1/mail'"),
        # libpq's keyword/value form, which psql takes and mailgate does not
        ("host=db.example.org user=mailgate password=s3cret-pw dbname=mail", "unsupported database URL "
         "'host=db.example.org user=mailgate password=*** dbname=mail'"),
        ("host=db.example.org password='s3cret pw' dbname=mail", "unsupported database URL "
         "'host=db.example.org password=*** dbname=mail'"),
        ("sqlite://mailgate:s3cret-pw@db.example.org/mail", "bad SQLite URL "
         "'sqlite://mailgate:***@db.example.org/mail'"),
    ],
)
def test_aMistypedDatabaseURLIsShownWithoutItsPassword(url, reason):
    """
    An administrator's typo in the scheme or the host (and the server's
    start-up line in the journal, which says the same) does not print the
    database's password, and one Python cannot split is a configuration
    error, not an internal one.  Nor does a connection string in libpq's
    keyword/value form, which is no URL, or an SQLite URL written as a
    PostgreSQL one.
    """
    code, out, err = mailgate(url, "user", "list")
    assert (code, out) == (78, "")
    assert err.startswith(f"mailgate: {reason}: ") and err.count("\n") == 1, err
    assert "s3cret" not in err
    from twisted.python import usage

    from mailgate.tap import Options

    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--database", url])
    assert "s3cret" not in str(e.value) and reason in str(e.value)


# -- db backup -------------------------------------------------------------------


def test_dbBackupCopiesTheDatabaseWhileAWriterWorks(sqliteURL, tmp_path):
    """
    C{db backup FILE}: one consistent snapshot of the SQLite database into
    a new owner-only file, taken while another connection is in the middle
    of a write (a server delivering): the copy is what was committed, the
    write is neither waited for nor half in it, and the copy stands alone
    (no -wal file to bring along) and serves as a database.
    """
    import os
    import stat

    path = sqliteURL[len("sqlite:///"):]
    writer = sqlite3.connect(path)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute(
        "INSERT INTO users (address, domain, password_hash, created_at) VALUES (?, ?, ?, ?)",
        ("bob@example.org", "example.org", "x", 0),
    )
    backup = tmp_path / "backup.sqlite3"
    try:
        code, out, err = mailgate(sqliteURL, "db", "backup", str(backup))
    finally:
        writer.commit()
        writer.close()
    assert (code, err) == (0, ""), err
    assert out == f"backed up {path} to {backup} ({os.path.getsize(backup)} octets)\n"
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    assert sqlite3.connect(backup).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not os.path.exists(f"{backup}-wal")
    code, out, _ = mailgate(f"sqlite:///{backup}", "user", "list", "--json")
    assert code == 0
    assert [json.loads(line)["address"] for line in out.splitlines()] == [ALICE]
    # The live database has the write, committed after the copy.
    assert sqlite3.connect(path).execute("SELECT count(*) FROM users").fetchone()[0] == 2
    assert sqlite3.connect(backup).execute("SELECT count(*) FROM users").fetchone()[0] == 1


def test_dbBackupIsGivenItsNameOnlyOnceWhole(sqliteURL, tmp_path, monkeypatch):
    """
    The copy is written under a name that says it is partial, and takes
    the backup's name only once whole, checked and synced: a backup
    killed on its way (here, interrupted at its first fsync) leaves no
    file under the name a restore would take (it held part of the
    database, or read, with the journal beside it, as an empty database
    that checks "ok"), and the next night's run is not refused as if it
    had made one.
    """
    import os
    import stat

    from mailgate.store.backup import backupDatabase

    backups = tmp_path / "backups"
    backups.mkdir()
    target = backups / "2026-12-05.sqlite3"
    seen = []

    def interrupted(fd):
        seen.extend((name, stat.S_IMODE(os.stat(backups / name).st_mode)) for name in os.listdir(backups))
        raise KeyboardInterrupt()

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backupDatabase(engineFromURL(sqliteURL), str(target))
    monkeypatch.undo()
    assert len(seen) == 1, seen
    assert seen[0][0].startswith("2026-12-05.sqlite3.") and seen[0][0].endswith(".partial"), seen
    assert seen[0][1] == 0o600
    assert os.listdir(backups) == []
    code, out, err = mailgate(sqliteURL, "db", "backup", str(target))
    assert (code, err) == (0, ""), err
    assert os.listdir(backups) == [target.name]
    code, out, _ = mailgate(f"sqlite:///{target}", "user", "list", "--json")
    assert code == 0 and [json.loads(line)["address"] for line in out.splitlines()] == [ALICE]


def test_dbBackupNeverOverwritesAFile(sqliteURL, tmp_path):
    existing = tmp_path / "backup.sqlite3"
    existing.write_bytes(b"an older backup")
    code, _, err = mailgate(sqliteURL, "db", "backup", str(existing))
    assert (code, err) == (73, f"mailgate: {existing} exists: a backup goes into a new file\n")
    assert existing.read_bytes() == b"an older backup"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    code, _, _ = mailgate(sqliteURL, "db", "backup", str(link))
    assert code == 73 and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("side", ["-wal", "-journal"])
def test_aRestoreIntoTheNameOfADatabaseWhoseLogIsLeftIsRefused(sqliteURL, tmp_path, side):
    """
    A restore with db backup into the database's name, the database
    moved aside without the log a crash left beside it: SQLite would
    take that log for the copy's own and apply the lost database's last
    writes over it (restored, then undone).  Refused, exit 73, naming the
    file and what to do; nothing is made.
    """
    backup = tmp_path / "backup.sqlite3"
    assert mailgate(sqliteURL, "db", "backup", str(backup))[0] == 0
    target = tmp_path / "restored.sqlite3"
    left = tmp_path / f"restored.sqlite3{side}"
    left.write_bytes(b"the log of the database that was here")
    code, _, err = mailgate(f"sqlite:///{backup}", "db", "backup", str(target))
    assert (code, err) == (
        73,
        f"mailgate: {left} exists: it is of the database that was {target}, and SQLite would apply it "
        "to the copy: move it aside with that database (or remove it)\n",
    )
    assert not target.exists() and not list(tmp_path.glob("restored.sqlite3.*.partial"))


def test_aRestoreUnderTheServerStillRunningIsRefused(sqliteURL, tmp_path):
    """
    A restore into the name of a database moved aside without stopping
    its server (which holds the name's .lock and goes on serving the
    moved file, taking mail into it): refused, exit 75, nothing made.  It
    was made: the server's deliveries from then on went to the moved file
    alone, lost to the restored one.  Once the server has stopped, it is
    made.
    """
    backup = tmp_path / "backup.sqlite3"
    assert mailgate(sqliteURL, "db", "backup", str(backup))[0] == 0
    live = tmp_path / "live.sqlite3"
    server = engineFromURL(f"sqlite:///{live}")
    server.claimServer()
    try:
        code, out, err = mailgate(f"sqlite:///{backup}", "db", "backup", str(live))
    finally:
        server.releaseServer()
    assert (code, out) == (EX_TEMPFAIL, "")
    assert err == (
        f"mailgate: a mailgate server is running on {live} (it holds {live}.lock), serving the database moved "
        "aside: stop it first, then restore\n"
    )
    assert not live.exists() and not list(tmp_path.glob("live.sqlite3.*.partial"))
    code, out, err = mailgate(f"sqlite:///{backup}", "db", "backup", str(live))
    assert (code, err) == (0, ""), out


def test_dbBackupOfPostgreSQLNamesItsTools(postgresURL, tmp_path):
    code, _, err = mailgate(postgresURL, "db", "backup", str(tmp_path / "x"))
    assert code == 64
    assert err == (
        "mailgate: db backup copies an SQLite database; back PostgreSQL up with its own tools "
        "(pg_dump, or pg_basebackup and WAL archiving)\n"
    )
    assert not (tmp_path / "x").exists()


def test_mailDeliveredAfterARestoreNeverGetsAUniqueIdGivenOutSince(sqliteURL, tmp_path):
    """
    A restore sets the database back to the backup, its unique id counters
    too, but not the clients: one that leaves mail on the server has the
    ids the live database gave mail delivered after the backup (lost with
    the disk).  Were new mail given those ids again after the restore, the
    client would take it for mail it has and never download it (RFC 1939:
    a unique id is never reused in a maildrop).  The copy's maildrops
    have a new validity stamp, the second half of every id given from
    then on: the messages in the copy keep theirs, and mail delivered
    after a restore gets ids the live database never gave.  Restored as
    README says, with C{db backup} from the copy, each restore renews it
    again, so restoring the same backup twice reuses no id either.
    """
    import os
    import re

    def delivered(url):
        code, out, err = mailgate(url, "deliver", ALICE, stdin="Subject: later\n\nhello\n")
        assert (code, err) == (0, ""), err
        return re.fullmatch(rf"delivered to {ALICE} as (\S+)\n", out).group(1)

    def uniqueIds(url):
        code, out, err = mailgate(url, "mailbox", "list", ALICE, "--json")
        assert (code, err) == (0, ""), err
        return [json.loads(line)["unique_id"] for line in out.splitlines()]

    path = sqliteURL[len("sqlite:///"):]
    kept = uniqueIds(sqliteURL)
    backup = tmp_path / "backup.sqlite3"
    assert mailgate(sqliteURL, "db", "backup", str(backup))[0] == 0
    # After the backup, the client downloads (and keeps) a message.
    given = {delivered(sqliteURL)}
    # The disk is lost; the copy is put in its place, and new mail comes.
    os.replace(backup, path)
    for side in ("-wal", "-shm"):
        if os.path.exists(path + side):
            os.unlink(path + side)
    assert uniqueIds(sqliteURL) == kept
    again = delivered(sqliteURL)
    assert again not in given
    given.add(again)
    # Restored by C{db backup} from a backup, twice from the same one.
    assert mailgate(sqliteURL, "db", "backup", str(backup))[0] == 0
    for n in range(2):
        restored = tmp_path / f"restored{n}.sqlite3"
        code, _, err = mailgate(f"sqlite:///{backup}", "db", "backup", str(restored))
        assert (code, err) == (0, ""), err
        url = f"sqlite:///{restored}"
        assert uniqueIds(url) == kept + [again]
        fresh = delivered(url)
        assert fresh not in given
        given.add(fresh)


def test_aBackupHoldsNoNodeNorSessionOfTheServersRunningWhenItWasTaken(sqliteURL, tmp_path):
    """
    The nodes serving the database and their POP3 sessions, as the
    registry had them when the backup was taken, are processes, not data:
    a copy restored soon after (within the 30 seconds and 10 minutes a
    killed node's rows count) showed in C{mailgate who} a session nobody
    had, which C{mailgate kick} then waited for, and in C{mailgate nodes}
    a node that did not run, beside the one serving it.  The copy has
    neither; what the live database has stays.
    """
    import time

    path = sqliteURL[len("sqlite:///"):]
    now = int(time.time())
    live = sqlite3.connect(path)
    with live:
        live.execute(
            "INSERT INTO mailgate_nodes (node_id, name, started_at, seen_at) VALUES (?, ?, ?, ?)",
            ("n1", "mail.example.org[123]", now - 60, now),
        )
        live.execute(
            "INSERT INTO pop3_sessions (user_id, session_id, node_id, peer, since) "
            "SELECT user_id, ?, ?, ?, ? FROM users",
            ("s1", "n1", "192.0.2.1:1234", now - 5),
        )
    live.close()
    assert mailgate(sqliteURL, "who", "--json")[1] != ""
    backup = tmp_path / "backup.sqlite3"
    assert mailgate(sqliteURL, "db", "backup", str(backup))[0] == 0
    restored = f"sqlite:///{backup}"
    assert mailgate(restored, "who", "--json") == (0, "", "")
    assert mailgate(restored, "nodes", "--json") == (0, "", "")
    assert json.loads(mailgate(sqliteURL, "who", "--json")[1])["user"] == ALICE


# -- a damaged SQLite database ------------------------------------------------


@pytest.fixture
def damagedURL(sqliteURL):
    """
    A database whose table of message chunks is damaged (its root page
    overwritten, as a failing disk or a copy of a file being written
    leaves one), while the rest still opens and reads.
    """
    path = sqliteURL[len("sqlite:///"):]
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pageSize = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'body_chunks'").fetchone()
    finally:
        conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * pageSize)
        f.write(b"\xff" * 64)
    return sqliteURL


def test_aDamagedDatabaseIsSaidToBeDamaged(damagedURL, tmp_path):
    """
    Damage found past the opening, reading the damaged table: one line
    saying the database is damaged and to restore the last backup, exit
    78 (not an internal error, 70, as if mailgate were at fault); a backup
    of it fails in one line too and leaves no file.
    """
    copy = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    code, out, err = mailgate(damagedURL, "db", "copy", "--from", damagedURL, "--to", copy)
    assert code == 78, (code, err)
    # Which file: the source's.
    source = damagedURL[len("sqlite:///"):]
    assert err.startswith(f"mailgate: the SQLite database {source} is damaged (database disk image is malformed): restore it ")
    assert err.count("\n") == 1, err
    # The target it created is not left behind, to be taken for a copy.
    assert not (tmp_path / "c.sqlite3").exists()
    backup = tmp_path / "backup.sqlite3"
    code, out, err = mailgate(damagedURL, "db", "backup", str(backup))
    assert code == 73, (code, err)
    assert "database disk image is malformed" in err and err.count("\n") == 1, err
    assert not backup.exists()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://mail:s3cret@db.internal:5433/mail", "postgresql://db.internal:5433/mail"),
        ("postgresql://mail:s3cret@db.internal:5432/mail", "postgresql://db.internal/mail"),
        ("postgresql://mail@db.internal/mail?port=5433", "postgresql://db.internal:5433/mail"),
        ("postgresql://mail:s3cret@[::1]:5433/mail", "postgresql://[::1]:5433/mail"),
        ("postgresql://db1:5433,db2:5434/mail", "postgresql://db1:5433,db2:5434/mail"),
        ("postgresql:///mail?host=/var/run/postgresql", "postgresql:///mail?host=/var/run/postgresql"),
        ("postgresql://mail:s3cret@/mail?host=/run/pg&sslmode=disable", "postgresql:///mail?host=/run/pg"),
        ("postgresql:///mail?host=/run/pg&port=5433", "postgresql:///mail?host=/run/pg&port=5433"),
        ("postgresql:///mail", "postgresql:///mail"),
    ],
)
def test_aPostgreSQLDatabaseIsNamedWhereItConnects(url, shown):
    """
    What errors and the start-up log call a PostgreSQL database: a URL
    naming a Unix socket's directory, or none (libpq's default socket),
    is not said to be localhost's, which would send the administrator
    after a TCP port the connection never used; a port other than 5432
    is shown (an administrator with several clusters on a host tells
    them apart by it; it was left out), the password never.
    """
    pytest.importorskip("psycopg")
    assert repr(engineFromURL(url)) == shown


def test_aDatabaseInADirectoryThatIsNotThereIsSaidToBeSo(tmp_path):
    """
    A database URL whose directory does not exist (mistyped, or not made
    yet), at its creation: SQLite says only "unable to open database
    file"; the line names the missing directory.
    """
    missing = tmp_path / "var" / "lib" / "mailgate"
    code, _, err = mailgate(f"sqlite:///{missing}/mail.sqlite3", "db", "upgrade")
    assert (code, err) == (
        78,
        f"mailgate: cannot open SQLite database {missing}/mail.sqlite3: unable to open database file "
        f"(there is no directory {missing})\n",
    )


def _withAnotherApplicationsTable(url):
    """
    Give the empty database at C{url} a table of another application's
    (C{invoices}) and none of mailgate's; return its engine.
    """
    engine = engineFromURL(url)
    conn = engine.connect()
    try:
        runTransaction(engine, conn, lambda cursor: cursor.execute("CREATE TABLE invoices (id INTEGER)"), (), {}, True)
    finally:
        conn.close()
    return engine


@pytest.mark.parametrize("argv", [["user", "list"], ["who"], ["ban", "list"], ["mailbox", "list", ALICE]])
def test_anotherApplicationsDatabaseIsNotMadeMailgates(databaseURL, argv):
    """
    A command that does not create a database (a listing), pointed by a
    mistyped --database at another application's database, refuses it, as
    it refuses a missing file, rather than install mailgate's tables in it
    (probe: mailgate user list on an SQLite file holding a table invoices
    listed no users and left 15 tables of mailgate's beside it).
    """
    from mailgate.urls import shownURL

    engine = _withAnotherApplicationsTable(databaseURL)
    code, out, err = mailgate(databaseURL, *argv)
    where = engine.path if engine.name == "sqlite" else shownURL(databaseURL)
    assert (code, out) == (78, ""), (code, out, err)
    assert err.startswith(
        f"mailgate: no mailgate database in {where}: it holds another application's tables (invoices) and none "
        "of mailgate's (check --database; "
    ), err
    assert _tables(databaseURL) == ["invoices"]
    # deliver: the MTA keeps the message (75), as for a missing file.
    assert mailgate(databaseURL, "deliver", ALICE, stdin="Subject: x\r\n\r\nx\r\n")[0] == 75
    assert _tables(databaseURL) == ["invoices"]


def test_dbCopyIntoAnotherApplicationsDatabaseIsRefused(databaseURL, tmp_path):
    """
    C{db copy --to} a database that holds another application's tables and
    none of mailgate's (a mistyped URL naming an existing database) is
    refused, saying so (exit 78), as the other commands refuse it: before,
    the copy installed mailgate's tables beside the invoices and wrote
    every user's password hash and mail there (probe: --to an SQLite file
    holding a table foo, exit 0).  A missing SQLite file is still made.
    """
    from mailgate.urls import shownURL

    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    assert mailgate(source, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    engine = _withAnotherApplicationsTable(databaseURL)
    code, out, err = mailgate(source, "db", "copy", "--from", source, "--to", databaseURL)
    where = engine.path if engine.name == "sqlite" else shownURL(databaseURL)
    assert (code, out) == (78, ""), (code, out, err)
    assert err == (
        f"mailgate: --to: no mailgate database in {where}: it holds another application's tables (invoices) "
        "and none of mailgate's\n"
    ), err
    assert _tables(databaseURL) == ["invoices"]
    fresh = tmp_path / "fresh.sqlite3"
    assert mailgate(source, "db", "copy", "--from", source, "--to", f"sqlite:///{fresh}")[0] == 0


# -- db restored --------------------------------------------------------------

BOB, CAROL = "bob@example.org", "carol@example.org"


def _run(url, function, write=False):
    """
    C{function(cursor)} in one transaction on the database C{url}.
    """
    from mailgate.store import openSynchronousStore

    store = openSynchronousStore(url, create=False)
    try:
        return store.database.run(function, write=write)
    finally:
        store.close()


def _stamps(url):
    return dict(_run(url, lambda c: c.execute(
        "SELECT u.address, m.uid_validity FROM users u JOIN mailboxes m ON m.user_id = u.user_id"
    ).fetchall()))


def _addServerRows(url, seen):
    """
    A node whose heartbeat was last written at C{seen}, with a POP3
    session of each user, as a backup taken while it served holds them.
    """
    def add(cursor):
        cursor.execute(
            "INSERT INTO mailgate_nodes (node_id, name, started_at, seen_at) VALUES (?, ?, ?, ?)",
            ("n1", "mail.example.org[123]", seen - 60, seen),
        )
        cursor.execute(
            "INSERT INTO pop3_sessions (user_id, session_id, node_id, peer, since) "
            "SELECT user_id, 's' || CAST(user_id AS TEXT), ?, ?, ? FROM users",
            ("n1", "192.0.2.1:1234", seen - 5),
        )

    _run(url, add, write=True)


def _delivered(url, address):
    import re

    code, out, err = mailgate(url, "deliver", address, stdin="Subject: later\n\nhello\n")
    assert (code, err) == (0, ""), err
    return re.fullmatch(rf"delivered to {address} as (\S+)\n", out).group(1)


def _uniqueIds(url, address):
    code, out, err = mailgate(url, "mailbox", "list", address, "--json")
    assert (code, err) == (0, ""), err
    return [json.loads(line)["unique_id"] for line in out.splitlines()]


def test_dbRestoredGivesEveryMaildropANewStampAndForgetsTheServersOfTheBackup(databaseURL, tmp_path):
    """
    C{db restored}, on a database restored from a backup C{db backup} did
    not make (here a C{db copy} of the live database, which keeps the
    counters and stamps as a pg_dump or a copied file does): every
    maildrop's stamp changes, its messages keep their ids, and mail
    delivered after the restore gets no id the live database gave since
    the backup (a leave-on-server client has those, for mail lost with
    it).  The nodes and sessions the backup held (dead: their heartbeat
    is old) are forgotten.  Run again (the same backup restored twice),
    it draws new stamps again.
    """
    live = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    for address in (ALICE, BOB, CAROL):
        assert mailgate(live, "user", "add", address, "--password-stdin", stdin="pw\n")[0] == 0
    _delivered(live, ALICE)
    assert mailgate(live, "db", "copy", "--from", live, "--to", databaseURL)[0] == 0
    kept = _uniqueIds(databaseURL, ALICE)
    given = {_delivered(live, ALICE)}
    _addServerRows(databaseURL, int(time.time()) - 3600)
    before = _stamps(databaseURL)

    code, out, err = mailgate(databaseURL, "db", "restored")
    assert (code, err) == (0, ""), err
    assert out == (
        "gave 3 maildrops new validity stamps; forgot 1 node and 3 POP3 sessions "
        "of the servers that ran when the backup was taken\n"
    )
    after = _stamps(databaseURL)
    assert after.keys() == before.keys()
    assert all(after[a] != before[a] and 0 <= after[a] < 2**31 for a in before), (before, after)
    assert _uniqueIds(databaseURL, ALICE) == kept
    assert _run(databaseURL, lambda c: c.execute(
        "SELECT (SELECT count(*) FROM mailgate_nodes), (SELECT count(*) FROM pop3_sessions)"
    ).fetchone()) == (0, 0)
    again = _delivered(databaseURL, ALICE)
    assert again not in given and again not in kept

    code, out, err = mailgate(databaseURL, "db", "restored")
    assert (code, err) == (0, ""), err
    assert out.startswith("gave 3 maildrops new validity stamps; forgot 0 nodes and 0 POP3 sessions ")
    assert all(_stamps(databaseURL)[a] != after[a] for a in after)


def test_dbRestoredTakesARecentHeartbeatForARunningNodeOnPostgreSQLOnly(databaseURL, tmp_path):
    """
    A node whose heartbeat is recent: on PostgreSQL a node running (or
    one restored from a backup taken less than STALE_AFTER ago, until
    then), so the command is refused (exit 75) and changes nothing; on
    SQLite the server's lock file tells whether one runs, and such a row
    is the restored file's.
    """
    from mailgate.store.registry import STALE_AFTER

    assert mailgate(databaseURL, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    _addServerRows(databaseURL, int(time.time()))
    before = _stamps(databaseURL)
    code, out, err = mailgate(databaseURL, "db", "restored")
    if databaseURL.startswith("sqlite"):
        assert (code, err) == (0, ""), err
        assert out.startswith("gave 1 maildrop a new validity stamp; forgot 1 node and 1 POP3 session ")
        return
    assert (code, out) == (EX_TEMPFAIL, "")
    assert err == (
        "mailgate: a mailgate server is running on this database (node mail.example.org[123], its heartbeat "
        f"less than {STALE_AFTER} seconds old): stop every node first (a node copied with a backup taken "
        f"less than {STALE_AFTER} seconds ago counts as running until then)\n"
    )
    assert _stamps(databaseURL) == before
    # The session row kept (C{who} does not list it: no node holds its
    # maildrop's lock, PostgreSQL tells).
    assert _run(databaseURL, lambda c: c.execute("SELECT count(*) FROM pop3_sessions").fetchone()) == (1,)


def test_dbRestoredIsRefusedWhileAServerRunsOnTheDatabase(mailgate_server):
    """
    A real server on the database: its POP3 sessions list unique ids,
    and its deliveries give them, under the stamps there are, so C{db
    restored} is refused (exit 75) and changes nothing, on SQLite because
    the server holds the file's lock, on PostgreSQL because its node's
    heartbeat is recent.  Once the server has stopped, it runs.
    """
    url = mailgate_server.database
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    server = mailgate_server()
    waitFor(lambda: mailgate(url, "nodes", "--json")[1], "the node's heartbeat")
    before = _stamps(url)
    code, out, err = mailgate(url, "db", "restored")
    assert (code, out) == (EX_TEMPFAIL, ""), err
    if mailgate_server.backend == "sqlite":
        path = mailgate_server.dbpath
        assert err == f"mailgate: a mailgate server is running on {path} (it holds {path}.lock): stop it first\n"
    else:
        assert err.startswith("mailgate: a mailgate server is running on this database (node "), err
    assert _stamps(url) == before
    assert mailgate(url, "nodes", "--json")[1] != ""
    server.stop()
    code, out, err = mailgate(url, "db", "restored")
    assert (code, err) == (0, ""), err
    assert out.startswith("gave 1 maildrop a new validity stamp; ")
    assert _stamps(url) != before


@pytest.mark.skipif(os.geteuid() != 0, reason="root makes the lock file only when run as root")
def test_dbRestoredRunAsRootLeavesTheLockFileToTheDatabasesOwner(tmp_path):
    """
    C{db restored} on SQLite holds the server's lock file for its
    transaction, and makes it where there is none (a database restored to
    a new place: the lock file is no part of a backup).  Run as root, it
    made it root's, mode 0600, and the server, which runs as the
    database's owner, could not start on it (exit 78, "cannot open SQLite
    database ...: Permission denied").  It is the database's owner's.
    """
    path = tmp_path / "restored.sqlite3"
    url = f"sqlite:///{path}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    nobody = 65534
    os.chown(path, nobody, nobody)
    lock = tmp_path / "restored.sqlite3.lock"
    if lock.exists():
        lock.unlink()
    code, out, err = mailgate(url, "db", "restored")
    assert (code, err) == (0, ""), err
    made = os.stat(lock)
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (nobody, nobody, 0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="root makes the lock file only when run as root")
def test_aLockFileWithAnotherNameIsNeitherGivenAwayNorRewritten(tmp_path):
    """
    Root, running C{db restored} (or a server starting as root), gives the
    lock file to the database's owner: where that owner had put a hard
    link to a file of root's in the lock file's place (in a directory of
    theirs), root gave that file to them, and truncated it to write its
    pid.  A lock file with another name is locked, and left as it is.
    """
    path = tmp_path / "restored.sqlite3"
    url = f"sqlite:///{path}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    nobody = 65534
    os.chown(path, nobody, nobody)
    victim = tmp_path / "roots-own"
    victim.write_text("root's own\n")
    victim.chmod(0o644)
    lock = tmp_path / "restored.sqlite3.lock"
    if lock.exists():
        lock.unlink()
    os.link(victim, lock)
    code, out, err = mailgate(url, "db", "restored")
    assert (code, err) == (0, ""), err
    kept = os.stat(victim)
    assert (kept.st_uid, kept.st_gid, kept.st_mode & 0o777) == (0, 0, 0o644)
    assert victim.read_text() == "root's own\n"
