"""
C{mailgate db check}: exit 0 on a sound database; 65 naming each check
that found something wrong, with examples and what to do, on SQLite and
PostgreSQL; SQLite's own check finding a damaged page; read-only, and
not held up by a server's write.  Through L{mailgate.cli.run} on real
databases.
"""

import os
import re
import sqlite3
from pathlib import Path

import pytest

from databasefiles import backupOf, digest, directoryForOthers, fill, onlyReadableByNobody, runAs
from e2e import mailgateHere as mailgate
from mailgate.store import engineFromURL
from mailgate.store.database import runTransaction
from mailgate.store.schema import LATEST
from test_damaged_database import damagedPath  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture
def filledURL(databaseURL):
    """
    A database where Alice and Bob have two messages each.
    """
    messages = [f"Subject: {n}\n\nhello {n}\n" for n in range(2)]
    return fill(databaseURL, {ALICE: messages, BOB: messages})


def _execute(url, *statements):
    """
    Run C{statements} in one write transaction on the database at C{url},
    as someone changing it by hand (or a bug) would.
    """
    engine = engineFromURL(url)
    conn = engine.connect()

    def run(cursor):
        for statement in statements:
            cursor.execute(statement)

    try:
        runTransaction(engine, conn, run, (), {}, True)
    finally:
        conn.close()


def test_aSoundDatabaseIsSaidToBeSound(filledURL):
    """
    Every check says ok, the last line that the database is sound, exit
    0; on PostgreSQL, that its pages are pg_amcheck's to check.
    """
    code, out, err = mailgate(filledURL, "db", "check")
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert lines[-1].endswith(": sound (13 checks)" if filledURL.startswith("sqlite") else ": sound (12 checks)")
    checks = [line for line in lines[:-1] if not line.startswith("PostgreSQL's own pages")]
    assert checks and all(line.endswith(": ok") for line in checks), out
    if filledURL.startswith("sqlite"):
        assert lines[0] == "SQLite's quick_check: ok"
        code, out, _ = mailgate(filledURL, "db", "check", "--full")
        assert code == 0 and out.splitlines()[0] == "SQLite's integrity_check: ok", out
    else:
        assert "PostgreSQL's own pages: not checked here (pg_amcheck checks its tables and indexes)" in lines


def test_whatIsWrongIsNamedWithWhatToDo(filledURL):
    """
    Counters that do not match the messages, a body counted wrong, a
    message whose body is gone: each check says what, for whom, and
    what to do; exit 65 with one line on standard error naming them.
    """
    _execute(
        filledURL,
        "UPDATE mailboxes SET used_messages = used_messages + 1 "
        f"WHERE user_id = (SELECT user_id FROM users WHERE address = '{ALICE}')",
        "UPDATE mailboxes SET next_uid = 1 "
        f"WHERE user_id = (SELECT user_id FROM users WHERE address = '{BOB}')",
        # Bob's first message loses its body (and its chunks stay).
        "DELETE FROM bodies WHERE body_id = (SELECT body_id FROM maildrop "
        f"WHERE user_id = (SELECT user_id FROM users WHERE address = '{BOB}') AND uid = 1)",
        # Alice's second is counted twice.
        "UPDATE bodies SET refcount = refcount + 1 WHERE body_id = (SELECT body_id FROM maildrop "
        f"WHERE user_id = (SELECT user_id FROM users WHERE address = '{ALICE}') AND uid = 2)",
    )
    code, out, err = mailgate(filledURL, "db", "check")
    assert code == 65, (out, err)
    assert err.count("\n") == 1 and ": 4 checks found problems: " in err, err
    assert (
        "storage use: maildrops whose recorded use is not what their messages take (quotas go by it): "
        "mailgate user recount ADDRESS sets it right\n"
        f"  {ALICE}: counts 3 messages, "
    ) in out
    assert "unique id counters: maildrops whose next unique id is one given already" in out
    assert f"  {BOB}: next uid 1, a message has uid 2\n" in out
    # Its chunks stay: its content is whole, and named as such (not lost).
    assert "messages and their bodies: ok\n" in out
    assert (
        "messages and their bodies' records: messages whose body's record is missing while their content is "
        "whole: POP3 serves them, but db copy leaves their content behind"
    ) in out
    assert re.search(rf"\n  {re.escape(BOB)}: message uid 1 \(\S+\) has no body record; its content is whole "
                     r"\(\d+ octets\)\n", out), out
    assert "chunks and their bodies: ok\n" in out
    assert "bodies and the messages holding them: bodies whose reference count" in out
    assert "counts 2 references, 1 message holds it" in out
    assert "users and their maildrops: ok\n" in out


