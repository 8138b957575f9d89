"""
A damaged SQLite database, as an administrator meets it: pages
overwritten by a disk error, a file truncated by a full disk during a
copy, a header zeroed.  Made for real on small files (the damage is
written into the file itself), and met by the store, the protocols, the
C{mailgate} command and, once, a real C{twistd mailgate}.

What must hold: no traceback and no "internal error" (mailgate did not
make the damage); one line naming the file, SQLite's reason and what to
do; POP3 C{-ERR [SYS/TEMP]} and SMTP C{451} for what touches the damage
(the MTA keeps the mail until the restore), while the rest is served.
"""

import smtplib
import sqlite3
import urllib.error
import urllib.request

import pytest
from twisted.logger import LogLevel

from e2e import DEADLINE, mailgate_server, pop, popLogin, sqliteOnly  # noqa: F401 (mailgate_server is a fixture)
from e2e import mailgateHere as mailgate
from mailgate.errors import DatabaseDamaged
from mailgate.testing import POP3Session, SMTPSession, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland"
#: small pages: a few maildrop rows fill one, so that Bob's rows have
#: pages of their own, apart from Alice's
PAGE_SIZE = 512


def _rightmostLeaf(conn, table):
    """
    The number of the last leaf page of C{table}'s b-tree, the one that
    holds its greatest keys (SQLite's C{dbstat} names each page by its
    path from the root, which sorts as the keys do).
    """
    rows = conn.execute(
        "SELECT pageno, path FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,)
    ).fetchall()
    assert len(rows) > 1, rows
    return max(rows, key=lambda row: row[1])[0]


def overwritePage(path, number):
    """
    Overwrite page C{number} of the SQLite file at C{path} with octets no
    page holds, as a disk error or a torn copy leaves one.
    """
    with open(path, "r+b") as f:
        f.seek((number - 1) * PAGE_SIZE)
        f.write(b"\xff" * PAGE_SIZE)


@pytest.fixture
def damagedPath(tmp_path):
    """
    A database where Alice (one message) and Bob (forty) have mail, and
    the page of the maildrop table holding Bob's last rows is
    overwritten: Alice's rows, pages away from it, still read, and take
    a new message (an insert balances its page with two neighbours at
    most: Bob's forty rows fill more pages than that).
    """
    path = tmp_path / "mail.sqlite3"
    made = sqlite3.connect(path)
    made.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    made.execute("PRAGMA journal_mode = WAL")
    made.close()
    store = memoryStore(f"sqlite:///{path}")
    try:
        addUser(store, ALICE, PASSWORD)
        addUser(store, BOB, PASSWORD)
        deliver(store, [ALICE], b"Subject: for alice\r\n\r\nhello\r\n")
        for n in range(40):
            deliver(store, [BOB], f"Subject: for bob {n}\r\n\r\nhello\r\n".encode())
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        leaf = _rightmostLeaf(conn, "maildrop")
    finally:
        conn.close()
    overwritePage(path, leaf)
    return path


