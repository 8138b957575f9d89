"""
A newer C{mailgate} command on an SQLite database an older server still
runs on (a package upgrade done, the service not yet restarted) migrates
nothing: it exits 75 (which an MTA retries, for C{mailgate deliver}) and
says to restart the server or stop it and run C{db upgrade}.  Without a
server it upgrades the database as before.

The databases are those an old release made (tests/fixtures, as in
tests/test_old_databases.py); the server's lock is held in this process
as a running server holds it (L{SQLiteEngine.claimServer}).
"""

import gzip
import shutil
import sqlite3
from pathlib import Path

import pytest

from e2e import mailgateHere as mailgate
from mailgate.cli import EX_TEMPFAIL
from mailgate.store import engineFromURL
from mailgate.store.schema import LATEST, SCHEMA_TABLE

FIXTURES = Path(__file__).parent / "fixtures"
ALICE = "alice@example.org"
MESSAGE = "Subject: after the upgrade\n\nhello\n"

#: Commands that migrate as they open the database, and db upgrade.
COMMANDS = [
    pytest.param(["deliver", ALICE], MESSAGE, id="deliver"),
    pytest.param(["user", "list"], "", id="user-list"),
    pytest.param(["db", "upgrade"], "", id="db-upgrade"),
]


def _oldDatabase(tmp_path, version):
    path = tmp_path / "mail.sqlite3"
    with gzip.open(FIXTURES / f"schema-v{version}.sqlite3.gz", "rb") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    return path


def _schemaVersion(path):
    """
    The version the file records, read with sqlite3 itself.
    """
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def serverRunning():
    """
    Hold the lock of the SQLite file at a path as its running server
    does, until the test ends.
    """
    engines = []

    def hold(path):
        engine = engineFromURL(f"sqlite:///{path}")
        engine.claimServer()
        engines.append(engine)

    yield hold
    for engine in engines:
        engine.releaseServer()


def _refusal(path, version):
    return (
        f"mailgate: a mailgate server is running on {path} (it holds {path}.lock) with an older database "
        f"schema (version {version}, this mailgate's is {LATEST}): nothing was migrated; restart it (its "
        f"start upgrades the database), or stop it and run mailgate db upgrade\n"
    )


@pytest.mark.parametrize("argv, stdin", COMMANDS)
def test_nothingIsMigratedUnderARunningServer(tmp_path, serverRunning, argv, stdin):
    """
    The older server keeps serving the schema it knows: the command exits
    75 with one line saying why and what to do, and the file's schema
    version is unchanged.
    """
    path = _oldDatabase(tmp_path, 11)
    serverRunning(path)
    code, out, err = mailgate(f"sqlite:///{path}", *argv, stdin=stdin)
    assert (code, out, err) == (EX_TEMPFAIL, "", _refusal(path, 11))
    assert _schemaVersion(path) == 11


def test_migration4IsNotBegunUnderARunningServer(tmp_path, serverRunning):
    """
    The version-3 database, whose migration 4 rewrites every message
    chunk (holding SQLite's write lock throughout): a delivery under the
    running server migrates nothing.
    """
    path = _oldDatabase(tmp_path, 3)
    serverRunning(path)
    code, out, err = mailgate(f"sqlite:///{path}", "deliver", ALICE, stdin=MESSAGE)
    assert (code, out, err) == (EX_TEMPFAIL, "", _refusal(path, 3))
    assert _schemaVersion(path) == 3


def test_dbCopyFromADatabaseUnderARunningServer(tmp_path, serverRunning):
    """
    C{db copy} migrates its C{--from} first: refused the same way, naming
    the side, and no target is left behind.
    """
    path = _oldDatabase(tmp_path, 11)
    serverRunning(path)
    target = tmp_path / "copy.sqlite3"
    code, out, err = mailgate(
        f"sqlite:///{path}", "db", "copy", "--from", f"sqlite:///{path}", "--to", f"sqlite:///{target}"
    )
    assert (code, out) == (EX_TEMPFAIL, "")
    assert err == "mailgate: --from: " + _refusal(path, 11)[len("mailgate: "):]
    assert _schemaVersion(path) == 11
    assert not target.exists()


@pytest.mark.parametrize("argv, stdin", COMMANDS)
def test_withoutAServerTheCommandUpgrades(tmp_path, argv, stdin):
    """
    With no server running (its lock file left by one that stopped), the
    command upgrades the database as before, and works.
    """
    path = _oldDatabase(tmp_path, 11)
    engine = engineFromURL(f"sqlite:///{path}")
    engine.claimServer()
    engine.releaseServer()
    code, out, err = mailgate(f"sqlite:///{path}", *argv, stdin=stdin)
    assert (code, err) == (0, ""), err
    assert _schemaVersion(path) == LATEST


def test_anUpToDateDatabaseServesCommandsBesideTheServer(tmp_path, serverRunning):
    """
    Only a migration is refused: on a database already at this
    mailgate's version, commands work beside the running server.
    """
    path = _oldDatabase(tmp_path, 11)
    assert mailgate(f"sqlite:///{path}", "db", "upgrade")[0] == 0
    serverRunning(path)
    code, out, err = mailgate(f"sqlite:///{path}", "deliver", ALICE, stdin=MESSAGE)
    assert (code, err) == (0, ""), err
    code, out, err = mailgate(f"sqlite:///{path}", "db", "upgrade")
    assert (code, out, err) == (0, f"schema is at version {LATEST}\n", "")


def test_commandsAskingAtOnceDoNotTakeEachOtherForAServer(tmp_path, monkeypatch):
    """
    Two commands on an older database at once (two deliveries an MTA
    runs side by side) both ask whether a server runs: each asked by
    taking the server's own lock for a moment, and the one that asked
    second took the first for a server and exited 75 with nothing
    migrated.  Asked with a shared lock, neither sees a server; and a
    server starting while a command asks waits that moment out rather
    than being refused as a second server.
    """
    import fcntl
    import os
    import threading

    from mailgate.store import sqlite

    # The start's wait, long enough here that a loaded machine's late
    # timer below is waited for all the same.
    monkeypatch.setattr(sqlite, "CLAIM_WAIT", 30.0)
    path = _oldDatabase(tmp_path, 11)
    (tmp_path / "mail.sqlite3.lock").touch()
    asking = os.open(tmp_path / "mail.sqlite3.lock", os.O_RDONLY)
    try:
        fcntl.flock(asking, fcntl.LOCK_SH)  # another command, asking now
        assert engineFromURL(f"sqlite:///{path}").serverRunning() is False
        starting = engineFromURL(f"sqlite:///{path}")
        threading.Timer(0.2, lambda: fcntl.flock(asking, fcntl.LOCK_UN)).start()
        starting.claimServer()  # waits for the command's moment, then holds it
        try:
            assert engineFromURL(f"sqlite:///{path}").serverRunning() is True
        finally:
            starting.releaseServer()
    finally:
        os.close(asking)