def _bodyOf(address, uid):
    return (
        "(SELECT body_id FROM maildrop WHERE user_id = "
        f"(SELECT user_id FROM users WHERE address = '{address}') AND uid = {uid})"
    )


def test_aMessageWhoseBodysRecordAloneIsGoneIsNotSaidLost(filledURL):
    """
    A salvage (sqlite3 .dump of a damaged file) can lack a body's record
    and keep its chunks: the message is whole, and POP3 serves it.  db
    check said it had no body ("they cannot be retrieved") and its chunks
    belonged to nothing: an administrator weighing the salvage against
    the backup took mail that was there for lost.  Now it is named apart,
    with what it costs; a message whose chunks are gone, or one of them,
    is still lost.
    """
    _execute(
        filledURL,
        f"DELETE FROM bodies WHERE body_id = {_bodyOf(BOB, 1)}",
        # Bob's second: its record and its chunks gone.
        f"DELETE FROM body_chunks WHERE body_id = {_bodyOf(BOB, 2)}",
        f"DELETE FROM bodies WHERE body_id = {_bodyOf(BOB, 2)}",
    )
    code, out, err = mailgate(filledURL, "db", "check")
    assert code == 65, (out, err)
    assert re.search(
        rf"messages and their bodies: messages whose body is missing: [^\n]*\n  {re.escape(BOB)}: message uid 2 "
        r"\(\S+\) has no body\n(?!  )",
        out,
    ), out
    assert re.search(
        rf"messages and their bodies' records: [^\n]*\n  {re.escape(BOB)}: message uid 1 \(\S+\) has no body "
        r"record; its content is whole \(\d+ octets\)\n(?!  )",
        out,
    ), out
    assert "chunks and their bodies: ok\n" in out
    assert err.endswith(": 2 checks found problems: messages and their bodies, messages and their bodies' records\n")
    # Read whole, by the store's reads that POP3's RETR makes.
    code, out, err = mailgate(filledURL, "mailbox", "show", BOB, "1")
    assert (code, out, err) == (0, "Subject: 0\r\n\r\nhello 0\r\n", "")


def test_aMessageWhoseSizeIsNotItsBodysIsFoundAndNotHiddenByARecount(filledURL):
    """
    A message recorded as larger than its body (a disk error, a hand
    edit) is one that POP3 lists wrongly and whose RETR ends the session
    at a chunk that is not there: db check names it, and the storage use
    check's advice, user recount, which sums the messages' sizes, leaves
    it named (it only carried the wrong size into the quota, after which
    the check said the database was sound).
    """
    _execute(
        filledURL,
        "UPDATE maildrop SET size = size + 5 "
        f"WHERE user_id = (SELECT user_id FROM users WHERE address = '{ALICE}') AND uid = 1",
    )
    code, out, err = mailgate(filledURL, "db", "check")
    assert code == 65, (out, err)
    assert "messages and their sizes: messages whose recorded size is not their body's" in out, out
    assert f"  {ALICE}: message uid 1 (" in out
    assert ": 2 checks found problems: messages and their sizes, storage use\n" in err, err
    assert mailgate(filledURL, "user", "recount", ALICE)[0] == 0
    code, out, err = mailgate(filledURL, "db", "check")
    assert code == 65, (out, err)
    assert ": 1 check found problems: messages and their sizes\n" in err, err