def _loudEvents(events):
    """
    The log events at error level or above, or carrying a traceback.
    """
    return [
        event for event in events
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


def test_aDamagedMaildropIsATemporaryFailureNamingTheFile(damagedPath, logEvents):
    """
    Reading Bob's damaged maildrop raises L{DatabaseDamaged}, naming the
    file, SQLite's reason and the restore; his POP3 login is answered
    C{-ERR [SYS/TEMP]} and a message for him C{451 4.3.0}, each logged as
    a warning without a traceback (they were internal errors: critical,
    with a traceback, "internal server error"); Alice is served.
    """
    store = memoryStore(f"sqlite:///{damagedPath}")
    try:
        with pytest.raises(DatabaseDamaged) as raised:
            resultOf(store.listMessages(BOB))
        said = str(raised.value)
        assert said.startswith(f"the SQLite database {damagedPath} is damaged (database disk image is malformed): ")
        assert "restore it from its last backup" in said

        session = POP3Session(store)
        assert session.login(BOB, PASSWORD).startswith("-ERR [SYS/TEMP] ")
        alice = POP3Session(store)
        assert alice.login(ALICE, PASSWORD).startswith("+OK ")
        assert alice.command("STAT").startswith("+OK 1 ")

        smtp = SMTPSession(store)
        replies = smtp.sendMail("sender@remote.test", [BOB], b"Subject: more\r\n\r\nhello\r\n")
        assert replies.splitlines()[-1].startswith("451 4.3.0 "), replies
        assert _loudEvents(logEvents) == []
        warned = [event for event in logEvents if event.get("log_level") == LogLevel.warn]
        assert warned and all(str(damagedPath) in str(event.get("log_format", "")) + repr(event) for event in warned)
    finally:
        store.close()


def test_aCommandMeetingTheDamageNamesTheFile(damagedPath):
    """
    The C{mailgate} command that reads the damage: one line naming the
    file, exit 78 (a retry does not repair it); C{deliver} exits 75, so
    that the MTA keeps the message until the restore.
    """
    url = f"sqlite:///{damagedPath}"
    code, _, err = mailgate(url, "mailbox", "list", BOB)
    assert code == 78, err
    assert err.startswith(f"mailgate: the SQLite database {damagedPath} is damaged (database disk image is malformed): ")
    assert err.count("\n") == 1, err
    code, _, err = mailgate(url, "deliver", BOB, stdin="Subject: hi\n\nhello\n")
    assert code == 75, err
    assert f"the SQLite database {damagedPath} is damaged" in err and err.count("\n") == 1, err
    # Alice's mail is on pages of its own: listed.  (A delivery to her
    # may still meet the damage: an insert balances the page with its
    # neighbours.)
    assert mailgate(url, "mailbox", "list", ALICE)[0] == 0


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_aDatabaseDamagedAtItsOpeningIsSaidToBe(damagedPath, damage):
    """
    A file whose header is zeroed, or truncated (a copy cut short by a
    full disk), fails at its opening: one line saying it is damaged (or
    no SQLite database at all) and to restore it, exit 78.
    """
    if damage == "header":
        with open(damagedPath, "r+b") as f:
            f.write(b"\0" * 100)
    else:
        with open(damagedPath, "r+b") as f:
            f.truncate(PAGE_SIZE * 3)
    code, _, err = mailgate(f"sqlite:///{damagedPath}", "user", "list")
    assert code == 78, err
    assert err.startswith(f"mailgate: cannot open SQLite database {damagedPath}: "), err
    assert "(it is damaged, or not an SQLite database: restore it from its last backup" in err
    assert err.count("\n") == 1, err


@sqliteOnly
def test_aServerSaysOnceThatItsDatabaseIsDamaged(mailgate_server, damagedPath, databaseURL):
    """
    A real server on the damaged file: Bob's logins are refused with
    C{[SYS/TEMP]} and his mail with 451, Alice's served; the log has one
    error line naming the file and SQLite's reason (C{database.damaged},
    however many sessions meet the damage: Bob's failed deliveries
    between Alice's good ones said "database writes fail" and "work
    again" by turns, an error each time), and no traceback; /healthz
    says the database is damaged from then on.
    """
    assert databaseURL == f"sqlite:///{damagedPath}"
    server = mailgate_server(
        "--auth-failure-delay", "0", "--smtp", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"
    )
    for _ in range(2):
        client = pop(server)
        client.user(BOB)
        with pytest.raises(Exception, match=r"-ERR \[SYS/TEMP\] "):
            client.pass_(PASSWORD)
        client.quit()
    alice = popLogin(server, ALICE, PASSWORD)
    assert alice.stat()[0] == 1
    alice.quit()
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", server.ports["SMTP"][0], timeout=DEADLINE) as smtp:
            # Bob's pages are what the damage took; a message for Carol,
            # nobody's, is refused at RCPT, and Alice's is stored.
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("sender@remote.test", [BOB], b"Subject: hi\r\n\r\nhello\r\n")
            assert refused.value.smtp_code == 451
        with smtplib.SMTP("127.0.0.1", server.ports["SMTP"][0], timeout=DEADLINE) as smtp:
            smtp.sendmail("sender@remote.test", [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(f"http://127.0.0.1:{server.ports['METRICS'][0]}/healthz", timeout=DEADLINE)
    assert health.value.code == 503
    assert health.value.read() == b"unavailable: database damaged (DatabaseDamaged, DatabaseError, SQLITE_CORRUPT)\n"
    log = server.stdout
    errors = [line for line in log.splitlines() if "#error" in line or "#critical" in line]
    assert len(errors) == 1, log
    assert f"the SQLite database {damagedPath} is damaged (database disk image is malformed)" in errors[0]
    assert "Traceback" not in log, log


def test_aServerWhoseStartMeetsTheDamageStopsWithAConfigurationError(damagedPath):
    """
    Damage the start meets (the table of schema versions, read before
    anything is served): a configuration error, which twistd mailgate
    exits 78 for and systemd does not restart (RestartPreventExitStatus),
    not a temporary failure (75), which it restarted for ever.
    """
    from twisted.internet.testing import MemoryReactor

    from mailgate.errors import ConfigurationError, UnavailableAtStart
    from mailgate.store import openStore

    conn = sqlite3.connect(damagedPath)
    try:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'mailgate_schema'").fetchone()
    finally:
        conn.close()
    overwritePage(damagedPath, root)
    with pytest.raises(ConfigurationError) as raised:
        openStore(f"sqlite:///{damagedPath}", MemoryReactor(), server=False)
    assert not isinstance(raised.value, UnavailableAtStart)
    assert str(raised.value).startswith(f"the SQLite database {damagedPath} is damaged (database disk image is malformed): ")


def test_PostgreSQLsWordsForDamageAreDamage():
    """
    PostgreSQL's SQLSTATE XX001 (a damaged table page) and XX002 (a
    damaged index page) are L{DatabaseDamaged}, naming the database
    without its password and what to do for each; another error is not.
    """
    errors = pytest.importorskip("psycopg.errors")
    from mailgate.store import engineFromURL
    from mailgate.store.database import _translate

    engine = engineFromURL("postgresql://mail:s3cret@db.internal/mail")
    table = _translate(engine, errors.DataCorrupted("invalid page in block 7 of relation base/16384/24576"))
    assert isinstance(table, DatabaseDamaged)
    assert str(table) == (
        "the PostgreSQL database postgresql://db.internal/mail has a damaged page in a table (SQLSTATE XX001: "
        "invalid page in block 7 of relation base/16384/24576): restore it from its last backup (pg_amcheck "
        "says what else is damaged)"
    )
    index = _translate(engine, errors.IndexCorrupted('index "maildrop_pkey" contains unexpected zero page'))
    assert isinstance(index, DatabaseDamaged) and str(index).endswith("(SQLSTATE XX002: index \"maildrop_pkey\" contains unexpected zero page): REINDEX it")
    assert engine.damage(errors.UniqueViolation("duplicate key")) is None


def _raiseIndexDamage(cursor):
    """
    What PostgreSQL's btree code raises on a damaged index page (SQLSTATE
    XX002), raised here by the real server.
    """
    cursor.execute(
        "DO $$ BEGIN RAISE EXCEPTION 'index \"maildrop_pkey\" contains unexpected zero page at block 7' "
        "USING ERRCODE = 'XX002'; END $$"
    )


def test_PostgreSQLsDamageIsSaidAndNotKeptForTheHealthCheck(postgresURL, logEvents):
    """
    Damage a PostgreSQL server reports (SQLSTATE XX002, a damaged index)
    fails what met it, as L{DatabaseDamaged}, and is said once as
    C{database.damaged}; it is not kept as the health check's verdict
    (L{Database.damage}), unlike a damaged SQLite file's: an index is
    REINDEXed while the nodes serve, and every node that had met it
    answered 503 until it was restarted, repaired or not, leaving a load
    balancer no node for any user.
    """
    from pumped import PumpedReactor

    from mailgate.store import engineFromURL
    from mailgate.store.database import Database

    reactor = PumpedReactor()
    database = Database(engineFromURL(postgresURL), reactor)
    try:
        outcomes = []
        database.runWrite(_raiseIndexDamage).addBoth(outcomes.append)
        database.runInteraction(_raiseIndexDamage).addBoth(outcomes.append)
        reactor.pump(lambda: len(outcomes) == 2, timeout=DEADLINE)
        for outcome in outcomes:
            assert outcome.check(DatabaseDamaged), outcome
            assert str(outcome.value).endswith("REINDEX it"), outcome
        assert database.damage is None
        said = [event for event in logEvents if event.get("event") == "database.damaged"]
        assert len(said) == 1 and said[0]["log_level"] == LogLevel.error
        assert "contains unexpected zero page at block 7" in said[0]["reason"]
    finally:
        database.close()
