"""
A client's retry of a message mailgate already committed (it lost the 250:
a timeout, a cut connection, a node killed between the commit and the
reply) is recognised by the message's delivery key, answered as delivered
and not stored twice (C{--duplicate-window}).  Another message, the same
octets from another sender or by another protocol, a message without a
Date, Message-ID or Received field, and anything past the window are
stored as always.  Through the store on both backends, two nodes
delivering the same message at once on PostgreSQL, SMTP and LMTP
sessions, C{mailgate deliver}, and a real server whose client hung up
before the reply.
"""

import io
import secrets
import smtplib
import socket
import tracemalloc

from twisted.logger import formatEvent

from e2e import DEADLINE, mailgate_cli, mailgate_server, popLogin, sqliteOnly, waitFor  # noqa: F401 (fixtures)
from mailgate.message import DeliveryKey, spoolBytes
from mailgate.metrics import Metrics
from mailgate.records import AlreadyDelivered
from mailgate.testing import SMTPSession, addUser, memoryStore, resultOf
from test_lifecycle import Clocked, store  # noqa: F401 (store: alice and bob, on each backend)

ALICE = "alice@example.org"
BOB = "bob@example.org"
SENDER = "sender@remote.test"


def message(n=1):
    return (
        b"Date: Sat, 05 Dec 2026 13:00:00 +0000\r\nMessage-ID: <report.%d@remote.test>\r\n"
        b"Subject: report %d\r\n\r\nthe same octets\r\n" % (n, n)
    )


def keyed(octets, sender=SENDER, protocol="smtp"):
    """
    A message source with the delivery key SMTP gives C{octets}.
    """
    source = spoolBytes(octets)
    key = DeliveryKey(protocol, sender)
    key.update(octets)
    source.deliveryKey = key.key()
    return source


def maildrop(store, address=ALICE):
    return [m.uniqueId for m in resultOf(store.listMessages(address))]


# -- the store ------------------------------------------------------------------


def test_theSameMessageAgainIsAnsweredWithTheFirstCopysId(store):
    first = resultOf(store.deliver([ALICE, BOB], keyed(message())))
    assert not any(isinstance(uid, AlreadyDelivered) for uid in first.values())
    again = resultOf(store.deliver([ALICE, BOB], keyed(message())))
    assert again == first and all(isinstance(uid, AlreadyDelivered) for uid in again.values())
    assert maildrop(store, ALICE) == [first[ALICE]] and maildrop(store, BOB) == [first[BOB]]
    # Quotas count the one copy.
    assert resultOf(store.quotaOf(ALICE)).usedMessages == 1
    # A retry for one recipient the first delivery did not have: she gets
    # it, he is answered with his copy.
    carol = "carol@example.org"
    addUser(store, carol, "c")
    mixed = resultOf(store.deliver([ALICE, carol], keyed(message())))
    assert mixed[ALICE] == first[ALICE] and isinstance(mixed[ALICE], AlreadyDelivered)
    assert not isinstance(mixed[carol], AlreadyDelivered) and maildrop(store, carol) == [mixed[carol]]


def test_onlyTheSameMessageFromTheSameSenderIsARetry(store):
    deliver = lambda source: resultOf(store.deliver([ALICE], source))[ALICE]  # noqa: E731
    uids = [
        deliver(keyed(message(1))),
        deliver(keyed(message(2))),  # other octets
        deliver(keyed(message(1), sender="other@remote.test")),
        deliver(keyed(message(1), protocol="lmtp")),
        # No key (an import, a quota warning): always stored.
        deliver(spoolBytes(message(1))),
    ]
    assert not any(isinstance(uid, AlreadyDelivered) for uid in uids)
    assert maildrop(store) == uids


