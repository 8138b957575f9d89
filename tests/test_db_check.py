"""
C{mailgate db check}: exit 0 on a sound database; 65 naming each check
that found something wrong, with examples and what to do, on SQLite and
PostgreSQL; SQLite's own check finding a damaged page; read-only, and
not held up by a server's write.  Through L{mailgate.cli.run} on real
databases.
"""

import hashlib
import sqlite3
from pathlib import Path

import pytest

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
    for address in (ALICE, BOB):
        assert mailgate(databaseURL, "user", "add", address, "--password-stdin", stdin="pw\n")[0] == 0
        for n in range(2):
            assert mailgate(databaseURL, "deliver", address, stdin=f"Subject: {n}\n\nhello {n}\n")[0] == 0
    return databaseURL


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
    assert lines[-1].endswith(": sound (9 checks)" if filledURL.startswith("sqlite") else ": sound (8 checks)")
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
    assert err.count("\n") == 1 and ": 5 checks found problems: " in err, err
    assert (
        "storage use: maildrops whose recorded use is not what their messages take (quotas go by it): "
        "mailgate user recount ADDRESS sets it right\n"
        f"  {ALICE}: counts 3 messages, "
    ) in out
    assert "unique id counters: maildrops whose next unique id is one given already" in out
    assert f"  {BOB}: next uid 1, a message has uid 2\n" in out
    assert "messages and their bodies: messages whose body is missing" in out
    assert f"  {BOB}: message uid 1 (" in out
    assert "chunks and their bodies: chunks of no body: storage nothing uses\n" in out
    assert "bodies and the messages holding them: bodies whose reference count" in out
    assert "counts 2 references, 1 message holds it" in out
    assert "users and their maildrops: ok\n" in out


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


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    before = _digest(Path(path))
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
    assert _digest(Path(path)) == before
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