def test_aDamagedFileIsFoundBySQLitesCheck(damagedPath):
    """
    A damaged page (Bob's maildrop rows overwritten): SQLite's check
    says the file is damaged and to restore it, the checks reading that
    page say they could not, the others run; exit 65.
    """
    code, out, err = mailgate(f"sqlite:///{damagedPath}", "db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    assert lines[0] == (
        f"SQLite's quick_check: the file {damagedPath} is damaged: restore it from its last backup "
        "(README: Backups)"
    ), out
    assert "storage use: not checked: a page it reads is damaged (database disk image is malformed)" in lines
    assert "users and their maildrops: ok" in lines
    assert err.startswith(f"mailgate: sqlite:///{damagedPath}: ") and "SQLite's quick_check" in err


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_theCheckChangesNothingAndWaitsForNoWriter(filledURL):
    """
    Beside a server in the middle of a write (another connection holding
    the write lock): the check answers at once, and neither the file nor
    its write-ahead log holds anything.  An older database is checked by
    SQLite, not migrated, and its invariants are said to be unchecked.
    """
    path = engineFromURL(filledURL).path
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    before = digest(path)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        code, out, err = mailgate(filledURL, "db", "check", "--full")
    finally:
        writer.rollback()
        writer.close()
    assert (code, err) == (0, ""), out
    # Nothing written: the file as it was, and no log of changes (the
    # last connection to close removes an empty one).
    assert digest(path) == before
    assert not Path(path + "-wal").exists() or Path(path + "-wal").stat().st_size == 0

    _execute(filledURL, f"UPDATE mailgate_schema SET version = {LATEST - 1}")
    code, out, err = mailgate(filledURL, "db", "check")
    assert code == 0, (out, err)
    assert f"mailgate's invariants: not checked (schema version {LATEST - 1}; " in out
    assert mailgate(filledURL, "db", "version")[1].startswith(f"schema version {LATEST - 1} ")


def test_aDatabaseThatIsNotMailgatesIsSaidToBe(tmp_path):
    """
    A file with no mailgate tables (an empty one, a salvage whose
    schema was lost, a mistyped path to another application's database):
    one line saying so, exit 78, rather than every check failing as if
    the tables were damaged.
    """
    path = tmp_path / "other.sqlite3"
    sqlite3.connect(path).execute("CREATE TABLE invoices (id INTEGER)").connection.close()
    code, out, err = mailgate(f"sqlite:///{path}", "db", "check")
    assert (code, out) == (78, ""), err
    assert err == f"mailgate: no mailgate database in sqlite:///{path}: it holds no mailgate tables\n"


def _lockedUsers(url):
    """
    A connection of its own holding the users table locked (ACCESS
    EXCLUSIVE, as an ALTER TABLE does), which a check reading it waits
    for: a check that takes as long as the test wants.  Rolled back (the
    lock given back) by the test.
    """
    import psycopg

    from mailgate.store.postgres import _conninfo

    holder = psycopg.connect(_conninfo(url))
    holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    return holder


def _checkInThread(url, *options):
    """
    C{mailgate db check} on a thread: the thread, and the list that gets
    its C{(exit status, stdout, stderr)}.
    """
    import threading

    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(mailgate(url, "db", "check", *options)), daemon=True)
    thread.start()
    return thread, outcome


