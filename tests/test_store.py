"""
The mail store contract on real databases, driven synchronously: users,
delivery, reference-counted bodies, maildrop snapshots and locks, schema
migrations and group commit; plus the scale promises of README: a
100,000-message maildrop listed in a handful of statements, and a 50 MB
message streamed through a POP3 session in bounded memory.

The contract runs on both backends, through the C{databaseURL} fixture of
tests/conftest.py: a SQLite file and a fresh PostgreSQL schema.  Tests of
SQLite itself (PRAGMAs, the in-memory URL, BEGIN IMMEDIATE, the sqlite3
module's errors) stay SQLite-only.
"""

import sqlite3
import threading
import time
import tracemalloc

import pytest
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgate.auth.passwords import makeCredentials, verifyPassword
from mailgate.errors import (
    ConfigurationError,
    MaildropInUse,
    NoSuchUser,
    TemporaryFailure,
    UnavailableAtStart,
    UserExists,
)
from mailgate.interfaces import IMaildrop, IMaildropLocks, IMailStore, IMessageBody
from mailgate.message import MessageSpool, spoolBytes
from mailgate.store import engineFromURL, openStore, openSynchronousStore
from mailgate.store.database import Database, WorkerThreads, runBatch, runTransaction
from mailgate.records import MessageInfo, UserRecord, UserSummary
from mailgate.store.schema import LATEST, MIGRATIONS, SCHEMA_TABLE, upgrade
from mailgate.store import sql as sqlStore
from mailgate.store.rows import formatUniqueId
from mailgate.store.sql import CHUNK_SIZE, SQLMailStore
from mailgate.testing import TEST_HASH_COST, POP3Session, addUser, deliver, memoryStore, readWhole, resultOf
from pumped import PumpedReactor

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"

MESSAGE = b"Subject: hello\r\nFrom: x@example.net\r\n\r\nbody line\r\n"


def credentials(password, apop=False):
    return makeCredentials(password, apop=apop, logN=TEST_HASH_COST)


sqliteOnly = pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)


def pytest_generate_tests(metafunc):
    # The store contract also holds for SQLite's in-memory URL (what
    # mailgate.testing.memoryStore() gives embedders' tests): tests using
    # anyStore run on three databases unless they say otherwise.  (Should
    # pytest ever apply conftest's own parameters first, this fails loudly
    # with "duplicate parametrization", never silently.)
    if "anyStore" in metafunc.fixturenames and not metafunc.definition.get_closest_marker("parametrize"):
        metafunc.definition.add_marker(
            pytest.mark.parametrize("databaseURL", ["sqlite", "memory", "postgres"], indirect=True)
        )


@pytest.fixture
def anyStore(databaseURL):
    """
    A synchronous store on each backend in turn: a SQLite file, SQLite's
    in-memory URL, and a fresh PostgreSQL schema.
    """
    s = memoryStore(databaseURL)
    yield s
    s.close()


def _rows(cursor, sql, args):
    cursor.execute(sql, args)
    try:
        return [tuple(row) for row in cursor.fetchall()]
    except Exception:
        # A statement without a result (psycopg raises, sqlite3 gives []).
        return []


def sql(engine, statement, args=()):
    """
    Run one statement in a transaction of its own on a new connection of
    C{engine}, commit, and return its rows (as tuples).  Works on either
    backend; a new connection sees only committed data.
    """
    conn = engine.connect()
    try:
        return runTransaction(engine, conn, _rows, (statement, args), {}, True)
    finally:
        conn.close()


def query(store, statement, args=()):
    """
    Rows straight from the database behind a store, committed data only.
    (A private in-memory SQLite database can only be reached through the
    store's own connection.)
    """
    engine = store.engine
    if engine.ephemeral:
        return store.database.run(_rows, statement, args)
    return sql(engine, statement, args)


def openFor(store, address):
    user = resultOf(store.findUser(address))
    return resultOf(store.openMaildrop(user))


def removeFirst(store, address, count=1):
    maildrop = openFor(store, address)
    try:
        resultOf(maildrop.expunge(list(range(count))))
    finally:
        maildrop.release()


# -- interfaces --------------------------------------------------------------


def test_interfaces(anyStore):
    addUser(anyStore, ALICE, "pw")
    deliver(anyStore, [ALICE], MESSAGE)
    assert verifyObject(IMailStore, anyStore)
    assert verifyObject(IMaildropLocks, anyStore.locks)
    maildrop = openFor(anyStore, ALICE)
    assert verifyObject(IMaildrop, maildrop)
    body = resultOf(maildrop.openMessage(0))
    assert verifyObject(IMessageBody, body)
    maildrop.release()


# -- users -------------------------------------------------------------------


def test_addAndFindUser(anyStore):
    record = resultOf(anyStore.addUser(ALICE, credentials("wonderland", apop=True)))
    assert isinstance(record, UserRecord)
    assert record.address == ALICE
    found = resultOf(anyStore.findUser(ALICE))
    assert found == record
    assert verifyPassword("wonderland", found.passwordHash)
    assert found.scramSha256.startswith("SCRAM-SHA-256$")
    assert found.apopSecret == "wonderland"


def test_findUnknownUser(anyStore):
    assert resultOf(anyStore.findUser("nobody@example.org")) is None


def test_addExistingUser(anyStore):
    addUser(anyStore, ALICE, "pw")
    with pytest.raises(UserExists):
        resultOf(anyStore.addUser(ALICE, credentials("other")))
    # The first user's password is untouched.
    assert verifyPassword("pw", resultOf(anyStore.findUser(ALICE)).passwordHash)


def test_setCredentials(anyStore):
    addUser(anyStore, ALICE, "old", apop=True)
    resultOf(anyStore.setCredentials(ALICE, credentials("new")))
    user = resultOf(anyStore.findUser(ALICE))
    assert verifyPassword("new", user.passwordHash)
    assert not verifyPassword("old", user.passwordHash)
    assert user.apopSecret is None


def test_setCredentialsOfUnknownUser(anyStore):
    with pytest.raises(NoSuchUser):
        resultOf(anyStore.setCredentials("nobody@example.org", credentials("x")))


def test_deleteUser(anyStore):
    addUser(anyStore, ALICE, "pw")
    addUser(anyStore, BOB, "pw")
    deliver(anyStore, [ALICE], MESSAGE)
    deliver(anyStore, [ALICE], MESSAGE)
    resultOf(anyStore.deleteUser(ALICE))
    assert resultOf(anyStore.findUser(ALICE)) is None
    assert [u.address for u in resultOf(anyStore.listUsers())] == [BOB]
    assert query(anyStore, "SELECT count(*) FROM maildrop") == [(0,)]
    assert query(anyStore, "SELECT count(*) FROM bodies") == [(0,)]
    assert query(anyStore, "SELECT count(*) FROM body_chunks") == [(0,)]
    with pytest.raises(NoSuchUser):
        resultOf(anyStore.listMessages(ALICE))


def test_deleteUnknownUser(anyStore):
    with pytest.raises(NoSuchUser):
        resultOf(anyStore.deleteUser("nobody@example.org"))


def test_deleteUserKeepsBodiesOthersHold(anyStore):
    addUser(anyStore, ALICE, "pw")
    addUser(anyStore, BOB, "pw")
    deliver(anyStore, [ALICE, BOB], MESSAGE)
    resultOf(anyStore.deleteUser(ALICE))
    assert query(anyStore, "SELECT refcount FROM bodies") == [(1,)]
    maildrop = openFor(anyStore, BOB)
    assert readWhole(resultOf(maildrop.openMessage(0))) == MESSAGE
    maildrop.release()


def test_bodiesReleasedInRunsKeepTheSharedOnesAndDropTheRest(anyStore, monkeypatch):
    """
    Removing many messages at once releases their bodies a run of bodies
    at a time (three statements a run, not three a body): across several
    runs, a body another maildrop still holds keeps it with one reference
    fewer, and one nobody holds goes with all its chunks.
    """
    from mailgate.store import rows

    monkeypatch.setattr(rows, "IN_BATCH", 4)
    addUser(anyStore, ALICE, "pw")
    addUser(anyStore, BOB, "pw")
    big = b"Subject: big\r\n\r\n" + b"y" * (CHUNK_SIZE + 10) + b"\r\n"
    for n in range(7):
        deliver(anyStore, [ALICE, BOB], b"Subject: shared %d\r\n\r\nbody\r\n" % n)
    for n in range(6):
        deliver(anyStore, [ALICE], big if n % 2 else b"Subject: alone %d\r\n\r\nbody\r\n" % n)
    assert query(anyStore, "SELECT count(*) FROM bodies") == [(13,)]
    resultOf(anyStore.deleteUser(ALICE))
    assert query(anyStore, "SELECT refcount, count(*) FROM bodies GROUP BY refcount") == [(1, 7)]
    assert query(anyStore, "SELECT count(DISTINCT body_id) FROM body_chunks") == [(7,)]
    maildrop = openFor(anyStore, BOB)
    assert [readWhole(resultOf(maildrop.openMessage(i))) for i in (0, 6)] == [
        b"Subject: shared 0\r\n\r\nbody\r\n",
        b"Subject: shared 6\r\n\r\nbody\r\n",
    ]
    maildrop.release()
    resultOf(anyStore.deleteUser(BOB))
    assert query(anyStore, "SELECT count(*) FROM bodies") == [(0,)]
    assert query(anyStore, "SELECT count(*) FROM body_chunks") == [(0,)]


def test_listUsers(anyStore):
    addUser(anyStore, CAROL, "pw")
    addUser(anyStore, ALICE, "pw", apop=True)
    addUser(anyStore, BOB, "pw")
    deliver(anyStore, [ALICE], MESSAGE)
    deliver(anyStore, [ALICE, CAROL], b"x\r\n")
    assert resultOf(anyStore.listUsers()) == [
        UserSummary(ALICE, 2, len(MESSAGE) + 3, True),
        UserSummary(BOB, 0, 0, False),
        UserSummary(CAROL, 1, 3, False),
    ]


def test_listUsersEmpty(anyStore):
    assert resultOf(anyStore.listUsers()) == []
    assert list(resultOf(anyStore.listUsers(page=2))) == []


def test_listUsersPagedIsInCodePointOrderAcrossPages(anyStore):
    """
    C{listUsers(page=N)} reads N users at a time, in code point order of
    the addresses, each page going on after the last address read, also
    where the column's collation orders punctuation otherwise (on
    PostgreSQL, ICU's root collation, as a database made with
    en_US.UTF-8 has): the same users as the whole listing, none twice or
    left out at a page's edge; a user added between two pages after the
    page read is listed.
    """
    addresses = ["ab@example.org", "a_b@example.org", "a-c@example.org", "a+b@example.org", "a.b@example.org",
                 "a@example.org", "a9@example.org"]
    if anyStore.engine.name == "postgres":
        if not query(anyStore, "SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'"):
            pytest.skip("this PostgreSQL has no ICU collations")
        # Before the store's connection prepares a statement on the table.
        query(anyStore, 'ALTER TABLE users ALTER COLUMN address TYPE text COLLATE "und-x-icu"')
    for address in addresses:
        addUser(anyStore, address, "pw")
    if anyStore.engine.name == "postgres":
        collated = [row[0] for row in query(anyStore, "SELECT address FROM users ORDER BY address")]
        assert collated != sorted(addresses)  # the collation orders them otherwise
    whole = sorted(resultOf(anyStore.listUsers()), key=lambda user: user.address)
    assert [user.address for user in whole] == sorted(addresses)
    for page in (1, 2, 3, 7, 8):
        assert list(resultOf(anyStore.listUsers(page=page))) == whole, page
    listing = iter(resultOf(anyStore.listUsers(page=2)))
    assert [next(listing).address for _ in range(3)] == ["a+b@example.org", "a-c@example.org", "a.b@example.org"]
    addUser(anyStore, "zz@example.org", "pw")
    assert [user.address for user in listing] == sorted(addresses)[3:] + ["zz@example.org"]


