"""
Master users in the store (L{mailgate.store.masterusers}): names and
password hashes that log in to any user's maildrop, as Dovecot's master
users do; on a real SQLite file and on the real PostgreSQL.  Schema 18
adds their table to a database as schema 17 left it, and C{mailgate db
copy} carries them to the new database.
"""

import threading

import pytest
from zope.interface.verify import verifyObject

from mailgate.auth.passwords import makeCredentials, verifyPassword
from mailgate.errors import MasterUserExists, NoSuchMasterUser
from mailgate.interfaces import ILifecycleStore, IMailStore
from mailgate.records import MasterUserRecord
from mailgate.store import openSynchronousStore
from mailgate.store.schema import LATEST, currentVersion
from mailgate.testing import TEST_HASH_COST, POP3Session, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"


def hashOf(password):
    return makeCredentials(password, apop=False, logN=TEST_HASH_COST).passwordHash


@pytest.fixture
def store(databaseURL):
    store = memoryStore(databaseURL)
    yield store
    store.close()


def test_theStoreStillProvidesBothInterfaces(store):
    assert verifyObject(IMailStore, store)
    assert verifyObject(ILifecycleStore, store)


def test_aMasterUserIsAddedFoundChangedListedAndRemoved(store):
    admin, helpdesk = hashOf("admin secret"), hashOf("help")
    assert resultOf(store.findMasterUser("admin")) is None
    assert resultOf(store.listMasterUsers()) == []
    assert resultOf(store.addMasterUser("admin", admin)) is None
    # Names in code point order: "-" (0x2d) before "." (0x2e) before
    # letters, whatever the database's collation says.
    for name in ("help.desk", "help-desk", "backup@example.org"):
        resultOf(store.addMasterUser(name, helpdesk))
    found = resultOf(store.findMasterUser("admin"))
    assert (found.name, found.passwordHash) == ("admin", admin)
    assert isinstance(found.createdAt, int) and found.createdAt > 0
    assert verifyPassword("admin secret", found.passwordHash)
    listed = [m.name for m in resultOf(store.listMasterUsers())]
    assert listed == ["admin", "backup@example.org", "help-desk", "help.desk"]

    resultOf(store.setMasterUserPassword("admin", hashOf("new one")))
    changed = resultOf(store.findMasterUser("admin"))
    assert verifyPassword("new one", changed.passwordHash)
    assert not verifyPassword("admin secret", changed.passwordHash)
    assert changed.createdAt == found.createdAt

    resultOf(store.removeMasterUser("help.desk"))
    assert resultOf(store.findMasterUser("help.desk")) is None
    assert [m.name for m in resultOf(store.listMasterUsers())] == ["admin", "backup@example.org", "help-desk"]


def test_aMasterUsersNetworksAreKeptSetAndLifted(store):
    resultOf(store.addMasterUser("admin", hashOf("a"), "192.0.2.0/24"))
    resultOf(store.addMasterUser("backup", hashOf("b")))
    assert resultOf(store.findMasterUser("admin")).allowedNetworks == "192.0.2.0/24"
    assert resultOf(store.findMasterUser("backup")).allowedNetworks is None
    assert resultOf(store.setMasterUserNetworks("backup", "local")) is None
    assert resultOf(store.setMasterUserNetworks("admin", None)) == "192.0.2.0/24"
    assert [(m.name, m.allowedNetworks) for m in resultOf(store.listMasterUsers())] == [
        ("admin", None), ("backup", "local"),
    ]
    with pytest.raises(NoSuchMasterUser):
        resultOf(store.setMasterUserNetworks("nobody", None))


def test_theRefusals(store):
    resultOf(store.addMasterUser("admin", hashOf("one")))
    with pytest.raises(MasterUserExists):
        resultOf(store.addMasterUser("admin", hashOf("two")))
    # The first one's password stands.
    assert verifyPassword("one", resultOf(store.findMasterUser("admin")).passwordHash)
    with pytest.raises(NoSuchMasterUser):
        resultOf(store.setMasterUserPassword("nobody", hashOf("x")))
    with pytest.raises(NoSuchMasterUser):
        resultOf(store.removeMasterUser("nobody"))
    resultOf(store.removeMasterUser("admin"))
    with pytest.raises(NoSuchMasterUser):
        resultOf(store.removeMasterUser("admin"))


def test_aMasterUserIsNoUserAndAUserNoMasterUser(store):
    """
    The names are apart from the users' addresses: a user of the same
    name is not found as a master user, nor the other way round, and
    removing either leaves the other.
    """
    addUser(store, ALICE, "alice's")
    resultOf(store.addMasterUser(ALICE, hashOf("master's")))
    assert resultOf(store.findUser(ALICE)).address == ALICE
    resultOf(store.addMasterUser("admin", hashOf("x")))
    assert resultOf(store.findUser("admin")) is None
    resultOf(store.deleteUser(ALICE))
    assert resultOf(store.findMasterUser(ALICE)).name == ALICE
    assert resultOf(store.findUser(ALICE)) is None