def test_messagesWithoutAnIdentifyingFieldHaveNoKey():
    """
    Bare octets (a device's or a script's alert, with no Message-ID nor
    trace field; a Date: alone does not tell two sent in one second
    apart) may be sent again as a new message: no key, stored every time.
    Found in the header section only, whatever the pieces the octets
    arrive in.
    """

    def keyOf(octets, piece):
        key = DeliveryKey("smtp", SENDER)
        for start in range(0, len(octets), piece):
            key.update(octets[start : start + piece])
        return key.key()

    for piece in (1, 3, 1 << 16):
        assert keyOf(b"Subject: disk full\r\n\r\nDate: in the body\r\n", piece) is None
        assert keyOf(b"Subject: x\r\nMessage-ID: <1@remote.test>\r\n\r\nbody\r\n", piece) is not None
        assert keyOf(b"received : from mx.remote.test\r\n\r\n", piece) is not None
        assert keyOf(b"Subject: x\nMESSAGE-ID: <2@remote.test>\n\nbody\n", piece) is not None
        assert keyOf(b"Subject: x\r\nDate: Sat, 05 Dec 2026 13:00:00 +0000\r\n\r\nbody\r\n", piece) is None
    assert keyOf(b"X-Filler: " + b"x" * 70_000 + b"\r\nMessage-ID: <late@x>\r\n\r\n", 1 << 16) is None
    assert keyOf(message(1), 7) == keyOf(message(1), 1 << 16) != keyOf(message(2), 7)


def test_aHeaderLineInOneOctetPiecesIsNotCopiedAtEachOctet():
    """
    BDAT chunks may be an octet each: the line being looked at grows in
    place, not joined to the piece and split again at every octet (which
    held two copies of the line at once and copied it twice per octet: a
    chunk 64 KB into the line cost three times one at its start).  Past
    the octets looked at, a field is not looked for.
    """
    pieces = [b"%c" % (65 + i % 26) for i in range(60_000)]
    key = DeliveryKey("smtp", SENDER)
    key.update(b"X-Long: ")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for piece in pieces:
            key.update(piece)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * len(pieces), peak
    key.update(b"\r\nMessage-ID: <long@x>\r\n\r\n")
    whole = DeliveryKey("smtp", SENDER)
    whole.update(b"X-Long: " + b"".join(pieces) + b"\r\nMessage-ID: <long@x>\r\n\r\n")
    assert key.key() == whole.key() is not None
    late = DeliveryKey("smtp", SENDER)
    for octet in b"X-Filler: " + b"x" * 70_000:
        late.update(bytes((octet,)))
    late.update(b"\r\nMessage-ID: <late@x>\r\n\r\n")
    assert late.key() is None


def test_pastTheWindowTheSameOctetsAreStoredAgain(store):
    clock = Clocked(store)
    store.limits.duplicateWindow = 3600
    first = resultOf(store.deliver([ALICE], keyed(message())))[ALICE]
    clock.now += 3599
    assert resultOf(store.deliver([ALICE], keyed(message())))[ALICE] == first
    clock.now += 2
    later = resultOf(store.deliver([ALICE], keyed(message())))[ALICE]
    assert not isinstance(later, AlreadyDelivered) and maildrop(store) == [first, later]
    # And the window starts again from that copy.
    clock.now += 10
    assert resultOf(store.deliver([ALICE], keyed(message())))[ALICE] == later


def test_aWindowOfZeroStoresEveryCopy(store):
    store.limits.duplicateWindow = 0
    uids = [resultOf(store.deliver([ALICE], keyed(message())))[ALICE] for _ in range(2)]
    assert maildrop(store) == uids and len(set(uids)) == 2


def test_anAddressGivenToSomeoneElseAfterARenameGetsItsOwnCopy(store, databaseURL):
    """
    Alice renamed to Carol by the admin command (another process), and a
    new Alice added: a message to both, on a server that still remembers
    Alice's old user id, gives each her copy.  It gave Carol both, and
    on PostgreSQL failed every time for her key written twice.
    """
    carol = "carol@example.org"
    first = resultOf(store.deliver([ALICE], keyed(message(1))))[ALICE]
    admin = memoryStore(databaseURL)
    try:
        resultOf(admin.renameUser(ALICE, carol))
        addUser(admin, ALICE, "new alice")
    finally:
        admin.close()
    both = resultOf(store.deliver([ALICE, carol], keyed(message(2))))
    assert not any(isinstance(uid, AlreadyDelivered) for uid in both.values())
    assert maildrop(store, ALICE) == [both[ALICE]]
    assert maildrop(store, carol) == [first, both[carol]]