def _waitUntilWaitingFor(url, holder, thread):
    """
    Return once a session waits for a lock C{holder}'s holds (bounded).
    """
    import time

    import psycopg

    from e2e import DEADLINE
    from mailgate.store.postgres import _conninfo

    deadline = time.monotonic() + DEADLINE
    with psycopg.connect(_conninfo(url), autocommit=True) as watcher:
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        while watcher.execute(waiting, (holder.info.backend_pid,)).fetchone()[0] == 0:
            assert thread.is_alive(), "the check ended without waiting for the table"
            assert time.monotonic() < deadline, "the check never waited for the table"
            time.sleep(0.01)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aCheckOnPostgreSQLTakesTheTimeItNeedsNotANodes(filledURL, monkeypatch):
    """
    A check runs for longer than a node's statements may (60 seconds,
    then the connection given up at 75; 1 and 1.5 here): on a large
    database, where one statement reads every message, each run failed
    "temporary failure, try again" (exit 75), whenever it was tried
    again.  Each check now has its own time, an hour by default.  The
    check is made to take 3 seconds by a table it waits for.
    """
    from e2e import DEADLINE
    from mailgate.store import pgdeadline, postgres

    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_MS", 1000)
    monkeypatch.setattr(pgdeadline.DeadlineConnection, "answerDeadline", 1.5)
    holder = _lockedUsers(filledURL)
    try:
        thread, outcome = _checkInThread(filledURL)
        _waitUntilWaitingFor(filledURL, holder, thread)
        # Past both bounds, unless the check ended already.
        thread.join(3)
    finally:
        holder.rollback()
        holder.close()
    thread.join(DEADLINE)
    [(code, out, err)] = outcome
    assert (code, err) == (0, ""), out
    assert out.splitlines()[-1].endswith(": sound (12 checks)")


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aCheckThatOutlastsItsTimeoutSaysWhichAndHowToGiveItLonger(filledURL):
    """
    C{--timeout SECONDS} bounds each check: one that has not ended then
    stops the command, exit 75, one line naming the check and the option.
    Bad values are usage errors.
    """
    from e2e import DEADLINE

    holder = _lockedUsers(filledURL)
    try:
        thread, outcome = _checkInThread(filledURL, "--timeout", "1")
        thread.join(DEADLINE)
    finally:
        holder.rollback()
        holder.close()
    [(code, out, err)] = outcome
    assert (code, out) == (75, ""), err
    assert err == (
        f"mailgate: {engineFromURL(filledURL)!r}: the check of users and their maildrops did not end "
        "within 1 second: give it longer with --timeout SECONDS (0: no limit)\n"
    )
    code, out, err = mailgate(filledURL, "db", "check", "--timeout", "0")
    assert code == 0 and out.splitlines()[-1].endswith(": sound (12 checks)"), (out, err)
    for bad, why in (("soon", "not a number: 'soon'"), ("-1", "must not be negative"),
                     ("604801", "at most 604800 seconds (0: no limit)")):
        assert mailgate(filledURL, "db", "check", "--timeout", bad) == (64, "", f"mailgate: bad --timeout: {why}\n")


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aCheckWritesNothingAndARoleThatMayOnlyReadRunsIt(filledURL, monkeypatch):
    """
    Each check is a READ ONLY transaction: a statement of one that would
    write (a mistake in a check) is refused and changes nothing.  Before,
    on PostgreSQL, a check ran in autocommit, where SET TRANSACTION READ
    ONLY only warned: the write went through.  A monitoring role granted
    USAGE on the schema and SELECT on its tables, nothing else, runs the
    check (which it did before too) and finds the database sound.
    """
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from conftest import POSTGRES
    from mailgate.store import check
    from mailgate.store.postgres import _conninfo

    assert mailgate(filledURL, "ban", "add", "192.0.2.1")[0] == 0
    writing = ("bans, by mistake", "WITH gone AS (DELETE FROM bans RETURNING 1) SELECT 1, count(*) OVER () FROM gone",
               lambda one: "a ban removed", "none")
    with monkeypatch.context() as patched:
        patched.setattr(check, "INVARIANTS", (writing,))
        mailgate(filledURL, "db", "check")
    with psycopg.connect(_conninfo(filledURL)) as conn:
        assert conn.execute("SELECT count(*) FROM bans").fetchone()[0] == 1

    role = f"mgmon_{secrets.token_hex(4)}"
    host = urlsplit(POSTGRES).netloc.rpartition("@")[2]
    monitorURL = urlunsplit(urlsplit(filledURL)._replace(netloc=f"{role}:pw@{host}"))
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        try:
            with psycopg.connect(_conninfo(filledURL), autocommit=True) as conn:
                schema = conn.execute("SELECT current_schema()").fetchone()[0]
            admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
            code, out, err = mailgate(monitorURL, "db", "check")
        finally:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
    assert (code, err) == (0, ""), out
    assert out.splitlines()[-1].endswith(": sound (12 checks)")


