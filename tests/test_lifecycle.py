"""
A maildrop's lifecycle in the store, on both backends (the C{databaseURL}
fixture): storage use and quotas, retention, kept deleted mail, renaming,
expunging and the registry of POP3 sessions.

The store is driven synchronously here; where concurrency is the point
(two nodes delivering to one user at once), real worker threads run
against the real database.
"""

import pytest
from twisted.python.failure import Failure

from mailgate.errors import NoSuchUser, QuotaExceeded
from mailgate.message import spoolBytes
from mailgate.store import engineFromURL
from mailgate.store.database import Database
from mailgate.store.lifecycle import DEFAULT, UNLIMITED, formatSize, parseSize
from mailgate.store.sql import SQLMailStore
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf
from pumped import PumpedReactor

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"


def message(n, filler=0):
    return b"Subject: message %d\r\n\r\n" % n + b"x" * filler + b"body\r\n"


@pytest.fixture
def store(databaseURL):
    s = memoryStore(databaseURL)
    addUser(s, ALICE, "wonderland")
    addUser(s, BOB, "builder")
    yield s
    s.close()


def failureOf(d):
    """
    The failure of an already-fired L{Deferred} that must have failed.
    """
    box = []
    d.addBoth(box.append)
    assert box and isinstance(box[0], Failure), box
    return box[0]


def usage(store, address):
    status = resultOf(store.quotaOf(address))
    return status.usedMessages, status.usedOctets


def users(store):
    return {u.address: u for u in resultOf(store.listUsers())}


# -- sizes ---------------------------------------------------------------------


def test_sizesAsAdministratorsWriteThem():
    assert parseSize("1G") == 1 << 30
    assert parseSize("500M") == 500 << 20
    assert parseSize("64k") == 64 << 10
    assert parseSize("1GiB") == 1 << 30
    assert parseSize("12345") == 12345
    for bad in ("", "G", "1.5G", "-1", "10X", "1 G B"):
        with pytest.raises(ValueError):
            parseSize(bad)
    assert [formatSize(n) for n in (1 << 30, 1536 << 10, 1000, 0)] == ["1G", "1536K", "1000", "0"]


# -- storage use -----------------------------------------------------------------


def test_useFollowsDeliveriesAndDeletions(store):
    one, two = message(1), message(2, 100)
    deliver(store, [ALICE, BOB], one)
    deliver(store, [ALICE], two)
    assert usage(store, ALICE) == (2, len(one) + len(two))
    assert usage(store, BOB) == (1, len(one))
    listed = users(store)
    assert (listed[ALICE].messages, listed[ALICE].octets) == (2, len(one) + len(two))

    session = POP3Session(store)
    session.login(ALICE, "wonderland")
    assert session.command("DELE 2").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")
    assert usage(store, ALICE) == (1, len(one))
    # The other recipient's copy is not touched.
    assert usage(store, BOB) == (1, len(one))


def test_useSurvivesTheMigrationOfAnExistingDatabase(databaseURL):
    """
    A database made before quotas existed gets its use computed once, by
    the migration.
    """
    from mailgate.store import openSynchronousStore
    from mailgate.store.database import runTransaction
    from mailgate.store.schema import MIGRATIONS, applyMigration

    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    try:
        from mailgate.store.schema import _ensureVersionTable

        runTransaction(engine, conn, lambda c: (_ensureVersionTable(c), applyMigration(c, engine, MIGRATIONS[0])), (), {}, True)

        def old(cursor):
            cursor.execute(
                "INSERT INTO users (address, domain, password_hash, created_at) VALUES (?, ?, ?, ?) RETURNING user_id",
                (ALICE, "example.org", "x", 0),
            )
            (userId,) = cursor.fetchone()
            cursor.execute("INSERT INTO mailboxes (user_id, uid_validity, next_uid) VALUES (?, 7, 3)", (userId,))
            for uid, size in ((1, 100), (2, 250)):
                cursor.execute(
                    "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (userId, uid, f"u{uid}", userId, f"b{uid}", size, 10, 1000 + uid),
                )

        runTransaction(engine, conn, old, (), {}, True)
    finally:
        conn.close()
    upgraded = openSynchronousStore(databaseURL)
    try:
        assert usage(upgraded, ALICE) == (2, 350)
    finally:
        upgraded.close()


# -- quotas at delivery --------------------------------------------------------


def test_aFullMailboxRefusesOnlyItsOwnCopy(store):
    """
    LMTP-style delivery (partial): the recipient over quota gets a
    QuotaExceeded result and nothing; the others get the message.
    """
    first = message(1)
    deliver(store, [ALICE], first)
    resultOf(store.setQuota(ALICE, len(first) + 10))
    results = resultOf(store.deliver([ALICE, BOB], spoolBytes(message(2))))
    assert isinstance(results[ALICE], QuotaExceeded)
    assert results[ALICE].addresses == (ALICE,)
    assert isinstance(results[BOB], str)
    assert usage(store, ALICE) == (1, len(first))
    assert [m.size for m in resultOf(store.listMessages(ALICE))] == [len(first)]
    assert usage(store, BOB) == (1, len(message(2)))