def test_theRetentionTaskForgetsWhatIsPastEveryLiveNodesWindow(databaseURL):
    """
    Past the window, the deliveries kept to know a retry are removed by
    the retention task, but not while another live node goes by a longer
    window (it would store a retry twice); a user removed takes hers.
    """
    from test_store import query

    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(a, ALICE, "wonderland")
        addUser(a, BOB, "builder")
        clocks = [Clocked(a), Clocked(b)]
        a.limits.duplicateWindow, b.limits.duplicateWindow = 3600, 7200
        resultOf(b.sessions.flush())
        assert ("--duplicate-window", 3600, b.sessions.name, 7200) in resultOf(a.sessions.otherSettings())
        for n in range(5):
            resultOf(a.deliver([ALICE, BOB], keyed(message(n))))
        assert query(a, "SELECT count(*) FROM recent_deliveries") == [(10,)]
        for clock in clocks:
            clock.now += 3601
        resultOf(b.sessions.flush())
        assert resultOf(a.forgetDeliveries()) == 0
        # B, which goes by two hours, still knows a retry.
        assert isinstance(resultOf(b.deliver([ALICE], keyed(message(0))))[ALICE], AlreadyDelivered)
        resultOf(b.sessions.leave())
        assert resultOf(a.forgetDeliveries(limit=3)) == 3
        assert resultOf(a.forgetDeliveries()) == 7
        assert query(a, "SELECT count(*) FROM recent_deliveries") == [(0,)]
        resultOf(a.deliver([ALICE, BOB], keyed(message(9))))
        resultOf(a.deleteUser(BOB))
        assert query(a, "SELECT count(*) FROM recent_deliveries") == [(1,)]
    finally:
        a.close()
        b.close()


def test_oneRetentionRoundKeepsUpWithABusyServer(store):
    """
    A round of the retention task (every ten minutes) forgets the
    deliveries of a busy server's ten minutes: it forgot 10,000 at most,
    fewer than a server storing 1.4 million copies a day keeps, and the
    table grew without end.  Those still within the window stay.
    """
    import os
    import time

    from twisted.internet.testing import MemoryReactorClock

    from mailgate.store.housekeeping import RetentionService
    from test_store import query

    [(aliceId,)] = query(store, "SELECT user_id FROM users WHERE address = ?", (ALICE,))
    now = int(time.time())

    def insert(cursor, count, deliveredAt):
        for start in range(0, count, 500):
            rows = [(aliceId, os.urandom(16), "x", deliveredAt) for _ in range(min(500, count - start))]
            cursor.execute(
                "INSERT INTO recent_deliveries (user_id, delivery_key, uidl, delivered_at) VALUES "
                + ",".join(["(?, ?, ?, ?)"] * len(rows)),
                [value for row in rows for value in row],
            )

    store.database.run(insert, 12_000, now - 2 * 86400, write=True)
    store.database.run(insert, 7, now - 60, write=True)
    retention = RetentionService(store, MemoryReactorClock())
    resultOf(retention.runOnce())
    assert query(store, "SELECT count(*) FROM recent_deliveries") == [(7,)]


def test_theSameMessageTwiceInOneGroupCommitIsStoredOnce(databaseURL):
    """
    Deliveries waiting for the same commit run as one; two of them the
    same message for the same user (a retry arriving while the first is
    being committed) still give her one copy.
    """
    from pumped import PumpedReactor
    from test_lifecycle import threadedStore

    setup = memoryStore(databaseURL)
    addUser(setup, ALICE, "wonderland")
    setup.close()
    reactor = PumpedReactor()
    node = threadedStore(databaseURL, reactor)
    outcomes = []
    try:
        for n in (1, 1, 2, 1):
            node.deliver([ALICE], keyed(message(n))).addBoth(outcomes.append)
        reactor.pump(lambda: len(outcomes) == 4, timeout=60)
    finally:
        node.database.close()
    uids = [o[ALICE] for o in outcomes]
    assert all(isinstance(uid, str) for uid in uids), outcomes
    assert uids[0] == uids[1] == uids[3] != uids[2]
    assert [isinstance(uid, AlreadyDelivered) for uid in uids] == [False, True, False, True]
    check = memoryStore(databaseURL)
    try:
        assert maildrop(check) == [uids[0], uids[2]]
    finally:
        check.close()