def test_listMessages(anyStore):
    addUser(anyStore, ALICE, "pw")
    clocked = SQLMailStore(anyStore.database, anyStore.locks, clock=lambda: 1700000000.75)
    first = resultOf(clocked.deliver([ALICE], spoolBytes(MESSAGE)))[ALICE]
    second = resultOf(clocked.deliver([ALICE], spoolBytes(b"short\n")))[ALICE]
    assert resultOf(anyStore.listMessages(ALICE)) == [
        MessageInfo(1, len(MESSAGE), first, 1700000000),
        MessageInfo(2, 7, second, 1700000000),
    ]


def test_listMessagesOfUnknownUser(anyStore):
    with pytest.raises(NoSuchUser):
        resultOf(anyStore.listMessages("nobody@example.org"))


# -- delivery ----------------------------------------------------------------


def test_deliverReturnsUniqueIds(anyStore):
    addUser(anyStore, ALICE, "pw")
    addUser(anyStore, BOB, "pw")
    results = deliver(anyStore, [ALICE, BOB], MESSAGE)
    assert set(results) == {ALICE, BOB}
    for uniqueId in results.values():
        assert len(uniqueId) == 16
        int(uniqueId, 16)
    assert [m.uniqueId for m in resultOf(anyStore.listMessages(ALICE))] == [results[ALICE]]
    assert [m.uniqueId for m in resultOf(anyStore.listMessages(BOB))] == [results[BOB]]


def test_deliverToUnknownRecipientStillDeliversToTheOthers(anyStore):
    addUser(anyStore, ALICE, "pw")
    results = deliver(anyStore, [ALICE, "nobody@example.org"], MESSAGE)
    assert isinstance(results["nobody@example.org"], NoSuchUser)
    assert isinstance(results[ALICE], str)
    assert len(resultOf(anyStore.listMessages(ALICE))) == 1
    assert query(anyStore, "SELECT refcount FROM bodies") == [(1,)]


def test_deliverToNobodyStoresNothing(anyStore):
    results = deliver(anyStore, ["nobody@example.org", "none@example.org"], MESSAGE)
    assert all(isinstance(r, NoSuchUser) for r in results.values())
    assert query(anyStore, "SELECT count(*) FROM bodies") == [(0,)]
    assert query(anyStore, "SELECT count(*) FROM body_chunks") == [(0,)]


def test_deliverToTheSameRecipientTwiceInOneCall(anyStore):
    addUser(anyStore, ALICE, "pw")
    deliver(anyStore, [ALICE, ALICE], MESSAGE)
    assert len(resultOf(anyStore.listMessages(ALICE))) == 1
    assert query(anyStore, "SELECT refcount FROM bodies") == [(1,)]


def test_messageToThreeRecipientsIsStoredOnce(anyStore):
    for address in (ALICE, BOB, CAROL):
        addUser(anyStore, address, "pw")
    body = b"Subject: shared\r\n\r\n" + b"z" * (CHUNK_SIZE + 100) + b"\r\n"
    deliver(anyStore, [ALICE, BOB, CAROL], body)
    assert query(anyStore, "SELECT size, refcount FROM bodies") == [(len(body), 3)]
    # The header section, then two chunks of body.
    assert query(anyStore, "SELECT count(*) FROM body_chunks") == [(3,)]
    assert query(anyStore, "SELECT count(*) FROM maildrop") == [(3,)]

    removeFirst(anyStore, ALICE)
    removeFirst(anyStore, BOB)
    assert query(anyStore, "SELECT refcount FROM bodies") == [(1,)]
    assert query(anyStore, "SELECT count(*) FROM body_chunks") == [(3,)]
    maildrop = openFor(anyStore, CAROL)
    assert readWhole(resultOf(maildrop.openMessage(0))) == body
    maildrop.release()

    removeFirst(anyStore, CAROL)
    assert query(anyStore, "SELECT count(*) FROM bodies") == [(0,)]
    assert query(anyStore, "SELECT count(*) FROM body_chunks") == [(0,)]
    assert query(anyStore, "SELECT count(*) FROM maildrop") == [(0,)]


def test_largeMessageIsChunked(anyStore):
    addUser(anyStore, ALICE, "pw")
    body = b"Subject: big\r\n\r\n" + b"".join(b"%07d\r\n" % i for i in range(40000))
    deliver(anyStore, [ALICE], body)
    chunks = query(anyStore, "SELECT seq, length(data) FROM body_chunks ORDER BY seq")
    assert [seq for seq, _ in chunks] == list(range(len(chunks)))
    assert all(length <= CHUNK_SIZE for _, length in chunks)
    assert sum(length for _, length in chunks) == len(body)
    # A message longer than one chunk keeps its header section in a chunk
    # of its own (so TOP n 0 reads just that), then the rest in full chunks.
    header = len(b"Subject: big\r\n\r\n")
    assert chunks[0][1] == header
    assert len(chunks) == 1 + -(-(len(body) - header) // CHUNK_SIZE)
    maildrop = openFor(anyStore, ALICE)
    message = resultOf(maildrop.openMessage(0))
    assert message.size == len(body)
    assert message.headerSize == len(b"Subject: big\r\n\r\n")
    assert readWhole(message) == body
    maildrop.release()


def test_emptyMessage(anyStore):
    addUser(anyStore, ALICE, "pw")
    deliver(anyStore, [ALICE], b"")
    maildrop = openFor(anyStore, ALICE)
    assert list(maildrop.sizes) == [0]
    message = resultOf(maildrop.openMessage(0))
    assert (message.size, message.headerSize) == (0, 0)
    assert readWhole(message) == b""
    maildrop.release()


def test_uniqueIdsAreUniqueAndNeverReused(anyStore):
    addUser(anyStore, ALICE, "pw")
    addUser(anyStore, BOB, "pw")
    seen = [deliver(anyStore, [ALICE, BOB], b"m%d\r\n" % n)[ALICE] for n in range(5)]
    assert len(set(seen)) == 5
    # Remove the newest and the oldest; new mail gets new ids.
    maildrop = openFor(anyStore, ALICE)
    resultOf(maildrop.expunge([0, 4]))
    maildrop.release()
    later = [deliver(anyStore, [ALICE], b"n%d\r\n" % n)[ALICE] for n in range(3)]
    assert not set(later) & set(seen)
    assert len(set(later)) == 3
    assert [m.uniqueId for m in resultOf(anyStore.listMessages(ALICE))] == seen[1:4] + later


def test_uniqueIdsNotReusedWhenAUserIsRecreated(anyStore):
    addUser(anyStore, ALICE, "pw")
    before = {deliver(anyStore, [ALICE], b"m\r\n")[ALICE] for _ in range(3)}
    resultOf(anyStore.deleteUser(ALICE))
    addUser(anyStore, ALICE, "pw")
    after = {deliver(anyStore, [ALICE], b"m\r\n")[ALICE] for _ in range(3)}
    assert not before & after


# -- maildrops ---------------------------------------------------------------


def test_maildropSnapshot(anyStore):
    addUser(anyStore, ALICE, "pw")
    ids = [deliver(anyStore, [ALICE], MESSAGE + b"x" * n + b"\r\n")[ALICE] for n in range(3)]
    maildrop = openFor(anyStore, ALICE)
    assert maildrop.address == ALICE
    assert list(maildrop.sizes) == [len(MESSAGE) + n + 2 for n in range(3)]
    assert resultOf(maildrop.uniqueIds(0, 3)) == ids
    assert resultOf(maildrop.uniqueIds(1, 1)) == ids[1:2]
    assert resultOf(maildrop.uniqueIds(3, 5)) == []
    assert readWhole(resultOf(maildrop.openMessage(2))) == MESSAGE + b"xx\r\n"
    # Mail arriving now is not part of this session's snapshot.
    deliver(anyStore, [ALICE], MESSAGE)
    assert len(maildrop.sizes) == 3
    maildrop.release()
    assert len(openFor(anyStore, ALICE).sizes) == 4


def test_expunge(anyStore):
    addUser(anyStore, ALICE, "pw")
    ids = [deliver(anyStore, [ALICE], b"m%d\r\n" % n)[ALICE] for n in range(4)]
    maildrop = openFor(anyStore, ALICE)
    resultOf(maildrop.expunge([1, 3]))
    resultOf(maildrop.expunge([]))
    maildrop.release()
    assert [m.uniqueId for m in resultOf(anyStore.listMessages(ALICE))] == [ids[0], ids[2]]
    assert query(anyStore, "SELECT count(*) FROM bodies") == [(2,)]


def test_maildropLock(anyStore):
    addUser(anyStore, ALICE, "pw")
    addUser(anyStore, BOB, "pw")
    user = resultOf(anyStore.findUser(ALICE))
    first = resultOf(anyStore.openMaildrop(user))
    with pytest.raises(MaildropInUse):
        resultOf(anyStore.openMaildrop(user))
    # Another user's maildrop is not affected.
    other = openFor(anyStore, BOB)
    other.release()
    first.release()
    first.release()  # idempotent
    second = resultOf(anyStore.openMaildrop(user))
    # Releasing a stale maildrop again must not unlock the new session.
    first.release()
    with pytest.raises(MaildropInUse):
        resultOf(anyStore.openMaildrop(user))
    second.release()


def test_recordLogin(anyStore):
    addUser(anyStore, ALICE, "pw")
    now = [1000.0]
    clocked = SQLMailStore(anyStore.database, anyStore.locks, clock=lambda: now[0])
    user = resultOf(clocked.findUser(ALICE))
    assert resultOf(clocked.recordLogin(user, 300)) is True
    now[0] += 299
    assert resultOf(clocked.recordLogin(user, 300)) is False
    now[0] += 1
    assert resultOf(clocked.recordLogin(user, 300)) is True
    # A refused login did not move the reference point.
    now[0] += 150
    assert resultOf(clocked.recordLogin(user, 300)) is False
    now[0] += 150
    assert resultOf(clocked.recordLogin(user, 300)) is True


def test_aRecordedLoginCountsOnlyOnceItsSessionBegins(anyStore):
    """
    A login recorded for LOGIN-DELAY whose maildrop is released before
    its POP3 session began (refused or cancelled after the credentials
    were checked) is taken back before the lock goes: the user's next
    login is not held back by it, and the last login shown is the one
    before.  One whose session began stays.
    """
    addUser(anyStore, ALICE, "pw")
    now = [1000.0]
    clocked = SQLMailStore(anyStore.database, anyStore.locks, clock=lambda: now[0])
    user = resultOf(clocked.findUser(ALICE))

    def lastLogin():
        return [u.lastLogin for u in resultOf(clocked.listUsers()) if u.address == ALICE][0]

    maildrop = resultOf(clocked.openMaildrop(user))
    assert resultOf(clocked.recordLogin(user, 300)) is True
    maildrop.sessionStarted("192.0.2.1:1")
    resultOf(maildrop.release())
    assert lastLogin() == 1000
    now[0] += 300
    for _ in range(2):
        maildrop = resultOf(clocked.openMaildrop(user))
        assert resultOf(clocked.recordLogin(user, 300)) is True
        resultOf(maildrop.release())
        assert lastLogin() == 1000
    maildrop = resultOf(clocked.openMaildrop(user))
    assert resultOf(clocked.recordLogin(user, 300)) is True
    maildrop.sessionStarted("192.0.2.1:1")
    resultOf(maildrop.release())
    assert lastLogin() == 1300
    assert resultOf(clocked.recordLogin(user, 300)) is False


# -- schema and connection ---------------------------------------------------


def test_freshDatabaseIsAtLatestVersion(anyStore):
    assert query(anyStore, f"SELECT max(version) FROM {SCHEMA_TABLE}") == [(LATEST,)]
    assert LATEST == MIGRATIONS[-1].version
    assert upgrade(anyStore.database) == []
    assert query(anyStore, f"SELECT count(*) FROM {SCHEMA_TABLE}") == [(len(MIGRATIONS),)]


def test_upgradeAppliesEveryMigrationOnce(databaseURL):
    url = databaseURL
    bare = openSynchronousStore(url, migrate=False)
    try:
        applied = upgrade(bare.database)
        assert [m.version for m in applied] == [m.version for m in MIGRATIONS]
        assert upgrade(bare.database) == []
    finally:
        bare.close()
    again = openSynchronousStore(url)
    try:
        assert upgrade(again.database) == []
    finally:
        again.close()


def test_inMemoryDatabaseIsAtLatestVersion():
    s = memoryStore()
    try:
        assert query(s, f"SELECT max(version) FROM {SCHEMA_TABLE}") == [(LATEST,)]
        assert upgrade(s.database) == []
    finally:
        s.close()


def _makeNewer(url):
    """
    Make the database at C{url} look as if a newer mailgate had migrated it.
    """
    s = openSynchronousStore(url)
    s.close()
    sql(
        engineFromURL(url),
        f"INSERT INTO {SCHEMA_TABLE} (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)",
        (LATEST + 1,),
    )


def test_newerSchemaIsRefused(databaseURL):
    _makeNewer(databaseURL)
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(databaseURL)
    assert str(LATEST + 1) in str(e.value)


def test_newerSchemaIsRefusedByTheServerStore(databaseURL):
    _makeNewer(databaseURL)
    with pytest.raises(ConfigurationError) as e:
        openStore(databaseURL, reactor=MemoryReactor())
    assert str(LATEST + 1) in str(e.value)


def test_filePragmas(store):
    conn = store.database.connection
    assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_walIsPersistentInTheFile(store, dbpath):
    conn = sqlite3.connect(dbpath)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        conn.close()


def test_memoryPragmas():
    s = memoryStore()
    try:
        assert s.database.connection.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        s.close()


@pytest.mark.parametrize(
    "url",
    ["mysql://localhost/db", "sqlite://relative.sqlite3", "sqlite:///", "nonsense", ""],
)
def test_badURLs(url):
    with pytest.raises(ConfigurationError):
        engineFromURL(url)


def test_unopenableDatabase():
    with pytest.raises(ConfigurationError):
        openSynchronousStore("sqlite:////nonexistent/directory/x.sqlite3")


def test_unreachablePostgreSQLStopsTheServerStore():
    """
    A PostgreSQL server that cannot be reached stops start-up with a
    configuration error naming it, rather than a server that fails every
    session later.  (Port 1 on 127.0.0.1: connection refused at once.)
    """
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigurationError) as e:
        openStore("postgresql://mailgate@127.0.0.1:1/nowhere", reactor=MemoryReactor())
    assert "127.0.0.1" in str(e.value)
    # One that may go away: twistd mailgate exits 75, to be started again.
    assert isinstance(e.value, UnavailableAtStart)