def test_aTemporaryFailureThatIsNoTimeoutIsSaidForWhatItIs(tmp_path, monkeypatch):
    """
    A check that fails for now for another reason than its time bound
    (here SQLite, whose checks C{--timeout} does not bound, answering
    that the file is locked) is that temporary failure, said as it is,
    even when it came once C{--timeout} seconds were past: it was "did
    not end within 0.001 seconds: give it longer with --timeout", which
    no --timeout would have changed.  (SQLite's own lock cannot be taken
    between the command's opening and its check: another program holding
    a WAL file from readers needs it alone.  So the engine answers as
    SQLite does once its busy timeout is out.)
    """
    import time

    from mailgate.store import sqlite

    def locked(self, cursor, timeout):
        time.sleep(0.01)
        raise sqlite3.OperationalError("database is locked")

    url = f"sqlite:///{tmp_path / 'mail.db'}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    monkeypatch.setattr(sqlite.SQLiteEngine, "administrativeRead", locked)
    code, out, err = mailgate(url, "db", "check", "--timeout", "0.001")
    assert (code, out) == (75, ""), err
    assert err == "mailgate: temporary failure, try again: database unavailable: database is locked\n"


def test_aBadTimeoutIsAUsageErrorBeforeTheDatabaseIsOpened(tmp_path):
    """
    C{--timeout} is read before the database is opened: a bad value is a
    usage error (64) whatever the database's state; on a SQLite file not
    there it was "no such database file" (78), which sent the
    administrator after the database.
    """
    url = f"sqlite:///{tmp_path / 'none.db'}"
    for bad, why in (("abc", "not a number: 'abc'"), ("-1", "must not be negative"),
                     ("604801", "at most 604800 seconds (0: no limit)")):
        assert mailgate(url, "db", "check", "--timeout", bad) == (64, "", f"mailgate: bad --timeout: {why}\n")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_aBackupIsCheckedAsItIsAndKeepsItsChecksum(filledURL, tmp_path):
    """
    C{db check} and C{db version} of a backup leave its octets as they
    were: the check opened it to write, and put it in WAL mode, which
    changed its header (and so its checksum) and left a -wal and -shm
    beside it.
    """
    (tmp_path / "backups").mkdir()
    backup = backupOf(filledURL, tmp_path / "backups")
    before = digest(backup)
    code, out, err = mailgate(f"sqlite:///{backup}", "db", "check", "--full")
    assert (code, err) == (0, ""), out
    assert out.splitlines()[-1].endswith(": sound (13 checks)")
    assert mailgate(f"sqlite:///{backup}", "db", "version")[0] == 0
    assert digest(backup) == before
    assert sorted(p.name for p in backup.parent.iterdir()) == ["backup.sqlite3"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as the user nobody")
@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
@pytest.mark.parametrize("owner", ["its owner", "another user"])
def test_aFileThatMayOnlyBeReadIsChecked(filledURL, request, owner):
    """
    A backup or snapshot its reader may not write (chmod 0400 and the
    reader's; 0444 and another user's), checked by a user who is not
    root, in a directory he may not write: checked and sound, where it
    was refused (exit 78, "cannot open SQLite database ... to write to
    it").  The file is as it was.
    """
    directory = directoryForOthers(request)
    backup = backupOf(filledURL, directory)
    onlyReadableByNobody(backup, owner == "its owner")
    before = digest(backup)
    for argv in (("db", "check"), ("db", "version")):
        done = runAs("nobody", backup, argv)
        assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert done.stdout.startswith(f"schema version {LATEST} ")
    assert digest(backup) == before
    assert sorted(p.name for p in directory.iterdir()) == ["backup.sqlite3"]


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_aLiveDatabaseIsCheckedWithItsLatestCommits(filledURL):
    """
    Beside a server holding the database open, whose latest commits are in
    its write-ahead log still (not checkpointed into the file): the
    read-only check reads them, and finds what they did (a user removed
    by hand, his messages left).
    """
    path = engineFromURL(filledURL).path
    server = sqlite3.connect(path, isolation_level=None)
    try:
        server.execute("PRAGMA wal_autocheckpoint = 0")
        server.execute("PRAGMA foreign_keys = OFF")
        server.execute("DELETE FROM users WHERE address = ?", (BOB,))
        assert Path(path + "-wal").stat().st_size > 0
        code, out, err = mailgate(filledURL, "db", "check")
    finally:
        server.close()
    assert code == 65, (out, err)
    assert "messages and their users: " in out and "messages and their users: ok" not in out