# -- two nodes at the same moment (PostgreSQL) ------------------------------------


def _delivery(engine, address, n, userIds):
    """
    A delivery as the group-commit writer hands it over: C{(function,
    args, kwargs)} for L{mailgate.store.database.runBatch}.  Those of one
    node share C{userIds} (its writer's cache): only then does a batch run
    them as one call.
    """
    from mailgate.store.sql import NO_QUOTA, _deliver

    return (_deliver, (engine, [address], keyed(message(n)), 1_800_000_000, True, userIds, NO_QUOTA, 3600), {})


def _inThread(work):
    """
    Start C{work()} on a thread; the returned list gets C{("ok", result)}
    or C{("error", exception)} when it ends.
    """
    import threading

    outcome = []

    def run():
        try:
            outcome.append(("ok", work()))
        except Exception as e:
            outcome.append(("error", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _waitUntilWaiting(watcher, conn, thread):
    """
    Return once C{conn}'s session waits for a lock another session holds
    (bounded); C{thread} is the one running its statement.
    """
    import time

    deadline = time.monotonic() + DEADLINE
    waiting = "SELECT cardinality(pg_blocking_pids(%s))"
    while watcher.execute(waiting, (conn.info.backend_pid,)).fetchone()[0] == 0:
        assert thread.is_alive(), "it finished without waiting for the other transaction"
        assert time.monotonic() < deadline, "it never waited for the other transaction"
        time.sleep(0.01)


def _watcher(url):
    import psycopg

    from mailgate.store.postgres import _conninfo

    return psycopg.connect(_conninfo(url), autocommit=True)


def _userId(store, address):
    from test_store import query

    [(userId,)] = query(store, "SELECT user_id FROM users WHERE address = ?", (address,))
    return userId


def test_twoNodesGivenTheSameRetryAtOnceStoreItOnce(postgresURL):
    """
    Two nodes handed the same message for Alice at the same moment (an
    MTA's retry reaching a second node while the first is committing the
    first copy): the second waits for the first to commit, then finds its
    copy and answers with its unique id.  Both used to look before either
    had committed, find nothing, and both store it.  The interleaving is
    forced: the first delivery runs in a transaction left open, the second
    starts on another connection, and the first commits only once the
    second waits for it.
    """
    from mailgate.store.database import runBatch
    from mailgate.store.postgres import DELIVERY_LOCK_CLASS
    from mailgate.store.sql import _deliverOne

    node = memoryStore(postgresURL)
    engine = node.engine
    other = engine.connect()
    try:
        addUser(node, ALICE, "wonderland")
        first = node.database.connection
        cursor = engine.begin(first, True)
        with engine.pipeline(first):
            delivered = _deliverOne(cursor, engine, [ALICE], keyed(message()), 1_800_000_000, window=3600)
        uid = delivered[ALICE]
        assert not isinstance(uid, AlreadyDelivered)
        with _watcher(postgresURL) as watcher:
            # One lock, of the two-int4 form (objsubid 2) in a class of its
            # own: never one of mailgate's single-key locks (objsubid 1).
            held = "SELECT classid::bigint, objsubid FROM pg_locks WHERE locktype = 'advisory' AND pid = %s"
            assert watcher.execute(held, (first.info.backend_pid,)).fetchall() == [(DELIVERY_LOCK_CLASS, 2)]
            # The second node's delivery, pipelined as its writer runs it.
            thread, outcome = _inThread(lambda: runBatch(engine, other, [_delivery(engine, ALICE, 1, {})]))
            _waitUntilWaiting(watcher, other, thread)
        first.commit()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the second delivery did not finish"
        [(kind, results)] = outcome
        assert kind == "ok", results
        [(ok, again)] = results
        assert ok, again
        assert isinstance(again[ALICE], AlreadyDelivered) and again[ALICE] == uid
        assert maildrop(node) == [uid]
        assert resultOf(node.quotaOf(ALICE)).usedMessages == 1
    finally:
        other.close()
        node.close()


def test_otherMessagesAndOtherUsersDoNotWaitForADeliveryBeingCommitted(postgresURL):
    """
    While one node commits a message for Alice, the same message for Bob
    is stored at once by another, and the duplicate check's lock of
    another message for Alice is taken at once too (her delivery itself
    waits for her mailbox's counters, as it always did).  A wait is an
    error here (lock_timeout), not a hang.
    """
    from mailgate.store.database import runBatch
    from mailgate.store.sql import _deliverOne

    node = memoryStore(postgresURL)
    engine = node.engine
    other = engine.connect()
    try:
        addUser(node, ALICE, "wonderland")
        addUser(node, BOB, "builder")
        first = node.database.connection
        cursor = engine.begin(first, True)
        _deliverOne(cursor, engine, [ALICE], keyed(message(1)), 1_800_000_000, window=3600)
        with other.cursor() as setting:
            setting.execute("SET lock_timeout = '5s'")
        other.commit()
        [(ok, bobs)] = runBatch(engine, other, [_delivery(engine, BOB, 1, {})])
        assert ok and not isinstance(bobs[BOB], AlreadyDelivered), bobs
        # Her other message's lock, and Bob's, alone.
        locking = engine.begin(other, True)
        engine.lockDeliveries(
            locking,
            [(_userId(node, ALICE), keyed(message(2)).deliveryKey), (_userId(node, BOB), keyed(message(1)).deliveryKey)],
        )
        engine.rollback(other)
        first.commit()
        assert len(maildrop(node, ALICE)) == 1 and maildrop(node, BOB) == [bobs[BOB]]
    finally:
        other.close()
        node.close()


def test_anotherSchemasDeliveryOfTheSameMessageToItsUserOfTheSameIdDoesNotWait(postgresURL):
    """
    Advisory locks are the whole database's, and user ids start at 1 in
    every schema: a second mailgate in another schema of the same database
    (another deployment; the suite's tests side by side), storing the same
    message for its Alice (id 1 there too) while this one's delivery to
    Alice is being committed, does so at once rather than wait for it
    (before, it waited, and a suite run failed on the lock timeout).  A
    wait is an error here (lock_timeout), not a hang.
    """
    import psycopg

    from conftest import withSchema
    from mailgate.store.database import runBatch
    from mailgate.store.sql import _deliverOne

    base = postgresURL.split("?", 1)[0]
    schema = "t_other_" + secrets.token_hex(4)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    node = memoryStore(postgresURL)
    elsewhere = memoryStore(withSchema(base, schema))
    other = elsewhere.engine.connect()
    try:
        for store in (node, elsewhere):
            addUser(store, ALICE, "wonderland")
        assert _userId(node, ALICE) == _userId(elsewhere, ALICE)
        first = node.database.connection
        cursor = node.engine.begin(first, True)
        _deliverOne(cursor, node.engine, [ALICE], keyed(message(1)), 1_800_000_000, window=3600)
        with other.cursor() as setting:
            setting.execute("SET lock_timeout = '5s'")
        other.commit()
        [(ok, stored)] = runBatch(elsewhere.engine, other, [_delivery(elsewhere.engine, ALICE, 1, {})])
        assert ok and not isinstance(stored[ALICE], AlreadyDelivered), stored
        first.commit()
        assert maildrop(elsewhere, ALICE) == [stored[ALICE]] and len(maildrop(node, ALICE)) == 1
    finally:
        other.close()
        elsewhere.close()
        node.close()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_batchesWithTheSameMessagesInOtherOrdersDoNotDeadlock(postgresURL):
    """
    Two nodes' group commits holding the same three messages for Alice,
    in opposite orders, both finish: each takes the locks in the same
    (sorted) order.  Taken in each batch's own order, the first would hold
    message 1 and wait for 2, the second hold 3 and wait for 2; once a
    third transaction holding 2 lets go, one of them gets it and waits for
    3: a deadlock, which PostgreSQL breaks by failing one of them.
    """
    from mailgate.store.database import runBatch

    node = memoryStore(postgresURL)
    engine = node.engine
    connections = [engine.connect(), engine.connect()]
    threads = []
    try:
        addUser(node, ALICE, "wonderland")
        holder = node.database.connection
        engine.lockDeliveries(engine.begin(holder, True), [(_userId(node, ALICE), keyed(message(2)).deliveryKey)])
        outcomes = []
        with _watcher(postgresURL) as watcher:
            for conn, order in zip(connections, ([1, 2, 3], [3, 2, 1])):
                userIds = {}
                batch = [_delivery(engine, ALICE, n, userIds) for n in order]
                thread, outcome = _inThread(lambda conn=conn, batch=batch: runBatch(engine, conn, batch))
                threads.append(thread)
                outcomes.append(outcome)
                _waitUntilWaiting(watcher, conn, thread)
        engine.rollback(holder)
        for thread in threads:
            thread.join(DEADLINE)
        assert not any(thread.is_alive() for thread in threads), "a batch did not finish"
        results = []
        for [(kind, batch)] in outcomes:
            assert kind == "ok", batch
            assert all(ok for ok, _ in batch), batch
            results.append([value[ALICE] for _, value in batch])
        forward, backward = results[0], results[1][::-1]
        assert forward == backward
        stored = [isinstance(uid, AlreadyDelivered) for uid in forward + backward]
        assert sorted(stored) == [False] * 3 + [True] * 3
        assert sorted(maildrop(node)) == sorted(forward)
    finally:
        for conn in connections:
            conn.close()
        node.close()


def test_aGroupCommitLooksUpEachDeliveryOnce(tmp_path):
    """
    The deliveries of a group commit are looked up at a cost that grows
    with their number, not its square: the look-up asked for every
    recipient with every message's key, n^2 probes for n messages to n
    users (in SQLite's own count of the steps it ran), which under load
    made each delivery's look-up cost more than the delivery itself.
    """
    import time

    from mailgate.store.sql import _alreadyDelivered

    store = memoryStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    try:
        users = [f"user{n}@example.org" for n in range(120)]
        for n, address in enumerate(users):
            addUser(store, address, "pw")
            resultOf(store.deliver([address], keyed(message(n))))
        connection = store.database.connection

        def steps(count):
            now = int(time.time())
            together = [([users[n]], keyed(message(n)), now, True) for n in range(count)]
            counted = []
            connection.set_progress_handler(lambda: counted.append(1), 100)
            try:
                found = store.database.run(_alreadyDelivered, store.engine, together, {}, 3600)
            finally:
                connection.set_progress_handler(None, 0)
            # Each one is a retry, found.
            assert sorted(found) == list(range(count))
            return len(counted)

        small, large = steps(30), steps(120)
        assert large < 6 * small, (small, large)
    finally:
        store.close()


# -- SMTP and LMTP sessions ---------------------------------------------------------


def test_smtpAnswersARetryAsDeliveredAndSaysSo(store, logEvents):
    metrics = Metrics()
    replies = [
        SMTPSession(store, metrics=metrics).sendMail(SENDER, [ALICE, BOB], message()).splitlines()[-1]
        for _ in range(2)
    ]
    assert replies[0].startswith("250 2.0.0 OK: message accepted as ")
    assert replies[1] == "250 2.0.0 OK: already delivered, not stored again (a retry of the same message)"
    assert len(maildrop(store, ALICE)) == len(maildrop(store, BOB)) == 1
    sample = metrics.registry.get_sample_value
    assert sample("mailgate_deliveries_total", {"protocol": "smtp", "result": "accepted"}) == 1
    assert sample("mailgate_deliveries_total", {"protocol": "smtp", "result": "duplicate"}) == 1
    delivered = [e for e in logEvents if e.get("event") == "smtp.delivered"]
    assert "duplicate" not in delivered[0]
    assert delivered[1]["duplicates"] == [ALICE, BOB]
    assert f" duplicate={ALICE},{BOB} " in formatEvent(delivered[1])
    # The same octets without a date or Message-ID: a new message.
    bare = b"Subject: ping\r\n\r\nalive\r\n"
    for _ in range(2):
        assert "already delivered" not in SMTPSession(store).sendMail(SENDER, [ALICE], bare)
    assert len(maildrop(store, ALICE)) == 3


def test_lmtpAnswersEachRecipientOfARetry(store):
    carol = "carol@example.org"
    addUser(store, carol, "c")
    first = SMTPSession(store, lmtp=True).sendMail(SENDER, [ALICE], message(), hello="LHLO mx.test")
    [uid] = maildrop(store, ALICE)
    assert first.splitlines()[-1] == f"250 2.0.0 <{ALICE}> delivered as {uid}"
    again = SMTPSession(store, lmtp=True).sendMail(SENDER, [ALICE, carol], message(), hello="LHLO mx.test")
    [carolsUid] = maildrop(store, carol)
    assert again.splitlines()[-2:] == [
        f"250 2.0.0 <{ALICE}> already delivered as {uid}",
        f"250 2.0.0 <{carol}> delivered as {carolsUid}",
    ]
    assert maildrop(store, ALICE) == [uid]


# -- mailgate deliver, and a real server ------------------------------------------------


def test_deliverRecognisesTheMTAsRetry(tmp_path, cheapCommandHashes):
    from mailgate.cli import run

    database = f"sqlite:///{tmp_path / 'mail.sqlite3'}"

    def mailgate(*argv, stdin=b""):
        out, err = io.StringIO(), io.StringIO()
        wrapped = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        code = run(["--database", database, *argv], stdin=wrapped, stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    assert mailgate("user", "add", ALICE, "--password-stdin", stdin=b"wonderland\n")[0] == 0
    code, out, _ = mailgate("deliver", "-f", SENDER, ALICE, stdin=message())
    assert code == 0 and out.startswith(f"delivered to {ALICE} as ")
    uid = out.split()[-1]
    code, out, _ = mailgate("deliver", "-f", SENDER, ALICE, stdin=message())
    assert (code, out) == (0, f"already delivered to {ALICE} as {uid} (the same message again: not stored twice)\n")
    code, out, _ = mailgate("deliver", "-f", "other@remote.test", ALICE, stdin=message())
    assert code == 0 and out.startswith(f"delivered to {ALICE} as ")
    # Given back on purpose (mail she deleted): stored again.
    code, out, _ = mailgate("deliver", "--again", "-f", SENDER, ALICE, stdin=message())
    assert code == 0 and out.startswith(f"delivered to {ALICE} as ") and uid not in out
    assert len(mailgate("mailbox", "list", ALICE, "--json")[1].splitlines()) == 3


@sqliteOnly
def test_aClientThatHungUpBeforeThe250IsNotGivenTwoCopies(mailgate_server, mailgate_cli):
    """
    The story behind it: the client sends its message and, before reading
    the reply, goes away (its timeout; here, it closes the connection at
    once).  The message was committed; the client's MTA tries again later,
    and the user, reading by POP3, has it once.
    """
    mailgate_cli.addUser(ALICE, "wonderland")
    server = mailgate_server("--smtp", "tcp:0:interface=127.0.0.1", "--domain", "example.org")
    wire = message().replace(b"\r\n.", b"\r\n..")
    with socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=DEADLINE) as raw:
        raw.recv(512)
        raw.sendall(
            b"EHLO mx.remote.test\r\n"
            + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode()
        )
        received = b""
        while received.count(b"\r\n354 ") + received.startswith(b"354 ") == 0:
            chunk = raw.recv(4096)
            assert chunk, received
            received += chunk
        raw.sendall(wire + b".\r\n")
    def stored():
        return len(mailgate_cli.check("mailbox", "list", ALICE, "--json").splitlines())

    waitFor(lambda: stored() == 1, "the first copy stored")
    client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), local_hostname="mx.remote.test", timeout=DEADLINE)
    try:
        assert client.sendmail(SENDER, [ALICE], message()) == {}
    finally:
        client.quit()
    pop = popLogin(server, ALICE, "wonderland")
    try:
        assert pop.stat()[0] == 1
    finally:
        pop.quit()
    waitFor(lambda: f"duplicate={ALICE}" in server.stdout, "the retry's log line")