def test_aFullMailboxRefusesTheWholeMessageWhenNotPartial(store):
    """
    SMTP-style delivery: one recipient over quota and nobody gets it.
    """
    resultOf(store.setQuota(ALICE, 10))
    d = store.deliver([BOB, ALICE], spoolBytes(message(1)), partial=False)
    failure = failureOf(d)
    assert failure.check(QuotaExceeded)
    assert failure.value.addresses == (ALICE,)
    assert resultOf(store.listMessages(BOB)) == []
    assert usage(store, BOB) == (0, 0)


def test_aMessageThatFitsExactlyIsAccepted(store):
    body = message(1)
    resultOf(store.setQuota(ALICE, 2 * len(body)))
    assert isinstance(deliver(store, [ALICE], body)[ALICE], str)
    assert isinstance(deliver(store, [ALICE], body)[ALICE], str)
    assert isinstance(resultOf(store.deliver([ALICE], spoolBytes(b"x\r\n")))[ALICE], QuotaExceeded)


def test_messageCountQuota(store):
    resultOf(store.setQuota(ALICE, messages=2))
    outcomes = [resultOf(store.deliver([ALICE], spoolBytes(message(n))))[ALICE] for n in range(3)]
    assert [isinstance(o, str) for o in outcomes] == [True, True, False]
    assert isinstance(outcomes[2], QuotaExceeded)


def test_defaultQuotaAndTheUsersOwn(store):
    body = message(1)
    store.limits.quotaOctets = len(body)
    deliver(store, [ALICE], body)
    assert isinstance(resultOf(store.deliver([ALICE], spoolBytes(body)))[ALICE], QuotaExceeded)
    # Her own quota replaces the default, in either direction.
    resultOf(store.setQuota(ALICE, UNLIMITED))
    assert isinstance(deliver(store, [ALICE], body)[ALICE], str)
    resultOf(store.setQuota(ALICE, DEFAULT))
    assert isinstance(resultOf(store.deliver([ALICE], spoolBytes(body)))[ALICE], QuotaExceeded)
    status = resultOf(store.quotaOf(ALICE))
    assert (status.quotaOctets, status.quotaMessages) == (len(body), None)
    listed = users(store)
    assert listed[ALICE].quotaOctets is None and listed[BOB].quotaOctets is None


def test_lowerQuotaKeepsStoredMail(store):
    """
    Mail already stored is never refused or lost because of a quota
    change: it stays, POP3 serves it, and only new mail is refused.
    """
    bodies = [message(n, 50) for n in range(3)]
    for body in bodies:
        deliver(store, [ALICE], body)
    resultOf(store.setQuota(ALICE, 1, messages=1))
    assert usage(store, ALICE) == (3, sum(map(len, bodies)))
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith(f"+OK {ALICE} has 3 messages")
    for n, body in enumerate(bodies, 1):
        assert session.command(f"RETR {n}").endswith(body.decode() + ".\r\n")
    assert session.command("QUIT").startswith("+OK")
    assert isinstance(resultOf(store.deliver([ALICE], spoolBytes(b"x\r\n")))[ALICE], QuotaExceeded)


def test_quotaOfAnUnknownUser(store):
    assert resultOf(store.quotaOf(CAROL)) is None
    failure = failureOf(store.setQuota(CAROL, 5))
    assert failure.check(NoSuchUser)


# -- exact under concurrency ------------------------------------------------------


def threadedStore(url, reactor):
    engine = engineFromURL(url)
    return SQLMailStore(Database(engine, reactor), engine.makeLocks(None) if engine.name == "sqlite" else None)


@pytest.mark.parametrize("partial", [False, True])
def test_concurrentDeliveriesNeverSqueezeUnderTheLimit(databaseURL, partial):
    """
    Two stores (two nodes) on one database, each with its own writer and
    group commit, deliver the same user's mail at the same time: exactly
    as many messages as fit are stored, however the deliveries interleave
    and batch, and her use is exact.  With a second recipient (partial),
    the full mailbox does not cost the other one anything.
    """
    setup = memoryStore(databaseURL)
    try:
        addUser(setup, ALICE, "pw")
        addUser(setup, BOB, "pw")
        body = message(0, 200)
        fit = 17
        resultOf(setup.setQuota(ALICE, fit * len(body)))
    finally:
        setup.close()

    reactor = PumpedReactor()
    nodes = [threadedStore(databaseURL, reactor) for _ in range(2)]
    outcomes = []
    try:
        recipients = [ALICE, BOB] if partial else [ALICE]
        for n in range(30):
            for node in nodes:
                node.deliver(recipients, spoolBytes(body), partial=partial).addBoth(outcomes.append)
        reactor.pump(lambda: len(outcomes) == 60, timeout=60)
    finally:
        for node in nodes:
            node.database.close()

    if partial:
        accepted = [o for o in outcomes if isinstance(o[ALICE], str)]
        refused = [o for o in outcomes if isinstance(o[ALICE], QuotaExceeded)]
        assert all(isinstance(o[BOB], str) for o in outcomes)
    else:
        accepted = [o for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, Failure) and o.check(QuotaExceeded)]
    assert len(accepted) == fit
    assert len(refused) == 60 - fit

    check = memoryStore(databaseURL)
    try:
        assert usage(check, ALICE) == (fit, fit * len(body))
        assert len(resultOf(check.listMessages(ALICE))) == fit
        uids = [m.uniqueId for m in resultOf(check.listMessages(ALICE))]
        assert len(set(uids)) == fit
        assert usage(check, BOB) == ((60, 60 * len(body)) if partial else (0, 0))
    finally:
        check.close()