def test_aRecordsReprShowsNoPasswordMaterial(store):
    secret = hashOf("admin secret")
    resultOf(store.addMasterUser("admin", secret))
    record = resultOf(store.findMasterUser("admin"))
    assert repr(record) == "<MasterUserRecord admin>"
    assert repr(resultOf(store.listMasterUsers())) == "[<MasterUserRecord admin>]"


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_twoAddingTheSameNameAtOnceOneIsRefused(databaseURL, store):
    """
    Two commands (two nodes' administrators) adding the same master user
    at once on PostgreSQL: the one that commits second is told it exists
    (MasterUserExists, not a database error), and the first one's
    password stands.
    """
    import psycopg

    from e2e import DEADLINE, waitFor

    first = psycopg.connect(databaseURL)
    outcome = []
    try:
        first.execute(
            "INSERT INTO master_users (name, password_hash, created_at) VALUES ('admin', %s, 1)", (hashOf("first"),)
        )
        backend = first.info.backend_pid

        def second():
            try:
                outcome.append(resultOf(store.addMasterUser("admin", hashOf("second"))))
            except Exception as e:
                outcome.append(e)

        adding = threading.Thread(target=second, daemon=True)
        adding.start()
        with psycopg.connect(databaseURL, autocommit=True) as watcher:

            def waiting():
                # The second insert is waiting for the first one's lock.
                return watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> %s", (backend,)
                ).fetchone()[0]

            waitFor(waiting, "the second add to wait for the first")
        first.commit()
        adding.join(DEADLINE)
        assert not adding.is_alive()
    finally:
        first.close()
    assert len(outcome) == 1 and isinstance(outcome[0], MasterUserExists), outcome
    assert verifyPassword("first", resultOf(store.findMasterUser("admin")).passwordHash)


def test_schema17GainsTheTableAndKeepsEverything(databaseURL):
    """
    A database as the mailgate before this one left it (schema 17), with
    a user, his mail and an alias: migrated, all is as it was, and master
    users can be added.
    """
    from databasefiles import olderSchema, olderUser

    olderSchema(databaseURL, version=17)

    def alias(cursor, userId):
        assert currentVersion(cursor) == 17
        cursor.execute(
            "INSERT INTO aliases (address, domain, user_id, created_at) VALUES (?, 'example.org', ?, 1700000000)",
            ("abuse@example.org", userId),
        )

    olderUser(databaseURL, ALICE, makeCredentials("alice's", logN=TEST_HASH_COST), then=alias)
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(currentVersion) == LATEST
        deliver(store, [ALICE], b"Subject: after the upgrade\r\n\r\nhello\r\n")
        assert resultOf(store.findAlias("abuse@example.org")) == ALICE
        assert resultOf(store.listMasterUsers()) == []
        resultOf(store.addMasterUser("admin", hashOf("x")))
        assert [m.name for m in resultOf(store.listMasterUsers())] == ["admin"]
        session = POP3Session(store)
        assert session.login(ALICE, "alice's").startswith("+OK")
        assert session.command("STAT").startswith("+OK 1 ")
        session.command("QUIT")
    finally:
        store.close()


@pytest.mark.parametrize("direction", ["sqlite to postgres", "postgres to sqlite"])
def test_aDatabaseCopyCarriesTheMasterUsers(tmp_path, postgresURL, direction):
    """
    C{mailgate db copy} to the other engine: the master users are there
    with their password hashes and when they were added, and it says how
    many it copied.  A target with master users of its own is refused as
    one with users is (exit 73), and left as it was.
    """
    from e2e import mailgateHere

    sqliteURL = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    source, target = (sqliteURL, postgresURL) if direction == "sqlite to postgres" else (postgresURL, sqliteURL)
    store = openSynchronousStore(source)
    try:
        addUser(store, ALICE, "alice's")
        resultOf(store.addMasterUser("admin", hashOf("admin secret")))
        resultOf(store.addMasterUser("backup", hashOf("backup secret"), "192.0.2.0/24,local"))
        before = resultOf(store.listMasterUsers())
    finally:
        store.close()
    code, out, err = mailgateHere(source, "db", "copy", "--from", source, "--to", target)
    assert (code, err) == (0, ""), out
    assert out.splitlines()[-1] == "copied 2 master users"
    copied = openSynchronousStore(target)
    try:
        after = resultOf(copied.listMasterUsers())
        assert [(m.name, m.passwordHash, m.createdAt, m.allowedNetworks) for m in after] == [
            (m.name, m.passwordHash, m.createdAt, m.allowedNetworks) for m in before
        ]
        assert after[1].allowedNetworks == "192.0.2.0/24,local"
        assert verifyPassword("admin secret", resultOf(copied.findMasterUser("admin")).passwordHash)
    finally:
        copied.close()

    # A fresh target with only a master user of its own: refused.
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    store = openSynchronousStore(other)
    try:
        resultOf(store.addMasterUser("admin", hashOf("the target's")))
    finally:
        store.close()
    code, out, err = mailgateHere(source, "db", "copy", "--from", source, "--to", other)
    assert (code, out) == (73, "")
    assert err == "mailgate: the target database already has master users; copy into an empty database\n"
    store = openSynchronousStore(other)
    try:
        assert [m.name for m in resultOf(store.listMasterUsers())] == ["admin"]
        assert verifyPassword("the target's", resultOf(store.findMasterUser("admin")).passwordHash)
        assert resultOf(store.findUser(ALICE)) is None
    finally:
        store.close()

