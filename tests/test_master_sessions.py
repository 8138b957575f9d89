"""
What an administrator sees of a master user's POP3 session (a helpdesk's,
a backup tool's login to a user's maildrop): the session registry
(C{mailgate who}) records the master user's name, and so does the mail
it deletes where deleted mail is kept (C{mailgate mailbox deleted}), on a
real SQLite file and on the real PostgreSQL; schema 19 adds both columns
to a database as schema 18 left it, and C{mailgate db copy} carries the
deletions' master users.  A user's own session records none.

The login path itself: tests/test_master_logins.py; on a real server:
tests/test_master_logins_e2e.py.
"""

import json
import time

import pytest

from e2e import mailgateHere
from mailgate.auth.passwords import makeCredentials
from mailgate.store import openSynchronousStore
from mailgate.store.schema import LATEST, currentVersion
from mailgate.testing import TEST_HASH_COST, POP3Session, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
TRUSTED = ("127.0.0.0/8",)


@pytest.fixture
def store(databaseURL):
    store = memoryStore(databaseURL)
    addUser(store, ALICE, "alice-pw")
    addUser(store, BOB, "bob-pw")
    for n in range(2):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nfor alice\r\n" % n)
    deliver(store, [BOB], b"Subject: bob's\r\n\r\nfor bob\r\n")
    resultOf(store.addMasterUser("admin", makeCredentials("admin-pw", logN=TEST_HASH_COST).passwordHash))
    yield store
    store.close()


def _session(store):
    return POP3Session(
        store, apop=False, trustedNetworks=TRUSTED, masterUsers=True, masterUserSeparator="*"
    )


def test_theRegistryRecordsTheMasterUserOfASession(store):
    helpdesk, own = _session(store), _session(store)
    assert helpdesk.login(f"{ALICE}*Admin", "admin-pw").startswith(f"+OK {ALICE} has 2 messages")
    assert own.login(BOB, "bob-pw").startswith(f"+OK {BOB} has 1 message")
    resultOf(store.sessions.flush())
    listed = {s.address: s.master for s in resultOf(store.listSessions())}
    # The master user's name as logins give it (small letters), none for
    # bob's own login.
    assert listed == {ALICE: "admin", BOB: None}
    assert [s.master for s in resultOf(store.listSessions(ALICE))] == ["admin"]
    helpdesk.command("QUIT")
    own.command("QUIT")
    resultOf(store.sessions.flush())
    assert resultOf(store.listSessions()) == []


def test_theMailAMasterUserDeletesIsKeptWithItsName(store):
    store.limits.keepDeletedDays = 7
    helpdesk = _session(store)
    assert helpdesk.login(f"{ALICE}*admin", "admin-pw").startswith("+OK")
    assert helpdesk.command("DELE 2").startswith("+OK")
    assert helpdesk.command("QUIT").startswith("+OK")
    own = _session(store)
    assert own.login(ALICE, "alice-pw").startswith("+OK")
    assert own.command("DELE 1").startswith("+OK")
    assert own.command("QUIT").startswith("+OK")

    kept = resultOf(store.listDeleted(ALICE))
    # In maildrop order: her own deletion of message 1, the helpdesk's of 2.
    assert [(k.number, k.deletedBy, k.deletedByMaster) for k in kept] == [
        (1, "127.0.0.1:40000", None), (2, "127.0.0.1:40000", "admin"),
    ]
    # The listing the command reads a page at a time says the same.
    paged = list(resultOf(store.listDeleted(ALICE, page=1)))
    assert [(k.uniqueId, k.deletedByMaster) for k in paged] == [(k.uniqueId, k.deletedByMaster) for k in kept]
    # Restored, it is alice's mail as any other.
    restored, missing = resultOf(store.restoreDeleted(ALICE, [kept[1].uniqueId]))
    assert (len(restored), missing) == (1, [])
    assert [k.uniqueId for k in resultOf(store.listDeleted(ALICE))] == [kept[0].uniqueId]


def test_aMasterUsersDeletionWithoutKeptMailLeavesNoRow(store):
    """
    Where deleted mail is not kept (no --keep-deleted-days, no node that
    keeps it), a master user's deletion removes the mail as a user's does.
    """
    helpdesk = _session(store)
    assert helpdesk.login(f"{ALICE}*admin", "admin-pw").startswith("+OK")
    assert helpdesk.command("DELE 1").startswith("+OK")
    assert helpdesk.command("QUIT").startswith("+OK")
    assert resultOf(store.listDeleted(ALICE)) == []
    assert len(resultOf(store.listMessages(ALICE))) == 1