# -- group commit ----------------------------------------------------------


@pytest.fixture
def batchConnection(databaseURL):
    """
    A connection of each backend's engine, with a table C{t}; on SQLite,
    every statement it runs is recorded.
    """
    engine = engineFromURL(databaseURL)
    sql(engine, "CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    conn = engine.connect()
    statements = []
    if engine.name == "sqlite":
        conn.set_trace_callback(statements.append)
    yield engine, conn, statements, engine
    conn.close()


def _committedRows(engine):
    return dict(sql(engine, "SELECT k, v FROM t"))


def _inTransaction(engine, conn):
    if engine.name == "sqlite":
        return conn.in_transaction
    import psycopg

    return conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


def _insert(cursor, key, value):
    cursor.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))
    return key


def _insertThenFail(cursor, key):
    cursor.execute("INSERT INTO t (k, v) VALUES (?, 0)", (key,))
    raise ValueError("boom")


def _locked(cursor, key):
    # SQLite's way of saying "try again": transient, but the connection
    # and the other interactions of the batch are fine.
    cursor.execute("INSERT INTO t (k, v) VALUES (?, 0)", (key,))
    raise sqlite3.OperationalError("database is locked")


def _transactionId(cursor, key):
    cursor.execute("INSERT INTO t (k, v) VALUES (?, 0)", (key,))
    cursor.execute("SELECT txid_current()")
    return cursor.fetchone()[0]


def test_runBatchCommitsTheSuccessfulOnesOnce(batchConnection):
    """
    One failing interaction (an exception, a unique violation; on SQLite
    also a lock) undoes only itself: the others are committed, together.
    On PostgreSQL a failed statement aborts the whole transaction unless
    its savepoint is rolled back, so this is where that is proven.
    """
    engine, conn, statements, path = batchConnection
    batch = [
        (_insert, ("a", 1), {}),
        (_insertThenFail, ("b",), {}),
        (_insert, ("c", 3), {}),
        (_insert, ("a", 9), {}),  # unique violation
        (_insert, (), {"key": "e", "value": 5}),
    ]
    if engine.name == "sqlite":
        batch.append((_locked, ("d",), {}))
    else:
        batch += [(_transactionId, ("x",), {}), (_transactionId, ("y",), {})]
    results = runBatch(engine, conn, batch)
    assert len(results) == len(batch)
    assert results[0] == (True, "a")
    assert results[2] == (True, "c")
    assert results[4] == (True, "e")
    ok, failure = results[1]
    assert not ok and isinstance(failure, Failure) and failure.check(ValueError)
    ok, failure = results[3]
    assert not ok and engine.isUniqueViolation(failure.value), failure.value
    assert not failure.check(TemporaryFailure)
    # Only the successful interactions' effects, all in one transaction.
    if engine.name == "sqlite":
        ok, failure = results[5]
        assert not ok and failure.check(TemporaryFailure)
        assert _committedRows(path) == {"a": 1, "c": 3, "e": 5}
        # The optimistic attempt (no savepoints) was rolled back; the batch
        # then ran once more with savepoints and committed once.
        assert statements.count("ROLLBACK") == 1
        assert sum(1 for s in statements if s.upper().startswith("COMMIT")) == 1
    else:
        (ok1, x), (ok2, y) = results[5:]
        assert ok1 and ok2 and x == y  # the same transaction
        assert _committedRows(path) == {"a": 1, "c": 3, "e": 5, "x": 0, "y": 0}
    assert not _inTransaction(engine, conn)


def test_runBatchOfOne(batchConnection):
    engine, conn, _, path = batchConnection
    assert runBatch(engine, conn, [(_insert, ("a", 1), {})]) == [(True, "a")]
    [(ok, failure)] = runBatch(engine, conn, [(_insertThenFail, ("b",), {})])
    assert not ok and failure.check(ValueError)
    [(ok, failure)] = runBatch(engine, conn, [(_insert, ("a", 2), {})])
    assert not ok and engine.isUniqueViolation(failure.value), failure.value
    if engine.name == "sqlite":
        [(ok, failure)] = runBatch(engine, conn, [(_locked, ("c",), {})])
        assert not ok and failure.check(TemporaryFailure)
    assert _committedRows(path) == {"a": 1}
    assert not _inTransaction(engine, conn)
    # The connection is still usable.
    assert runBatch(engine, conn, [(_insert, ("f", 6), {})]) == [(True, "f")]
    assert _committedRows(path) == {"a": 1, "f": 6}


@sqliteOnly
def test_runBatchThatCannotBeginAppliesNothing(batchConnection):
    engine, conn, _, path = batchConnection
    conn.execute("BEGIN")  # a transaction left open: BEGIN IMMEDIATE fails
    # The failure of the whole batch is raised (the caller classifies it).
    with pytest.raises((TemporaryFailure, sqlite3.OperationalError)):
        runBatch(engine, conn, [(_insert, ("a", 1), {}), (_insert, ("b", 2), {})])
    assert not conn.in_transaction
    assert _committedRows(path) == {}
    # The connection is usable afterwards.
    assert runBatch(engine, conn, [(_insert, ("a", 1), {}), (_insert, ("b", 2), {})]) == [
        (True, "a"),
        (True, "b"),
    ]
    assert _committedRows(path) == {"a": 1, "b": 2}


def test_sqlErrorsAreNotTransient(batchConnection):
    """
    SQLiteEngine.isTransient: "constraint violations and SQL errors do
    not" heal, so they must not be reported as temporary failures (on
    either backend).
    """

    def badSQL(cursor):
        cursor.execute("SELEC nothing")

    def noSuchTable(cursor):
        cursor.execute("SELECT * FROM no_such_table")

    engine, conn, _, _ = batchConnection
    results = runBatch(engine, conn, [(badSQL, (), {}), (noSuchTable, (), {})])
    assert len(results) == 2, results
    for ok, failure in results:
        assert not ok
        assert not failure.check(TemporaryFailure), failure.value


# -- a 100,000-message maildrop ----------------------------------------------

BIG_MAILDROP = 100_000
SMALL_BODY = b"Subject: x\r\n\r\nbody\r\n"


def _fill(cursor, userId, count):
    cursor.execute("SELECT owner_id, body_id, size, header_size FROM bodies")
    ((owner, bodyId, size, headerSize),) = cursor.fetchall()
    cursor.execute("SELECT uid, uidl FROM maildrop WHERE user_id = ?", (userId,))
    ((firstUid, firstId),) = cursor.fetchall()
    validity = int(firstId[8:], 16)
    assert formatUniqueId(firstUid, validity) == firstId
    cursor.executemany(
        "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
        [
            (userId, uid, formatUniqueId(uid, validity), owner, bodyId, size, headerSize)
            for uid in range(firstUid + 1, firstUid + count)
        ],
    )
    cursor.execute("UPDATE bodies SET refcount = ?", (count,))
    # Keep the user's uid counter past the rows just added.
    cursor.execute("UPDATE mailboxes SET next_uid = ? WHERE user_id = ?", (firstUid + count, userId))
    return firstUid, validity


def _bulkFill(store, userId, count):
    """
    Give a maildrop C{count} messages fast: one message delivered through
    the store, then C{count - 1} more maildrop rows sharing its body,
    inserted with plain SQL on a connection of the store's engine.

    @return: the unique id of message number C{n} as a function of C{n}.
    """
    engine = store.engine
    conn = engine.connect()
    try:
        firstUid, validity = runTransaction(engine, conn, _fill, (userId, count), {}, True)
    finally:
        conn.close()
    return lambda n: formatUniqueId(firstUid + n - 1, validity)


class _CountingCursor:
    """
    A cursor that counts the statements mailgate sends through it.
    """

    def __init__(self, cursor, statements):
        self._cursor = cursor
        self._statements = statements

    def execute(self, statement, *args):
        self._statements.append(statement)
        return self._cursor.execute(statement, *args)

    def executemany(self, statement, *args):
        self._statements.append(statement)
        return self._cursor.executemany(statement, *args)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


