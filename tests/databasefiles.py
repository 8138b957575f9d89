"""
Set-up shared by the tests of mailgate's commands on real database files
(test_db_check, test_readonly_commands, test_cli_audit): a database with
users and their messages, a backup of it, an older schema, a file that a
user who is not root may only read, in a directory he may reach, and the
installed command run as him.
"""

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from e2e import DEADLINE, MAILGATE, childEnvironment
from e2e import mailgateHere as mailgate
from mailgate.store import engineFromURL
from mailgate.store.database import SynchronousDatabase, runTransaction
from mailgate.store.schema import MIGRATIONS, _ensureVersionTable, applyMigration


def fill(url, mailboxes, password="pw"):
    """
    Add to the database at C{url}, through the command in this process,
    each user of C{mailboxes} (address: the messages to deliver to him, in
    order), all with C{password}; return C{url}.
    """
    for address, messages in mailboxes.items():
        assert mailgate(url, "user", "add", address, "--password-stdin", stdin=f"{password}\n")[0] == 0
        for message in messages:
            assert mailgate(url, "deliver", address, stdin=message)[0] == 0
    return url


def backupOf(url, directory):
    """
    A backup of the database at C{url} in C{directory}, made by C{mailgate
    db backup} (in rollback-journal mode, as SQLite's backup leaves it).
    """
    backup = Path(directory) / "backup.sqlite3"
    code, out, err = mailgate(url, "db", "backup", str(backup))
    assert (code, err) == (0, ""), out
    return backup


def digest(path):
    """
    The SHA-256 of the file at C{path}: whether a command changed it.
    """
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def olderSchema(url, version=None):
    """
    Give the database at C{url} the schema before this mailgate's last
    migration (or the schema C{version}), as an older mailgate left it.
    """
    engine = engineFromURL(url)
    database = SynchronousDatabase(engine)
    try:

        def older(cursor):
            _ensureVersionTable(cursor)
            for migration in MIGRATIONS[:-1] if version is None else MIGRATIONS:
                if version is None or migration.version <= version:
                    applyMigration(cursor, engine, migration)

        database.runInteraction(older)
    finally:
        database.close()


def byHand(url, statement, *args):
    """
    Run one statement on the database at C{url} in a transaction of its
    own, as an administrator's SQL or a tool would (the rows no mailgate
    command writes: what C{mailgate db check} is to find).
    """
    engine = engineFromURL(url)
    conn = engine.connect()
    try:
        runTransaction(engine, conn, lambda cursor: cursor.execute(statement, args), (), {}, True)
    finally:
        conn.close()


def olderUser(url, address, credentials, then=None):
    """
    Add the user C{address} with C{credentials} (a
    L{mailgate.auth.passwords.StoredCredentials}) and an empty mailbox to
    the database at C{url}, by the statements any older schema takes (the
    store, which would migrate it first, is not opened); then
    C{then(cursor, userId)}, in the same transaction, if given.
    """
    database = SynchronousDatabase(engineFromURL(url))
    try:

        def add(cursor):
            cursor.execute(
                "INSERT INTO users (address, domain, password_hash, scram_sha256, created_at) "
                "VALUES (?, ?, ?, ?, 1700000000) RETURNING user_id",
                (address, address.rpartition("@")[2], credentials.passwordHash, credentials.scramSha256),
            )
            (userId,) = cursor.fetchone()
            cursor.execute("INSERT INTO mailboxes (user_id, uid_validity, next_uid) VALUES (?, 7, 1)", (userId,))
            if then is not None:
                then(cursor, userId)

        database.runInteraction(add)
    finally:
        database.close()


def directoryForOthers(request, mode=0o755):
    """
    A directory of root's that other users may reach with C{mode}
    (pytest's own are root's alone), removed when the test ends.
    """
    directory = Path(tempfile.mkdtemp(prefix="mailgate-readonly-"))
    request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
    directory.chmod(mode)
    return directory


def onlyReadableByNobody(path, nobodys):
    """
    Make the file at C{path} one the user nobody may only read: his, mode
    0400 (C{nobodys}), or another user's (root's), mode 0444.
    """
    if nobodys:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        Path(path).chmod(0o400)
    else:
        Path(path).chmod(0o444)


def runAs(name, path, argv, stdin=""):
    """
    The installed C{mailgate} command run as the user C{name} on the SQLite
    file at C{path}, with C{stdin}: the L{subprocess.CompletedProcess}.
    """
    user = pwd.getpwnam(name)
    return subprocess.run(
        [MAILGATE, "--database", f"sqlite:///{path}", *argv], input=stdin, capture_output=True, text=True,
        timeout=DEADLINE, env=childEnvironment(), user=user.pw_uid, group=user.pw_gid, extra_groups=[],
    )