def _atSchema18(cursor, userId):
    """
    What a node of schema 18 left for alice: a message deleted by POP3
    and kept (its body and chunk), and the row of her session in progress
    on a live node, in the columns schema 18 has.
    """
    now = int(time.time())
    data = b"Subject: kept\r\n\r\nfrom before\r\n"
    cursor.execute(
        "INSERT INTO bodies (owner_id, body_id, size, header_size, refcount, created_at) "
        "VALUES (?, 'old', ?, 17, 1, ?)",
        (userId, len(data), now - 100),
    )
    cursor.execute("INSERT INTO body_chunks (owner_id, body_id, seq, data) VALUES (?, 'old', 0, ?)", (userId, data))
    cursor.execute(
        "INSERT INTO deleted_mail (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at, "
        "deleted_at, deleted_by) VALUES (?, 1, 'OLD1', ?, 'old', ?, 17, ?, ?, '192.0.2.7:4000')",
        (userId, userId, len(data), now - 100, now - 50),
    )
    cursor.execute("UPDATE mailboxes SET next_uid = 2 WHERE user_id = ?", (userId,))
    cursor.execute(
        "INSERT INTO mailgate_nodes (node_id, name, started_at, seen_at) VALUES ('old-node', 'old[1]', ?, ?)",
        (now - 60, now + 3600),
    )
    cursor.execute(
        "INSERT INTO pop3_sessions (user_id, session_id, node_id, peer, since) "
        "VALUES (?, 'old-node.1', 'old-node', '192.0.2.8:4001', ?)",
        (userId, now - 10),
    )


def test_schema18GainsTheColumnsAndKeepsEverything(databaseURL):
    """
    A database as the mailgate before this one left it (schema 18): its
    kept deleted message and its session row (a node of schema 18 still
    running while the others are upgraded writes such rows too) are
    listed with no master user, the message is restored and served, and
    a master user's deletion after the upgrade is kept with its name.
    C{db check} finds the upgraded database sound.
    """
    from databasefiles import olderSchema, olderUser

    olderSchema(databaseURL, version=18)
    olderUser(databaseURL, ALICE, makeCredentials("alice-pw", logN=TEST_HASH_COST), then=_atSchema18)
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(currentVersion) == LATEST >= 19
        [session] = resultOf(store.listSessions())
        assert (session.address, session.peer, session.master) == (ALICE, "192.0.2.8:4001", None)
        # A node of schema 18 still running writes its rows as it did.
        store.database.run(
            lambda cursor: cursor.execute(
                "INSERT INTO pop3_sessions (user_id, session_id, node_id, peer, since) "
                "SELECT user_id, 'old-node.2', 'old-node', '192.0.2.9:4002', since FROM pop3_sessions"
            ),
            write=True,
        )
        assert sorted((s.peer, s.master) for s in resultOf(store.listSessions())) == [
            ("192.0.2.8:4001", None), ("192.0.2.9:4002", None),
        ]
        [kept] = resultOf(store.listDeleted(ALICE))
        assert (kept.uniqueId, kept.deletedBy, kept.deletedByMaster) == ("OLD1", "192.0.2.7:4000", None)
        code, out, err = mailgateHere(databaseURL, "db", "check")
        assert (code, err) == (0, ""), out
        code, out, err = mailgateHere(databaseURL, "mailbox", "deleted", ALICE, "--json")
        assert (code, err) == (0, "")
        assert [(r["from"], r["master"]) for r in map(json.loads, out.splitlines())] == [("192.0.2.7:4000", None)]

        # The old node's session ends (its node's rows go), and the mail
        # comes back and is served.
        store.database.run(
            lambda cursor: cursor.execute("DELETE FROM pop3_sessions WHERE node_id = 'old-node'"), write=True
        )
        resultOf(store.restoreDeleted(ALICE, ["OLD1"]))
        resultOf(store.addMasterUser("admin", makeCredentials("admin-pw", logN=TEST_HASH_COST).passwordHash))
        store.limits.keepDeletedDays = 7
        helpdesk = _session(store)
        assert helpdesk.login(f"{ALICE}*admin", "admin-pw").startswith(f"+OK {ALICE} has 1 message")
        assert helpdesk.command("RETR 1").endswith("\r\nfrom before\r\n.\r\n")
        assert helpdesk.command("DELE 1").startswith("+OK")
        assert helpdesk.command("QUIT").startswith("+OK")
        [kept] = resultOf(store.listDeleted(ALICE))
        assert (kept.uniqueId, kept.deletedBy, kept.deletedByMaster) == ("OLD1", "127.0.0.1:40000", "admin")
    finally:
        store.close()