# The bulk fill writes through a connection of its own: not for :memory:.
@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_hugeMaildropIsListedInFewStatements(anyStore, monkeypatch):
    store = anyStore
    addUser(store, ALICE, "wonderland")
    user = resultOf(store.findUser(ALICE))
    deliver(store, [ALICE], SMALL_BODY)
    uniqueId = _bulkFill(store, user.userId, BIG_MAILDROP)

    # Every statement the store runs goes through a cursor its engine's
    # begin() made; count them (on either backend).
    statements = []
    begin = store.engine.begin
    monkeypatch.setattr(
        store.engine, "begin", lambda conn, write: _CountingCursor(begin(conn, write), statements)
    )
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland") == (
        f"+OK {ALICE} has {BIG_MAILDROP} messages ({BIG_MAILDROP * len(SMALL_BODY)} octets)\r\n"
    )
    assert session.command("STAT") == f"+OK {BIG_MAILDROP} {BIG_MAILDROP * len(SMALL_BODY)}\r\n"

    listing = session.command("LIST").split("\r\n")
    assert listing[0].startswith("+OK")
    assert listing[-2:] == [".", ""]
    lines = listing[1:-2]
    assert len(lines) == BIG_MAILDROP
    assert lines[0] == f"1 {len(SMALL_BODY)}"
    assert lines[-1] == f"{BIG_MAILDROP} {len(SMALL_BODY)}"
    assert all(line == f"{n} {len(SMALL_BODY)}" for n, line in enumerate(lines, 1))

    uidl = session.command("UIDL").split("\r\n")
    assert uidl[0].startswith("+OK")
    assert uidl[-2:] == [".", ""]
    lines = uidl[1:-2]
    assert len(lines) == BIG_MAILDROP
    assert all(line == f"{n} {uniqueId(n)}" for n, line in enumerate(lines, 1))

    assert session.command("RETR 100000") == f"+OK {len(SMALL_BODY)} octets\r\n" + (
        SMALL_BODY + b".\r\n"
    ).decode()
    assert session.command("QUIT").startswith("+OK")
    assert statements, "no statement was counted"
    assert len(statements) < BIG_MAILDROP // 100, len(statements)


# -- streaming a 50 MB message -----------------------------------------------

HUGE = 50 * 1024 * 1024


class CountingTransport(StringTransport):
    """
    Counts what is written and keeps only the last few octets.
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.tail = b""

    def write(self, data):
        self.count += len(data)
        self.tail = (self.tail + data)[-16:]


def test_fiftyMegabyteMessageStreamsInBoundedMemory(anyStore):
    store = anyStore
    addUser(store, ALICE, "wonderland")
    # Ten lines per block, one starting with "." to be stuffed.
    block = b"." + b"d" * 77 + b"\n" + (b"y" * 78 + b"\n") * 9
    spool = MessageSpool()
    spool.writeData(b"Subject: big\nX-Test: streaming\n\n")
    blocks = 0
    for _ in range(HUGE // len(block) + 1000):
        if spool.size >= HUGE:
            break
        spool.writeData(block * 64)
        blocks += 64
    spool.finish()
    size = spool.size
    assert size >= HUGE
    results = resultOf(store.deliver([ALICE], spool))
    spool.close()
    assert isinstance(results[ALICE], str)

    # What a client must receive: the status line, every line starting with
    # "." stuffed, and the terminating ".".
    statusLine = f"+OK {size} octets\r\n".encode()
    expected = len(statusLine) + size + blocks + len(b".\r\n")

    session = POP3Session(store)
    assert session.login(ALICE, "wonderland") == f"+OK {ALICE} has 1 messages ({size} octets)\r\n"
    counting = CountingTransport()
    session.protocol.transport = counting
    session.transport = counting

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        session.protocol.dataReceived(b"RETR 1\r\n")
        session.clock.advance(0)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()

    assert not counting.disconnecting, "the session was closed during RETR"
    assert counting.count == expected
    assert counting.tail.endswith(b"\r\n.\r\n")
    assert peak < 10 * 1024 * 1024, f"peak {peak} octets while streaming {size}"


def test_runBatchWithoutFailuresUsesNoSavepoints(batchConnection):
    """
    The common case costs only the interactions' own statements, one
    transaction and one commit.
    """
    engine, conn, statements, path = batchConnection
    batch = [(_insert, (key, n), {}) for n, key in enumerate("abc")]
    results = runBatch(engine, conn, batch)
    assert [ok for ok, _ in results] == [True, True, True]
    assert _committedRows(path) == {"a": 0, "b": 1, "c": 2}
    if engine.name == "sqlite":
        assert not [s for s in statements if "SAVEPOINT" in s]
        assert sum(1 for s in statements if s.upper().startswith("COMMIT")) == 1


def test_workerThreadsKeepLightWorkOnOneThread():
    """
    Jobs one after another go to the thread that became idle last (the one
    with the warm connection); jobs together use as many threads as there
    are, the rest wait their turn; stop() ends every thread.
    """
    reactor = PumpedReactor()
    workers = WorkerThreads(reactor, 3, "test-workers")
    workers.start()
    try:
        names = [reactor.wait(workers.submit(lambda: threading.current_thread().name)) for _ in range(5)]
        assert names == ["test-workers-0"] * 5

        gate = threading.Event()

        def held():
            assert gate.wait(30)
            return threading.current_thread().name

        together = [workers.submit(held) for _ in range(4)]
        gate.set()
        names = [reactor.wait(d) for d in together]
        assert set(names) == {"test-workers-0", "test-workers-1", "test-workers-2"}

        failed = reactor.wait(workers.submit(lambda: 1 / 0))
        assert failed.check(ZeroDivisionError)
    finally:
        threads = list(workers._threads)
        workers.stop()
    assert not any(thread.is_alive() for thread in threads)


def test_stoppingWorkersStuckInTheDatabaseWaitsTheTimeoutOnceInAll():
    """
    Workers stuck in statements that never end (a hung database) are
    waited for C{timeout} seconds in all, not each: the wait runs on the
    reactor thread, and four threads stuck held it four times as long.
    """
    reactor = PumpedReactor()
    workers = WorkerThreads(reactor, 4, "test-stuck")
    workers.start()
    gate = threading.Event()
    started = threading.Semaphore(0)

    def stuck():
        started.release()
        gate.wait(30)

    pending = [workers.submit(stuck) for _ in range(4)]
    for _ in range(4):
        assert started.acquire(timeout=10)
    waits = []
    threads = list(workers._threads)
    for thread in threads:
        # Each join waits what it is given, as a thread that never ends
        # makes it: the sum is the time the reactor was held.
        thread.join = lambda timeout=None, waits=waits: waits.append(timeout) or time.sleep(timeout)
    try:
        workers.stop(timeout=0.2)
        assert len(waits) == 4
        assert sum(waits) <= 0.2 + 1e-6, waits
    finally:
        gate.set()
        for thread in threads:
            threading.Thread.join(thread, 10)
    assert len(pending) == 4


def test_closingADatabaseStuckInStatementsWaitsTheTimeoutOnceForAllItsThreads(tmp_path, monkeypatch):
    """
    A database whose writer and readers are all stuck in statements (a
    PostgreSQL server that hangs) waits for them THREADS_STOP_TIMEOUT
    seconds in all when it closes, not that per pool: the wait holds the
    reactor thread, and the writer's and then the readers' full bound held
    a stop with a hung database for 20 s after the services' own 10 s.
    Time is the test's own clock, advanced by each join by what it waits.
    """
    from mailgate.store import database as databaseModule

    now = [1000.0]
    monkeypatch.setattr(databaseModule, "monotonic", lambda: now[0])
    engine = engineFromURL("sqlite:///" + str(tmp_path / "stuck.sqlite3"))
    reactor = PumpedReactor()
    database = Database(engine, reactor)
    writer, readers = database._writer, database._readers
    assert readers is not writer
    gate = threading.Event()
    started = threading.Semaphore(0)

    def stuck(cursor):
        started.release()
        gate.wait(30)

    threads = list(writer._threads) + list(readers._threads)
    database.runWrite(stuck)
    for _ in readers._threads:
        database.runInteraction(stuck)
    for _ in threads:
        assert started.acquire(timeout=10)
    waits = []

    def join(timeout=None):
        waits.append(timeout)
        now[0] += timeout

    for thread in threads:
        thread.join = join
    try:
        database.close()
        assert len(waits) == len(threads)
        # 10 s in all (THREADS_STOP_TIMEOUT), where it was 10 s per pool.
        assert sum(waits) <= 10.0 + 1e-6, waits
    finally:
        gate.set()
        for thread in threads:
            threading.Thread.join(thread, 10)


def test_aWorkerDescheduledAfterHandingBackItsResultIsStillTheOneIdleLast():
    """
    A worker that the system deschedules right after handing a result
    back (as on a loaded machine) is already idle: the job submitted as
    soon as the result arrives goes to it, not to a cold thread.  Before,
    it put itself back among the idle only after the hand-back, and the
    next job went to another thread.
    """
    reactor = PumpedReactor()
    handBack = reactor.callFromThread

    def descheduledAfterHandingBack(function, *args):
        handBack(function, *args)
        time.sleep(0.05)

    reactor.callFromThread = descheduledAfterHandingBack
    workers = WorkerThreads(reactor, 3, "test-workers")
    workers.start()
    try:
        names = [reactor.resultOf(workers.submit(lambda: threading.current_thread().name)) for _ in range(5)]
        assert names == ["test-workers-0"] * 5
    finally:
        workers.stop()


def _insertSlowly(cursor, key, value, commits):
    cursor.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))
    return key, len(commits)


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_threadedWritesAreCommittedTogether(databaseURL):
    """
    The threaded L{Database}: writes queued while the writer is busy are
    committed together; each L{Deferred} fires once its write is
    committed; a failing write fails alone; the writer goes on after a
    batch that failed as a whole.
    """
    engine = engineFromURL(databaseURL)
    sql(engine, "CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    commits = []
    commit = engine.commit

    def countingCommit(conn):
        commit(conn)
        commits.append(1)

    engine.commit = countingCommit
    reactor = PumpedReactor()
    database = Database(engine, reactor)
    try:
        outcomes = {}

        def record(key):
            def recorded(result):
                outcomes[key] = (result, len(commits))

            return recorded

        for n in range(200):
            key = f"k{n}"
            value = n if n != 77 else None  # NOT NULL: fails
            database.runWrite(_insertSlowly, key, value, commits).addBoth(record(key))
        reactor.pump(lambda: len(outcomes) == 200)
        failed = {k for k, (v, _) in outcomes.items() if isinstance(v, Failure)}
        assert failed == {"k77"}
        assert not outcomes["k77"][0].check(TemporaryFailure)
        # Every write's Deferred fired after its own commit.
        for key, (result, commitsWhenFired) in outcomes.items():
            if key != "k77":
                _, commitsBefore = result
                assert commitsBefore < commitsWhenFired
        assert len(commits) < 100, "writes queued together were not committed together"
        assert len(_committedRows(engine)) == 199

        # A batch whose transaction cannot even begin fails as a whole,
        # and the writer goes on with the next writes.
        begin = engine.begin
        broken = [True]

        def brokenBegin(conn, write):
            if write and broken[0]:
                broken[0] = False
                raise ValueError("no transaction today")
            return begin(conn, write)

        engine.begin = brokenBegin
        later = []
        database.runWrite(_insert, "x", 1).addBoth(later.append)
        reactor.pump(lambda: later)
        assert isinstance(later[0], Failure) and later[0].check(ValueError)
        database.runWrite(_insert, "y", 2).addBoth(later.append)
        reactor.pump(lambda: len(later) == 2)
        assert later[1] == "y"
        assert _committedRows(engine)["y"] == 2
    finally:
        database.close()


def _contents(store, address):
    maildrop = openFor(store, address)
    try:
        return [readWhole(resultOf(maildrop.openMessage(i))) for i in range(len(maildrop.sizes))]
    finally:
        maildrop.release()


def _deliveryBatch(engine, messages, userIds):
    """
    Deliveries as the writer queue hands them over: C{(addresses, message,
    partial)} each.
    """
    return [
        (sqlStore._deliver, (engine, list(addresses), spoolBytes(message), 1700000000, partial, userIds), {})
        for addresses, message, partial in messages
    ]


def _countStatements(engine, monkeypatch):
    statements = []
    begin = engine.begin
    monkeypatch.setattr(engine, "begin", lambda conn, write: _CountingCursor(begin(conn, write), statements))
    return statements


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_deliveriesWaitingForOneCommitAreStoredTogether(databaseURL, monkeypatch):
    """
    The deliveries of one group commit share their statements: every
    message lands in the right maildrops, byte for byte, with distinct
    unique ids, and a batch of forty costs no more statements than a batch
    of five.
    """
    store = memoryStore(databaseURL)
    engine = store.engine
    conn = engine.connect()
    try:
        for address in (ALICE, BOB, CAROL):
            addUser(store, address, "pw")
        big = b"Subject: big\r\n\r\n" + b"x" * (2 * CHUNK_SIZE + 100) + b"\r\n"
        userIds = {}
        batch = _deliveryBatch(
            engine,
            [
                ([ALICE], b"Subject: 1\r\n\r\none\r\n", True),
                ([ALICE, BOB], b"Subject: 2\r\n\r\ntwo\r\n", True),
                ([BOB, "nobody@example.org"], b"Subject: 3\r\n\r\nthree\r\n", True),
                ([CAROL], big, True),
                ([ALICE, ALICE], b"Subject: 5\r\n\r\n.five\r\n", False),
            ],
            userIds,
        )
        results = runBatch(engine, conn, batch)
        assert [ok for ok, _ in results] == [True] * 5
        outcomes = [value for _, value in results]
        assert set(outcomes[1]) == {ALICE, BOB}
        assert isinstance(outcomes[2]["nobody@example.org"], NoSuchUser)
        assert set(outcomes[4]) == {ALICE}
        ids = [uid for outcome in outcomes for uid in outcome.values() if isinstance(uid, str)]
        assert len(ids) == len(set(ids)) == 6

        assert _contents(store, ALICE) == [
            b"Subject: 1\r\n\r\none\r\n",
            b"Subject: 2\r\n\r\ntwo\r\n",
            b"Subject: 5\r\n\r\n.five\r\n",
        ]
        assert _contents(store, BOB) == [b"Subject: 2\r\n\r\ntwo\r\n", b"Subject: 3\r\n\r\nthree\r\n"]
        assert _contents(store, CAROL) == [big]
        assert [m.uniqueId for m in resultOf(store.listMessages(ALICE))] == [
            outcomes[0][ALICE],
            outcomes[1][ALICE],
            outcomes[4][ALICE],
        ]
        # The message to two recipients is stored once.
        [(count,)] = query(store, "SELECT COUNT(*) FROM bodies")
        assert count == 5

        statements = _countStatements(engine, monkeypatch)
        few = _deliveryBatch(engine, [([ALICE, BOB], b"Subject: n\r\n\r\nx\r\n", True)] * 5, userIds)
        assert [ok for ok, _ in runBatch(engine, conn, few)] == [True] * 5
        forFive = len(statements)
        del statements[:]
        many = _deliveryBatch(engine, [([ALICE, BOB], b"Subject: n\r\n\r\nx\r\n", True)] * 40, userIds)
        assert [ok for ok, _ in runBatch(engine, conn, many)] == [True] * 40
        assert len(statements) == forFive, statements
        assert len(resultOf(store.listMessages(BOB))) == 2 + 45
    finally:
        conn.close()
        store.close()


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_aBatchOfMegabytesOfSmallMessages(databaseURL):
    """
    Small bodies of one batch are inserted together, a megabyte or so at a
    time: twelve messages of 100 KB arrive whole and in order.
    """
    store = memoryStore(databaseURL)
    conn = store.engine.connect()
    try:
        addUser(store, ALICE, "pw")
        messages = [b"Subject: %d\r\n\r\n" % n + bytes([65 + n]) * 100_000 + b"\r\n" for n in range(12)]
        batch = _deliveryBatch(store.engine, [([ALICE], m, True) for m in messages], {})
        assert [ok for ok, _ in runBatch(store.engine, conn, batch)] == [True] * 12
        assert _contents(store, ALICE) == messages
    finally:
        conn.close()
        store.close()


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_aDeliveryThatMustFailFailsAloneInItsBatch(databaseURL):
    """
    SMTP delivers all or nothing (C{partial} false): when one recipient
    has vanished since RCPT, that message fails and the others of the same
    group commit are still delivered.
    """
    store = memoryStore(databaseURL)
    conn = store.engine.connect()
    try:
        for address in (ALICE, BOB):
            addUser(store, address, "pw")
        batch = _deliveryBatch(
            store.engine,
            [
                ([ALICE], b"Subject: 1\r\n\r\none\r\n", False),
                ([BOB, "gone@example.org"], b"Subject: 2\r\n\r\ntwo\r\n", False),
                ([BOB], b"Subject: 3\r\n\r\nthree\r\n", False),
            ],
            {},
        )
        (ok1, _), (ok2, failure), (ok3, _) = runBatch(store.engine, conn, batch)
        assert ok1 and ok3 and not ok2
        assert failure.check(NoSuchUser) and "gone@example.org" in str(failure.value)
        assert _contents(store, ALICE) == [b"Subject: 1\r\n\r\none\r\n"]
        assert _contents(store, BOB) == [b"Subject: 3\r\n\r\nthree\r\n"]
    finally:
        conn.close()
        store.close()


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_deliveriesTogetherNoticeAUserRecreatedByAnotherProcess(databaseURL):
    store = memoryStore(databaseURL)
    conn = store.engine.connect()
    try:
        for address in (ALICE, BOB):
            addUser(store, address, "pw")
        userIds = {}
        first = _deliveryBatch(store.engine, [([ALICE], b"Subject: 1\r\n\r\nx\r\n", True)] * 2, userIds)
        assert [ok for ok, _ in runBatch(store.engine, conn, first)] == [True, True]
        resultOf(store.deleteUser(ALICE))
        addUser(store, ALICE, "pw")
        second = _deliveryBatch(
            store.engine,
            [([ALICE], b"Subject: 2\r\n\r\ny\r\n", True)] * 2 + [([BOB], b"Subject: 3\r\n\r\nz\r\n", True)],
            userIds,
        )
        results = runBatch(store.engine, conn, second)
        assert [ok for ok, _ in results] == [True] * 3
        assert _contents(store, ALICE) == [b"Subject: 2\r\n\r\ny\r\n"] * 2
        assert _contents(store, BOB) == [b"Subject: 3\r\n\r\nz\r\n"]
    finally:
        conn.close()
        store.close()


def test_deliveryNoticesAUserRecreatedByAnotherProcess(databaseURL):
    """
    The writer remembers user ids; when another process (the admin
    command) deletes a user and creates it again, the next delivery finds
    the new user instead of losing the message or refusing it.
    """
    server = memoryStore(databaseURL)
    admin = memoryStore(databaseURL)
    try:
        addUser(server, ALICE, "pw")
        first = resultOf(server.deliver([ALICE], spoolBytes(b"Subject: 1\r\n\r\nx\r\n")))
        resultOf(admin.deleteUser(ALICE))
        addUser(admin, ALICE, "pw")
        second = resultOf(server.deliver([ALICE], spoolBytes(b"Subject: 2\r\n\r\ny\r\n"), partial=True))
        assert isinstance(second[ALICE], str) and second[ALICE] != first[ALICE]
        messages = resultOf(admin.listMessages(ALICE))
        assert [m.uniqueId for m in messages] == [second[ALICE]]
        # And a user deleted for good is reported, not silently dropped.
        resultOf(admin.deleteUser(ALICE))
        third = resultOf(server.deliver([ALICE], spoolBytes(b"Subject: 3\r\n\r\nz\r\n"), partial=True))
        assert isinstance(third[ALICE], NoSuchUser)
    finally:
        server.close()
        admin.close()


def test_aBadPostgreSQLURLIsReportedWithoutItsPassword():
    """
    A URL refused at start-up is named in the one-line error mailgate
    prints (to standard error, often to a log): never with its password.
    """
    with pytest.raises(ConfigurationError) as refused:
        engineFromURL("postgresql://mailgate:s3cret-word@db.internal:5433/")
    message = str(refused.value)
    assert "s3cret-word" not in message
    assert "postgresql://mailgate:***@db.internal:5433/" in message


def test_headersAreReadAheadWithinTheirBudget(anyStore, tripsTo):
    """
    TOP n 0 for a maildrop's messages one after another (what a client
    listing headers does): one trip to the database serves as many as fit
    in the header budget, each exactly its header; the message after the
    budget is read by the next trip.
    """
    store = anyStore
    addUser(store, ALICE, "pw")
    headers = []
    for n in range(1, 8):
        header = b"Subject: %d\r\nX-Pad: %s\r\n\r\n" % (n, b"p" * 300)
        headers.append(header)
        deliver(store, [ALICE], header + b"body %d\r\n.dot line\r\n" % n)
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    # Room for the first four headers only.
    maildrop.headerReadAheadOctets = sum(len(h) for h in headers[:4])
    trips = tripsTo(store)
    try:
        tops = [resultOf(maildrop.openMessage(n, headerOnly=True)) for n in range(7)]
        assert [(t.size, t.whole) for t in tops] == [(len(h), h) for h in headers]
        assert trips == ["_openMessages", "_openMessages"]
        # A whole message after its header: read anew, whole.
        body = resultOf(maildrop.openMessage(2))
        assert body.whole == headers[2] + b"body 3\r\n.dot line\r\n"
    finally:
        resultOf(maildrop.release())


@pytest.fixture
def openingsOf(monkeypatch):
    """
    C{openingsOf(store)}: record the trips C{store}'s maildrops make to
    open messages from then on; the returned list gets, for each, the
    message numbers (1-based, in the maildrop C{maildrop}) it read: the
    one asked for, and those read ahead within the budget.
    """

    def start(store, maildrop):
        openings = []
        realOpen = store.reads.openMessages

        def recorded(userId, uids, headerOnly, budget):
            numbers = []
            openings.append(numbers)

            def read(rows):
                numbers.extend(maildrop._uids.index(uid) + 1 for uid, _ in rows)
                return rows

            return realOpen(userId, uids, headerOnly, budget).addCallback(read)

        monkeypatch.setattr(store.reads, "openMessages", recorded)
        return openings

    return start


def _sevenMessages(store):
    addUser(store, ALICE, "pw")
    messages = [b"Subject: %d\r\n\r\nbody %d\r\n.dot line\r\n" % (n, n) for n in range(1, 8)]
    for message in messages:
        deliver(store, [ALICE], message)
    return messages, resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))


def test_aClientGoingFromTheNewestBackIsReadAheadBackwards(anyStore, openingsOf):
    """
    A client fetching the newest message first, then the one before, and
    so on (headers, then whole messages): each kind is read in one trip,
    the run going back from the last message, and every message is whole.
    """
    messages, maildrop = _sevenMessages(anyStore)
    openings = openingsOf(anyStore, maildrop)
    try:
        tops = [resultOf(maildrop.openMessage(n, headerOnly=True)).whole for n in range(6, -1, -1)]
        assert tops == [m[: m.index(b"\r\n\r\n") + 4] for m in reversed(messages)]
        whole = [resultOf(maildrop.openMessage(n)).whole for n in range(6, -1, -1)]
        assert whole == messages[::-1]
        assert openings == [[7, 6, 5, 4, 3, 2, 1]] * 2
    finally:
        resultOf(maildrop.release())


def test_aClientPickingMessagesIsReadOnlyWhatItPicks(anyStore, openingsOf):
    """
    A client picking messages here and there (after reading headers, it
    fetches a few; or it asks for one again) costs a trip for the message
    it asks for and nothing more: read ahead, the messages it skips would
    be read for nothing, again at every pick.  The run it left is kept:
    back to its headers, it finds them read.
    """
    messages, maildrop = _sevenMessages(anyStore)
    openings = openingsOf(anyStore, maildrop)
    try:
        for n in (0, 1, 2):
            resultOf(maildrop.openMessage(n, headerOnly=True))
        assert openings == [[1, 2, 3, 4, 5, 6, 7]]
        # Five messages or more apart: picks.
        picked = [resultOf(maildrop.openMessage(n)).whole for n in (5, 0, 6, 6)]
        assert picked == [messages[5], messages[0], messages[6], messages[6]]
        assert openings[1:] == [[6], [1], [7], [7]]
        # Back to the headers: what the first trip read ahead.
        assert resultOf(maildrop.openMessage(3, headerOnly=True)).whole == b"Subject: 4\r\n\r\n"
        assert len(openings) == 5
        # The same header twice: the second time, that header alone.
        resultOf(maildrop.openMessage(3, headerOnly=True))
        assert openings[5:] == [[4]]
    finally:
        resultOf(maildrop.release())


def test_aClientSkippingAFewMessagesIsStillOnItsRun(anyStore, openingsOf):
    """
    A client going forward that passes over a message (deleted, or one
    it takes the header of alone) is still on its run: the trip after the
    read-ahead's end reads ahead again.
    """
    messages, maildrop = _sevenMessages(anyStore)
    # Room for three messages per trip.
    maildrop.readAheadOctets = sum(len(m) for m in messages[:3])
    openings = openingsOf(anyStore, maildrop)
    try:
        got = [resultOf(maildrop.openMessage(n)).whole for n in (0, 1, 2, 4, 5, 6)]
        assert got == messages[:3] + messages[4:]
        assert openings == [[1, 2, 3], [5, 6, 7]]
    finally:
        resultOf(maildrop.release())


def test_aClientTakingHeadersAndWholeMessagesInTurnKeepsBothRuns(anyStore, openingsOf):
    """
    A client going through the maildrop taking one message's header
    (TOP n 0, as for a large message it will not download) and the next
    one whole, in turn: the headers and the whole messages are each read
    ahead once, neither run dropping the other's.
    """
    messages, maildrop = _sevenMessages(anyStore)
    openings = openingsOf(anyStore, maildrop)
    try:
        got = []
        for n in range(7):
            top = resultOf(maildrop.openMessage(n, headerOnly=True)).whole
            whole = resultOf(maildrop.openMessage(n)).whole
            got.append((top, whole))
        assert got == [(m[: m.index(b"\r\n\r\n") + 4], m) for m in messages]
        assert openings == [[1, 2, 3, 4, 5, 6, 7]] * 2
    finally:
        resultOf(maildrop.release())


def test_aHeaderIsCutFromTheWholeMessageReadAhead(anyStore, openingsOf):
    """
    A client that downloads the small messages whole and takes only the
    header of the others (a download size limit), in order: the header of
    a message already read ahead whole is cut from it, without a trip,
    and is exactly what reading that header alone gives (octets, size,
    and what dot-stuffing needs to know).
    """
    store = anyStore
    addUser(store, ALICE, "pw")
    messages = [b"Subject: %d\r\n.Dotted: %d\r\n\r\nbody %d\r\n.dot line\r\n" % (n, n, n) for n in range(1, 8)]
    for message in messages:
        deliver(store, [ALICE], message)
    user = resultOf(store.findUser(ALICE))
    maildrop = resultOf(store.openMaildrop(user))
    openings = openingsOf(store, maildrop)
    try:
        got = [resultOf(maildrop.openMessage(n, headerOnly=n % 2 == 1)) for n in range(7)]
        assert openings == [[1, 2, 3, 4, 5, 6, 7]]
        headers = [m[: m.index(b"\r\n\r\n") + 4] for m in messages]
        assert [body.whole for body in got] == [headers[n] if n % 2 else messages[n] for n in range(7)]
        # The whole message stays read ahead: RETR after TOP needs no trip.
        assert resultOf(maildrop.openMessage(3)).whole == messages[3]
        assert len(openings) == 1
    finally:
        resultOf(maildrop.release())

    def described(body):
        return (body.whole, body.size, body.headerSize, body.needsStuffing, body.dotOffsets)

    alone = resultOf(store.openMaildrop(user))
    try:
        for n in (1, 3, 5):
            assert described(resultOf(alone.openMessage(n, headerOnly=True))) == described(got[n])
    finally:
        resultOf(alone.release())


def test_aLongMessageOnTheRunIsReadAheadAsItsFirstPiece(anyStore, openingsOf, tripsTo):
    """
    The run of a client downloading in order does not stop at a message
    longer than a chunk: its first piece (its header) comes with the
    others, so downloading it costs only the trips for the rest of its
    chunks, and the messages after it are read ahead with it.
    """
    store = anyStore
    addUser(store, ALICE, "pw")
    line = b"y" * 70 + b"\r\n"
    long = b"Subject: long\r\n\r\n" + line * (2 * CHUNK_SIZE // len(line) + 10)
    messages = [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n", long,
                b"Subject: 4\r\n\r\nfour\r\n", b"Subject: 5\r\n\r\n.five\r\n"]
    for message in messages:
        deliver(store, [ALICE], message)
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    openings = openingsOf(store, maildrop)
    trips = tripsTo(store)
    try:
        got = [readWhole(resultOf(maildrop.openMessage(n))) for n in range(5)]
        assert got == messages
        assert openings == [[1, 2, 3, 4, 5]]
        # The long message's two further chunks, in one trip.
        assert trips == ["_openMessages", "_readChunks"]
    finally:
        resultOf(maildrop.release())


def test_aClientWithADownloadLimitGetsTheHeadersOfLongMessagesReadAhead(anyStore, openingsOf):
    """
    A client that downloads the short messages and takes only the header
    of the long ones (TOP n 0), in order: one trip serves it all, and each
    header is exactly what reading it alone gives.
    """
    store = anyStore
    addUser(store, ALICE, "pw")
    line = b"z" * 70 + b"\r\n"
    messages = []
    for n in range(1, 7):
        if n % 2:
            messages.append(b"Subject: %d\r\n\r\nshort %d\r\n" % (n, n))
        else:
            body = line * (CHUNK_SIZE // len(line) + 100)
            messages.append(b"Subject: %d\r\n.Dotted: long\r\n\r\n" % n + body)
    for message in messages:
        deliver(store, [ALICE], message)
    user = resultOf(store.findUser(ALICE))
    maildrop = resultOf(store.openMaildrop(user))
    # Room for the three long ones' first pieces (a chunk each, at most).
    maildrop.readAheadOctets = 4 * CHUNK_SIZE
    openings = openingsOf(store, maildrop)
    try:
        got = [resultOf(maildrop.openMessage(n, headerOnly=n % 2 == 1)) for n in range(6)]
        assert openings == [[1, 2, 3, 4, 5, 6]]
        headers = [m[: m.index(b"\r\n\r\n") + 4] for m in messages]
        assert [body.whole for body in got] == [headers[n] if n % 2 else messages[n] for n in range(6)]
    finally:
        resultOf(maildrop.release())
    alone = resultOf(store.openMaildrop(user))
    try:
        for n in (1, 3, 5):
            header = resultOf(alone.openMessage(n, headerOnly=True))
            assert (header.whole, header.size, header.headerSize, header.needsStuffing, header.dotOffsets) == (
                got[n].whole, got[n].size, got[n].headerSize, got[n].needsStuffing, got[n].dotOffsets)
    finally:
        resultOf(alone.release())


def test_aHeaderLongerThanAChunkIsReadAloneForTOP(anyStore, openingsOf):
    """
    A message whose header alone is longer than a chunk is stored in
    plain chunks: read ahead, it is its first chunk like any long
    message, and TOP n 0 reads its header from the database, not from
    that chunk; downloading it still needs no trip to open it.
    """
    store = anyStore
    addUser(store, ALICE, "pw")
    hugeHeader = b"Subject: huge\r\n" + (b"X-Pad: " + b"h" * 70 + b"\r\n") * (CHUNK_SIZE // 79 + 50) + b"\r\n"
    messages = [b"Subject: 1\r\n\r\none\r\n", hugeHeader + b"body\r\n", b"Subject: 3\r\n\r\nthree\r\n"]
    for message in messages:
        deliver(store, [ALICE], message)
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    openings = openingsOf(store, maildrop)
    try:
        assert readWhole(resultOf(maildrop.openMessage(0))) == messages[0]
        header = resultOf(maildrop.openMessage(1, headerOnly=True))
        assert header.headerSize == len(hugeHeader) and readWhole(header).startswith(hugeHeader)
        assert openings == [[1, 2, 3], [2]]
        assert [readWhole(resultOf(maildrop.openMessage(n))) for n in (1, 2)] == messages[1:]
        assert len(openings) == 2
    finally:
        resultOf(maildrop.release())


def test_chunksSurviveTheMoveToARowidTable(databaseURL):
    """
    Migration 4 moves SQLite's message chunks into a rowid table (and
    leaves PostgreSQL as it is): a database made at version 3 keeps every
    message octet for octet, and mail is still delivered and read after.
    """
    from mailgate.store.schema import _ensureVersionTable, applyMigration, currentVersion

    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    header = b"Subject: old\r\n\r\n"
    first = header + b"a" * 100 + b"\r\n"
    big = [b"x" * 1000, b"y" * 500]
    try:

        def atVersion3(cursor):
            _ensureVersionTable(cursor)
            for migration in MIGRATIONS[:3]:
                applyMigration(cursor, engine, migration)
            cursor.execute(
                "INSERT INTO users (address, domain, password_hash, created_at) VALUES (?, ?, ?, ?) RETURNING user_id",
                (ALICE, "example.org", credentials("pw").passwordHash, 0),
            )
            (userId,) = cursor.fetchone()
            cursor.execute(
                "INSERT INTO mailboxes (user_id, uid_validity, next_uid, used_octets, used_messages) "
                "VALUES (?, 7, 3, ?, 2)",
                (userId, len(first) + len(header) + sum(map(len, big))),
            )
            bodies = [("b1", [first], len(header)), ("b2", [header] + big, len(header))]
            for uid, (bodyId, chunks, headerSize) in enumerate(bodies, 1):
                size = sum(map(len, chunks))
                cursor.execute(
                    "INSERT INTO bodies (owner_id, body_id, size, header_size, refcount, created_at) "
                    "VALUES (?, ?, ?, ?, 1, 0)",
                    (userId, bodyId, size, headerSize),
                )
                for seq, chunk in enumerate(chunks):
                    cursor.execute(
                        "INSERT INTO body_chunks (owner_id, body_id, seq, data) VALUES (?, ?, ?, ?)",
                        (userId, bodyId, seq, chunk),
                    )
                cursor.execute(
                    "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                    (userId, uid, f"old{uid}", userId, bodyId, size, headerSize),
                )
            return currentVersion(cursor)

        assert runTransaction(engine, conn, atVersion3, (), {}, True) == 3
    finally:
        conn.close()
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(lambda c: currentVersion(c)) == LATEST
        if store.engine.name == "sqlite":
            (definition,) = store.database.run(
                lambda c: c.execute("SELECT sql FROM sqlite_master WHERE name = 'body_chunks'").fetchone()
            )
            assert "WITHOUT ROWID" not in definition.upper()
        deliver(store, [ALICE], b"Subject: new\r\n\r\nnew\r\n")
        maildrop = openFor(store, ALICE)
        try:
            assert resultOf(maildrop.uniqueIds(0, 2)) == ["old1", "old2"]
            assert readWhole(resultOf(maildrop.openMessage(0))) == first
            assert readWhole(resultOf(maildrop.openMessage(1))) == header + b"".join(big)
            assert resultOf(maildrop.openMessage(1, headerOnly=True)).whole == header
            assert readWhole(resultOf(maildrop.openMessage(2))) == b"Subject: new\r\n\r\nnew\r\n"
        finally:
            maildrop.release()
    finally:
        store.close()


def test_postgresStoresMessageChunksUncompressed(postgresURL):
    """
    Schema 7: on PostgreSQL a delivered message's chunks are stored as
    they are, not compressed (as SQLite stores them), and read back as
    they were delivered; a chunk stored compressed before reads the same.
    """
    store = openSynchronousStore(postgresURL)
    try:
        assert query(
            store,
            "SELECT attstorage FROM pg_attribute "
            "WHERE attrelid = 'body_chunks'::regclass AND attname = 'data'",
        ) == [("e",)]
        addUser(store, ALICE, "pw")
        text = b"Subject: text\r\n\r\n" + b"a line of plain text mail\r\n" * 400
        deliver(store, [ALICE], text)
        assert query(store, "SELECT pg_column_compression(data), octet_length(data) FROM body_chunks") == [
            (None, len(text))
        ]
        query(store, "ALTER TABLE body_chunks ALTER COLUMN data SET STORAGE EXTENDED")
        older = b"Subject: older\r\n\r\n" + b"mail stored before schema 7\r\n" * 400
        deliver(store, [ALICE], older)
        assert query(
            store, "SELECT pg_column_compression(data) FROM body_chunks ORDER BY 1 NULLS FIRST"
        ) == [(None,), ("pglz",)]
        maildrop = openFor(store, ALICE)
        try:
            assert readWhole(resultOf(maildrop.openMessage(0))) == text
            assert readWhole(resultOf(maildrop.openMessage(1))) == older
        finally:
            maildrop.release()
    finally:
        store.close()


def test_whetherAMessageNeedsStuffingIsKnownFromItsDelivery(anyStore):
    """
    A delivered message says whether POP3 must dot-stuff it (a line
    starting with "."), learnt at delivery; a row that does not know
    (stored before, or restored) is stuffed as before.
    """
    store = anyStore
    addUser(store, ALICE, "pw")
    deliver(store, [ALICE], b"Subject: plain\r\n\r\nnothing. to stuff\r\n")
    deliver(store, [ALICE], b"Subject: dotted\r\n\r\n.a dot line\r\n")
    deliver(store, [ALICE], b"Subject: plain too\r\n\r\nbody\r\n")
    query(store, "UPDATE maildrop SET dot_lines = NULL WHERE uid = (SELECT max(uid) FROM maildrop)")
    maildrop = openFor(store, ALICE)
    try:
        bodies = [resultOf(maildrop.openMessage(i)) for i in range(3)]
        assert [b.needsStuffing for b in bodies] == [False, True, True]
        assert resultOf(maildrop.openMessage(0, headerOnly=True)).needsStuffing is False
    finally:
        maildrop.release()


def test_dotLinePositionsReadAheadHoldFourOctetsEach(anyStore):
    """
    The positions of a message's dot lines are held as they are packed,
    four octets each, not as a tuple of C{int}s (some 36 octets each): a
    POP3 session's read-ahead of messages made of dot lines held ten
    times the read-ahead's octets (2.7 MB for seven 30 KB messages).
    """
    from mailgate.store.reads import unpackOffsets

    assert unpackOffsets(0, None) == ()
    assert unpackOffsets(1, None) is None
    assert unpackOffsets(1, b"\x01\x00\x00") is None
    assert list(unpackOffsets(2, b"\x07\x00\x00\x00\x00\x01\x00\x80")) == [7, 0x80000100]
    store = anyStore
    addUser(store, ALICE, "pw")
    dotted = b"Subject: dots\r\n\r\n" + b".\r\n" * 9_999
    for _ in range(8):
        deliver(store, [ALICE], dotted)
    maildrop = openFor(store, ALICE)
    try:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            first = resultOf(maildrop.openMessage(0))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        read = [first] + [resultOf(maildrop.openMessage(n)) for n in range(1, 8)]
        expected = [17 + 3 * n for n in range(9_999)]
        assert all(list(body.dotOffsets) == expected for body in read)
        # Seven messages read ahead with the first: their octets and
        # their positions (40 KB each) (2.7 MB with tuples).
        assert held < 2 * sqlStore.SQLMaildrop.readAheadOctets + 8 * 40_000, held
    finally:
        maildrop.release()


def test_whereDotLinesBeginIsKeptFromDelivery(anyStore):
    """
    A delivered message keeps where its lines that start with "." begin
    (POP3 then stuffs it by copying slices), for a message of one chunk
    and of several, and what POP3 sends from them is what stuffing by
    search sends; a row that does not know them gives C{None}.
    """
    from mailgate.pop3.dotstuff import stuffed
    from mailgate.pop3.responses import MessageBlocks

    store = anyStore
    addUser(store, ALICE, "pw")
    small = b"Subject: dotted\r\n\r\n.a dot line\r\nplain\r\n..two\r\n"
    line = b".x" + b"y" * 70 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + (line + b"z" * 70 + b"\r\n") * (3 * CHUNK_SIZE // 146)
    for data in (small, big, small):
        deliver(store, [ALICE], data)
    query(store, "UPDATE maildrop SET dot_at = NULL WHERE uid = (SELECT max(uid) FROM maildrop)")
    maildrop = openFor(store, ALICE)
    try:
        for index, data in enumerate((small, big)):
            body = resultOf(maildrop.openMessage(index))
            expected = [i for i in range(len(data)) if data[i] == 0x2E and (i == 0 or data[i - 1] == 0x0A)]
            assert list(body.dotOffsets) == expected
            source = MessageBlocks(body, None)
            sent = source.whole()
            while sent is None or not sent.endswith(b"\r\n.\r\n"):
                block = resultOf(source.nextBlock())
                sent = (sent or b"") + block
            assert sent == stuffed(data)
        assert resultOf(maildrop.openMessage(2)).dotOffsets is None
        assert resultOf(maildrop.openMessage(2)).needsStuffing is True
    finally:
        maildrop.release()


def test_aSmallMaildropsUniqueIdsComeWithTheLogin(anyStore, tripsTo):
    """
    The unique ids of a maildrop of up to SNAPSHOT_UNIQUE_IDS messages are
    read with the login's snapshot, so UIDL (asked by nearly every client
    that leaves mail on the server) costs no trip to the database; a
    larger maildrop's are read when asked, a range at a time.
    """
    from mailgate.store.snapshot import SNAPSHOT_UNIQUE_IDS

    store = anyStore
    addUser(store, ALICE, "pw")
    delivered = [deliver(store, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % n)[ALICE] for n in range(5)]
    maildrop = openFor(store, ALICE)
    try:
        trips = tripsTo(store)
        assert resultOf(maildrop.uniqueIds(0, 5)) == delivered
        assert resultOf(maildrop.uniqueIds(3, 1)) == delivered[3:4]
        assert resultOf(maildrop.uniqueIds(5, 1)) == []
        assert trips == []
    finally:
        maildrop.release()
    message = spoolBytes(b"Subject: many\r\n\r\nbody\r\n")
    for _ in range(SNAPSHOT_UNIQUE_IDS + 1 - len(delivered)):
        delivered.append(resultOf(store.deliver([ALICE], message))[ALICE])
    maildrop = openFor(store, ALICE)
    try:
        trips = tripsTo(store)
        assert resultOf(maildrop.uniqueIds(0, len(delivered))) == delivered
        assert resultOf(maildrop.uniqueIds(1000, 2)) == delivered[1000:]
        assert trips == ["_uniqueIds", "_uniqueIds"]
        # A message gone behind the session's back (not by its own QUIT)
        # is a temporary failure of the listing, not a listing without it.
        query(store, "DELETE FROM maildrop WHERE uidl = ?", (delivered[500],))
        with pytest.raises(TemporaryFailure, match="vanished"):
            resultOf(maildrop.uniqueIds(0, len(delivered)))
        assert resultOf(maildrop.uniqueIds(501, 3)) == delivered[501:504]
    finally:
        maildrop.release()


def _insertOrNote(cursor, key):
    # A write that goes on after its own statement failed (as one that
    # catches a unique violation does): in PostgreSQL's pipeline, what it
    # runs next is refused as "pipeline aborted".
    try:
        cursor.execute("INSERT INTO t (k, v) VALUES (?, 0)", (key,))
        cursor.execute("SELECT 1").fetchone()
    except Exception:
        pass
    cursor.execute("SELECT count(*) FROM t").fetchone()
    return key


def _insertTogether(cursor, calls):
    return [_insert(cursor, *args, **kwargs) for args, kwargs in calls]


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aPipelinedBatchWhoseOneWriteIsAbortedCommitsTheOthers(batchConnection):
    """
    A batch run in PostgreSQL's pipeline where one write goes on after
    its failed statement, and so meets "pipeline aborted": that is the
    write failing, not the connection lost.  The batch runs again with
    savepoints, the others are committed, on the same connection; taken
    for a lost connection, the batch ran three times on new connections
    and every write in it failed.
    """
    from mailgate.store.database import BatchableWrite

    engine, conn, _, path = batchConnection
    runBatch(engine, conn, [(_insert, ("a", 1), {})])
    insert = BatchableWrite(_insert, _insertTogether, pipelined=True)
    aborted = BatchableWrite(_insertOrNote, None, pipelined=True)
    results = runBatch(
        engine, conn, [(insert, ("b", 2), {}), (aborted, ("a",), {}), (insert, ("c", 3), {})]
    )
    assert results[0] == (True, "b") and results[2] == (True, "c")
    assert not results[1][0]
    assert _committedRows(path) == {"a": 1, "b": 2, "c": 3}
    assert not conn.closed and not _inTransaction(engine, conn)


def test_twoNodesBatchesUpdatingTheSameMailboxesInOtherOrdersDoNotDeadlock(postgresURL):
    """
    Two nodes' group commits each remove a message of Alice's and one of
    Bob's (two QUITs), in opposite orders: both commit, neither runs
    again.  Each write locked its user's row as it went, so the first
    held Alice's and waited for Bob's while the second held Bob's and
    waited for Alice's: a deadlock, which PostgreSQL breaks after a second
    by failing one (run again; under load, failing again, until the
    client got -ERR [SYS/TEMP] or 451).  Now each batch locks the rows
    its writes declare, in one order, before the first.  The interleaving
    is forced: a write between the two (of Carol's row, which a third
    transaction holds) keeps both batches past their first write.
    """
    from collections import Counter

    from test_duplicates import _inThread, _waitUntilWaiting, _watcher

    from mailgate.store.rows import removeMessages

    node = memoryStore(postgresURL)
    engine = node.engine
    connections = [engine.connect(), engine.connect()]
    threads = []
    try:
        for address in (ALICE, BOB, CAROL):
            addUser(node, address, "secret")
        for n in range(2):
            deliver(node, [ALICE, BOB], b"Subject: %d\r\n\r\nhello\r\n" % n)
        ids = {a: query(node, "SELECT user_id FROM users WHERE address = ?", (a,))[0][0] for a in (ALICE, BOB, CAROL)}
        uids = {
            a: [row[0] for row in query(node, "SELECT uid FROM maildrop WHERE user_id = ? ORDER BY uid", (ids[a],))]
            for a in (ALICE, BOB)
        }
        runs = Counter()

        def carols(cursor, name):
            runs[name] += 1
            cursor.execute("UPDATE mailboxes SET used_messages = used_messages WHERE user_id = ?", (ids[CAROL],))

        holder = node.database.connection
        engine.begin(holder, True).execute(
            "UPDATE mailboxes SET used_messages = used_messages WHERE user_id = ?", (ids[CAROL],)
        )
        outcomes = []
        with _watcher(postgresURL) as watcher:
            for n, (conn, (first, second)) in enumerate(zip(connections, ((ALICE, BOB), (BOB, ALICE)))):
                batch = [
                    (removeMessages, (ids[first], [uids[first][n]]), {}),
                    (carols, (n,), {}),
                    (removeMessages, (ids[second], [uids[second][n]]), {}),
                ]
                thread, outcome = _inThread(lambda conn=conn, batch=batch: runBatch(engine, conn, batch))
                threads.append(thread)
                outcomes.append(outcome)
                _waitUntilWaiting(watcher, conn, thread)
        engine.rollback(holder)
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads), "a batch did not finish"
        for [(kind, results)] in outcomes:
            assert kind == "ok", results
            assert [ok for ok, _ in results] == [True] * 3, results
        assert runs == {0: 1, 1: 1}, f"a batch ran again (it lost a deadlock): {runs}"
        assert query(node, "SELECT count(*) FROM maildrop")[0][0] == 0
        for address in (ALICE, BOB):
            assert resultOf(node.quotaOf(address)).usedMessages == 0
    finally:
        for conn in connections:
            conn.close()
        node.close()


#: seconds a thread of the test below waits for another, at most
_WAIT = 20


class _Watched:
    """
    A cursor as L{mailgate.interfaces.IEngine.begin} gives it, whose
    statements that lose a deadlock are recorded in C{lost}, and which,
    given C{pause} (two events), stops after its first UPDATE of
    C{bodies} until the test lets it go on.
    """

    def __init__(self, cursor, name, lost, pause=None):
        self._cursor, self._name, self._lost, self._pause = cursor, name, lost, pause

    def execute(self, statement, params=()):
        import psycopg

        try:
            self._cursor.execute(statement, params)
        except psycopg.errors.DeadlockDetected:
            self._lost.append(self._name)
            raise
        if self._pause is not None and "UPDATE bodies" in statement:
            paused, goOn = self._pause
            self._pause = None
            paused.set()
            assert goOn.wait(_WAIT), "the test never let the release go on"
        return self

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def test_twoQuitsReleasingTheSameSharedBodiesInRunsCutDifferentlyDoNotDeadlock(postgresURL, monkeypatch):
    """
    Alice's QUIT and Bob's on two nodes delete messages both were sent,
    whose bodies they share, Bob one more than Alice, so that his
    release cuts its runs (L{rows.IN_BATCH}, 2 here for 500) elsewhere:
    his first run holds the body of lower id of the two Alice releases,
    and waits, while hers, one run, takes the other (the table's order,
    on a table small enough to be scanned) and waits for his.  PostgreSQL
    broke it after its deadlock_timeout, failing one (run again, a second
    late).  Now each run locks its bodies in the order of their ids
    before its UPDATE: neither statement loses a deadlock, and the bodies
    both let go of are gone, the one Alice keeps stays, with one
    reference.  The interleaving is forced: Bob's release stops after its
    first run until Alice's waits for it.
    """
    from test_duplicates import _inThread, _waitUntilWaiting, _watcher

    from mailgate.store import rows

    monkeypatch.setattr(rows, "IN_BATCH", 2)
    node = memoryStore(postgresURL)
    stores = {ALICE: memoryStore(postgresURL), BOB: memoryStore(postgresURL)}
    lost = []
    paused, goOn = threading.Event(), threading.Event()
    threads = []
    try:
        addUser(node, ALICE, "pw")
        addUser(node, BOB, "pw")
        # Three bodies, of ids k0 < k1 < k2, where k2 lies before k1 in the
        # table: with random ids, a few deliveries give them.
        for n in range(40):
            deliver(node, [ALICE, BOB], b"Subject: %d\r\n\r\nhello\r\n" % n)
            inTable = [bodyId for (bodyId,) in query(node, "SELECT body_id FROM bodies ORDER BY ctid")]
            ordered = sorted(inTable)
            found = [
                (ordered[i - 1], ordered[i], later)
                for i in range(1, len(ordered))
                for later in ordered[i + 1 :]
                if inTable.index(later) < inTable.index(ordered[i])
            ]
            if found:
                break
        k0, k1, k2 = found[0]
        # What autovacuum does to a table: its plan is then the scan of a
        # small table.
        query(node, "ANALYZE bodies")
        for address, store in stores.items():
            begin = store.engine.begin
            pause = (paused, goOn) if address == BOB else None
            store.engine.begin = lambda conn, write, begin=begin, name=address, pause=pause: _Watched(
                begin(conn, write), name, lost, pause
            )

        def quit(address, bodyIds):
            uids = {
                uid for (uid,) in query(
                    node, "SELECT m.uid FROM maildrop m JOIN users u ON u.user_id = m.user_id "
                    f"WHERE u.address = ? AND m.body_id IN ({','.join('?' * len(bodyIds))})",
                    (address, *bodyIds),
                )
            }
            maildrop = openFor(stores[address], address)
            try:
                return resultOf(maildrop.expunge([i for i, uid in enumerate(maildrop._uids) if uid in uids]))
            finally:
                maildrop.release()

        bobs, bobsOutcome = _inThread(lambda: quit(BOB, [k0, k1, k2]))
        threads.append(bobs)
        assert paused.wait(_WAIT), "Bob's release never ran its first run"
        with _watcher(postgresURL) as watcher:
            alices, alicesOutcome = _inThread(lambda: quit(ALICE, [k1, k2]))
            threads.append(alices)
            _waitUntilWaiting(watcher, stores[ALICE].database.connection, alices)
        goOn.set()
        for thread in threads:
            thread.join(_WAIT)
        assert not any(thread.is_alive() for thread in threads), "a release did not finish"
        assert (alicesOutcome, bobsOutcome) == ([("ok", 2)], [("ok", 3)])
        assert lost == [], f"a release lost a deadlock (and ran again): {lost}"
        shared = query(node, "SELECT body_id, refcount FROM bodies WHERE body_id IN (?, ?, ?)", (k0, k1, k2))
        assert shared == [(k0, 1)]
        assert query(node, "SELECT count(*) FROM body_chunks WHERE body_id IN (?, ?)", (k1, k2)) == [(0,)]
        others = query(node, "SELECT refcount, count(*) FROM bodies WHERE body_id <> ? GROUP BY refcount", (k0,))
        assert others in ([], [(2, len(inTable) - 3)])
    finally:
        goOn.set()
        for thread in threads:
            thread.join(_WAIT)
        for store in (*stores.values(), node):
            store.close()


class _Recorded:
    """
    A cursor as L{mailgate.interfaces.IEngine.begin} gives it, whose
    statements are recorded in C{statements}.
    """

    def __init__(self, cursor, statements):
        self._cursor, self._statements = cursor, statements

    def execute(self, statement, params=()):
        self._statements.append(statement)
        self._cursor.execute(statement, params)
        return self

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def test_aQuitReleasingSeveralBodiesTakesOneStatementToDropTheirReferences(postgresURL):
    """
    A QUIT whose messages were the last references to two bodies drops
    the references in one statement, which also locks the rows in the
    order of their ids (see the test above), then deletes the chunks and
    the bodies: three statements, three round trips.  fd7a830 locked them
    with a SELECT of its own first, a round trip more for every QUIT that
    released two bodies or more.
    """
    store = memoryStore(postgresURL)
    statements = []
    try:
        addUser(store, ALICE, "pw")
        for n in range(2):
            deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
        begin = store.engine.begin
        store.engine.begin = lambda conn, write: _Recorded(begin(conn, write), statements)
        maildrop = openFor(store, ALICE)
        try:
            assert resultOf(maildrop.expunge([0, 1])) == 2
        finally:
            maildrop.release()
        touching = [s.split()[0] + " " + ("body_chunks" if "body_chunks" in s else "bodies")
                    for s in statements if "bodies" in s or "body_chunks" in s]
        assert touching == ["WITH bodies", "DELETE body_chunks", "DELETE bodies"], statements
        assert query(store, "SELECT count(*) FROM bodies") == [(0,)]
    finally:
        store.close()


def test_theWritesThatUpdateMailboxesSayWhose(store):
    """
    What the group-commit writer locks up front (see the test above):
    each write that updates users' C{mailboxes} rows declares them, with
    its own arguments: a delivery its recipients (looked up if need be),
    a QUIT's removal (kept for recovery or not, under its lock's guard)
    the user, the registry's writes the users whose last logins they
    record.
    """
    from mailgate.store.database import _mailboxesOf
    from mailgate.store.guarded import Guarded
    from mailgate.store.recovery import _keepDeleted
    from mailgate.store.registry import _leave, _sync
    from mailgate.store.rows import removeMessages
    from mailgate.store.sql import NO_QUOTA, _deliver, _recordLogin

    for address in (ALICE, BOB):
        addUser(store, address, "secret")
    alice, bob = (query(store, "SELECT user_id FROM users WHERE address = ?", (a,))[0][0] for a in (ALICE, BOB))
    cursor = store.engine.begin(store.database.connection, True)
    try:
        spool = spoolBytes(b"Subject: x\r\n\r\nhello\r\n")
        batch = [
            (_deliver, (store.engine, [ALICE, BOB, "nobody@example.org"], spool, 0, True, {}, NO_QUOTA, 0), {}),
            (removeMessages, (101, [1]), {}),
            (Guarded(lambda cursor: True, _keepDeleted), (102, [1], 0, None), {}),
            (Guarded(lambda cursor: True, removeMessages), (103, [1]), {}),
            (_sync, ((1, "node", 0, "{}"), 0, [], [], None, [(104, 5)]), {}),
            (_sync, ((1, "node", 0, "{}"), 0, [], [], None), {"logins": [(107, 5)]}),
            (_sync, ((1, "node", 0, "{}"), 0, [], [], None), {}),
            (_leave, (1, [(105, 5)]), {}),
            (_leave, (1,), {}),
            (_recordLogin, (106, 0, 0), {}),
            (lambda cursor: None, (), {}),
        ]
        assert _mailboxesOf(cursor, batch) == {alice, bob, 101, 102, 103, 104, 105, 106, 107}
        spool.close()
    finally:
        store.engine.rollback(store.database.connection)


def test_aWriteOfItsOwnTransactionLocksItsMailboxesFirstToo(postgresURL):
    """
    A write run as a transaction of its own (the admin command's, e.g.
    C{mailgate deliver} to two users, whose counter update locks the rows
    in the order the plan finds them; or a batch's write run again alone)
    locks the rows it declares before it runs, in the same order as a
    node's batch: seen from another connection, Bob's row is locked while
    the write has not touched it yet.
    """
    import psycopg

    from test_duplicates import _watcher

    from mailgate.store.database import runTransaction, updatesMailboxes

    node = memoryStore(postgresURL)
    engine = node.engine
    conn = engine.connect()
    try:
        for address in (ALICE, BOB):
            addUser(node, address, "secret")
        ids = [query(node, "SELECT user_id FROM users WHERE address = ?", (a,))[0][0] for a in (ALICE, BOB)]
        seen = []

        with _watcher(postgresURL) as watcher:

            @updatesMailboxes(lambda cursor: ids)
            def write(cursor):
                try:
                    watcher.execute("SELECT 1 FROM mailboxes WHERE user_id = %s FOR UPDATE NOWAIT", (ids[1],))
                    seen.append("free")
                except psycopg.errors.LockNotAvailable:
                    seen.append("locked")
                cursor.execute("UPDATE mailboxes SET used_messages = used_messages WHERE user_id = ?", (ids[0],))

            runTransaction(engine, conn, write, (), {}, True)
        assert seen == ["locked"]
    finally:
        conn.close()
        node.close()