@pytest.mark.parametrize("direction", ["sqlite to postgres", "postgres to sqlite"])
def test_aDatabaseCopyCarriesWhichMasterUserDeletedTheMail(tmp_path, postgresURL, direction):
    """
    C{mailgate db copy} to the other engine: the kept deleted mail comes
    with the master user whose session deleted it (and none for the
    user's own deletion), as C{mailbox deleted} shows it on both.
    """
    sqliteURL = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    source, target = (sqliteURL, postgresURL) if direction == "sqlite to postgres" else (postgresURL, sqliteURL)
    store = memoryStore(source)
    try:
        addUser(store, ALICE, "alice-pw")
        for n in range(2):
            deliver(store, [ALICE], b"Subject: %d\r\n\r\nfor alice\r\n" % n)
        resultOf(store.addMasterUser("admin", makeCredentials("admin-pw", logN=TEST_HASH_COST).passwordHash))
        store.limits.keepDeletedDays = 7
        for login, password, number in ((f"{ALICE}*admin", "admin-pw", 2), (ALICE, "alice-pw", 1)):
            session = _session(store)
            assert session.login(login, password).startswith("+OK")
            assert session.command(f"DELE {number}").startswith("+OK")
            assert session.command("QUIT").startswith("+OK")
    finally:
        store.close()
    before = mailgateHere(source, "mailbox", "deleted", ALICE, "--json")
    assert [json.loads(line)["master"] for line in before[1].splitlines()] == [None, "admin"]
    code, out, err = mailgateHere(source, "db", "copy", "--from", source, "--to", target)
    assert (code, err) == (0, ""), out
    assert mailgateHere(target, "mailbox", "deleted", ALICE, "--json") == before
    assert mailgateHere(target, "mailbox", "deleted", ALICE) == mailgateHere(source, "mailbox", "deleted", ALICE)


def test_whoShowsTheMasterUserInAColumnOfItsOwn(store, databaseURL):
    """
    The installed C{mailgate who}: a MASTER column, as wide as the longest
    master user's name, C{-} for a user's own login; SINCE stays in line.
    C{--json}'s C{master} is the name, C{null} for the user's own.
    """
    from e2e import AdminCommand

    long = "helpdesk.second-level@support.example.org"
    resultOf(store.addMasterUser(long, makeCredentials("long-pw", logN=TEST_HASH_COST).passwordHash))
    store.sessions.name = "node-a[1]"
    helpdesk, own = _session(store), _session(store)
    assert helpdesk.login(f"{ALICE}*{long}", "long-pw").startswith("+OK")
    assert own.login(BOB, "bob-pw").startswith("+OK")
    resultOf(store.sessions.flush())
    cli = AdminCommand(databaseURL)
    lines = cli.check("who").splitlines()
    assert lines[0].split() == ["USER", "NODE", "CLIENT", "MASTER", "SINCE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows[ALICE].split()[1:4] == ["node-a[1]", "127.0.0.1:40000", long]
    assert rows[BOB].split()[1:4] == ["node-a[1]", "127.0.0.1:40000", "-"]
    # MASTER and SINCE begin where each row's name and time do.
    assert lines[0].index("MASTER") == rows[ALICE].index(long) == rows[BOB].index(" - ") + 1
    assert {lines[0].index("SINCE")} == {len(line) - len("2026-12-06T16:53:41Z") for line in lines[1:]}
    records = {r["user"]: r for r in map(json.loads, cli.check("who", "--json").splitlines())}
    assert {user: r["master"] for user, r in records.items()} == {ALICE: long, BOB: None}
    assert set(records[ALICE]) == {"user", "node", "client", "master", "since"}
    helpdesk.command("QUIT")
    own.command("QUIT")
